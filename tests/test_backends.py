"""The `reference` and `flex` backends against a float64 computation of DESIGN.md's mask.

Tolerances are derived (DESIGN.md, style 7): a backend's error against float64 may be at most 2x the error of the
same-precision explicit torch computation (`attention_math` in the inputs' dtype), plus a floor of a few ulps at the
magnitude of the unit-variance inputs, for the exact-zero cases (a query that sees one key has dq = 0 exactly).
"""

import random

import pytest
import torch

from prefix_attn import PrefixLayout, prefix_attention
from prefix_attn.reference import attention_math

LAYOUTS = [
    ([0], [[1]]),
    ([1], [[1, 1]]),
    ([7, 0, 2], [[1, 5], [3], [1, 1, 1, 1, 1, 1, 1, 1]]),
    ([127, 1], [[129, 1], [128, 2]]),  # tile size +- 1 (flex tiles are 128)
    ([3] * 30, [[2, 2]] * 30),  # many tiny documents in one tile
]


def random_qkv(T, hq, hkv, d, dtype, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(T, h, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return make(hq), make(hkv), make(hkv)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def tolerance(same_precision_err, ref, dtype, terms=1, head_dim=16):
    """2x the same-precision error, plus a floor for exact zeros: a length-D dot product (the softmax Jacobian's
    rowsum(dO * O)) carries up to D ulps of rounding at the unit scale of the inputs, per summed term (dk, dv sum over
    the GQA group). A real fault is O(1); the floor (~1e-5 in fp32) does not hide it."""
    return 2 * same_precision_err + 4 * terms * head_dim * torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (6, 1)])
def test_reference_backend_forward_and_grads(case, dtype, heads):
    layout = PrefixLayout.from_lengths(*LAYOUTS[case])
    hq, hkv = heads
    q, k, v = random_qkv(layout.total_tokens, hq, hkv, 16, dtype, seed=case, requires_grad=True)
    scale = 0.3
    out = prefix_attention(q, k, v, layout, softmax_scale=scale, backend="reference")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_math(q64, k64, v64, layout, scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())

    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    same = attention_math(qs, ks, vs, layout, scale)
    same_grads = torch.autograd.grad(same, (qs, ks, vs), g)

    assert torch.isfinite(out).all()
    assert err(out, ref) <= tolerance(err(same, ref), ref, dtype)
    for name, a, r, s in zip("qkv", grads, ref_grads, same_grads):
        terms = 1 if name == "q" else hq // hkv
        assert err(a, r) <= tolerance(err(s, r), r, dtype, terms), f"d{name}"


@pytest.mark.parametrize("case", [0, 2, 3])
def test_flex_backend_forward_on_cpu(case):
    # FlexAttention runs its forward eagerly on the CPU (no backward there); gradients are tested on the GPU
    # (tests/gpu/test_triton_gpu.py).
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = PrefixLayout.from_lengths(*LAYOUTS[case])
    q, k, v = random_qkv(layout.total_tokens, 4, 2, 16, torch.float32, seed=10 + case)
    out = prefix_attention(q, k, v, layout, backend="flex")
    ref = attention_math(q.double(), k.double(), v.double(), layout)
    same = attention_math(q, k, v, layout)
    assert err(out, ref) <= tolerance(err(same, ref), ref, torch.float32)


def test_attention_is_confined_to_allowed_keys():
    # Perturbing keys/values a query may not see leaves its output unchanged, bit for bit.
    layout = PrefixLayout.from_lengths([4, 2], [[3, 5], [1, 2]])
    q, k, v = random_qkv(layout.total_tokens, 2, 2, 8, torch.float32, seed=3)
    out = prefix_attention(q, k, v, layout)
    mask = layout.dense_mask()
    for qi in range(layout.total_tokens):
        hidden = ~mask[qi]
        k2, v2 = k.clone(), v.clone()
        k2[hidden] += 5.0
        v2[hidden] -= 3.0
        assert torch.equal(prefix_attention(q, k2, v2, layout)[qi], out[qi])


def test_bad_inputs_raise_value_errors():
    layout = PrefixLayout.from_lengths([2], [[1, 2]])
    q, k, v = random_qkv(5, 4, 2, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="total_tokens=5"):
        prefix_attention(q[:4], k[:4], v[:4], layout)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        prefix_attention(q[:, :3], k, v, layout)
    with pytest.raises(ValueError, match="3-D tensor"):
        prefix_attention(q[None], k, v, layout)
    with pytest.raises(ValueError, match="same shape"):
        prefix_attention(q, k, v[:, :1], layout)
    with pytest.raises(ValueError, match="same head_dim"):
        prefix_attention(q, k[..., :4], v[..., :4], layout)
    with pytest.raises(ValueError, match="unknown attention backend"):
        prefix_attention(q, k, v, layout, backend="magic")
    with pytest.raises(ValueError, match="PrefixLayout"):
        prefix_attention(q, k, v, {"prefix_lens": [2]})


def test_auto_backend_is_reference_on_cpu():
    from prefix_attn import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "reference"
