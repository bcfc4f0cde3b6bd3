"""One training run from its three argument groups: what ``prefixdpo train`` and ``recipes/dpo.py`` both call.

    check output_dir -> tokenizer -> data -> trainer (model loads, data is normalized and tokenized) -> train -> save

Every check that can fail on the user's input runs before the model loads: the output directory (a previous run is
never overwritten), the checkpoint to resume from, the model and tokenizer paths, the data files.
"""

from __future__ import annotations

import logging
import os

from . import checkpoints
from .arguments import ScriptArguments
from .data.formats import PreferenceDataError, ensure_pad_token, rename_columns
from .data.loading import load_dataset_mixture, load_preference_dataset, split_for_evaluation

logger = logging.getLogger("prefixdpo")


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_path(name: str | None, field: str = "model_name_or_path") -> str:
    """``name`` when it is an existing local path or a Hub id; FileNotFoundError for a local path that does not exist."""
    if not name:
        raise PreferenceDataError(f"set {field} (a Hub id or a local directory) in the YAML or on the command line")
    if os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if _looks_local(name):
        raise FileNotFoundError(f"{field} {name!r} does not exist (no such local directory)")
    return name


def load_tokenizer(script_args: ScriptArguments, training_args, model_args):
    """The run's tokenizer (the model's unless ``tokenizer_name_or_path``), with eos as pad when it has none."""
    from transformers import AutoTokenizer

    field = "tokenizer_name_or_path" if script_args.tokenizer_name_or_path else "model_name_or_path"
    name = check_model_path(script_args.tokenizer_name_or_path or model_args.model_name_or_path, field)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"could not load the tokenizer of {field}={name!r}: {first}") from None
    ensure_pad_token(tokenizer)
    return tokenizer


def load_datasets(script_args: ScriptArguments, training_args, tokenizer, need_eval: bool | None = None):
    """The train split and (when evaluating) the eval split, as the data fields say: one dataset (``dataset_name``)
    or a mixture (``datasets``), column renames, ``test_split_size``, ``max_*_samples``. The trainer normalizes them
    (layout detection, bad rows) as it does every dataset."""
    if need_eval is None:
        need_eval = training_args.eval_strategy != "no"
    renames = dict(prompt_column=script_args.prompt_column, chosen_column=script_args.chosen_column,
                   rejected_column=script_args.rejected_column)
    streaming = script_args.dataset_streaming or script_args.streaming
    if streaming and training_args.batching == "token_budget":
        raise PreferenceDataError("streaming datasets have no length, which batching='token_budget' needs to group "
                                  "pairs; use batching='pairs' with streaming, or turn streaming off")

    def limit(ds, n):
        if n is None:
            return ds
        return ds.take(n) if not hasattr(ds, "__len__") else ds.select(range(min(n, len(ds))))

    # Several processes (accelerate launch): the main process downloads and caches first, the others then read the
    # cache.
    with training_args.main_process_first(desc="loading the dataset"):
        if script_args.datasets:
            train = load_dataset_mixture(script_args.datasets, tokenizer, streaming=streaming, renames=renames,
                                         on_bad_rows=training_args.on_bad_rows, num_proc=training_args.dataset_num_proc,
                                         pairs_from_ranks=training_args.pairs_from_ranks)
            evaluation = None
        else:
            if not script_args.dataset_name:
                raise PreferenceDataError("set dataset_name (a Hub id or a local path) or a `datasets` mixture in the "
                                          "YAML or on the command line")

            def load(split):
                ds = load_preference_dataset(script_args.dataset_name, script_args.dataset_config, split=split,
                                             revision=script_args.dataset_revision,
                                             data_files=script_args.dataset_data_files, streaming=streaming)
                return rename_columns(ds, **renames)

            train = load(script_args.dataset_train_split)
            evaluation = None
            if need_eval and script_args.test_split_size is None:
                if not script_args.dataset_test_split:
                    raise PreferenceDataError("eval_strategy is not 'no' but there is no evaluation split: set "
                                              "dataset_test_split or test_split_size, or eval_strategy: 'no'")
                evaluation = load(script_args.dataset_test_split)
        if script_args.test_split_size is not None:
            train, held_out = split_for_evaluation(train, script_args.test_split_size, training_args.seed)
            evaluation = held_out if need_eval else None
        elif need_eval and evaluation is None:
            raise PreferenceDataError("eval_strategy is not 'no' but a `datasets` mixture has no evaluation split: set "
                                      "test_split_size, or eval_strategy: 'no'")
    return limit(train, script_args.max_train_samples), limit(evaluation, script_args.max_eval_samples)


def build_trainer(script_args: ScriptArguments, training_args, model_args):
    """Everything before training: checks, tokenizer, data, the trainer (which loads the model(s))."""
    from trl import get_peft_config, get_quantization_config

    from .trainer import PrefixDPOTrainer

    checkpoints.check_start(training_args.output_dir, training_args.resume_from_checkpoint,
                            training_args.overwrite_output_dir)
    check_model_path(model_args.model_name_or_path)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    tokenizer = load_tokenizer(script_args, training_args, model_args)
    train_dataset, eval_dataset = load_datasets(script_args, training_args, tokenizer)
    trainer = PrefixDPOTrainer(
        model=check_model_path(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    if script_args.ignore_bias_buffers:  # TRL's dpo script does the same: DDP skips the boolean buffers
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    return trainer


def train_and_save(trainer, script_args: ScriptArguments, training_args):
    """Train, then save the final model, unless a signal stopped the run (its checkpoint is then what stays)."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.stop_on_signal.stopped_at is not None:
        return trainer
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if training_args.merge_adapters:
        trainer.accelerator.print(f"Merged model saved to {trainer.save_merged_model()}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def train(script_args: ScriptArguments, training_args, model_args):
    """The whole run from Python: set up, train, save. Returns the trainer."""
    return train_and_save(build_trainer(script_args, training_args, model_args), script_args, training_args)


# The exceptions that mean "the input is wrong" while a run is set up: printed as one line. During training every
# exception keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


def user_error(e: BaseException) -> str:
    """The one line a user mistake is reported with."""
    message = str(e).strip() or type(e).__name__
    return f"error: {message.splitlines()[0]}"


def main(argv: list[str] | None = None, prog: str = "prefixdpo train") -> int:
    """Parse, set up, train, save: ``prefixdpo train`` and ``accelerate launch recipes/dpo.py``. A mistake in the
    config, the data or the model path ends in one ``error:`` line and status 2; a run stopped by SIGTERM/SIGINT
    after saving its checkpoint ends with status 0."""
    import sys

    from .arguments import parse_config

    try:
        script_args, training_args, model_args = parse_config(argv, prog=prog)
        logging.getLogger("prefixdpo").setLevel(logging.INFO if training_args.process_index == 0 else logging.WARNING)
        trainer = build_trainer(script_args, training_args, model_args)
    except USER_ERRORS as e:
        print(user_error(e), file=sys.stderr)
        return 2
    train_and_save(trainer, script_args, training_args)
    # Leave together: a process that exits while another still saves or pushes can take the group down.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0
