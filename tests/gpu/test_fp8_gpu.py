"""GPU tests of the FP8 forward (``prefix_attn.triton.fp8``): the fused quantize kernel and the attention kernel at
GPU tiles.

Run on a CUDA machine with FP8 tensor cores (compute capability >= 8.9; Hopper is the target):
``python -m pytest -m gpu tests/gpu/test_fp8_gpu.py -q``. The default (CPU) run deselects them.

Tolerances, derived rather than tuned (derivations in tests/test_fp8.py's module doc):
- quantize kernel vs ``fp8_reference.quantize_reference``: scales and values bit for bit without rotation; with
  rotation (tensor-core sums in another order) scales to 32 fp32 eps, values to one e4m3 step on at most 0.1% of
  elements.
- attention vs float64 on the ORIGINAL inputs (``attention_math``): relative error at most 2x that of
  ``fp8_attention_reference`` (the same quantization and P rounding, fp32 torch on the GPU) plus four fp32 eps.
The output buffer is poisoned with NaN first: every element must be written, none non-finite.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import assert_quantized_as_reference, random_layout
from prefix_attn import PrefixLayout, fp8_reference as fr, prefix_attention
from prefix_attn.reference import attention_math

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                       reason="needs FP8 tensor cores (compute capability >= 8.9)"),
]

DEV = "cuda"
F32_EPS = torch.finfo(torch.float32).eps


def _tf():
    from prefix_attn import triton

    return triton


def _qkv(T, hq, hkv, d, dtype, seed, outliers=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(T, h, d, device=DEV, generator=g) for h in (hq, hkv, hkv))
    if outliers:
        ch = torch.randperm(d, device=DEV, generator=g)[:outliers]
        mult = 10 + 40 * torch.rand(outliers, device=DEV, generator=g)
        q[:, :, ch] *= mult
        k[:, :, ch] *= mult
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotate"])
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16)],
                         ids=["d128-bf16", "d64-bf16", "d128-fp16"])
@pytest.mark.parametrize("packed", [False, True], ids=["tiles", "pack16"])
@pytest.mark.parametrize("T", [1, 127, 1000])
def test_quantize_kernel(T, d, dtype, rotate, packed):
    from dataclasses import replace

    tf = _tf()
    cfg = replace(tf.fp8_default_config(d, torch.device(DEV)), block_m=64)
    if packed:  # query tiles of 16 tokens: four tiles per quantize program, one scale each
        cfg = replace(cfg, block_m=16, block_n=64)
    q, k, v = _qkv(T, 8, 2, d, dtype, seed=T, outliers=4)
    if T > 2 * cfg.block_n:
        k[cfg.block_n : 2 * cfg.block_n, 1] = 0  # a zero tile
    x = tf.quantize_qkv_fp8(q, k, v, cfg.block_m, cfg.block_n, rotate=rotate)
    t_pad = -(-T // cfg.block_n) * cfg.block_n
    assert x.vt8.shape == (2, d, t_pad) and (x.vt8[:, :, T:].float() == 0).all()
    vt = x.vt8[:, :, :T].permute(2, 0, 1)
    for got8, got_s, src, block, rot in ((x.q8, x.qs, q, cfg.block_m, rotate), (x.k8, x.ks, k, cfg.block_n, rotate),
                                         (vt, x.vs, v, cfg.block_n, False)):
        assert_quantized_as_reference(got8, got_s, src, block, rot)


def _errors(layout, hq, hkv, d, dtype, seed, rotate, outliers=0, scale=None, config=None):
    """(kernel error, fp8 torch reference error) vs float64 on the original inputs; asserts every output written."""
    tf = _tf()
    T = layout.total_tokens
    q, k, v = _qkv(T, hq, hkv, d, dtype, seed, outliers)
    cfg = config or tf.fp8_default_config(d, torch.device(DEV))
    out = torch.full_like(q, float("nan"))
    got = tf.triton_fp8_prefix_attention(q, k, v, layout, scale, rotate=rotate, config=cfg, out=out)
    assert got.dtype == dtype
    assert torch.isfinite(got).all(), "unwritten (NaN poison) or non-finite output"
    truth = attention_math(q.double(), k.double(), v.double(), layout, scale)
    emul = fr.fp8_attention_reference(q, k, v, layout, scale, rotate=rotate, block_m=cfg.block_m,
                                      block_n=cfg.block_n)
    err = ((got.double() - truth).norm() / truth.norm()).item()
    ref = ((emul.double() - truth).norm() / truth.norm()).item()
    return err, ref


def _assert_ok(err, ref, label):
    assert err <= 2 * ref + 4 * F32_EPS, f"{label}: kernel error {err:.3e} > 2 x fp8 torch reference error {ref:.3e}"


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotate"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16)],
                         ids=["d128-bf16", "d64-bf16", "d128-fp16"])
def test_random_layouts(d, dtype, seed, rotate):
    rng = random.Random(seed)
    layout = random_layout(rng, tokens=rng.choice([700, 1500, 2600]), device=DEV)
    hq, hkv = [(8, 2), (4, 4), (6, 3)][seed % 3]
    _assert_ok(*_errors(layout, hq, hkv, d, dtype, seed, rotate), f"seed {seed}")


AWKWARD = [
    ("one_token", [0], [[1]]),
    ("only_self", [0] * 300, [[1]] * 300),
    ("tile_pm1", [127, 128, 129, 63, 65], [[127, 128, 129], [1], [64], [63, 65, 1], [2]]),
    ("tiny_docs", [1, 0, 2, 3] * 40, [[1, 2], [3], [1, 1, 1], [2]] * 40),
    ("eight_branches", [700], [[1, 64, 129, 300, 2, 127, 128, 5]]),
]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_awkward_layouts(name, prefix, branches, d):
    layout = PrefixLayout.from_lengths(prefix, branches, device=DEV)
    _assert_ok(*_errors(layout, 8, 2, d, torch.bfloat16, 1, rotate=d == 128), name)


# GQA groups 1, 3 (16 tokens x 3 heads: 48 rows padded to 64), 4, 8. block_m counts TOKENS; fp8_default_config sizes
# it for 64 MMA rows (4 warps), at least 16 tokens (8 warps beyond 64 rows); the bf16 forward goes down to 8 tokens.
GROUPS = {1: (4, 4), 3: (6, 2), 4: (8, 2), 8: (8, 1)}


def _packed_cfg(groups, **kw):
    from dataclasses import replace

    tf = _tf()
    gp2 = 1 << (groups - 1).bit_length()
    bm = max(64 // gp2, 16)
    base = tf.fp8_default_config(128, torch.device(DEV), groups)
    assert (base.block_m, base.warps) == (bm, 4 if bm * gp2 <= 64 else 8)
    return replace(base, **kw)


@pytest.mark.parametrize("groups", list(GROUPS), ids=[f"g{g}" for g in GROUPS])
@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_packed_awkward_layouts(name, prefix, branches, groups):
    hq, hkv = GROUPS[groups]
    cfg = _packed_cfg(groups)
    layout = PrefixLayout.from_lengths(prefix, branches, device=DEV)
    _assert_ok(*_errors(layout, hq, hkv, 128, torch.bfloat16, groups, rotate=groups == 3, config=cfg),
               f"{name} g{groups}")


@pytest.mark.parametrize("groups", list(GROUPS), ids=[f"g{g}" for g in GROUPS])
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("d", [64, 128])
def test_packed_random_layouts(d, seed, groups):
    rng = random.Random(100 + seed)
    layout = random_layout(rng, tokens=rng.choice([700, 1500, 2600]), device=DEV)
    hq, hkv = GROUPS[groups]
    _assert_ok(*_errors(layout, hq, hkv, d, torch.bfloat16, seed, rotate=seed == 1, config=_packed_cfg(groups)),
               f"seed {seed} g{groups}")


PACKED_VARIANTS = {  # as FP8_SWEEP in scripts/bench_attention.py, plus the loads the sweep does not time
    "pack16_s3": dict(block_m=16, block_n=64, warps=4, stages=3),
    "pack16_n128": dict(block_m=16, block_n=128, warps=4),
    "pack16_s4": dict(block_m=16, block_n=64, warps=4, stages=4),
    "pack32_w8": dict(block_m=32, block_n=64, warps=8),
    "pack16_no_tma": dict(block_m=16, tma=False),
}


@pytest.mark.parametrize("variant", list(PACKED_VARIANTS), ids=list(PACKED_VARIANTS))
def test_packed_config_variants(variant):
    layout = PrefixLayout.from_lengths(*AWKWARD[2][1:], device=DEV)
    cfg = _packed_cfg(4, **PACKED_VARIANTS[variant])
    _assert_ok(*_errors(layout, 8, 2, 128, torch.bfloat16, 2, rotate=True, config=cfg), variant)


def test_packed_large_row():
    """A ~7.7K-token row of 32/8 heads, held to the derived float64 tolerance."""
    layout = PrefixLayout.from_lengths([2047] * 3, [[257, 257]] * 3, device=DEV)
    _assert_ok(*_errors(layout, 32, 8, 128, torch.bfloat16, 3, rotate=True, config=_packed_cfg(4)), "large packed")


def test_large_row():
    layout = PrefixLayout.from_lengths([2047] * 3, [[257, 257]] * 3, device=DEV)  # ~7.7K tokens
    _assert_ok(*_errors(layout, 4, 1, 128, torch.bfloat16, 3, rotate=True), "large")


@pytest.mark.parametrize("d", [64, 128])
def test_rotation_lowers_error_on_outliers(d):
    layout = PrefixLayout.from_lengths([1023, 511], [[257, 257], [128, 300]], device=DEV)
    plain, plain_ref = _errors(layout, 8, 2, d, torch.bfloat16, 4, rotate=False, outliers=4, scale=0.02)
    rot, rot_ref = _errors(layout, 8, 2, d, torch.bfloat16, 4, rotate=True, outliers=4, scale=0.02)
    _assert_ok(plain, plain_ref, "outliers, plain")
    _assert_ok(rot, rot_ref, "outliers, rotate")
    # CPU measurement (tests/test_fp8.py): ~3x lower with 4 outlier channels; ask for 2x.
    assert rot < 0.5 * plain, (rot, plain)


def test_backends_and_grad_error():
    layout = PrefixLayout.from_lengths([100, 5], [[30, 40], [7]], device=DEV)
    q, k, v = _qkv(layout.total_tokens, 4, 2, 128, torch.bfloat16, 0)
    tf = _tf()
    with torch.no_grad():
        for name, rot in (("triton_fp8", False), ("triton_fp8_rotate", True)):
            assert torch.equal(prefix_attention(q, k, v, layout, backend=name),
                               tf.triton_fp8_prefix_attention(q, k, v, layout, rotate=rot))
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="forward-only"):
        prefix_attention(q, k, v, layout, backend="triton_fp8")


def test_torch_compile_traces_the_op():
    tf = _tf()
    layout = PrefixLayout.from_lengths([100, 5], [[30, 40], [7]], device=DEV)
    q, k, v = _qkv(layout.total_tokens, 4, 2, 64, torch.bfloat16, 0)

    def f(q, k, v):
        return tf.triton_fp8_prefix_attention(q, k, v, layout, rotate=True)

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f)(q, k, v), f(q, k, v), rtol=0, atol=0)
