"""What a TRL, axolotl or LLaMA-Factory user already has: `trl dpo` configs unchanged (dataset mixtures, eval splits,
streaming), a chat template of one's own, and a merged model at the end of a LoRA run.

The installed trl package ships no DPO run configs (only accelerate configs), so the mixture config here is written
as TRL's documentation writes one (DatasetMixtureConfig's docstring), on local files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_pairs

from prefixdpo.arguments import make_parser
from prefixdpo.cli import main

CPU = ["--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none",
       "--disable_tqdm", "true", "--save_strategy", "no"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_trl_dpo_key_is_accepted():
    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments, TrlParser

    trl_keys = {a.dest for a in TrlParser((ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig))._actions}
    ours = {a.dest for a in make_parser()._actions}
    assert trl_keys - ours == set()


def _mixture_files(tmp_path):
    tldr = [{"prompt": f"w{i} w1 w2 w3", "chosen": f" w{i} w4", "rejected": " w5", "extra": i} for i in range(12)]
    hh = [{"chosen": f"\n\nHuman: w{i} w7\n\nAssistant: w8 w{i}", "rejected": f"\n\nHuman: w{i} w7\n\nAssistant: w9"}
          for i in range(20)]
    return _write_jsonl(tmp_path / "tldr.jsonl", tldr), _write_jsonl(tmp_path / "hh.jsonl", hh)


def test_a_trl_mixture_config_trains(tmp_path, tiny_model_dir, caplog):
    tldr, hh = _mixture_files(tmp_path)
    config = tmp_path / "trl_dpo.yaml"
    # As `trl dpo --config` takes it: the mixture section, test_split_size, TRL's own field names.
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        "datasets:\n"
        f"  - path: json\n    data_files: {tldr}\n    split: train\n    columns: [prompt, chosen, rejected]\n"
        "    fraction: 0.5\n"
        f"  - path: {hh}\n    split: train\n    fraction: 0.5\n"
        "test_split_size: 0.25\n"
        "dataset_streaming: false\n"
        "ignore_bias_buffers: false\n"
        "beta: 0.1\n"
        "per_device_train_batch_size: 4\n"
        "per_device_eval_batch_size: 4\n"
        "max_steps: 2\n"
        "eval_strategy: steps\n"
        "eval_steps: 2\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    with caplog.at_level("INFO"):
        assert main(["train", "--config", str(config), *CPU]) == 0
    # Each entry was normalized on its own (its own layout), then 12 + 12 rows (fraction 0.5 each, capped by the
    # smaller entry) were combined and a quarter held out.
    assert "datasets[0] (json) dataset: explicit prompt, text" in caplog.text
    assert f"datasets[1] ({hh}) dataset: implicit prompt, text" in caplog.text
    assert "datasets[0] (json): 12 rows, datasets[1]" in caplog.text and ": 12 rows" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert main(["data-stats", "--config", str(config), "--output_dir", str(tmp_path / "stats"), *CPU]) == 0


def test_a_mixture_of_text_and_conversations_is_refused_in_one_line(tmp_path, tiny_model_dir, capsys):
    tldr, _ = _mixture_files(tmp_path)
    conv = _write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": [{"role": "user", "content": "w1"}], "chosen": [{"role": "assistant", "content": "w2"}],
         "rejected": [{"role": "assistant", "content": "w3"}]}])
    config = tmp_path / "mix.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ndatasets:\n  - path: {tldr}\n  - path: {conv}\n"
                      f"output_dir: {tmp_path / 'o'}\neval_strategy: 'no'\n")
    assert main(["train", "--config", str(config), *CPU]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"datasets[0] ({tldr}) is text" in errors[0] and f"datasets[1] ({conv})" in errors[0]


def test_streaming_trains_with_pairs_and_token_budget_is_refused(tmp_path, tiny_model_dir, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", make_pairs(16, seed=1, response=(1, 6)))
    args = ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--dataset_streaming", "true",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_strategy", "no", *CPU]
    assert main([*args, "--output_dir", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "model.safetensors").exists()
    assert main([*args, "--output_dir", str(tmp_path / "b"), "--batching", "token_budget",
                 "--max_tokens_per_batch", "2048"]) == 2
    err = capsys.readouterr().err
    assert "error: streaming datasets have no length, which batching='token_budget' needs" in err


CONVERSATIONS = [{"prompt": [{"role": "user", "content": f"w{i} w2"}],
                  "chosen": [{"role": "assistant", "content": f"w{i} w3"}],
                  "rejected": [{"role": "assistant", "content": "w4"}]} for i in range(8)]


def test_chat_template_path(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    from prefixdpo.quickstart import build_model

    # A base model's tokenizer with no template: conversational data is refused naming the field.
    base = tmp_path / "base"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(base)
    build_model(tok).save_pretrained(base)
    data = _write_jsonl(tmp_path / "conv.jsonl", CONVERSATIONS)
    args = ["train", "--model_name_or_path", str(base), "--dataset_name", data, "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--eval_strategy", "no", *CPU]
    assert main([*args, "--output_dir", str(tmp_path / "a")]) == 2
    assert "set chat_template_path" in capsys.readouterr().err
    # With a Jinja file it trains, and the template is saved with the model.
    template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}" \
               "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(template)
    assert main([*args, "--output_dir", str(tmp_path / "b"), "--chat_template_path", str(jinja)]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "b").chat_template == template


def _sequence_logps(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def test_merge_adapters_saves_a_merged_model_with_the_adapters_log_probs(tmp_path, tiny_model_dir):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    data = _write_jsonl(tmp_path / "d.jsonl", make_pairs(16, seed=2, response=(1, 6)))
    out = tmp_path / "lora"
    assert main(["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--use_peft", "true",
                 "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--learning_rate", "5e-2",
                 "--max_steps", "3", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
                 "--merge_adapters", "true", "--output_dir", str(out), *CPU]) == 0
    assert (out / "adapter_model.safetensors").exists()
    merged_dir = out / "merged"
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    adapter = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(10, 40, (3, 12), generator=torch.Generator().manual_seed(0))
    got, want = _sequence_logps(merged, ids), _sequence_logps(adapter, ids)
    # Merging adds B @ A into W: the same product in another order, so float32 rounding of the logits only.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(want, _sequence_logps(base, ids), atol=1e-3)  # the adapters did train


def test_merge_adapters_needs_peft(tmp_path, tiny_model_dir, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", make_pairs(8, seed=2, response=(1, 6)))
    assert main(["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--merge_adapters", "true",
                 "--eval_strategy", "no", "--output_dir", str(tmp_path / "o"), *CPU]) == 2
    assert "merge_adapters: true needs a LoRA/PEFT run" in capsys.readouterr().err


@pytest.mark.parametrize("doc", ["docs/USAGE.md"])
def test_usage_has_the_side_by_side_table(doc):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    for key in ("`chat_template_path`", "axolotl", "LLaMA-Factory", "`merge_adapters`", "`datasets`"):
        assert key in text, key
