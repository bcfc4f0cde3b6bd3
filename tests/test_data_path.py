"""One data path: the Python API reads every dataset as the command line does (layout detection, normalization,
bad rows dropped and counted), so a TRL user who swaps the class name trains on raw public layouts."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from conftest import make_tokenizer, tiny_model

from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer
from prefixdpo.data.formats import PreferenceDataError


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, use_cpu=True,
                per_device_train_batch_size=2, max_steps=2, logging_steps=1, learning_rate=1e-3, save_strategy="no",
                max_length=64, disable_tqdm=True)
    base.update(kw)
    return PrefixDPOConfig(**base)


def _ultrafeedback_rows(n):
    # HuggingFaceH4/ultrafeedback_binarized: a text prompt, conversations that repeat it, and other columns.
    rows = []
    for i in range(n):
        prompt = f"w{i} w{i + 1} w{i + 2}"
        rows.append({
            "prompt": prompt, "prompt_id": f"id{i}",
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"w{i + 5} w7"}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"w{i + 9}"}],
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"w{i + 5} w7"}],
            "score_chosen": 8.0, "score_rejected": 5.0,
        })
    return rows


def test_raw_ultrafeedback_binarized_trains(tmp_path):
    ds = datasets.Dataset.from_list(_ultrafeedback_rows(6))
    trainer = PrefixDPOTrainer(model=tiny_model("llama", vocab_size=len(make_tokenizer())), args=_args(tmp_path),
                               train_dataset=ds, processing_class=make_tokenizer())
    # The repeated user turn became the prompt: each response is the assistant turn alone.
    first = trainer.train_dataset[0]
    tok = make_tokenizer()
    assert tok.decode(first["prompt_ids"]).split() == ["User:", "w0", "w1", "w2", "Assistant:"]
    assert tok.decode(first["chosen_ids"]).split()[:2] == ["w5", "w7"]
    trainer.train()
    assert trainer.state.global_step == 2


def test_bad_types_and_nulls_are_dropped_with_counts(tmp_path, caplog):
    # ints and nulls in text columns, as a user's jsonl has them (datasets reads mixed types as a Json column).
    rows = [{"prompt": f"w{i} w2", "chosen": f" w{i} w5", "rejected": " w6"} for i in range(6)]
    rows += [{"prompt": "w1", "chosen": 5, "rejected": " w6"}, {"prompt": "w1", "chosen": None, "rejected": " w6"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.formats"):
        trainer = PrefixDPOTrainer(model=tiny_model("llama", vocab_size=len(make_tokenizer())), args=_args(tmp_path),
                                   train_dataset=ds, processing_class=make_tokenizer())
    assert len(trainer.train_dataset) == 6
    assert "dropped 2 of 8 rows" in caplog.text and "wrong type in chosen (int, expected text)" in caplog.text
    assert "null chosen" in caplog.text
    trainer.train()
    with pytest.raises(PreferenceDataError, match="row 6: wrong type in chosen"):
        PrefixDPOTrainer(model=tiny_model("llama", vocab_size=len(make_tokenizer())),
                         args=_args(tmp_path, on_bad_rows="error"), train_dataset=ds, processing_class=make_tokenizer())


def test_hh_rlhf_text_and_eval_dict(tmp_path):
    rows = [{"chosen": f"\n\nHuman: w{i} w3\n\nAssistant: w{i} w8", "rejected": f"\n\nHuman: w{i} w3\n\nAssistant: w9"}
            for i in range(4)]
    ds = datasets.Dataset.from_list(rows)
    trainer = PrefixDPOTrainer(model=tiny_model("llama", vocab_size=len(make_tokenizer())), args=_args(tmp_path),
                               train_dataset=ds, eval_dataset={"a": ds, "b": ds}, processing_class=make_tokenizer())
    assert set(trainer.eval_dataset) == {"a", "b"} and all("prompt_ids" in d.column_names
                                                             for d in trainer.eval_dataset.values())
    trainer.train()


def test_an_unsupported_model_is_refused_before_its_data_is_touched(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefixdpo.modeling.attention import UnsupportedModelError

    config = AutoConfig.for_model("llama4_text", vocab_size=64, hidden_size=16, intermediate_size=32,
                                  intermediate_size_mlp=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=8, attention_chunk_size=8)
    model = AutoModelForCausalLM.from_config(config)
    touched = []

    class Watched(datasets.Dataset):
        def map(self, *a, **k):  # any preparation would map over the data
            touched.append(1)
            return super().map(*a, **k)

    ds = datasets.Dataset.from_list([{"prompt": "w1", "chosen": " w2", "rejected": " w3"}])
    ds.__class__ = Watched
    with pytest.raises(UnsupportedModelError, match="chunked attention"):
        PrefixDPOTrainer(model=model, args=_args(tmp_path), train_dataset=ds, processing_class=make_tokenizer())
    assert not touched
