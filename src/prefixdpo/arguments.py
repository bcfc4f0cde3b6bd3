"""The run's arguments and the parser every entry point shares: a YAML file plus command-line overrides.

Three argument groups, as in TRL's scripts: :class:`ScriptArguments` (the data: TRL's ScriptArguments and
DatasetMixtureConfig fields, and ours), :class:`prefixdpo.PrefixDPOConfig` (training: TRL's DPOConfig plus prefix
sharing) and :class:`trl.ModelConfig` (model, dtype, LoRA, quantization). A YAML written for ``trl dpo --config``
parses unchanged.

Every mistake in a config comes back as one :class:`ConfigError` (a ``ValueError``) or ``FileNotFoundError`` whose
message names the key or the file and says what is allowed; the CLI prints it as one ``error:`` line and exits with
status 2. Nothing here prints a usage block or a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A run configuration that cannot be used as given: the message names the field and what it may be."""


@dataclass
class ScriptArguments:
    """Where the data comes from (TRL's ScriptArguments and DatasetMixtureConfig fields, with their meaning, and
    the fields prefixdpo adds)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id (e.g. 'Anthropic/hh-rlhf'), a local .json/.jsonl/.parquet/.csv file, a directory of "
            "such files (split from the file names: train.jsonl, test.jsonl), or a directory from save_to_disk. "
            "Ignored when `datasets` is set."
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
    dataset_streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset instead of downloading it whole (TRL's field; with batching='pairs')."},
    )
    ignore_bias_buffers: bool = field(
        default=False,
        metadata={"help": "TRL's field: DDP ignores the models' boolean buffers (a fix for some LM bias/mask buffers)."},
    )
    # TRL's DatasetMixtureConfig.
    datasets: list[dict] = field(
        default_factory=list,
        metadata={
            "help": "A mixture of datasets, as TRL's `trl dpo` takes it: a list of {path, name, data_dir, data_files, "
            "split, columns, fraction} (YAML only). Each entry is loaded, checked and normalized on its own, then they "
            "are concatenated; `fraction` sets each entry's share of the mixture (all entries or none)."
        },
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the mixture's datasets (TRL's field)."})
    test_split_size: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this share (0-1) or number of rows of the training data as the evaluation split "
            "(datasets.train_test_split, seeded with `seed`)."
        },
    )
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding the prompt, if not 'prompt'."})
    chosen_column: str | None = field(default=None, metadata={"help": "Column holding the chosen response."})
    rejected_column: str | None = field(default=None, metadata={"help": "Column holding the rejected response."})
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


MIXTURE_ENTRY_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "fraction")

# Keys that mark a YAML as meant for another tool or command.
_ACCELERATE_KEYS = {"compute_environment", "distributed_type", "num_processes", "machine_rank", "main_training_function",
                    "fsdp_config", "deepspeed_config", "rdzv_backend", "same_network"}
_QUICKSTART_KEYS = {"hidden_size", "num_hidden_layers", "min_eval_accuracy", "plot", "data_dir", "max_eval_pairs",
                    "regenerate_data"}


def argument_groups():
    from trl import ModelConfig

    from .config import PrefixDPOConfig

    return (ScriptArguments, PrefixDPOConfig, ModelConfig)


class _Parser:
    """HfArgumentParser (TRL's TrlParser) whose argparse errors raise :class:`ConfigError` instead of printing a usage
    block and exiting."""

    def __new__(cls, dataclass_types, prog: str):
        from trl import TrlParser

        class Parser(TrlParser):
            def error(self, message):  # argparse's hook for every invalid value or choice
                raise ConfigError(_reword_argparse(message))

        return Parser(dataclass_types, prog=prog)


def _reword_argparse(message: str) -> str:
    m = re.match(r"argument --?(\w+)(?:/--?[\w-]+)*: invalid (\w+) value: (.*)", message)
    if m:
        return f"{m.group(1)}: invalid value {m.group(3)} (expected {m.group(2)})"
    m = re.match(r"argument --?(\w+)(?:/--?[\w-]+)*: invalid choice: (.*?) \(choose from (.*)\)", message)
    if m:
        return f"{m.group(1)}: invalid value {m.group(2)}; allowed: {m.group(3)}"
    m = re.match(r"argument --?(\w+)(?:/--?[\w-]+)*: (.*)", message)
    if m:
        return f"{m.group(1)}: {m.group(2)}"
    return message


def make_parser(prog: str = "prefixdpo train", dataclass_types=None):
    """The argparse parser of the argument groups (``--help`` lists every field)."""
    return _Parser(dataclass_types or argument_groups(), prog)


def read_yaml_config(path: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path``; FileNotFoundError / ConfigError naming the file and the problem."""
    import yaml

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"config {path!r} is a directory, not a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config {path!r} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path!r} cannot be read: {e}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"config {path!r} must hold a YAML mapping of field: value, not a {type(config).__name__}")
    return config


def _known_fields(parser) -> dict[str, argparse.Action]:
    """Field name -> its argparse action (the first one: a bool field's ``--no_<name>`` complement comes after)."""
    known: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest != "help":
            known.setdefault(action.dest, action)
    return known


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_config_kind(config: dict, path: str, known) -> None:
    """A config written for another tool or command: say which, instead of listing its keys as unknown."""
    keys = set(config) - set(known)
    if len(keys & _ACCELERATE_KEYS) >= 2:
        raise ConfigError(
            f"{path!r} is an accelerate config ({', '.join(sorted(keys & _ACCELERATE_KEYS)[:3])}); give it to "
            f"accelerate: accelerate launch --config_file {path} recipes/dpo.py --config <run.yaml>"
        )
    if keys & _QUICKSTART_KEYS:
        raise ConfigError(f"{path!r} is a quickstart config; run it with: prefixdpo quickstart --config {path}")


def _check_value(key: str, value, action: argparse.Action) -> None:
    if action.choices is not None and value is not None and not isinstance(value, (list, dict)):
        allowed = [str(c) for c in action.choices]
        if str(value) not in allowed:
            raise ConfigError(f"{key}: invalid value {value!r}; allowed: {', '.join(allowed)}")


def _as_default(value, action: argparse.Action):
    """A YAML value as the parser's default: scalars become strings, so argparse converts and checks them exactly as
    it does command-line values (``beta: abc`` fails like ``--beta abc``); lists and mappings stay as they are."""
    if action.nargs in ("+", "*") or value is None or isinstance(value, (list, dict)):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_mixture(entries) -> None:
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("datasets: expected a list of mappings, each with at least a `path`")
    for i, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(MIXTURE_ENTRY_KEYS))
        if unknown:
            raise ConfigError(f"datasets[{i}]: unknown key {unknown[0]!r}{_suggest(unknown[0], MIXTURE_ENTRY_KEYS)} "
                              f"(allowed: {', '.join(MIXTURE_ENTRY_KEYS)})")
        if not entry.get("path"):
            raise ConfigError(f"datasets[{i}]: needs a `path` (a Hub id or a local file or directory)")
    fractions = [e.get("fraction") for e in entries]
    if any(f is not None for f in fractions) and any(f is None for f in fractions):
        raise ConfigError("datasets: set `fraction` on every entry or on none")


def parse_config(argv: list[str] | None = None, prog: str = "prefixdpo train", dataclass_types=None,
                 defaults: dict | None = None):
    """The argument groups' dataclasses from ``--config FILE.yaml`` (optional) plus ``--field value`` overrides.

    ``defaults`` are applied before the YAML (a command's own defaults, as the quickstart's). A YAML's ``env``
    mapping sets environment variables, as in TRL. Raises ConfigError / FileNotFoundError (never exits)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(prog, dataclass_types)
    known = _known_fields(parser)
    config: dict[str, Any] = dict(defaults or {})
    path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs the path of a YAML file")
        path = argv[i + 1]
        del argv[i : i + 2]
        from_file = read_yaml_config(path)
        _check_config_kind(from_file, path, known)
        env = from_file.pop("env", {}) or {}
        if not isinstance(env, dict):
            raise ConfigError(f"config {path!r}: `env` must be a mapping of variable: value")
        for name, value in env.items():
            os.environ[str(name)] = str(value)
        config.update(from_file)
    where = f" in {path}" if path else ""
    for key, value in config.items():
        if key not in known:
            raise ConfigError(f"unknown key {key!r}{where}{_suggest(key, known)}")
        _check_value(key, value, known[key])
    if "datasets" in config:
        _check_mixture(config["datasets"])
    for action in parser._actions:
        if action.dest in config:
            action.default = _as_default(config[action.dest], action)
            action.required = False

    # Command-line flags: unknown ones are named with a suggestion, as YAML keys are.
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        flag = next((r for r in rest if r.startswith("-")), rest[0])
        name = flag.lstrip("-").split("=")[0]
        if not flag.startswith("-"):
            raise ConfigError(f"unexpected argument {flag!r}: give fields as --name value")
        raise ConfigError(f"unknown argument {flag!r}{_suggest(name, known)}")
    values = vars(namespace)
    outputs = []
    for dtype in parser.dataclass_types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        kwargs = {k: v for k, v in values.items() if k in names}
        try:
            outputs.append(dtype(**kwargs))
        except (ValueError, TypeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    return tuple(outputs)
