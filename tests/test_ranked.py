"""pairs_from_ranks: datasets of scored or ranked completions per prompt (openbmb/UltraFeedback's raw layout, Nectar)
loaded from local files and turned into pairs under each rule, with the pairs made, the ties dropped and the
completions skipped counted."""

import json
import logging

import pytest
from datasets import Dataset

from conftest import make_tokenizer
from prefixdpo import PrefixDPOConfig
from prefixdpo.data.formats import normalize_preference_dataset
from prefixdpo.data.loading import load_preference_dataset
from prefixdpo.data.stats import tokenize_preference_dataset
from prefixdpo.data.grouping import prompt_groups
from prefixdpo.data.ranked import detect_ranked_layout, expand_ranked_completions, rank_pairs

ULTRAFEEDBACK = [
    # Two completions share the top score: best_vs_rest and all drop that pair as a tie.
    {"source": "evol", "instruction": "w1 w2 w3", "models": ["a", "b", "c", "d"], "completions": [
        {"model": "a", "response": "w10 w11", "overall_score": 8.0, "critique": "fine"},
        {"model": "b", "response": "w12", "overall_score": 6.0, "critique": "ok"},
        {"model": "c", "response": "w13 w14 w15", "overall_score": 8.0, "critique": "fine"},
        {"model": "d", "response": "w16", "overall_score": 3.0, "critique": "poor"}]},
    {"source": "sharegpt", "instruction": "w4 w5", "models": ["a", "b", "c", "d"], "completions": [
        {"model": "a", "response": "w20", "overall_score": 5.0, "critique": ""},
        {"model": "b", "response": "w21 w22", "overall_score": 7.0, "critique": ""},
        {"model": "c", "response": "w23", "overall_score": 9.0, "critique": ""},
        {"model": "d", "response": "w24 w25", "overall_score": 1.0, "critique": ""}]},
    # One completion without a score, one without text: a single usable completion makes no pair.
    {"source": "flan", "instruction": "w6", "models": ["a", "b", "c"], "completions": [
        {"model": "a", "response": "w30", "overall_score": None, "critique": ""},
        {"model": "b", "response": "", "overall_score": 4.0, "critique": ""},
        {"model": "c", "response": "w31", "overall_score": 4.0, "critique": ""}]},
]
NECTAR = [
    # rank 1 is the best; two answers share rank 2.
    {"prompt": "\n\nHuman: w1 w2\n\nAssistant:", "num_responses": 4, "answers": [
        {"answer": "w40", "model": "a", "rank": 1.0},
        {"answer": "w41 w42", "model": "b", "rank": 2.0},
        {"answer": "w43", "model": "c", "rank": 2.0},
        {"answer": "w44", "model": "d", "rank": 3.0}]},
    {"prompt": "\n\nHuman: w3\n\nAssistant:", "num_responses": 2, "answers": [
        {"answer": "w45", "model": "a", "rank": 2.0},
        {"answer": "w46", "model": "b", "rank": 2.0}]},
]
# rule: (pairs, ties dropped, completions skipped, prompts without a pair)
EXPECTED = {
    "UltraFeedback": {"best_vs_rest": (2 + 3, 1, 2, 1), "all": (5 + 6, 1, 2, 1), "best_vs_worst": (1 + 1, 0, 2, 1)},
    "Nectar": {"best_vs_rest": (3, 1, 0, 1), "all": (5, 2, 0, 1), "best_vs_worst": (1, 1, 0, 1)},
}


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("rule", ["best_vs_rest", "all", "best_vs_worst"])
@pytest.mark.parametrize("layout,rows", [("UltraFeedback", ULTRAFEEDBACK), ("Nectar", NECTAR)])
def test_ranked_layouts_from_local_files(layout, rows, rule, tmp_path, caplog):
    raw = load_preference_dataset(write_jsonl(tmp_path / "train.jsonl", rows))
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.ranked"):
        pairs, report = expand_ranked_completions(raw, rule, return_report=True)
    assert report.layout.startswith(layout) and report.rule == rule and report.prompts == len(rows)
    assert (report.pairs, report.ties_dropped, report.completions_skipped, report.prompts_without_pairs) == \
        EXPECTED[layout][rule] and len(pairs) == report.pairs
    if report.ties_dropped:
        assert f"{report.ties_dropped} pairs of equal score or rank dropped" in caplog.text
    assert pairs.column_names == ["prompt", "chosen", "rejected"]
    # Chosen is the better completion in every pair; the pairs are TRL's format and tokenize as TRL does.
    normalized = normalize_preference_dataset(pairs, make_tokenizer(), on_bad_rows="error")
    tokenized = tokenize_preference_dataset(normalized, make_tokenizer())
    sizes = sorted(len(g) for g in prompt_groups(tokenized))
    assert sum(sizes) == report.pairs and len(sizes) == report.prompts - report.prompts_without_pairs


def test_the_better_completion_is_chosen():
    raw = Dataset.from_list(NECTAR)
    pairs = expand_ranked_completions(raw, "all")
    assert [(p["chosen"], p["rejected"]) for p in pairs][:3] == [(" w40", " w41 w42"), (" w40", " w43"),
                                                                 (" w40", " w44")]
    assert pairs[0]["prompt"] == NECTAR[0]["prompt"]
    uf = expand_ranked_completions(Dataset.from_list(ULTRAFEEDBACK), "best_vs_worst")
    assert uf[0] == {"prompt": [{"role": "user", "content": "w1 w2 w3"}],
                     "chosen": [{"role": "assistant", "content": "w10 w11"}],
                     "rejected": [{"role": "assistant", "content": "w16"}]}
    assert uf[1]["chosen"][0]["content"] == "w23" and uf[1]["rejected"][0]["content"] == "w24 w25"


def test_rank_pairs_rules_on_one_prompt():
    layout = detect_ranked_layout(["instruction", "completions"])
    scored = [{"response": t, "overall_score": s} for t, s in (("a", 1), ("b", 3), ("c", 3), ("d", 2))]
    assert rank_pairs(scored, layout, "best_vs_rest") == ([("b", "d"), ("b", "a")], 1, 0)
    assert rank_pairs(scored, layout, "all") == ([("b", "d"), ("b", "a"), ("c", "d"), ("c", "a"), ("d", "a")], 1, 0)
    assert rank_pairs(scored, layout, "best_vs_worst") == ([("b", "a")], 0, 0)
    with pytest.raises(ValueError, match="pairs_from_ranks"):
        rank_pairs(scored, layout, "best")


def test_datasets_with_pairs_are_left_alone():
    pairs = Dataset.from_list([{"prompt": "w1", "chosen": " w2", "rejected": " w3"}])
    assert detect_ranked_layout(pairs.column_names) is None
    same, report = expand_ranked_completions(pairs, return_report=True)
    assert same is pairs and report is None
    # A column called "answers" next to chosen/rejected does not make a dataset ranked.
    assert detect_ranked_layout(["prompt", "answers", "chosen", "rejected"]) is None


def test_config_field(tmp_path):
    def cfg(**kw):
        return PrefixDPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", **kw)

    assert cfg().pairs_from_ranks == "best_vs_rest" and cfg(pairs_from_ranks="all").pairs_from_ranks == "all"
    with pytest.raises(ValueError, match="pairs_from_ranks must be"):
        cfg(pairs_from_ranks="best")


def test_the_python_api_and_data_stats_take_ranked_files(tmp_path, tiny_model_dir, caplog):
    # The same layout through every entry point: the trainer normalizes (and expands) every dataset it is given, and
    # data-stats reads what it will train.
    import datasets

    from conftest import tiny_model
    from prefixdpo import PrefixDPOTrainer
    from prefixdpo.cli import main

    path = write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK)
    raw = datasets.load_dataset("json", data_files=path, split="train")
    args = PrefixDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, use_cpu=True,
                           per_device_train_batch_size=2, max_steps=1, save_strategy="no", disable_tqdm=True,
                           pairs_from_ranks="all")
    with caplog.at_level(logging.WARNING):
        trainer = PrefixDPOTrainer(model=tiny_model("llama", vocab_size=len(make_tokenizer())), args=args,
                                   train_dataset=raw, processing_class=make_tokenizer())
    assert len(trainer.train_dataset) == EXPECTED["UltraFeedback"]["all"][0]
    assert "1 pairs of equal score or rank dropped" in caplog.text
    trainer.train()
    out = tmp_path / "stats.png"
    assert main(["data-stats", "--dataset_name", path, "--model_name_or_path", tiny_model_dir, "--pairs_from_ranks",
                 "best_vs_worst", "--output_dir", str(tmp_path), "--data_stats_plot", str(out), "--use_cpu", "true",
                 "--bf16", "false"]) == 0
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["pairs"] == EXPECTED["UltraFeedback"]["best_vs_worst"][0]
