"""CPU tests of the FP8 forward (``prefix_attn.triton.fp8``): its pure-torch quantization reference, and the Triton
kernels in Triton's interpreter (TRITON_INTERPRET=1; tests/conftest.py sets it on machines without a GPU).

Bounds are derived, not tuned:
- Quantization round trip, per element: ``|deq - x| <= 2^-4 |x| + 2^-10 scale`` (e4m3 has 3 mantissa bits: half a
  step is 2^-4 of the value's binade start, so at most 2^-4 |x|; below 2^-6 * scale the subnormal step is
  2^-9 * scale, half of it 2^-10 * scale), plus fp32 slack (``fp8_reference.quantization_error_bound``).
- The fused quantize kernel does the reference's fp32 operations in the same order: bit for bit without rotation;
  with rotation the [D, D] product's fp32 sums may be ordered differently, so at most one e4m3 step on an element
  that sits at a rounding boundary (and in practice none).
- The attention kernel's error against float64 on the ORIGINAL inputs is at most 2x the error of
  ``fp8_attention_reference`` (the same quantization and P rounding, in fp32 torch, without tiling), plus four fp32
  epsilons. The shared quantization error dominates both; the factor 2 leaves room for the kernel's different
  rounding order of P (running max instead of the row max), not for a wrong scale or mask.
fp8 ``tl.dot`` works in the interpreter; its fp32 -> e4m3 conversion does not at binade carries, so the kernels
round on the e4m3 grid in fp32 first there (``EXACT_CAST``, the fp8 module's doc). The attention kernel is the
GPU's (GQA-packed, one loop per tile, document-ordered launch, TMA loads) with small tiles (16-token query tiles,
16-key tiles) so that short rows cross many tiles.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import assert_quantized_as_reference  # noqa: E402
from prefix_attn import PrefixLayout, fp8_reference as fr, prefix_attention, resolve_backend  # noqa: E402
from prefix_attn.reference import attention_math  # noqa: E402

F32_EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------- rotation (pure torch)


@pytest.mark.parametrize("d", [16, 64, 128])
def test_rotation_is_orthogonal(d):
    r = fr.rotation_matrix(d)
    assert r.dtype == torch.float32 and r.shape == (d, d)
    # Entries are fp32(+-1/sqrt(d)) (relative error <= eps/2); each entry of R R^T sums d products of magnitude 1/d:
    # |R R^T - I| <= d * (1/d) * (eps + eps/2) + d * eps/2 (summation) < (d + 2) * eps.
    err = (r @ r.t() - torch.eye(d)).abs().max().item()
    assert err <= (d + 2) * F32_EPS, err
    # The +-1 form the kernel multiplies by is exact; R = diag(s) H / sqrt(d) with random (seeded) signs.
    pm = fr.rotation_pm1(d)
    assert set(pm.unique().tolist()) == {-1.0, 1.0}
    h = fr.hadamard(d)
    signs = pm[:, 0] / h[:, 0]
    assert torch.equal(pm, signs[:, None] * h)
    assert 0 < (signs > 0).sum() < d  # random signs, not all equal
    assert torch.equal(fr.rotation_pm1(d), pm)  # deterministic (seeded)


def test_rotation_preserves_dot_products():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(50, 64, generator=g, dtype=torch.float64), torch.randn(40, 64, generator=g, dtype=torch.float64)
    r = fr.rotation_matrix(64, dtype=torch.float64)
    torch.testing.assert_close((q @ r) @ (k @ r).t(), q @ k.t(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------- quantization (pure torch)


def _data(T, H, D, seed, dtype=torch.float32):
    """Values over many binades (1e-4 .. 1e2), so normals, subnormals and scale extremes all occur."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-14, 7, (T, H, D), generator=g).float())
    return (torch.randn(T, H, D, generator=g) * mag).to(dtype)


@pytest.mark.parametrize("T,block", [(1, 16), (33, 16), (64, 32), (100, 128)])
def test_scales_are_amax_over_448_per_block(T, block):
    x = _data(T, 3, 16, seed=T)
    x8, s = fr.quantize_reference(x, block)
    nb = -(-T // block)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and s.shape == (3, nb)
    for b in range(nb):
        for h in range(3):
            amax = x[b * block : (b + 1) * block, h].abs().max()
            assert s[h, b].item() == (amax / torch.tensor(448.0)).item()
            # the block's largest element maps to +-448 exactly
            assert x8[b * block : (b + 1) * block, h].float().abs().max().item() == 448.0


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_within_e4m3_bound(dtype, rotate):
    x = _data(70, 2, 64, seed=1, dtype=dtype)
    x8, s = fr.quantize_reference(x, 16, rotate)
    deq = fr.dequantize_reference(x8, s, 16, torch.float64)
    ref = fr.rotate_reference(x).double() if rotate else x.double()
    err = (deq - ref).abs()
    bound = fr.quantization_error_bound(ref, s, 16)
    assert (err <= bound).all(), (err / bound).max()
    # ... and the bound is tight (round to nearest reaches almost half a step somewhere), so it can fail.
    assert (err / bound).max() > 0.9


def test_zero_blocks():
    x = torch.randn(40, 2, 16)
    x[16:32, 1] = 0.0  # block 1 of head 1
    x8, s = fr.quantize_reference(x, 16)
    assert s[1, 1].item() == 1.0  # guarded: no 0/0
    assert (x8[16:32, 1].float() == 0).all()
    deq = fr.dequantize_reference(x8, s, 16)
    assert torch.isfinite(deq).all() and (deq[16:32, 1] == 0).all()
    x8, s = fr.quantize_reference(torch.zeros(5, 1, 16), 16)
    assert s.item() == 1.0 and (x8.float() == 0).all()


def _outliers(T, H, D, seed, n=4):
    """q, k, v ~ N(0, 1) with n channels of q and k 10-50x larger (same channels in both, as in real models)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    ch = torch.randperm(D, generator=g)[:n]
    mult = 10 + 40 * torch.rand(n, generator=g)
    q[:, :, ch] *= mult
    k[:, :, ch] *= mult
    return q, k, v


@pytest.mark.parametrize("seed", range(3))
def test_rotation_lowers_error_on_outlier_channels(seed):
    q, k, v = _outliers(256, 2, 64, seed)
    layout = PrefixLayout.from_lengths([100], [[78, 78]])
    scale = 0.02  # keep the softmax from collapsing onto one key (the outliers make scores ~30^2 larger)

    def s_err(rot):
        qd = fr.dequantize_reference(*fr.quantize_reference(q, 32, rot), 32, torch.float64)
        kd = fr.dequantize_reference(*fr.quantize_reference(k, 16, rot), 16, torch.float64)
        exact = torch.einsum("qhd,khd->hqk", q.double(), k.double())
        return ((torch.einsum("qhd,khd->hqk", qd, kd) - exact).norm() / exact.norm()).item()

    truth = attention_math(q.double(), k.double(), v.double(), layout, scale)

    def out_err(rot):
        o = fr.fp8_attention_reference(q, k, v, layout, scale, rotate=rot, block_m=32, block_n=16,
                                       dtype=torch.float64)
        return ((o - truth).norm() / truth.norm()).item()

    # Measured: QK^T error drops ~4x, the output's ~3x (4 outlier channels of 64); ask for 2x.
    assert s_err(True) < 0.5 * s_err(False)
    assert out_err(True) < 0.5 * out_err(False)


# -------------------------------------------------------------------------------- Triton kernels (the interpreter)

triton = pytest.importorskip("triton")
from prefix_attn import triton as tf  # noqa: E402
from prefix_attn.triton import fp8 as fp8_kernels  # noqa: E402

_INTERPRETED = type(fp8_kernels.fp8_fwd_kernel).__name__ == "InterpretedFunction"
needs_interpreter = pytest.mark.skipif(not _INTERPRETED, reason="prefix_attn.triton was imported before "
                                       "TRITON_INTERPRET=1 was set (or a GPU machine: tests/gpu/test_fp8_gpu.py "
                                       "covers it)")


def _qkv(T, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv)]


@needs_interpreter
@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotate"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T", [1, 47])
def test_quantize_kernel_matches_reference(T, dtype, rotate):
    q, k, v = _qkv(T, 4, 2, 32, dtype, seed=T)
    if T > 16:
        k[16:32, 1] = 0  # a zero block
        q[:, :, 3] *= 40  # an outlier channel
    x = tf.quantize_qkv_fp8(q, k, v, 32, 16, rotate=rotate)
    t_pad = -(-T // 16) * 16
    assert x.vt8.shape == (2, 32, t_pad) and (x.vt8[:, :, T:].float() == 0).all()  # zero padding
    vt = x.vt8[:, :, :T].permute(2, 0, 1)
    for got8, got_s, src, block, rot in ((x.q8, x.qs, q, 32, rotate), (x.k8, x.ks, k, 16, rotate),
                                         (vt, x.vs, v, 16, False)):
        assert_quantized_as_reference(got8, got_s, src, block, rot)


@needs_interpreter
@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotate"])
@pytest.mark.parametrize("T,block_m", [(47, 8), (100, 16)])
def test_quantize_kernel_several_q_tiles_per_program(T, block_m, rotate):
    # Small (GQA-packed) query tiles: each program quantizes up to 64 // block_m tiles of one head, one scale per
    # tile; the last program's tiles past the end are not stored (T=100, 16-row tiles: 7 tiles, programs of 4).
    q, k, v = _qkv(T, 3, 1, 32, torch.bfloat16, seed=T)
    q[:, :, 5] *= 40
    q[block_m : 2 * block_m, 1] = 0  # a zero tile inside a program
    x = tf.quantize_qkv_fp8(q, k, v, block_m, 16, rotate=rotate)
    ref8, ref_s = fr.quantize_reference(q, block_m, rotate)
    assert x.qs.shape == ref_s.shape == (3, -(-T // block_m))
    if not rotate:
        assert torch.equal(x.qs, ref_s) and torch.equal(x.q8.float(), ref8.float())
    else:  # as test_quantize_kernel_matches_reference
        torch.testing.assert_close(x.qs, ref_s, rtol=32 * F32_EPS, atol=0)
        a, b = x.q8.float(), ref8.float()
        assert ((a - b).abs() <= torch.maximum(b.abs() * 2.0**-3, torch.full_like(b, 2.0**-9))).all()
        assert (a != b).float().mean() <= 1e-3
    if not rotate:  # the key programs after the q programs are unchanged
        k8, ks = fr.quantize_reference(k, 16)
        assert torch.equal(x.ks, ks) and torch.equal(x.k8.float(), k8.float())


def _check_attention(layout, hq, hkv, d, dtype, seed, rotate=False, config=None, scale=None, window=None):
    T = layout.total_tokens
    q, k, v = _qkv(T, hq, hkv, d, dtype, seed)
    cfg = config or tf.fp8_default_config(d, q.device)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    got = tf.triton_fp8_prefix_attention(q, k, v, layout, scale, rotate=rotate, window=window, config=cfg, out=out)
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.isfinite(got).all(), "unwritten or non-finite output"
    truth = attention_math(q.double(), k.double(), v.double(), layout, scale, window=window)
    emul = fr.fp8_attention_reference(q, k, v, layout, scale, rotate=rotate, block_m=cfg.block_m, block_n=cfg.block_n,
                                      window=window)
    err = ((got.double() - truth).norm() / truth.norm()).item()
    ref_err = ((emul.double() - truth).norm() / truth.norm()).item()
    assert err <= 2 * ref_err + 4 * F32_EPS, f"kernel error {err:.3e} > 2 x fp8 torch reference error {ref_err:.3e}"
    return got


# (name, prefix_lens, branch_lens): lengths 1, tile sizes +-1 (tiles of 16 and 32), many tiny documents, 8 branches.
AWKWARD = [
    ("one_token", [0], [[1]]),
    ("tile_pm1", [15, 16, 17], [[31, 32], [33], [16, 1]]),
    ("many_tiny_docs", [0, 1, 2, 1, 0, 2, 1, 0, 1, 2, 0, 1], [[1], [2, 1], [1, 3], [1], [2, 2], [1], [3], [1, 1, 1],
                                                               [2], [1, 2], [3], [1, 1]]),
    ("eight_branches", [10], [[1, 20, 3, 17, 16, 15, 2, 9]]),
    ("long_prefix", [70], [[9, 40]]),
]


@needs_interpreter
@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_attention_awkward_layouts(name, prefix, branches):
    layout = PrefixLayout.from_lengths(prefix, branches)
    dtype = (torch.float16, torch.bfloat16)[len(name) % 2]
    _check_attention(layout, 4, 2, 32, dtype, seed=len(name))


@needs_interpreter
@pytest.mark.parametrize("window", [1, 7, 30])
@pytest.mark.parametrize("name,prefix,branches", [AWKWARD[3], AWKWARD[4]], ids=[AWKWARD[3][0], AWKWARD[4][0]])
def test_attention_with_a_window(name, prefix, branches, window):
    # The window reaches the FP8 kernel through its tables alone (windowed ranges and schedule).
    _check_attention(PrefixLayout.from_lengths(prefix, branches), 4, 2, 32, torch.float16, seed=window,
                     window=window)


@needs_interpreter
def test_attention_with_a_large_gqa_group_split(monkeypatch):
    # As the 16-bit kernels, the FP8 forward repeats KV heads past MAX_PACKED_GROUP query heads per KV head (a small
    # limit here): 8 query heads on one KV head run as groups of 2.
    from prefix_attn.triton import attention as tattn
    from prefix_attn.triton import config as tconfig

    monkeypatch.setattr(tconfig, "MAX_PACKED_GROUP", 2)
    groups = []
    real = tattn.fp8_default_config
    monkeypatch.setattr(tattn, "fp8_default_config", lambda d, device, g=4: groups.append(g) or real(d, device, g))
    layout = PrefixLayout.from_lengths([10, 3], [[9, 20], [1, 4]])
    T = layout.total_tokens
    q, k, v = _qkv(T, 8, 1, 32, torch.float16, seed=3)
    got = tf.triton_fp8_prefix_attention(q, k, v, layout)
    assert groups == [2]
    truth = attention_math(q.double(), k.double(), v.double(), layout)
    emul = fr.fp8_attention_reference(q, k, v, layout, block_m=real(32, q.device, 2).block_m,
                                      block_n=real(32, q.device, 2).block_n)
    err = ((got.double() - truth).norm() / truth.norm()).item()
    ref_err = ((emul.double() - truth).norm() / truth.norm()).item()
    assert err <= 2 * ref_err + 4 * F32_EPS, f"kernel error {err:.3e} > 2 x fp8 torch reference error {ref_err:.3e}"


@needs_interpreter
def test_options_the_fp8_forward_lacks_run_on_triton(caplog):
    layout = PrefixLayout.from_lengths([9], [[4, 6]])
    q, k, v = _qkv(layout.total_tokens, 2, 1, 32, torch.float16, seed=0)
    with caplog.at_level("WARNING"):
        out = prefix_attention(q, k, v, layout, backend="triton_fp8", softcap=3.0)
    assert "no logit soft-capping" in caplog.text
    assert torch.equal(out, prefix_attention(q, k, v, layout, backend="triton", softcap=3.0))


@needs_interpreter
@pytest.mark.parametrize("hq,hkv,rotate", [(3, 1, False), (2, 2, True), (4, 2, True)])
def test_attention_gqa_and_rotation(hq, hkv, rotate):
    layout = PrefixLayout.from_lengths([20, 3], [[13, 30], [1, 5, 8]])
    _check_attention(layout, hq, hkv, 32, torch.float16, seed=hq, rotate=rotate, scale=0.3)


@needs_interpreter
@pytest.mark.parametrize(
    "cfg",
    [tf.FP8AttentionConfig(block_m=32, block_n=16, warps=4, stages=1, tma=True),
     tf.FP8AttentionConfig(block_m=8, block_n=32, warps=4, stages=1, tma=True),
     tf.FP8AttentionConfig(block_m=16, block_n=32, warps=4, stages=1, tma=False),
     tf.FP8AttentionConfig(block_m=16, block_n=16, warps=4, stages=1, tma=False)],
    ids=["tma_bm_gt_bn", "tma_bm_lt_bn", "plain_loads", "plain_loads_16x16"],
)
def test_attention_configs(cfg):
    layout = PrefixLayout.from_lengths([31, 0, 5], [[1, 17, 33], [15], [2, 2, 2, 2]])
    _check_attention(layout, 4, 2, 64, torch.bfloat16, seed=7, config=cfg)


@needs_interpreter
def test_query_sees_only_itself_is_dequantized_v():
    # One key per query: p = 2^8 exactly, l = 2^8, out = v8 * vs (all exact in fp32), then rounded to fp16.
    layout = PrefixLayout.from_lengths([0] * 40, [[1]] * 40)
    q, k, v = _qkv(40, 2, 2, 32, torch.float16, seed=3)
    out = tf.triton_fp8_prefix_attention(q, k, v, layout)
    v8, vs = fr.quantize_reference(v, tf.fp8_default_config(32, v.device).block_n)
    assert torch.equal(out, fr.dequantize_reference(v8, vs, 16).to(torch.float16))


@needs_interpreter
def test_outliers_rotation_lowers_kernel_error():
    layout = PrefixLayout.from_lengths([60], [[40, 30]])
    q, k, v = (x.to(torch.float16) for x in _outliers(layout.total_tokens, 2, 64, seed=5))
    truth = attention_math(q.double(), k.double(), v.double(), layout, 0.02)
    errs = [((tf.triton_fp8_prefix_attention(q, k, v, layout, 0.02, rotate=r).double() - truth).norm()
             / truth.norm()).item() for r in (False, True)]
    assert errs[1] < 0.5 * errs[0], errs


# ------------------------------------------------------------------------------------------------ the public API


@needs_interpreter
def test_prefix_attention_backends():
    layout = PrefixLayout.from_lengths([9], [[4, 6]])
    q, k, v = _qkv(layout.total_tokens, 2, 1, 32, torch.float16, seed=0)
    for name, rot in (("triton_fp8", False), ("triton_fp8_rotate", True)):
        assert resolve_backend(name, q.device, q.dtype, 32) == name
        out = prefix_attention(q, k, v, layout, backend=name)
        assert torch.equal(out, tf.triton_fp8_prefix_attention(q, k, v, layout, rotate=rot))


def test_grad_requiring_call_raises():
    layout = PrefixLayout.from_lengths([9], [[4, 6]])
    q, k, v = (x.requires_grad_() for x in _qkv(layout.total_tokens, 2, 1, 32, torch.float16, seed=0))
    for name in ("triton_fp8", "triton_fp8_rotate"):
        with pytest.raises(RuntimeError, match="forward-only"):
            prefix_attention(q, k, v, layout, backend=name)
    with pytest.raises(RuntimeError, match="forward-only"):
        tf.triton_fp8_prefix_attention(q, k, v, layout)
    if _INTERPRETED:
        with torch.no_grad():
            assert torch.isfinite(prefix_attention(q, k, v, layout, backend="triton_fp8")).all()


def test_unsupported_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(tf, "fp8_supported", lambda device, dtype=None, head_dim=None: (False, "no FP8 here (test)"))
    with caplog.at_level(logging.WARNING, logger="prefix_attn.ops"):
        name = resolve_backend("triton_fp8", torch.device("cpu"), torch.float16, 32)
    triton_runs = tf.triton_supported(torch.device("cpu"), torch.float16, 32)[0]  # the interpreter: yes
    assert name == ("triton" if triton_runs else "reference")
    assert "no FP8 here (test)" in caplog.text and "falling back" in caplog.text


def test_supported():
    assert not tf.fp8_supported("cpu", torch.float32, 64)[0]  # 16-bit inputs only
    assert not tf.fp8_supported("cpu", torch.float16, 96)[0]
    if _INTERPRETED:
        assert tf.fp8_supported("cpu", torch.bfloat16, 64)[0]


def test_config_list_roundtrip():
    cfg = tf.FP8AttentionConfig(block_m=64, block_n=128, warps=4, stages=4, tma=False, quant_warps=4)
    assert tf.FP8AttentionConfig.from_list(cfg.as_list()) == cfg


# ------------------------------------------------------------------------------------------- GQA groups

# (hq, hkv, config): group sizes 1, 3 (padding rows after the group's), 4 and 8; block_m counts TOKENS (the MMA has
# block_m x group rows, rounded up to a power of two); TMA and plain loads.
PACKED = {
    "g4_tma": (4, 1, tf.FP8AttentionConfig(block_m=8, block_n=16, warps=4, stages=1, tma=True)),
    "g3_plain": (6, 2, tf.FP8AttentionConfig(block_m=8, block_n=32, warps=4, stages=1, tma=False)),
    "g3_tma": (3, 1, tf.FP8AttentionConfig(block_m=8, block_n=32, warps=4, stages=1, tma=True)),
    "g1": (2, 2, tf.FP8AttentionConfig(block_m=32, block_n=16, warps=4, stages=1, tma=True)),
    "g8_tma": (8, 1, tf.FP8AttentionConfig(block_m=8, block_n=32, warps=4, stages=1, tma=True)),
}


@needs_interpreter
@pytest.mark.parametrize("variant", list(PACKED), ids=list(PACKED))
def test_attention_packed(variant):
    """Derived tolerance vs float64, poisoned output: every group size quantizes and computes each row with its own
    head's per-(tile, head) q scale."""
    hq, hkv, cfg = PACKED[variant]
    layout = PrefixLayout.from_lengths(*AWKWARD[1][1:])  # tile_pm1: many branch ends inside tiles
    _check_attention(layout, hq, hkv, 32, torch.bfloat16, seed=11, rotate=variant == "g3_plain", config=cfg)


@needs_interpreter
@pytest.mark.parametrize("name,prefix,branches", [AWKWARD[0], AWKWARD[2]], ids=[AWKWARD[0][0], AWKWARD[2][0]])
def test_attention_packed_awkward(name, prefix, branches):
    layout = PrefixLayout.from_lengths(prefix, branches)
    _check_attention(layout, 6, 2, 32, torch.float16, seed=2, config=PACKED["g3_tma"][2])


def test_fp8_tables_share_the_16bit_tables_but_the_forward_tiles():
    # The FP8 forward's tables are the 16-bit config's with the forward's tile replaced (built once per layout).
    layout = PrefixLayout.from_lengths([40, 3], [[20, 17], [9]])
    cfg = tf.fp8_default_config(64, torch.device("cpu"), 2)
    t = fp8_kernels.fp8_tables(layout, cfg, 64, torch.float16, 2)
    base = tf.default_config(64, torch.float16, torch.device("cpu"), 2).tile_shape
    assert t.tile == base._replace(fwd_m=cfg.block_m, fwd_n=cfg.block_n)
