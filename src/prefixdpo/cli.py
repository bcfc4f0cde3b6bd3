"""The ``prefixdpo`` command.

    prefixdpo train --config configs/qwen2.5-7b-ultrafeedback-lora.yaml [--any_field value ...]
    prefixdpo data-stats --config configs/llama3.1-8b-hh-rlhf-zero3.yaml [--data_stats_samples 20000]
    prefixdpo quickstart [--config configs/quickstart.yaml] [--any_field value ...]

A YAML file sets any field of the argument groups (prefixdpo/arguments.py); flags on the command line override it.
``prefixdpo train`` runs on one process; for several GPUs, ``accelerate launch recipes/dpo.py`` with the same YAML.
A mistake in the config or the data ends in one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys

logger = logging.getLogger("prefixdpo")

USAGE = """usage: prefixdpo <command> [--config FILE.yaml] [--field value ...]

commands:
  train        train with PrefixDPOTrainer (one process; multi-GPU: accelerate launch recipes/dpo.py)
  data-stats   what training will run: lengths after truncation, tokens saved, a suggested token budget, a histogram
  quickstart   train a tiny model on shipped data on CPU, no network (about a minute)

`prefixdpo <command> --help` lists every field. docs/USAGE.md has examples.
"""

def data_stats(argv: list[str]) -> dict:
    """Tokenize the training split as the trainer will and report what will train (``data/stats.py``). A quickstart
    config measures the quickstart's shipped data with its tokenizer."""
    from .arguments import argument_groups, parse_config
    from .data.formats import normalize_preference_dataset
    from .data.stats import format_statistics, tokenize_preference_dataset, training_statistics
    from .data.vision import is_vision_dataset, measure_vision_pairs, vision_training_statistics
    from .run import load_datasets, load_tokenizer

    quick = "--config" in argv and _is_quickstart_config(argv)
    if quick:
        from . import quickstart

        qs_args, training_args = parse_config(argv, prog="prefixdpo data-stats",
                                              dataclass_types=(quickstart.QuickstartArguments, argument_groups()[1]),
                                              defaults=quickstart.QUICKSTART_DEFAULTS)
        tokenizer = quickstart.build_tokenizer()
        dataset = quickstart.load_splits(qs_args.data_dir)["train"]
        name, source, plot = qs_args.data_dir, "the quickstart's tokenizer", None
    else:
        script_args, training_args, model_args = parse_config(argv, prog="prefixdpo data-stats")
        tokenizer = load_tokenizer(script_args, training_args, model_args)
        if script_args.data_stats_samples is not None:
            script_args.max_train_samples = script_args.data_stats_samples
        dataset, _ = load_datasets(script_args, training_args, tokenizer, need_eval=False)
        name = script_args.dataset_name or f"a mixture of {len(script_args.datasets)} datasets"
        source = script_args.tokenizer_name_or_path or model_args.model_name_or_path
        plot = script_args.data_stats_plot
    dataset = normalize_preference_dataset(dataset, tokenizer, on_bad_rows=training_args.on_bad_rows,
                                           pairs_from_ranks=training_args.pairs_from_ranks)
    if is_vision_dataset(dataset):  # images: each pair measured with the model's processor
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(source, trust_remote_code=training_args.trust_remote_code)
        stats = vision_training_statistics(dataset, processor, training_args)
        tokenized = measure_vision_pairs(dataset, processor)
    else:
        tokenized = tokenize_preference_dataset(dataset, tokenizer, num_proc=training_args.dataset_num_proc)
        stats = training_statistics(tokenized, training_args)
    print(f"dataset {name}, tokenizer {source}")
    print(format_statistics(stats))
    plot = plot or os.path.join(training_args.output_dir, "data_stats.png")
    os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
    _histogram(tokenized, training_args.max_length, training_args.truncation_mode, plot, title=f"{name} "
               f"({stats['pairs']} pairs)")
    with open(os.path.splitext(plot)[0] + ".json", "w") as f:
        json.dump(stats, f, indent=2)
    print(f"histogram: {plot}")
    return stats


def _is_quickstart_config(argv: list[str]) -> bool:
    from .arguments import _QUICKSTART_KEYS, read_yaml_config

    path = argv[argv.index("--config") + 1] if argv.index("--config") + 1 < len(argv) else None
    return path is not None and os.path.isfile(path) and bool(set(read_yaml_config(path)) & _QUICKSTART_KEYS)


def _histogram(tokenized, max_length, truncation_mode, path, title=""):
    """Prompt and response lengths, and each pair's length packed against TRL's longer sequence, after truncation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.packing import packed_pair_length, truncate_sequence

    parts = {"prompt": [], "chosen": [], "rejected": []}
    packed, unshared = [], []
    for ex in tokenized:
        if max_length is not None and truncation_mode == "keep_start" and len(ex["prompt_ids"]) >= max_length:
            continue  # dropped by TRL's rule
        pc, cc = truncate_sequence(list(ex["prompt_ids"]), list(ex["chosen_ids"]), max_length, truncation_mode)
        pr, cr = truncate_sequence(list(ex["prompt_ids"]), list(ex["rejected_ids"]), max_length, truncation_mode)
        parts["prompt"].append(len(pc))
        parts["chosen"].append(len(cc))
        parts["rejected"].append(len(cr))
        packed.append(packed_pair_length(ex, max_length, truncation_mode))
        unshared.append(max(len(pc) + len(cc), len(pr) + len(cr)))
    fig, (ax_parts, ax_pair) = plt.subplots(1, 2, figsize=(11, 4))
    top = max([v for vals in parts.values() for v in vals] + [1])
    for label, values in parts.items():
        ax_parts.hist(values, bins=min(60, max(5, top)), range=(0, top), alpha=0.5, label=label)
    ax_parts.set(xlabel="tokens (after truncation)", ylabel="pairs", title="prompt and response lengths")
    ax_parts.legend()
    top2 = max(packed + [1])
    bins = min(60, max(5, top2))
    ax_pair.hist(packed, bins=bins, range=(0, top2), alpha=0.6, label="prefix-shared pair (packed)")
    ax_pair.hist(unshared, bins=bins, range=(0, top2), alpha=0.6, label="TRL's longer sequence")
    if max_length is not None:
        ax_pair.axvline(max_length, color="red", linestyle="--", label=f"max_length={max_length}")
    ax_pair.set(xlabel="tokens", ylabel="pairs", title="sequence length per pair")
    ax_pair.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _help(command: str) -> None:
    from .arguments import make_parser

    make_parser(prog=f"prefixdpo {command}").print_help()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in ("train", "data-stats", "quickstart"):
        print(f"error: unknown command {command!r}; the commands are train, data-stats, quickstart", file=sys.stderr)
        return 2
    if command != "quickstart" and ("-h" in rest or "--help" in rest):
        _help(command)
        return 0
    logging.basicConfig(level=logging.INFO if command != "quickstart" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .run import USER_ERRORS, main as run_main, user_error

    if command == "train":
        return run_main(rest, prog="prefixdpo train")
    try:
        if command == "quickstart":
            from .quickstart import main as quickstart_main

            return quickstart_main(rest)
        data_stats(rest)
        return 0
    except USER_ERRORS as e:
        print(user_error(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
