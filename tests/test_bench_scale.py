"""scripts/bench_scale.py's data and accounting, which its GPU runs rely on and which need no GPU."""

from __future__ import annotations

import itertools

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_scale")


def test_two_completions_are_one_pair_per_prompt(bench):
    # K = 2 keeps the data the one-pair runs of docs/PERFORMANCE.md were measured on.
    words = lambda start, k: " ".join(f"w{(start + i) % 29000}" for i in range(k))  # noqa: E731
    one_pair = [{"prompt": words(j * 7, 50), "chosen": " " + words(j * 11 + 1, 9),
                 "rejected": " " + words(j * 13 + 2, 9)} for j in range(4)]
    assert bench.pair_data(50, 9, 4) == bench.pair_data(50, 9, 4, completions=2) == one_pair


@pytest.mark.parametrize("k", [3, 4, 6])
def test_all_pairs_of_distinct_responses_per_prompt(bench, k):
    n, per_prompt = 3, k * (k - 1) // 2
    data = bench.pair_data(40, 5, n, completions=k)
    assert len(data) == n * per_prompt == n * bench.pairs_per_prompt(k)
    groups = [data[i : i + per_prompt] for i in range(0, len(data), per_prompt)]
    assert len({g[0]["prompt"] for g in groups}) == n  # different across prompts
    for group in groups:
        assert len({d["prompt"] for d in group}) == 1  # identical within a prompt's micro-batch
        responses = list(dict.fromkeys(r for d in group for r in (d["chosen"], d["rejected"])))
        assert len(responses) == k and all(len(r.split()) == 5 for r in responses)
        # Every pair once, chosen the response of lower index.
        assert [(d["chosen"], d["rejected"]) for d in group] == list(itertools.combinations(responses, 2))


def test_attention_and_token_accounting(bench):
    for p, r in [(1000, 512), (32000, 512), (7, 0)]:
        seq = p + r + 1
        old_trl = 2 * seq * (seq + 1) // 2
        old_ours = p * (p + 1) // 2 + 2 * ((r + 1) * p + (r + 1) * (r + 2) // 2)
        assert bench.attention_pairs(p, r, True) == bench.attention_pairs(p, r, True, 2) == old_trl
        assert bench.attention_pairs(p, r, False) == bench.attention_pairs(p, r, False, 2) == old_ours
        assert bench.unique_tokens(p, r) == p + 2 * (r + 1)
        # K = 4: TRL runs 6 pairs' 12 sequences; ours the prompt once and 4 responses over it.
        assert bench.attention_pairs(p, r, True, 4) == 6 * old_trl
        assert bench.attention_pairs(p, r, False, 4) - p * (p + 1) // 2 == 2 * (old_ours - p * (p + 1) // 2)
        assert bench.unique_tokens(p, r, 4) == p + 4 * (r + 1)


def test_dry_run_micro_batches_are_whole_prompts(bench, capsys):
    rows = bench.main(["--dry-run", "--prompts", "48", "--response", "6", "--completions", "4", "--steps", "2",
                       "--warmup", "1"])
    (r,) = rows
    assert (r["pairs"], r["prompts"], r["micro_batches"]) == (18, 3, 3) and r["whole_groups"]
    # The packed row: the prompt once and each response once (its branch opens with the last prompt token).
    assert r["row_tokens"] == [bench.unique_tokens(48, 6, 4) + 4 - 1]
    assert r["responses_deduplicated_frac"] == pytest.approx(1 - 4 / 12)
    assert "each prompt's pairs in one: True" in capsys.readouterr().out


@pytest.mark.parametrize("k", [2, 4])
def test_dry_run_several_prompts_per_micro_batch_with_accumulation(bench, k):
    # N = 2 prompts per micro-batch, S = 4 per step: 2 steps of 2 micro-batches, each holding two whole prompts.
    (r,) = bench.main(["--dry-run", "--prompts", "40", "--response", "5", "--completions", str(k), "--steps", "1",
                       "--warmup", "1", "--micro-prompts", "2", "--step-prompts", "4"])
    per_prompt = k * (k - 1) // 2
    assert (r["pairs"], r["prompts"], r["micro_batches"]) == (8 * per_prompt, 8, 4) and r["whole_groups"]
    assert r["unique_tokens"] == 2 * bench.unique_tokens(40, 5, k)
    assert r["row_tokens"] == [r["unique_tokens"] + 2 * (k - 1)]


def test_step_prompts_must_be_a_multiple_of_the_micro_batch(bench):
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--prompts", "40", "--micro-prompts", "1", "3", "--step-prompts", "4"])


def test_csv_rows_never_land_under_another_header(tmp_path, capsys):
    from prefixdpo.benchmarks import append_csv

    path = str(tmp_path / "bench.csv")
    append_csv(path, {"a": 1, "b": 2})
    append_csv(path, {"a": 3, "b": 4})
    append_csv(path, {"a": 5, "c": 6})  # an older file's columns differ: a file of its own
    append_csv(path, {"a": 7, "c": 8})
    assert (tmp_path / "bench.csv").read_text().split() == ["a,b", "1,2", "3,4"]
    assert (tmp_path / "bench.1.csv").read_text().split() == ["a,c", "5,6", "7,8"]
    assert "this row goes to" in capsys.readouterr().out


def test_plot_of_points_that_all_ran_out_of_memory_is_skipped(bench, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    row = {"trainer": "trl+liger", "model": "llama-8b+lora16", "prompt": 128000, "response": 512, "completions": 2,
           "status": "oom", "pairs_per_s": "", "peak_mem_gib": ""}
    bench.plot([row], tmp_path / "a.png")
    assert "no point trained" in capsys.readouterr().out and not (tmp_path / "a.png").exists()
    bench.plot([row, {**row, "prompt": 64000, "status": "ok", "pairs_per_s": 0.1, "peak_mem_gib": 90.0}],
               tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0
