"""The quickstart: shipped data regenerates byte for byte, the tokenizer renders it as TRL expects, and a few steps
of the full path (train, evaluate, save, plot) run on CPU."""

from __future__ import annotations

import json

import pytest

from prefixdpo.quickstart import (
    DATA_DIR,
    EVAL_FILE,
    TRAIN_FILE,
    build_tokenizer,
    generate_data,
    main,
)


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    train, test = generate_data(tmp_path)
    assert train.read_bytes() == TRAIN_FILE.read_bytes()
    assert test.read_bytes() == EVAL_FILE.read_bytes()
    size = sum(p.stat().st_size for p in DATA_DIR.iterdir())
    assert size < 400_000


def test_data_follows_the_rule_and_splits_are_disjoint():
    train = [json.loads(line) for line in TRAIN_FILE.read_text().splitlines()]
    test = [json.loads(line) for line in EVAL_FILE.read_text().splitlines()]
    for row in train + test:
        numbers = [int(x) for x in row["prompt"][0]["content"].split(":")[-1].split()]
        chosen = [int(x) for x in row["chosen"][0]["content"].split()]
        rejected = [int(x) for x in row["rejected"][0]["content"].split()]
        assert chosen == sorted(numbers) and rejected != chosen and sorted(rejected) == chosen
    prompts = lambda rows: {r["prompt"][0]["content"].split(":")[-1] for r in rows}  # noqa: E731
    assert not prompts(train) & prompts(test)


def test_tokenizer_renders_prompt_as_prefix():
    tok = build_tokenizer()
    row = json.loads(TRAIN_FILE.read_text().splitlines()[0])
    prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)
    p, f = prompt["input_ids"], full["input_ids"]
    assert f[: len(p)] == p and f[-1] == tok.eos_token_id and tok.unk_token_id not in f


def test_quickstart_smoke(tmp_path, capsys):
    out = tmp_path / "qs"
    status = main([
        "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "1", "--eval_strategy", "no",
        "--max_eval_pairs", "20", "--per_device_train_batch_size", "8", "--min_eval_accuracy", "0",
        "--disable_tqdm", "true",
    ])
    assert status == 0
    printed = capsys.readouterr().out
    assert "eval reward accuracy (held out)" in printed and "prefix sharing saved" in printed
    results = json.loads((out / "quickstart_results.json").read_text())
    assert results["steps"] == 4 and 0.0 <= results["eval_reward_accuracy"] <= 1.0
    assert results["tokens_packed"] < results["tokens_trl"] < results["tokens_trl_padded"]
    # The printed saving and the logged metric are one ratio: the dataset's total, and its mean over 4 random batches
    # of 8 pairs (the quickstart's pairs vary little in length, so they are close).
    assert results["logged_tokens_saved_frac_mean"] == pytest.approx(results["tokens_saved_frac"], abs=0.05)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "quickstart.png").stat().st_size > 10_000
