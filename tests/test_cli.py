"""`prefixdpo train` and `prefixdpo data-stats` end to end on a tiny model saved to disk, from a YAML plus overrides."""

from __future__ import annotations

import json
import logging

import pytest

from prefixdpo.cli import main
from prefixdpo.quickstart import DATA_DIR


CPU = ["--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none",
       "--disable_tqdm", "true"]


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "data-stats" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_data_stats(tmp_path, tiny_model_dir, capsys):
    plot = tmp_path / "stats.png"
    status = main(["data-stats", "--dataset_name", str(DATA_DIR), "--model_name_or_path", tiny_model_dir,
                   "--output_dir", str(tmp_path), "--data_stats_plot", str(plot), "--max_length", "30",
                   "--data_stats_samples", "300", *CPU])
    assert status == 0
    out = capsys.readouterr().out
    assert "saved by prefix sharing" in out and "suggested token budget per micro-batch" in out
    stats = json.loads(plot.with_suffix(".json").read_text())
    assert stats["pairs"] == 300 and stats["saved_by_prefix_sharing"] > 0
    assert stats["pairs_truncated"] > 0  # some quickstart pairs are longer than 30 tokens
    assert plot.stat().st_size > 10_000


def test_train_from_yaml_with_overrides(tmp_path, tiny_model_dir, caplog):
    # HH-RLHF-shaped text data with one bad row and one prompt too long for max_length.
    long_prompt = "\n\nHuman: " + " ".join(["word"] * 40) + "\n\nAssistant:"
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
            for i in range(10)]
    rows.append({"chosen": "\n\nHuman: same\n\nAssistant: a", "rejected": "\n\nHuman: same\n\nAssistant: a"})
    rows.append({"chosen": long_prompt + " yes", "rejected": long_prompt + " no"})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        f"dataset_name: {data}\n"
        "learning_rate: 1.0e-3\n"
        "per_device_train_batch_size: 4\n"
        "max_steps: 100\n"
        "max_length: 24\n"
        "eval_strategy: 'no'\n"
        "save_strategy: 'no'\n"
    )
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        status = main(["train", "--config", str(config), "--max_steps", "2", "--output_dir", str(out), *CPU])
    assert status == 0
    assert (out / "model.safetensors").exists()
    assert "dropped 1 of 12 rows" in caplog.text  # chosen == rejected
    assert "1 of 11 pairs were dropped because the prompt alone has max_length=24" in caplog.text


def test_bad_dataset_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    status = main(["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data),
                   "--output_dir", str(tmp_path / "o"), "--eval_strategy", "no", *CPU])
    assert status == 2
    err = capsys.readouterr().err
    assert "error: the dataset has no 'chosen' and no 'rejected' column" in err


def test_every_pair_dropped_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    # Every prompt is longer than max_length: TRL drops them all; say so instead of failing later on an empty set.
    data = tmp_path / "long.jsonl"
    rows = [{"prompt": " ".join(["word"] * 40), "chosen": " yes", "rejected": " no"} for _ in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = main(["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--max_length", "16",
                   "--output_dir", str(tmp_path / "o"), "--eval_strategy", "no", *CPU])
    assert status == 2
    assert "error: no train pairs left to train on: all 3 were dropped" in capsys.readouterr().err


def test_recipe_runs_in_one_process(tmp_path, tiny_model_dir):
    """recipes/dpo.py (what `accelerate launch` runs), here as a plain single process on CPU."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        f"dataset_name: {DATA_DIR}\n"
        "max_train_samples: 64\n"
        "max_eval_samples: 16\n"
        "per_device_train_batch_size: 8\n"
        "per_device_eval_batch_size: 16\n"
        "eval_strategy: steps\n"
        "eval_steps: 2\n"
        "save_strategy: 'no'\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(root / "recipes" / "dpo.py"), "--config", str(config), "--max_steps", "2",
         "--output_dir", str(out), *CPU],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").exists()
    assert "eval_rewards/accuracies" in proc.stdout + proc.stderr
