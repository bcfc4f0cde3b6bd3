"""Every mistake a user can make on the command line ends in one `error:` line on stderr and exit status 2, with no
traceback, and leaves the output directory as it was."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import dir_digest

from prefixdpo.cli import main

CPU = ["--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none",
       "--disable_tqdm", "true", "--eval_strategy", "no", "--save_strategy", "no"]


@pytest.fixture
def data_file(tmp_path):
    rows = [{"prompt": f"q{i} w1 w2", "chosen": f" yes {i}", "rejected": " no"} for i in range(8)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_cli(capsys, argv):
    status = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err
    return status, errors


def assert_one_error(capsys, argv, *fragments):
    status, errors = run_cli(capsys, argv)
    assert status == 2 and len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_unknown_key_suggests_the_field(tmp_path, capsys, tiny_model_dir, data_file):
    cfg = write(tmp_path, "run.yaml", f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data_file}\n"
                                      "learnig_rate: 1.0e-5\n")
    assert_one_error(capsys, ["train", "--config", cfg, *CPU], "unknown key 'learnig_rate'",
                     "did you mean 'learning_rate'?")
    assert_one_error(capsys, ["train", "--learnig_rate", "1", *CPU], "unknown argument '--learnig_rate'",
                     "did you mean 'learning_rate'?")


def test_invalid_values_name_the_field_and_what_is_allowed(tmp_path, capsys):
    cfg = write(tmp_path, "run.yaml", "attn_backend: fastest\n")
    assert_one_error(capsys, ["train", "--config", cfg, *CPU], "attn_backend: invalid value 'fastest'",
                     "allowed: auto, triton, fa4, sdpa, flex, reference")
    assert_one_error(capsys, ["train", "--attn_backend", "fastest", *CPU], "attn_backend: invalid value 'fastest'")
    cfg = write(tmp_path, "beta.yaml", "beta: abc\n")
    line = assert_one_error(capsys, ["train", "--config", cfg, *CPU], "beta: invalid value 'abc' (expected float)")
    assert len(line) < 200  # the one line that matters, not a usage block
    assert_one_error(capsys, ["train", "--beta", "abc", *CPU], "beta: invalid value 'abc' (expected float)")
    cfg = write(tmp_path, "tb.yaml", "batching: token_budget\n")
    assert_one_error(capsys, ["train", "--config", cfg, *CPU], "max_tokens_per_batch")


def test_missing_model_tokenizer_and_config_files(tmp_path, capsys, data_file):
    missing = str(tmp_path / "no-such-model")
    assert_one_error(capsys, ["train", "--model_name_or_path", missing, "--dataset_name", data_file,
                              "--output_dir", str(tmp_path / "o"), *CPU],
                     f"model_name_or_path {missing!r} does not exist")
    assert_one_error(capsys, ["train", "--model_name_or_path", "./typo-model", "--dataset_name", data_file,
                              "--output_dir", str(tmp_path / "o"), *CPU], "does not exist")
    assert_one_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml")], "config file", "does not exist")


def test_unreadable_and_non_mapping_yaml(tmp_path, capsys):
    bad = write(tmp_path, "bad.yaml", "model_name_or_path: [unclosed\n")
    assert_one_error(capsys, ["train", "--config", bad], "is not valid YAML at line")
    listy = write(tmp_path, "list.yaml", "- a\n- b\n")
    assert_one_error(capsys, ["train", "--config", listy], "must hold a YAML mapping")


def test_a_config_for_another_command(tmp_path, capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert_one_error(capsys, ["train", "--config", str(root / "recipes" / "accelerate" / "ddp.yaml")],
                     "is an accelerate config", "accelerate launch --config_file")
    assert_one_error(capsys, ["train", "--config", str(root / "configs" / "quickstart.yaml")],
                     "is a quickstart config", "prefixdpo quickstart --config")


def test_unknown_command(capsys):
    status, errors = run_cli(capsys, ["frobnicate"])
    assert status == 2 and errors == ["error: unknown command 'frobnicate'; the commands are train, data-stats, "
                                      "quickstart"]


def test_the_process_exits_2_without_a_traceback(tmp_path):
    cfg = write(tmp_path, "run.yaml", "learnig_rate: 1.0e-5\n")
    proc = subprocess.run([sys.executable, "-m", "prefixdpo.cli", "train", "--config", cfg], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: unknown key 'learnig_rate' in {cfg}; did you mean "
                                                "'learning_rate'?"]


# ---------------------------------------------------------------------------------------------------------------------
# The output directory
# ---------------------------------------------------------------------------------------------------------------------


def test_a_previous_run_is_never_overwritten(tmp_path, capsys, tiny_model_dir, data_file):
    out = tmp_path / "out"
    args = ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", data_file, "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "4", *CPU]
    assert main(args) == 0
    before = dir_digest(out)
    assert "model.safetensors" in before
    line = assert_one_error(capsys, args, f"output_dir {str(out)!r} holds a previous run", "resume_from_checkpoint",
                            "overwrite_output_dir: true")
    assert "model.safetensors" in line
    assert dir_digest(out) == before
    # A checkpoint folder alone is a previous run too.
    ckpt_only = tmp_path / "ckpt-only"
    (ckpt_only / "checkpoint-3").mkdir(parents=True)
    (ckpt_only / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    before = dir_digest(ckpt_only)
    assert_one_error(capsys, [*args[:6], str(ckpt_only), *args[7:]], "1 checkpoint folder(s) (newest: checkpoint-3)")
    assert dir_digest(ckpt_only) == before
    # overwrite_output_dir: the second run replaces the first.
    assert main([*args, "--overwrite_output_dir", "true"]) == 0
    assert dir_digest(out)["model.safetensors"] != "" and (out / "config.json").exists()


def test_resume_true_on_the_command_line(tmp_path, capsys, tiny_model_dir, data_file):
    out = tmp_path / "out"
    base = ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", data_file, "--output_dir", str(out),
            "--per_device_train_batch_size", "4", *CPU[:-2], "--save_strategy", "steps", "--save_steps", "2"]
    assert main([*base, "--max_steps", "2"]) == 0
    capsys.readouterr()
    assert main([*base, "--max_steps", "4", "--resume_from_checkpoint", "true"]) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # A path to an incomplete checkpoint is refused in one line.
    broken = out / "checkpoint-9"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert_one_error(capsys, [*base, "--max_steps", "10", "--resume_from_checkpoint", str(broken)],
                     f"cannot resume from {str(broken)!r}: it has no trainer_state.json")


# ---------------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------------


def test_loading_errors_name_the_file_and_line(tmp_path, capsys, tiny_model_dir):
    bad = write(tmp_path, "bad.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", oops}\n')
    args = ["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o"), *CPU]
    assert_one_error(capsys, ["train", "--dataset_name", bad, *args], f"{bad}, line 2, column", "malformed JSON")
    empty = write(tmp_path, "empty.jsonl", "")
    assert_one_error(capsys, ["train", "--dataset_name", empty, *args], f"the file {empty!r} is empty")
    bad_json = write(tmp_path, "bad.json", '[{"prompt": "a"},\n {"prompt": }]')
    assert_one_error(capsys, ["train", "--dataset_name", bad_json, *args], f"{bad_json}, line 2, column")


def test_an_unsupported_model_is_refused_before_it_loads(tmp_path, capsys):
    # A gpt-oss config with no weights: loading the model would fail, tokenizing would print; neither happens.
    from transformers import AutoConfig

    from prefixdpo.quickstart import build_tokenizer

    path = tmp_path / "gpt-oss-like"
    tok = build_tokenizer()
    tok.save_pretrained(path)
    AutoConfig.for_model("nemotron_h", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2).save_pretrained(path)
    data = write(tmp_path, "d.jsonl", json.dumps({"prompt": "1 2", "chosen": "3", "rejected": "4"}) + "\n")
    status = main(["train", "--model_name_or_path", str(path), "--dataset_name", data, "--output_dir",
                   str(tmp_path / "o"), *CPU])
    err = capsys.readouterr().err
    assert status == 2 and "Tokenizing" not in err and "Loading weights" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is a hybrid model: its Mamba-2 layers" in errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# data-stats
# ---------------------------------------------------------------------------------------------------------------------


def test_data_stats_counts_what_trains(tmp_path, capsys, tiny_model_dir):
    # Every prompt is longer than max_length: nothing would train. data-stats says so and fails.
    rows = [{"prompt": " ".join(["w1"] * 40), "chosen": " yes", "rejected": " no"} for _ in range(3)]
    data = write(tmp_path, "long.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert_one_error(capsys, ["data-stats", "--dataset_name", data, "--model_name_or_path", tiny_model_dir,
                              "--max_length", "16", "--output_dir", str(tmp_path), *CPU], "no pair would train")
    # Some prompts are too long: savings are counted on what trains, never negative; the budget holds max_length.
    rows += [{"prompt": f"q{i} w1 w2", "chosen": f" yes {i}", "rejected": " no"} for i in range(5)]
    data = write(tmp_path, "mixed.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    plot = tmp_path / "stats.png"
    assert main(["data-stats", "--dataset_name", data, "--model_name_or_path", tiny_model_dir, "--max_length", "16",
                 "--output_dir", str(tmp_path), "--data_stats_plot", str(plot), *CPU]) == 0
    stats = json.loads(plot.with_suffix(".json").read_text())
    assert stats["pairs_in"] == 8 and stats["pairs"] == 5 and stats["pairs_dropped"] == 3
    assert stats["saved_by_prefix_sharing"] > 0 and stats["saved_by_packing"] >= 0
    assert stats["suggested_token_budget"] >= max(16, stats["longest_packed_pair"])


def test_data_stats_takes_the_quickstart_config(tmp_path, capsys):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    assert main(["data-stats", "--config", str(cfg), "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1000 pairs train" in out and "prefix_sharing/tokens_saved_frac" in out
