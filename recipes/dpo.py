"""DPO with prefix sharing and packing: the multi-GPU entry point.

    accelerate launch --config_file recipes/accelerate/<topology>.yaml recipes/dpo.py --config configs/<run>.yaml \
        [--any_field value ...]

<topology> is single_gpu, ddp, fsdp2 or zero3 (each file says what it trades). The YAML sets the dataset
(ScriptArguments in prefixdpo/cli.py), the training (prefixdpo.PrefixDPOConfig = trl.DPOConfig + prefix sharing) and
the model (trl.ModelConfig, LoRA included); flags after it override single fields. `prefixdpo train` runs the same
steps in one process.

The file reads top to bottom: parse, setup (tokenizer, data, trainer), train, save.
"""

import logging

from trl import get_peft_config, get_quantization_config

from prefixdpo import PrefixDPOTrainer
from prefixdpo.cli import load_datasets, load_tokenizer, parse_config, report_prepared_dataset


def main():
    # ---- Parse: YAML from --config, then command-line overrides.
    script_args, training_args, model_args = parse_config(prog="recipes/dpo.py")
    logging.basicConfig(
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )

    # ---- Setup: how the model is loaded (each process loads it; ZeRO-3/FSDP2 shard it on prepare).
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }

    # ---- Setup: tokenizer (eos as pad when it has none) and data (loaded, normalized to prompt/chosen/rejected,
    # bad rows dropped and counted).
    tokenizer = load_tokenizer(script_args, training_args, model_args)
    train_dataset, eval_dataset = load_datasets(script_args, training_args, tokenizer)

    # ---- Setup: the trainer (tokenizes with TRL's rules; reference model = frozen copy of the policy, or the
    # policy with its LoRA adapter disabled).
    trainer = PrefixDPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    report_prepared_dataset(len(train_dataset), trainer.train_dataset, training_args, "train")

    # ---- Train (resume_from_checkpoint: a checkpoint directory, or true for the latest in output_dir).
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # ---- Save: safetensors, gathered from all ranks (FSDP2: FULL_STATE_DICT; ZeRO-3: zero3_save_16bit_model).
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    # ---- Leave together: a process that exits while another still saves or pushes can take the group down.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
