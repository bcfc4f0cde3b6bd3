"""TRL's gpt-oss DPO tests (TRL's tests/test_dpo_trainer.py: ``test_train`` with its tiny GptOssForCausalLM,
``test_train_gpt_oss``, ``test_train_moe_with_peft_config``, ``test_train_moe_peft_model``), run with
PrefixDPOTrainer on the CPU.

The hub's tiny gpt-oss and TRL's test datasets are out of reach here, so the model is a tiny gpt-oss built from a
config (attention sinks, sliding-window layers of 4 positions against prompts several times longer, 4 experts) and
the data is written in the datasets' formats: standard preference text for TRL's "zen" set, and for its "harmony"
set conversational preference data whose assistant messages carry the Harmony format's ``thinking`` field, through a
chat template that renders it as gpt-oss's does (an analysis channel before the final answer). The scenarios and the
assertions are TRL's: the run trains, logs its loss and the MoE aux loss (TRL adds it for gpt-oss), every trainable
parameter changes, and with LoRA on the experts' parameters the base weights do not.
"""

import pytest
import torch
from datasets import Dataset

from conftest import make_pairs, make_tokenizer, random_words, tiny_model
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer

HARMONY_TEMPLATE = (
    "{% for m in messages %}<|start|> {{ m['role'] }} "
    "{% if m['role'] == 'assistant' and m.get('thinking') %}<|channel|> analysis <|message|> {{ m['thinking'] }} "
    "<|end|> <|start|> assistant {% endif %}"
    "{% if m['role'] == 'assistant' %}<|channel|> final {% endif %}<|message|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}<|return|> {% else %}<|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|> assistant {% endif %}"
)


def _args(tmp_path, **kw):
    # TRL's arguments (learning rate 0.1, its defaults otherwise: gradient checkpointing, bf16), on the CPU.
    return PrefixDPOConfig(output_dir=str(tmp_path), learning_rate=0.1, report_to="none", use_cpu=True,
                           disable_tqdm=True, save_strategy="no", **kw)


def _zen():
    return Dataset.from_list(make_pairs(17, seed=11, prompt=(6, 14), response=(1, 6)))


def _harmony():
    import random

    rng = random.Random(3)
    rows = []
    for _ in range(19):
        def answer():
            return [{"role": "assistant", "thinking": random_words(rng, rng.randint(3, 6)),
                     "content": random_words(rng, rng.randint(1, 8))}]

        rows.append({"prompt": [{"role": "user", "content": random_words(rng, rng.randint(4, 10))}],
                     "chosen": answer(), "rejected": answer()})
    return Dataset.from_list(rows)


def _gpt_oss():
    model = tiny_model("gpt_oss", seed=0)
    assert model.config.model_type == "gpt_oss" and model.config.router_aux_loss_coef > 0
    return model


def _train(trainer):
    previous = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    return previous


@pytest.mark.parametrize("data", ["zen", "harmony"])
def test_train_gpt_oss(data, tmp_path):
    tokenizer = make_tokenizer()
    if data == "harmony":
        tokenizer.chat_template = HARMONY_TEMPLATE
    trainer = PrefixDPOTrainer(model=_gpt_oss(), args=_args(tmp_path), processing_class=tokenizer,
                               train_dataset=_zen() if data == "zen" else _harmony())
    previous = _train(trainer)
    assert trainer.aux_loss_enabled and trainer.state.log_history[-1]["aux_loss"] is not None
    for n, param in previous.items():
        assert not torch.equal(param, trainer.model.get_parameter(n)), f"Parameter {n} has not changed."


def _assert_only_adapters_changed(trainer, previous, base_names):
    for n, param in previous.items():
        new = trainer.model.get_parameter(n)
        if n in base_names:
            torch.testing.assert_close(param, new, msg=f"Parameter {n} has changed.")
        elif "base_layer" not in n and "ref" not in n:
            assert not torch.equal(param, new), f"Parameter {n} has not changed."


EXPERT_PARAMETERS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def test_train_moe_with_peft_config(tmp_path):
    from peft import LoraConfig

    model = _gpt_oss()
    base_names = {f"base_model.model.{n}" for n, _ in model.named_parameters()}
    trainer = PrefixDPOTrainer(model=model, args=_args(tmp_path), processing_class=make_tokenizer(),
                               train_dataset=_zen(), peft_config=LoraConfig(target_parameters=EXPERT_PARAMETERS))
    _assert_only_adapters_changed(trainer, _train(trainer), base_names)


def test_train_moe_peft_model(tmp_path):
    # A model wrapped by PEFT before the trainer. TRL 1.16 copies its adapter into a frozen "ref" adapter for the
    # reference, except under PEFT 0.17-0.19, which allow one adapter per model with target_parameters (the
    # reference is then the model with its adapter disabled; TRL's test of that case asserts no "ref").
    import peft
    from packaging.version import Version
    from peft import LoraConfig, get_peft_model

    model = _gpt_oss()
    base_names = {f"base_model.model.{n}" for n, _ in model.named_parameters()}
    model = get_peft_model(model, LoraConfig(target_parameters=EXPERT_PARAMETERS))
    trainer = PrefixDPOTrainer(model=model, args=_args(tmp_path), processing_class=make_tokenizer(),
                               train_dataset=_zen())
    assert ("ref" in trainer.model.peft_config) == (Version(peft.__version__) >= Version("0.20.0"))
    _assert_only_adapters_changed(trainer, _train(trainer), base_names)
