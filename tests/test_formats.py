"""Dataset loading and normalization: the common public layouts from local files, and every kind of bad input."""

from __future__ import annotations

import json
import logging

import pytest
from datasets import Dataset, DatasetDict

from prefixdpo.data.formats import (
    PreferenceDataError,
    check_chat_template,
    ensure_pad_token,
    normalize_preference_dataset,
)
from prefixdpo.data.loading import load_preference_dataset
from prefixdpo.data.stats import (
    dataset_statistics,
    kept_by_max_length,
    report_overlong_pairs,
    tokenize_preference_dataset,
    tokenized_lengths,
)
from prefixdpo.quickstart import build_tokenizer


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------------------------------------
# Layouts of public datasets, as local files
# ---------------------------------------------------------------------------------------------------------------------

HH_ROWS = [  # Anthropic/hh-rlhf: implicit prompt, text
    {
        "chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital.",
        "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: I don't know.",
    },
    {  # two turns; the answers agree on their first words ("It is"): the prompt must still end at "Assistant:"
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is water wet?\n\nAssistant: It is, yes.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is water wet?\n\nAssistant: It is not.",
    },
]

UF_ROWS = [  # HuggingFaceH4/ultrafeedback_binarized: text prompt, conversations that repeat the user turn
    {
        "prompt": "Name a prime number.",
        "prompt_id": "a1",
        "chosen": [user("Name a prime number."), assistant("7 is prime.")],
        "rejected": [user("Name a prime number."), assistant("9 is prime.")],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    },
    {
        "prompt": "Say hi.",
        "prompt_id": "a2",
        "chosen": [user("Say hi."), assistant("Hi!")],
        "rejected": [user("Say hi."), assistant("No.")],
        "score_chosen": 8.0,
        "score_rejected": 1.0,
    },
]

TLDR_ROWS = [  # trl-lib/tldr-preference: explicit prompt, text
    {"prompt": "SUBREDDIT: r/cats\nPOST: My cat sleeps all day.\nTL;DR:", "chosen": " cat sleeps a lot",
     "rejected": " dogs are great"},
    {"prompt": "SUBREDDIT: r/books\nPOST: I read ten books this month.\nTL;DR:", "chosen": " read many books",
     "rejected": " books"},
]

MULTITURN_ROWS = [  # implicit prompt, multi-turn conversations that differ in the last assistant turn
    {
        "chosen": [user("Hi"), assistant("Hello, how can I help?"), user("Add 2 and 2."), assistant("4")],
        "rejected": [user("Hi"), assistant("Hello, how can I help?"), user("Add 2 and 2."), assistant("5")],
    },
    {
        "chosen": [user("Tell me a color."), assistant("Blue.")],
        "rejected": [user("Tell me a color."), assistant("Seven.")],
    },
]

EXPLICIT_CONV_REPEATED_ROWS = [  # conversational prompt that is repeated inside chosen/rejected
    {
        "prompt": [user("Capital of Italy?")],
        "chosen": [user("Capital of Italy?"), assistant("Rome.")],
        "rejected": [user("Capital of Italy?"), assistant("Milan.")],
    },
]


def test_hh_rlhf_implicit_prompt(tmp_path, tokenizer):
    ds = load_preference_dataset(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS))
    out, report = normalize_preference_dataset(ds, tokenizer, return_report=True)
    assert report.layout.startswith("implicit prompt, text")
    assert out[0] == {
        "prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:",
        "chosen": " Paris is the capital.",
        "rejected": " I don't know.",
    }
    assert out[1]["prompt"].endswith("Is water wet?\n\nAssistant:")
    assert out[1]["chosen"] == " It is, yes." and out[1]["rejected"] == " It is not."
    for row, original in zip(out, HH_ROWS, strict=True):  # nothing lost: prompt + response is the original text
        assert row["prompt"] + row["chosen"] == original["chosen"]
        assert row["prompt"] + row["rejected"] == original["rejected"]


def test_ultrafeedback_binarized(tmp_path, tokenizer):
    ds = load_preference_dataset(write_jsonl(tmp_path / "uf.jsonl", UF_ROWS))
    out, report = normalize_preference_dataset(ds, tokenizer, return_report=True)
    assert "UltraFeedback" in report.layout and report.conversational
    assert out[0]["prompt"] == [user("Name a prime number.")]
    assert out[0]["chosen"] == [assistant("7 is prime.")]
    assert out[0]["rejected"] == [assistant("9 is prime.")]
    assert out[0]["score_chosen"] == 9.0  # other columns are kept
    tok = tokenize_preference_dataset(out, tokenizer)
    # The chat template renders the user turn once, in the prompt; each response ends with eos (<|end|>).
    assert tokenizer.decode(tok[0]["prompt_ids"]).count("<|user|>") == 1
    assert tok[0]["chosen_ids"][-1] == tokenizer.eos_token_id


def test_tldr_explicit_text(tmp_path, tokenizer):
    path = tmp_path / "tldr.parquet"
    Dataset.from_list(TLDR_ROWS).to_parquet(str(path))
    out = normalize_preference_dataset(load_preference_dataset(str(path)), tokenizer)
    assert out.to_list() == TLDR_ROWS


def test_multiturn_conversational(tmp_path, tokenizer):
    ds = load_preference_dataset(write_jsonl(tmp_path / "mt.jsonl", MULTITURN_ROWS))
    out = normalize_preference_dataset(ds, tokenizer)
    assert out[0]["prompt"] == MULTITURN_ROWS[0]["chosen"][:3]
    assert out[0]["chosen"] == [assistant("4")] and out[0]["rejected"] == [assistant("5")]
    assert out[1]["prompt"] == [user("Tell me a color.")]
    lengths = tokenized_lengths(tokenize_preference_dataset(out, tokenizer))
    assert all(n > 0 for column in lengths for n in column)


def test_conversational_prompt_repeated_in_responses(tokenizer):
    out = normalize_preference_dataset(Dataset.from_list(EXPLICIT_CONV_REPEATED_ROWS), tokenizer)
    assert out[0] == {"prompt": [user("Capital of Italy?")], "chosen": [assistant("Rome.")],
                      "rejected": [assistant("Milan.")]}


def test_sharegpt_from_value_and_renamed_columns(tokenizer):
    rows = [{"question": [{"from": "human", "value": "2+2?"}], "good": [{"from": "gpt", "value": "4"}],
             "bad": [{"from": "gpt", "value": "5"}]}]
    out = normalize_preference_dataset(Dataset.from_list(rows), tokenizer, prompt_column="question",
                                       chosen_column="good", rejected_column="bad")
    assert out[0]["prompt"] == [user("2+2?")]
    assert out[0]["chosen"] == [assistant("4")]


def test_text_responses_with_conversational_prompt(tokenizer):
    rows = [{"prompt": [user("Pick a number.")], "chosen": "3", "rejected": "three hundred"}]
    out = normalize_preference_dataset(Dataset.from_list(rows), tokenizer)
    assert out[0]["chosen"] == [assistant("3")] and out[0]["rejected"] == [assistant("three hundred")]


def test_load_csv_directory_splits_and_saved(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    Dataset.from_list(TLDR_ROWS).to_csv(str(d / "train.csv"), index=False)
    Dataset.from_list(TLDR_ROWS[:1]).to_csv(str(d / "test.csv"), index=False)
    both = load_preference_dataset(str(d), split=None)
    assert set(both) == {"train", "test"} and len(both["test"]) == 1
    assert len(load_preference_dataset(str(d), split="train[:1]")) == 1
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(TLDR_ROWS), "test": Dataset.from_list(TLDR_ROWS[:1])}).save_to_disk(
        str(saved))
    assert len(load_preference_dataset(str(saved), split="test")) == 1
    assert len(load_preference_dataset(str(saved), split="train[:1]")) == 1
    with pytest.raises(PreferenceDataError, match="split 'validation' not found.*'test', 'train'"):
        load_preference_dataset(str(saved), split="validation")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before training, or rows dropped and counted
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_column(tokenizer):
    with pytest.raises(PreferenceDataError, match=r"no 'rejected' column.*rename"):
        normalize_preference_dataset(Dataset.from_list([{"prompt": "a", "chosen": "b", "reject": "c"}]), tokenizer)


def test_unpaired_dataset_is_named(tokenizer):
    rows = [{"prompt": "a", "completion": "b", "label": True}]
    with pytest.raises(PreferenceDataError, match="unpaired"):
        normalize_preference_dataset(Dataset.from_list(rows), tokenizer)


@pytest.mark.parametrize(
    "rows, column",
    [
        ([{"prompt": "a", "chosen": 1, "rejected": 2}], "chosen"),
        ([{"prompt": "a", "chosen": ["x", "y"], "rejected": ["x", "z"]}], "chosen"),
        ([{"prompt": 5, "chosen": "b", "rejected": "c"}], "prompt"),
    ],
)
def test_wrong_column_type(rows, column, tokenizer):
    with pytest.raises(PreferenceDataError, match=rf"column '{column}' has type .*expected text"):
        normalize_preference_dataset(Dataset.from_list(rows), tokenizer)


def test_wrong_type_in_one_row_of_a_file(tmp_path, tokenizer, caplog):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3 + [{"prompt": "a", "chosen": 5, "rejected": "c"}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "mixed.jsonl", rows))
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.formats"):
        out, report = normalize_preference_dataset(ds, tokenizer, return_report=True)
    assert len(out) == 3 and report.dropped == {"wrong type in chosen (int, expected text)": 1}
    assert "wrong type in chosen (int, expected text) (e.g. row 3)" in caplog.text
    with pytest.raises(PreferenceDataError, match="row 3: wrong type in chosen"):
        normalize_preference_dataset(ds, tokenizer, on_bad_rows="error")


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(PreferenceDataError, match="could not load the file"):
        load_preference_dataset(str(path))


def test_chosen_text_rejected_conversation(tokenizer):
    # Arrow cannot hold both in one column, so this arrives as two differently typed columns.
    rows = [{"prompt": "a", "chosen": "b", "rejected": [assistant("c")]}]
    with pytest.raises(PreferenceDataError, match="both must be text or both conversations"):
        normalize_preference_dataset(Dataset.from_list(rows), tokenizer)


BAD_ROWS = [
    {"prompt": "p0", "chosen": "good", "rejected": "bad"},
    {"prompt": "p1", "chosen": None, "rejected": "bad"},  # null response
    {"prompt": "p2", "chosen": "good", "rejected": "   "},  # empty response
    {"prompt": "", "chosen": "good", "rejected": "bad"},  # empty prompt
    {"prompt": None, "chosen": "good", "rejected": "bad"},  # null prompt
    {"prompt": "p5", "chosen": "same", "rejected": "same"},  # no preference
    {"prompt": "p6", "chosen": "good", "rejected": "bad"},
]


def test_bad_rows_are_dropped_and_counted(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.formats"):
        out, report = normalize_preference_dataset(Dataset.from_list(BAD_ROWS), tokenizer, return_report=True)
    # Null values and identical responses are dropped; empty ones train as TRL trains them, and are counted.
    assert [r["prompt"] for r in out] == ["p0", "p2", "", "p6"]
    assert report.n_dropped == 3 and report.rows_in == 7 and report.rows_out == 4
    assert report.dropped == {"null chosen": 1, "null prompt": 1, "chosen equals rejected (no preference signal)": 1}
    assert report.examples["null chosen"] == 1 and report.examples["null prompt"] == 4
    assert report.empty == {"empty rejected": 1, "empty prompt": 1}
    message = caplog.text
    assert "dropped 3 of 7 rows" in message and "null chosen (e.g. row 1)" in message
    assert "2 rows have an empty part (1 x empty rejected; 1 x empty prompt)" in message


@pytest.mark.parametrize("index, reason", [(1, "null chosen"), (4, "null prompt"), (5, "chosen equals rejected")])
def test_bad_row_error_mode_names_the_row(index, reason, tokenizer):
    rows = [BAD_ROWS[0], BAD_ROWS[index]]
    with pytest.raises(PreferenceDataError, match=rf"row 1: {reason}"):
        normalize_preference_dataset(Dataset.from_list(rows), tokenizer, on_bad_rows="error")


def test_conversational_bad_rows(tokenizer, caplog):
    rows = [
        {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        {"prompt": [user("q")], "chosen": [assistant("")], "rejected": [assistant("b")]},  # empty response: kept
        {"prompt": [user("q")], "chosen": [], "rejected": [assistant("b")]},  # no message at all
        {"prompt": [user("")], "chosen": [assistant("a")], "rejected": [assistant("b")]},  # empty prompt: kept
        {"prompt": [user("q")], "chosen": [{"role": "assistant"}], "rejected": [assistant("b")]},  # no content
    ]
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.formats"):
        out, report = normalize_preference_dataset(Dataset.from_list(rows), tokenizer, return_report=True)
    assert len(out) == 3 and report.n_dropped == 2 and report.empty == {"empty chosen": 1, "empty prompt": 1}
    assert "dropped 2 of 5 rows" in caplog.text and "no messages in chosen" in caplog.text


def test_implicit_prompt_with_nothing_shared_trains_unshared(tokenizer):
    # "Yes." / "No." share no beginning: the prompt is empty, as TRL's extract_prompt makes it.
    rows = [{"chosen": "Yes.", "rejected": "No."}, HH_ROWS[0]]
    out, report = normalize_preference_dataset(Dataset.from_list(rows), tokenizer, return_report=True)
    assert len(out) == 2 and out[0]["prompt"] == "" and report.empty == {"empty prompt": 1}


def test_all_rows_bad_is_an_error(tokenizer):
    with pytest.raises(PreferenceDataError, match="no usable rows"):
        normalize_preference_dataset(Dataset.from_list([BAD_ROWS[1], BAD_ROWS[5]]), tokenizer)


def test_conversational_data_without_chat_template():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(PreferenceDataError, match="no chat template"):
        normalize_preference_dataset(Dataset.from_list(MULTITURN_ROWS), tok)
    with pytest.raises(PreferenceDataError, match="clone_chat_template"):
        check_chat_template(tok)
    # Text data needs no template.
    assert len(normalize_preference_dataset(Dataset.from_list(TLDR_ROWS), tok)) == 2


def test_missing_pad_token_defaults_to_eos(caplog):
    tok = build_tokenizer()
    tok.pad_token = None
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.formats"):
        ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token and "no pad token" in caplog.text
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(PreferenceDataError, match="neither a pad nor an eos"):
        ensure_pad_token(tok)


def test_missing_paths_and_hub_errors(tmp_path):
    with pytest.raises(PreferenceDataError, match="does not exist"):
        load_preference_dataset(str(tmp_path / "nope" / "x.jsonl"))
    bad_ext = tmp_path / "data.xlsx"
    bad_ext.write_text("x")
    with pytest.raises(PreferenceDataError, match="cannot tell the format"):
        load_preference_dataset(str(bad_ext))
    path = write_jsonl(tmp_path / "one.jsonl", TLDR_ROWS)
    with pytest.raises(PreferenceDataError, match="split 'test' not found"):
        load_preference_dataset(path, split="test")


def test_overlong_pairs_are_reported(caplog):
    prompts, chosen, rejected = [5, 20, 9, 3], [2, 2, 4, 1], [2, 3, 1, 1]
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.stats"):
        report = report_overlong_pairs(prompts, chosen, rejected, max_length=10)
    assert report.dropped == 1 and report.first_dropped == 1  # prompt of 20 >= 10: dropped by TRL's rule
    assert report.truncated == 1 and report.first_truncated == 2 and report.tokens_cut == 3  # 9+4 > 10
    assert "1 of 4 pairs have a prompt of max_length=10" in caplog.text
    assert "1 of 4 pairs are longer than max_length=10" in caplog.text
    assert report_overlong_pairs(prompts, chosen, rejected, max_length=None).dropped == 0


def _pairs(lengths, start=10):
    """Tokenized pairs of the given (prompt, chosen, rejected) lengths; responses differ from each other."""
    out = []
    for p, c, r in lengths:
        out.append({"prompt_ids": list(range(start, start + p)), "chosen_ids": [1] * c, "rejected_ids": [2] * r})
    return out


def test_dataset_statistics_counts():
    pairs = _pairs([(10, 2, 5), (4, 3, 1)])
    stats = dataset_statistics(pairs, batch_size=2)
    assert stats["tokens_trl"] == (20 + 7) + (8 + 4)
    assert stats["tokens_packed"] == (10 + 7 + 1) + (4 + 4 + 1)
    assert stats["tokens_trl_padded"] == 2 * 2 * 15
    assert stats["saved_by_prefix_sharing"] == 9 + 3
    assert stats["tokens_saved_frac"] == pytest.approx(1 - 27 / 39)
    assert stats["micro_batch_row_tokens"]["max"] == 18 + 9
    assert stats["suggested_token_budget"] == 256


def test_dataset_statistics_count_what_trains_after_truncation():
    # max_length=12: pair 0's rejected sequence (10 + 5) is cut to 12 tokens, as TRL's collator cuts it; pair 2's
    # prompt alone fills max_length, so TRL drops it.
    pairs = _pairs([(10, 2, 5), (4, 3, 1), (30, 1, 1)])
    kept = kept_by_max_length(pairs, 12, "keep_start")
    assert kept == [0, 1]
    stats = dataset_statistics([pairs[i] for i in kept], batch_size=2, max_length=12, pairs_in=3)
    assert (stats["pairs_in"], stats["pairs"], stats["pairs_dropped"], stats["pairs_truncated"]) == (3, 2, 1, 1)
    assert stats["tokens_trl"] == (12 + 12) + (7 + 5)
    assert stats["tokens_packed"] == (10 + 1 + 2 + 2) + (4 + 1 + 3 + 1)
    assert stats["tokens_trl_padded"] == 2 * 2 * 12
    assert 0 < stats["saved_by_prefix_sharing"] and 0 <= stats["saved_by_packing"]
    # The budget holds the longest pair and max_length at least (the trainer refuses a budget below either).
    assert stats["suggested_token_budget"] >= max(stats["longest_packed_pair"], 12)
    with pytest.raises(PreferenceDataError, match="no pair would train: all 1 pairs"):
        dataset_statistics([], max_length=12, pairs_in=1)


def test_dataset_statistics_budget_covers_a_long_pair():
    stats = dataset_statistics(_pairs([(300, 200, 100)]), batch_size=1, max_length=1024)
    assert stats["longest_packed_pair"] == 601 and stats["suggested_token_budget"] == 1024
    stats = dataset_statistics(_pairs([(900, 600, 600)]), batch_size=1, max_length=1024)
    assert stats["longest_packed_pair"] == 900 + 1 + 124 + 124
    assert stats["suggested_token_budget"] == 1280 and stats["tokens_saved_frac"] > 0
