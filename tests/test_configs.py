"""Every shipped YAML loads through the parser its command uses, and documents its launch command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "quickstart.yaml")
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_there_are_configs():
    assert len(RUN_CONFIGS) >= 3
    assert {p.stem for p in ACCELERATE_CONFIGS} >= {"single_gpu", "ddp", "fsdp2", "zero3"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_parses(path):
    from prefixdpo import PrefixDPOConfig
    from prefixdpo.arguments import ScriptArguments, parse_config

    # use_cpu: the configs ask for bf16, which TrainingArguments refuses on a machine without a GPU unless use_cpu.
    script_args, training_args, model_args = parse_config(["--config", str(path), "--use_cpu", "true"])
    assert isinstance(script_args, ScriptArguments) and isinstance(training_args, PrefixDPOConfig)
    assert script_args.dataset_name and model_args.model_name_or_path
    assert training_args.prefix_sharing is True
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():  # every key reached a dataclass with the YAML's value
        owner = next(a for a in (script_args, training_args, model_args) if hasattr(a, key))
        got = getattr(owner, key)
        if key in ("report_to",):
            got = got if isinstance(value, list) else got[0] if isinstance(got, list) else got
        if key in ("eval_strategy", "save_strategy", "lr_scheduler_type"):
            got = getattr(got, "value", got)
        assert got == value, f"{path.name}: {key}={got!r}, YAML has {value!r}"


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_header_names_its_launch_command(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"--config configs/{path.name}" in header
    assert "accelerate launch --config_file recipes/accelerate/" in header or "prefixdpo train" in header
    for topology in set(__import__("re").findall(r"recipes/accelerate/(\w+)\.yaml", header)):
        assert (ROOT / "recipes" / "accelerate" / f"{topology}.yaml").exists(), topology


def test_command_line_overrides_yaml():
    from prefixdpo.arguments import parse_config

    path = RUN_CONFIGS[0]
    _, training_args, model_args = parse_config(
        ["--config", str(path), "--use_cpu", "true", "--learning_rate", "3e-4", "--max_steps", "7",
         "--prefix_sharing", "false", "--model_name_or_path", "some/model"]
    )
    assert training_args.learning_rate == 3e-4 and training_args.max_steps == 7
    assert training_args.prefix_sharing is False and model_args.model_name_or_path == "some/model"


def test_unknown_key_is_rejected(tmp_path):
    from prefixdpo.arguments import parse_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_name: x\nmodel_name_or_path: y\nlearning_rte: 1.0e-6\n")
    with pytest.raises(ValueError, match="learning_rte"):
        parse_config(["--config", str(bad), "--use_cpu", "true"])


def test_invalid_prefixdpo_field_is_rejected(tmp_path):
    from prefixdpo.arguments import parse_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_name: x\nmodel_name_or_path: y\nattn_backend: cuda\n")
    with pytest.raises(ValueError, match="attn_backend: invalid value 'cuda'; allowed: auto, triton, fa4, sdpa, flex"):
        parse_config(["--config", str(bad), "--use_cpu", "true"])


def test_quickstart_config_matches_builtin_defaults():
    from prefixdpo.quickstart import QUICKSTART_DEFAULTS, QuickstartArguments, parse_args

    path = ROOT / "configs" / "quickstart.yaml"
    qs_args, training_args = parse_args(["--config", str(path)])
    builtin_qs, builtin_training = parse_args([])
    assert qs_args == builtin_qs
    for key in QUICKSTART_DEFAULTS:
        assert getattr(training_args, key) == getattr(builtin_training, key), key
    assert "prefixdpo quickstart --config configs/quickstart.yaml" in path.read_text()
    assert isinstance(qs_args, QuickstartArguments)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    cfg = yaml.safe_load(path.read_text())
    expected = {"single_gpu": "NO", "ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}[path.stem]
    assert cfg["distributed_type"] == expected
    if path.stem == "fsdp2":
        assert cfg["fsdp_config"]["fsdp_version"] == 2
    if path.stem == "zero3":
        assert cfg["deepspeed_config"]["zero_stage"] == 3
    assert cfg["num_processes"] >= 1 and cfg["main_training_function"] == "main"
