"""GPU tests of the `fa4` backend (FlashAttention-4 on the per-branch decomposition), against float64 as the other
backends are held: output and all three gradients on the random-layout harness and the awkward layouts, and model
exactness (packed and prefix-shared against each pair alone) in bf16 for Llama and Qwen3; windows, soft-caps and
sinks (FlashAttention-4's own window and soft-cap, the sink epilogue on its differentiable lse) as the triton
backend's are held.

Skipped where FlashAttention-4 is not installed. Tolerances as in test_triton_gpu.py: error vs float64 <= 2 x the
error of ``attention_math`` run by torch in the same dtype, plus four fp32 epsilons."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, random_layout, random_options, tiny_model
from test_triton_gpu import AWKWARD, OPTION_CASES, _check, _with_options

from prefix_attn import PrefixLayout, prefix_attention
from prefix_attn.ops import resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("flash_attn.cute")

DEV = "cuda"


def _fa4(layout):
    return lambda q, k, v: prefix_attention(q, k, v, layout, backend="fa4")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16)],
                         ids=["d128-bf16", "d64-bf16", "d128-fp16"])
def test_random_layouts(seed, d, dtype):
    layout = random_layout(random.Random(seed), tokens=random.Random(seed).choice([700, 1500, 2600]), device=DEV)
    hq, hkv = [(8, 2), (4, 4), (6, 3), (7, 1)][seed]
    _check(_fa4(layout), layout, hq, hkv, d, dtype, seed, label=f"seed {seed}")


@pytest.mark.parametrize("seed", range(4))
def test_random_layouts_with_options(seed):
    rng = random.Random(1000 + seed)
    layout = random_layout(rng, tokens=rng.choice([700, 1500, 2600]), device=DEV)
    opts = random_options(rng)
    hq, hkv = [(8, 2), (4, 4), (6, 3), (8, 1)][seed]
    _check(_with_options(layout, "fa4", **opts), layout, hq, hkv, 128, torch.bfloat16, seed,
           label=f"seed {seed} {opts}", **opts)


@pytest.mark.parametrize("opts", OPTION_CASES, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_options_on_long_prefixes(opts):
    layout = PrefixLayout.from_lengths([1500, 300, 0], [[200, 129, 1, 64], [127, 128], [700]], device=DEV)
    needs = frozenset({"window": "window", "softcap": "softcap", "sinks": "return_lse"}[k] for k in opts)
    assert resolve_backend("fa4", torch.device(DEV), torch.bfloat16, 128, needs) == "fa4"  # not handed to triton
    _check(_with_options(layout, "fa4", **opts), layout, 8, 2, 128, torch.bfloat16, 7, label=f"fa4 {opts}", **opts)


@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_awkward_layouts(name, prefix, branches):
    layout = PrefixLayout.from_lengths(prefix, branches, device=DEV)
    _check(_fa4(layout), layout, 8, 2, 128, torch.bfloat16, 0, label=name)


@pytest.mark.parametrize("arch", ["llama", "qwen3", *FAMILIES])
def test_model_exactness_in_bf16(arch):
    """Per-pair log-probs and gradients of the packed row with fa4 against each pair alone, in bf16: the packed
    error against the float32 unshared run may be at most twice the bf16 unshared run's own error (plus a floor).
    The families run their options through fa4: windows of 48 positions that bite on these rows (LFM2 has none),
    Gemma 2's soft-cap, gpt-oss's sinks."""
    from test_exactness import (PrefixPackingCollator, VOCAB, dpo_loss, grads, packed_logps, packed_model,
                                random_examples)
    from test_model_gpu import to_cuda

    dims = dict(hidden_size=128, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    if arch in FAMILIES and arch != "lfm2":
        dims["sliding_window"] = 48
    model32 = tiny_model(arch, vocab_size=VOCAB, seed=1, **dims).cuda()
    examples = random_examples(10, seed=5, max_prompt=200, max_resp=150)
    batch = to_cuda(PrefixPackingCollator(pad_token_id=0)(examples))

    def alone(model):
        res = []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                ids = torch.tensor([ex["prompt_ids"] + ex[key]], device=DEV)
                logits = model(input_ids=ids).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
                res.append(lp[len(ex["prompt_ids"]) - 1:].sum())
        return torch.stack(res)

    truth = alone(model32)
    ref = truth.detach() + torch.randn_like(truth)
    truth_grads = grads(model32, dpo_loss(truth, ref))
    model16 = tiny_model(arch, vocab_size=VOCAB, seed=1, dtype=torch.bfloat16, **dims).cuda()
    same = alone(model16)
    same_grads = grads(model16, dpo_loss(same, ref))
    pm = packed_model(model16, "fa4")
    got = packed_logps(pm, batch)
    got_grads = grads(pm, dpo_loss(got, ref))

    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    floor = 4 * torch.finfo(torch.float32).eps
    assert err(got, truth) <= 2 * err(same, truth) + floor
    for g, s, t in zip(got_grads, same_grads, truth_grads):
        assert err(g, t) <= 2 * err(s, t) + floor
