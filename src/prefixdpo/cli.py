"""The ``prefixdpo`` command.

    prefixdpo train --config configs/qwen2.5-7b-ultrafeedback-lora.yaml [--any_field value ...]
    prefixdpo data-stats --config configs/llama3.1-8b-hh-rlhf-zero3.yaml [--data_stats_samples 20000]
    prefixdpo quickstart [--config configs/quickstart.yaml] [--any_field value ...]

A YAML file sets any field of the three argument groups below; flags on the command line override it (TRL's
``TrlParser``). ``prefixdpo train`` runs on one process; for several GPUs use ``accelerate launch recipes/dpo.py`` with
the same YAML (see docs/USAGE.md).

Argument groups: :class:`ScriptArguments` (the dataset), :class:`prefixdpo.PrefixDPOConfig` (training: TRL's
DPOConfig plus prefix sharing) and :class:`trl.ModelConfig` (model, dtype, attention, LoRA/quantization).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

logger = logging.getLogger("prefixdpo")

USAGE = """usage: prefixdpo <command> [--config FILE.yaml] [--field value ...]

commands:
  train        train with PrefixDPOTrainer (one process; multi-GPU: accelerate launch recipes/dpo.py)
  data-stats   length statistics of the tokenized dataset, tokens saved, a suggested token budget, a histogram
  quickstart   train a tiny model on shipped data on CPU, no network (about a minute)

`prefixdpo <command> --help` lists every field. docs/USAGE.md has examples.
"""


@dataclass
class ScriptArguments:
    """Where the data comes from and how it is checked (the fields TRL's scripts call ScriptArguments, and more)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id (e.g. 'Anthropic/hh-rlhf'), a local .json/.jsonl/.parquet/.csv file, a directory of "
            "such files (split from the file names: train.jsonl, test.jsonl), or a directory from save_to_disk."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration name (the `name` of datasets.load_dataset)."}
    )
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset branch, tag or commit."})
    dataset_data_files: str | None = field(
        default=None,
        metadata={"help": "Data files inside the Hub dataset or directory (a path or glob), for datasets.load_dataset."},
    )
    dataset_train_split: str = field(
        default="train", metadata={"help": "Split to train on; slices work, e.g. 'train[:10000]'."}
    )
    dataset_test_split: str | None = field(
        default="test",
        metadata={"help": "Split to evaluate on when eval_strategy is not 'no' (e.g. 'test', 'test_prefs')."},
    )
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding the prompt, if not 'prompt'."})
    chosen_column: str | None = field(default=None, metadata={"help": "Column holding the chosen response."})
    rejected_column: str | None = field(default=None, metadata={"help": "Column holding the rejected response."})
    on_bad_rows: str = field(
        default="drop",
        metadata={
            "help": "Rows that cannot train (null/empty prompt or response, chosen == rejected, malformed messages): "
            "'drop' them with a warning that counts them per reason, or 'error' at the first one.",
            "choices": ["drop", "error"],
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation pairs."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use, if not the model's (model_name_or_path)."}
    )
    data_stats_samples: int | None = field(
        default=None, metadata={"help": "data-stats: measure only the first N training pairs (faster on big sets)."}
    )
    data_stats_plot: str | None = field(
        default=None, metadata={"help": "data-stats: where to write the histogram PNG (default: <output_dir>/data_stats.png)."}
    )


def make_parser(prog: str = "prefixdpo train"):
    """The parser every entry point uses (``prefixdpo train``/``data-stats``, recipes/dpo.py, the config test)."""
    from trl import ModelConfig, TrlParser

    from .config import PrefixDPOConfig

    return TrlParser((ScriptArguments, PrefixDPOConfig, ModelConfig), prog=prog)


def parse_config(argv: list[str] | None = None, prog: str = "prefixdpo train"):
    """(ScriptArguments, PrefixDPOConfig, ModelConfig) from ``--config FILE.yaml`` plus command-line overrides."""
    return make_parser(prog).parse_args_and_config(args=argv)


# ---------------------------------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------------------------------


def load_tokenizer(script_args: ScriptArguments, training_args, model_args):
    from transformers import AutoTokenizer

    from .data.formats import ensure_pad_token

    name = script_args.tokenizer_name_or_path or model_args.model_name_or_path
    if not name:
        raise SystemExit("error: set model_name_or_path (or tokenizer_name_or_path) in the YAML or on the command line")
    tokenizer = AutoTokenizer.from_pretrained(
        name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    ensure_pad_token(tokenizer)
    return tokenizer


def load_datasets(script_args: ScriptArguments, training_args, tokenizer, need_eval: bool | None = None):
    """Load, normalize and check the train (and eval) split. Returns (train_dataset, eval_dataset or None)."""
    from .data.formats import load_preference_dataset, normalize_preference_dataset

    if not script_args.dataset_name:
        raise SystemExit("error: set dataset_name (a Hub id or a local path) in the YAML or on the command line")
    if need_eval is None:
        need_eval = training_args.eval_strategy != "no"

    def load(split: str, name: str, limit: int | None):
        ds = load_preference_dataset(
            script_args.dataset_name,
            script_args.dataset_config,
            split=split,
            revision=script_args.dataset_revision,
            data_files=script_args.dataset_data_files,
        )
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return normalize_preference_dataset(
            ds,
            tokenizer,
            name=name,
            on_bad_rows=script_args.on_bad_rows,
            prompt_column=script_args.prompt_column,
            chosen_column=script_args.chosen_column,
            rejected_column=script_args.rejected_column,
            num_proc=training_args.dataset_num_proc,
        )

    if need_eval and not script_args.dataset_test_split:
        raise SystemExit("error: eval_strategy is not 'no' but dataset_test_split is empty; set one of them")
    # Several processes (accelerate launch): the main process downloads and caches first, the others then read the
    # cache.
    with training_args.main_process_first(desc="loading and normalizing the dataset"):
        train = load(script_args.dataset_train_split, "train", script_args.max_train_samples)
        evaluation = load(script_args.dataset_test_split, "eval", script_args.max_eval_samples) if need_eval else None
    return train, evaluation


def report_prepared_dataset(n_before: int, prepared, training_args, name: str = "train"):
    """After the trainer tokenized a split: say how many pairs TRL's max_length rule dropped and how many it will
    truncate. Returns the :class:`~prefixdpo.data.formats.OverlongReport`."""
    from .data.formats import PreferenceDataError, report_overlong_pairs, tokenized_lengths

    dropped = n_before - len(prepared)
    if dropped:
        logger.warning(
            "%s dataset: %d of %d pairs were dropped because the prompt alone has max_length=%s tokens or more "
            "(TRL's rule with truncation_mode='keep_start'). Raise max_length or filter long prompts.",
            name, dropped, n_before, training_args.max_length,
        )
    if len(prepared) == 0:
        raise PreferenceDataError(
            f"no {name} pairs left to train on: all {n_before} were dropped because their prompt alone has "
            f"max_length={training_args.max_length} tokens or more; raise max_length or filter long prompts"
        )
    lengths = tokenized_lengths(prepared)
    report = report_overlong_pairs(*lengths, training_args.max_length, training_args.truncation_mode, name=name)
    report.dropped += dropped
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------


def train(script_args: ScriptArguments, training_args, model_args):
    """Setup, train, save: what recipes/dpo.py does, in one process."""
    from trl import get_peft_config, get_quantization_config

    from .trainer import PrefixDPOTrainer

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    tokenizer = load_tokenizer(script_args, training_args, model_args)
    train_dataset, eval_dataset = load_datasets(script_args, training_args, tokenizer)
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
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def data_stats(script_args: ScriptArguments, training_args, model_args) -> dict:
    """Tokenize the training split as the trainer will and report lengths, savings, a token budget and a histogram."""
    from .data.formats import (
        format_length_statistics,
        length_statistics,
        report_overlong_pairs,
        tokenize_preference_dataset,
        tokenized_lengths,
    )

    tokenizer = load_tokenizer(script_args, training_args, model_args)
    if script_args.data_stats_samples is not None:
        script_args.max_train_samples = script_args.data_stats_samples
    dataset, _ = load_datasets(script_args, training_args, tokenizer, need_eval=False)
    tokenized = tokenize_preference_dataset(dataset, tokenizer, num_proc=training_args.dataset_num_proc)
    prompt_lens, chosen_lens, rejected_lens = tokenized_lengths(tokenized)
    batch = training_args.per_device_train_batch_size
    stats = length_statistics(prompt_lens, chosen_lens, rejected_lens, batch_size=batch,
                              max_length=training_args.max_length)
    overlong = report_overlong_pairs(prompt_lens, chosen_lens, rejected_lens, training_args.max_length,
                                     training_args.truncation_mode)
    stats["max_length"] = training_args.max_length
    stats["overlong_dropped"] = overlong.dropped
    stats["overlong_truncated"] = overlong.truncated
    print(f"dataset {script_args.dataset_name} ({script_args.dataset_train_split}), tokenizer "
          f"{script_args.tokenizer_name_or_path or model_args.model_name_or_path}")
    print(format_length_statistics(stats))
    if training_args.max_length is not None:
        print(f"max_length={training_args.max_length}: {overlong.dropped} pairs dropped (prompt too long), "
              f"{overlong.truncated} truncated ({overlong.tokens_cut:,} tokens cut)")

    plot = script_args.data_stats_plot or os.path.join(training_args.output_dir, "data_stats.png")
    os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
    _histogram(prompt_lens, chosen_lens, rejected_lens, training_args.max_length, plot,
               title=f"{script_args.dataset_name} ({len(prompt_lens)} pairs)")
    with open(os.path.splitext(plot)[0] + ".json", "w") as f:
        json.dump(stats, f, indent=2)
    print(f"histogram: {plot}")
    return stats


def _histogram(prompt_lens, chosen_lens, rejected_lens, max_length, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    packed = [p + c + r + 1 for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens, strict=True)]
    fig, (ax_parts, ax_pair) = plt.subplots(1, 2, figsize=(11, 4))
    top = max([*prompt_lens, *chosen_lens, *rejected_lens, 1])
    bins = min(60, max(5, top))
    for values, label in ((prompt_lens, "prompt"), (chosen_lens, "chosen"), (rejected_lens, "rejected")):
        ax_parts.hist(values, bins=bins, range=(0, top), alpha=0.5, label=label)
    ax_parts.set(xlabel="tokens", ylabel="pairs", title="prompt and response lengths")
    ax_parts.legend()
    unshared = [max(p + c, p + r) for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens, strict=True)]
    top2 = max([*packed, 1])
    ax_pair.hist(packed, bins=min(60, max(5, top2)), range=(0, top2), alpha=0.6, label="prefix-shared pair (P+C+R+1)")
    ax_pair.hist(unshared, bins=min(60, max(5, top2)), range=(0, top2), alpha=0.6, label="longer of P+C, P+R")
    if max_length is not None:
        ax_pair.axvline(max_length, color="red", linestyle="--", label=f"max_length={max_length}")
    ax_pair.set(xlabel="tokens", ylabel="pairs", title="sequence length per pair")
    ax_pair.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO if command != "quickstart" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .data.formats import PreferenceDataError

    try:
        if command == "quickstart":
            from .quickstart import main as quickstart_main

            return quickstart_main(rest)
        if command == "train":
            train(*parse_config(rest, prog="prefixdpo train"))
            return 0
        if command == "data-stats":
            data_stats(*parse_config(rest, prog="prefixdpo data-stats"))
            return 0
    except PreferenceDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
