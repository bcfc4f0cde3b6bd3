"""``ref_attn_backend``: which packed calls compute reference log-probs, and that they (only they) get its backend.

The reference forward needs no backward, so it may run FP8 attention; the policy must never. TRL obtains
the reference in three ways, each checked here on a one-step CPU run: a separate reference model, the PEFT policy
with its adapter disabled, and (``precompute_ref_log_probs`` without a reference model) the policy itself before
training. Every packed call is recorded with the backend it was given and whether gradients were on; the recorded
call then runs with the CPU ``reference`` backend, since this test is about routing (the FP8 kernel's numerics are
tested on the GPU, tests/gpu/test_fp8_gpu.py).
"""

import copy

import pytest
from datasets import Dataset

import prefixdpo.modeling.packed as packed_mod
from conftest import make_pairs, make_tokenizer, tiny_model
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer

POLICY, REF = "reference", "triton_fp8_rotate"  # ref_attn_backend="triton_fp8" with fp8_rotation (the default)


@pytest.fixture
def calls(monkeypatch):
    seen = []
    original = packed_mod.packed_forward

    def spy(model, packed, *, backend, **kw):
        import torch

        seen.append((torch.is_grad_enabled(), backend))
        return original(model, packed, backend="reference", **kw)

    monkeypatch.setattr(packed_mod, "packed_forward", spy)
    return seen


def _train(tmp_path, ref_model=None, peft_config=None, **kw):
    args = PrefixDPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4, max_steps=1,
                           save_strategy="no", max_length=40, disable_tqdm=True, bf16=False, attn_backend=POLICY,
                           ref_attn_backend="triton_fp8", **kw)
    model = tiny_model("llama", seed=0)
    if ref_model == "copy":
        ref_model = copy.deepcopy(model)
    trainer = PrefixDPOTrainer(model=model, ref_model=ref_model, args=args,
                               train_dataset=Dataset.from_list(make_pairs(8, seed=1)),
                               processing_class=make_tokenizer(), peft_config=peft_config)
    trainer.train()
    return trainer


def _split(calls):
    with_grad = {b for g, b in calls if g}
    without = [b for g, b in calls if not g]
    return with_grad, without


def test_separate_reference_model(tmp_path, calls):
    _train(tmp_path, ref_model="copy")
    with_grad, without = _split(calls)
    assert with_grad == {POLICY}
    assert without == [REF], calls  # one step: one reference forward


def test_fp8_without_rotation(tmp_path, calls):
    _train(tmp_path, ref_model="copy", fp8_rotation=False)
    with_grad, without = _split(calls)
    assert with_grad == {POLICY}
    assert without == ["triton_fp8"], calls


def test_peft_adapter_disabled_is_the_reference(tmp_path, calls):
    from peft import LoraConfig

    _train(tmp_path, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with_grad, without = _split(calls)
    assert with_grad == {POLICY}
    assert without == [REF], calls


def test_precomputed_reference_without_ref_model(tmp_path, calls):
    _train(tmp_path, precompute_ref_log_probs=True)
    with_grad, without = _split(calls)
    assert with_grad == {POLICY}
    assert without and set(without) == {REF}, calls  # the precompute pass; training then calls the policy only


def test_policy_evaluation_is_not_a_reference_call(tmp_path, calls):
    """Evaluation runs the policy without gradients too: it must keep the policy's backend."""
    trainer = _train(tmp_path, ref_model="copy")
    calls.clear()
    trainer.evaluate(Dataset.from_list(make_pairs(4, seed=2)))
    _, without = _split(calls)
    assert sorted(without) == sorted([POLICY, REF]), calls


def test_unknown_ref_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ref_attn_backend must be None or one of"):
        PrefixDPOConfig(output_dir=str(tmp_path), bf16=False, ref_attn_backend="fp4")


def test_command_line_fields(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PrefixDPOConfig)
    base = ["--output_dir", str(tmp_path), "--bf16", "false"]
    (args,) = parser.parse_args_into_dataclasses(base + ["--ref_attn_backend", "triton_fp8", "--fp8_rotation", "false"])
    assert (args.ref_attn_backend, args.fp8_rotation) == ("triton_fp8", False)
    (args,) = parser.parse_args_into_dataclasses(base)
    assert (args.ref_attn_backend, args.fp8_rotation) == (None, True)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(base + ["--ref_attn_backend", "fp4"])
