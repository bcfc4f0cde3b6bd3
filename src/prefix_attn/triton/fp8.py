"""The FP8 (e4m3) forward of prefix-shared attention, for the frozen DPO reference model: kernels and launchers.

- ``fp8_quantize_kernel``: ONE launch quantizes q, k and v (one program per (tile, head) of one of them; small
  query tiles several per program so that each moves >= 64 rows): one read of the 16-bit input, one write of e4m3
  values plus one fp32 scale per (tile, head), ``scale = amax / E4M3_MAX`` (1.0 for an all-zero tile); near its
  memory-bandwidth floor (docs/PERFORMANCE.md). Query tiles are the attention kernel's query tiles (``block_m``
  tokens), key/value tiles its key tiles (``block_n`` rows), so the attention kernel needs one scale per (row, key
  tile). V is written transposed, ``vt8 [Hkv, D, T_pad]`` (T contiguous, zero padded to whole key tiles): Hopper's
  fp8 wgmma wants both operands K-major, and for ``P @ V`` the reduction runs over keys. With ``rotate`` the kernel
  first multiplies each q/k tile by the rotation (``rotation_matrix``: a [D, D] ``tl.dot`` with +-1 entries, exact
  in bf16/fp16, fp32 accumulation, then the 1/sqrt(D) in fp32). V is never rotated.
- ``fp8_fwd_kernel``: the 16-bit forward kernel's walk (same schedule, one loop over the key tiles, full tiles
  without a mask, boundary tiles masked with the per-query ranges; one program computes all query heads of one KV
  head) on e4m3 operands. ``S = (q8 @ k8^T) * (q_scale * k_scale * softmax_scale * log2 e)`` in fp32, online
  softmax in fp32. P is cast to e4m3 for ``P @ V``, SHIFTED: ``p = exp2(s - m + P_SHIFT_LOG2)``, i.e. 256 * the
  usual P, in [0, 256] (e4m3's largest finite value is 448). Unscaled P in [0, 1] (FlashAttention-3's choice) would
  lose every probability below 2^-10 of the row max to zero (e4m3's smallest subnormal is 2^-9) and round those
  below 2^-6 coarsely (subnormals); shifted by 2^8 they keep full e4m3 precision down to 2^-14 of the max. The
  shift costs nothing (it folds into the exp2's FMA) and cancels in ``acc / l`` (l sums the same shifted p,
  unrounded, in fp32). V's per-tile scale is applied after the dot without any extra multiply: the accumulator is
  kept in units of the current tile's V scale, ``acc_u = acc / vs_j``; moving to tile j+1 folds ``vs_j / vs_{j+1}``
  into the online-softmax rescale ``alpha`` that multiplies the accumulator anyway; the output is
  ``acc_u * vs_last / l``. q keeps one scale per (BLOCK_M tokens, head), applied as a per-row vector in the score
  FMA.

The pure-torch reference of the quantization (``quantize_reference``, ``dequantize_reference``, ``rotation_matrix``)
and of the whole computation (``fp8_attention_reference``: dequantized inputs, P rounded to e4m3 as the kernel does)
live in ``prefix_attn.fp8_reference``; the tests hold the kernels to them.

In Triton's CPU interpreter (``TRITON_INTERPRET=1``) the fp32 -> e4m3 conversion is wrong where rounding carries
into the next binade (e.g. 125.7 -> 64 instead of 128); there (only) the kernels round to the e4m3 grid in fp32
first (``EXACT_CAST``), so the conversion itself is exact. On a GPU the hardware conversion
(``cvt.rn.satfinite.e4m3x2.f32``, round to nearest even) is used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..fp8_reference import E4M3_MAX, P_SHIFT_LOG2, rotation_pm1
from ..layout import PrefixLayout
from ..schedule import AttentionTables, TileShape, build_tables
from .common import LOG2E, allowed, descriptor, interpret, packed_row_count, packed_rows, tma_ok, walk_bounds, walk_tile
from .config import FP8AttentionConfig, default_config

_E4M3_MAX = tl.constexpr(E4M3_MAX)
_P_SHIFT = tl.constexpr(float(P_SHIFT_LOG2))


@triton.jit
def _to_e4m3(x, EXACT_CAST: tl.constexpr):
    """fp32 -> e4m3 (round to nearest even). ``EXACT_CAST`` (the CPU interpreter only): round on the e4m3 grid in
    fp32 first (normal spacing 2^(e-3), subnormal 2^-9; the add/subtract of 1.5 * 2^23 rounds to an integer), so
    the interpreter's faulty conversion only sees representable values."""
    if EXACT_CAST:
        a = tl.abs(x)
        e = tl.maximum(tl.floor(tl.math.log2(tl.maximum(a, 1.0e-30))), -6.0)
        sp = tl.math.exp2(e - 3.0)
        r = ((a / sp + 12582912.0) - 12582912.0) * sp
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_tile(
    X, Y, S, R, blk, h, T, T_PAD, stride_xt, stride_xh, stride_yt, stride_yh, n_blocks, rsqrt_d,
    BLOCK: tl.constexpr,  # rows per scale
    HEAD_DIM: tl.constexpr,
    ROTATE: tl.constexpr,  # multiply by the +-1 rotation R (and rsqrt_d) before quantizing
    TRANSPOSED: tl.constexpr,  # write Y as [H, HEAD_DIM, T_PAD] (V), rows T..T_PAD-1 as zeros; else [T, H, HEAD_DIM]
    EXACT_CAST: tl.constexpr,
    SUB: tl.constexpr = 1,  # consecutive tiles per program (rows SUB * BLOCK, one scale per BLOCK rows); not V
):
    offs_t = blk * (BLOCK * SUB) + tl.arange(0, BLOCK * SUB)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_t < T
    x = tl.load(X + h.to(tl.int64) * stride_xh + offs_t[:, None].to(tl.int64) * stride_xt + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    if ROTATE:
        r = tl.load(R + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
        if EXACT_CAST:  # the interpreter: 16-bit dots are unreliable there; fp32 products of +-1 are exact anyway
            xf = tl.dot(x.to(tl.float32), r.to(tl.float32), input_precision="ieee") * rsqrt_d
        else:  # x * (+-1) is exact in 16 bits; the tensor cores accumulate in fp32
            xf = tl.dot(x, r.to(x.dtype)) * rsqrt_d
    else:
        xf = x.to(tl.float32)
    if SUB == 1:
        amax = tl.max(tl.max(tl.abs(xf), 1), 0)
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, _E4M3_MAX), 1.0)  # IEEE division, as torch's
        inv = tl.math.div_rn(1.0, scale)
        y = _to_e4m3(xf * inv, EXACT_CAST)
        tl.store(S + h * n_blocks + blk, scale)
    else:
        # SUB tiles of BLOCK rows: the same per-tile fp32 operations, on a [SUB] vector of scales.
        x3 = tl.reshape(xf, [SUB, BLOCK, HEAD_DIM])
        amax = tl.max(tl.max(tl.abs(x3), 2), 1)  # [SUB]
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, _E4M3_MAX), 1.0)
        inv = tl.math.div_rn(tl.full([SUB], 1.0, tl.float32), scale)
        y = tl.reshape(_to_e4m3(x3 * inv[:, None, None], EXACT_CAST), [SUB * BLOCK, HEAD_DIM])
        sb = blk * SUB + tl.arange(0, SUB)
        tl.store(S + h * n_blocks + sb, scale, mask=sb < n_blocks)
    if TRANSPOSED:
        yp = Y + h.to(tl.int64) * HEAD_DIM * T_PAD + offs_d[:, None].to(tl.int64) * T_PAD + offs_t[None, :]
        tl.store(yp, tl.trans(y), mask=(offs_t < T_PAD)[None, :])
    else:
        yp = Y + offs_t[:, None].to(tl.int64) * stride_yt + h.to(tl.int64) * stride_yh + offs_d[None, :]
        tl.store(yp, y, mask=ok[:, None])


@triton.jit(do_not_specialize=["T", "T_PAD", "N_QB", "N_KB"])
def fp8_quantize_kernel(
    Q, K, V,  # inputs: q [T, Hq, D], k/v [T, Hkv, D], 16-bit, unit stride along D
    Q8, K8, VT8,  # outputs: q8 [T, Hq, D], k8 [T, Hkv, D] contiguous e4m3; vt8 [Hkv, D, T_PAD] e4m3
    QS, KS, VS,  # scales: qs [Hq, N_QB], ks/vs [Hkv, N_KB] fp32
    R,  # [D, D] +-1 rotation (diag(signs) @ Hadamard) in the inputs' dtype; unused without ROTATE
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    T, T_PAD, N_QB, N_KB, rsqrt_d,
    H_Q: tl.constexpr,  # program id -> (tensor, tile, head) decomposition
    H_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query rows per scale (the attention kernel's BLOCK_M)
    BLOCK_KV: tl.constexpr,  # key/value rows per scale (the attention kernel's BLOCK_N)
    ROTATE: tl.constexpr,  # rotate q and k (never v)
    EXACT_CAST: tl.constexpr,
    Q_TILES: tl.constexpr = 1,  # q tiles per program (small, GQA-packed query tiles: >= 64 rows per program)
):
    """One launch for q, k and v: programs [0, ceil(N_QB/Q_TILES)*H_Q) quantize q (Q_TILES tiles of one head
    each), the next N_KB*H_KV k, the rest v."""
    pid = tl.program_id(0)
    nq = tl.cdiv(N_QB, Q_TILES) * H_Q
    nk = N_KB * H_KV
    if pid < nq:
        _quant_tile(Q, Q8, QS, R, pid // H_Q, pid % H_Q, T, T_PAD, stride_qt, stride_qh, H_Q * HEAD_DIM, HEAD_DIM,
                    N_QB, rsqrt_d, BLOCK_Q, HEAD_DIM, ROTATE, False, EXACT_CAST, Q_TILES)
    elif pid < nq + nk:
        i = pid - nq
        _quant_tile(K, K8, KS, R, i // H_KV, i % H_KV, T, T_PAD, stride_kt, stride_kh, H_KV * HEAD_DIM, HEAD_DIM,
                    N_KB, rsqrt_d, BLOCK_KV, HEAD_DIM, ROTATE, False, EXACT_CAST)
    else:
        i = pid - nq - nk
        _quant_tile(V, VT8, VS, R, i // H_KV, i % H_KV, T, T_PAD, stride_vt, stride_vh, 0, 0,
                    N_KB, rsqrt_d, BLOCK_KV, HEAD_DIM, False, True, EXACT_CAST)


@triton.jit
def _fp8_step(
    acc, l_i, m_i, v_prev, q, qsc, k_base, vt_base, ks_base, vs_base, k_desc, vt_desc, kv_col, vt_row, stride_kt,
    T_PAD, offs_m, offs_d, lo1, hi1, lo2, j, full, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    EXACT_CAST: tl.constexpr,
):
    """One key tile j: S (the per-element mask unless the tile is ``full``), the online-softmax update, P (shifted by
    2^P_SHIFT_LOG2) to e4m3, acc += P @ V. ``qsc`` [rows]: each row's q scale times the softmax scale."""
    offs_n = tl.arange(0, BLOCK_N)
    n0 = j * BLOCK_N
    if USE_TMA:
        k = k_desc.load([n0, kv_col])  # rows past T come back as zeros
        vt = vt_desc.load([vt_row, n0])
    else:
        kp = k_base + (n0 + offs_n)[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
        k = tl.load(kp, mask=((n0 + offs_n) < T)[:, None], other=0.0)
        # vt8 is zero padded to whole key tiles: always in bounds, and padding keys have V = 0 (never NaN * 0)
        vt = tl.load(vt_base + offs_d[:, None].to(tl.int64) * T_PAD + (n0 + offs_n)[None, :])
    sc = qsc * tl.load(ks_base + j)
    vs = tl.load(vs_base + j)
    s = tl.dot(q, tl.trans(k))  # e4m3 x e4m3 -> fp32
    if not full:
        kk = (n0 + offs_n)[None, :]
        ok = allowed(kk, lo1, hi1, lo2, offs_m)
        s = tl.where(ok, s, float("-inf"))
    # m_i starts finite (-1e30), so a row with no allowed key in this tile gets p = 0, never NaN. sc > 0.
    m_new = tl.maximum(m_i, tl.max(s, 1) * sc)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * sc[:, None] - (m_new - _P_SHIFT)[:, None])  # 2^P_SHIFT * softmax numerator, <= 2^P_SHIFT
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * (alpha * (v_prev / vs))[:, None]  # acc stays in units of the current tile's V scale
    acc = tl.dot(_to_e4m3(p, EXACT_CAST), tl.trans(vt), acc)
    return acc, l_i, m_new, vs


@triton.jit(do_not_specialize=["T", "T_PAD", "N_QB", "N_KB"])  # T varies per row: no recompile per length
def fp8_fwd_kernel(
    Q8, K8, VT8, QS, KS, VS, O,  # q8 [T, Hq, D], k8 [T, Hkv, D], vt8 [Hkv, D, T_PAD] e4m3; scales; o [T, Hq, D]
    SCHED, TOK,  # the forward schedule for BLOCK_M-TOKEN query tiles, as the 16-bit forward kernel's
    K_DESC, VT_DESC,  # TMA descriptors: k8 as [T, Hkv*D] block [BLOCK_N, D]; vt8 as [Hkv*D, T_PAD] block [D, BLOCK_N]
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    T, T_PAD, N_QB, N_KB, sm_scale_log2,
    H_KV: tl.constexpr,  # program id -> (query tile, KV head)
    GROUPS: tl.constexpr,  # query heads per KV head, all computed by one program
    ROWS: tl.constexpr,  # MMA rows: BLOCK_M * GROUPS rounded up to a power of two (common.packed_rows)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query TOKENS per tile (the schedule's, and q's quantization tile per head)
    BLOCK_N: tl.constexpr,  # keys per tile = k/v's quantization tile (must match the schedule's)
    USE_TMA: tl.constexpr,
    EXACT_CAST: tl.constexpr,  # the interpreter's e4m3 conversion workaround (see _to_e4m3)
):
    """The FP8 forward, GQA-packed as the 16-bit forward kernel: one program computes BLOCK_M query
    tokens for ALL the query heads of one KV head, stacked token-major as a [ROWS, D] e4m3 operand (row r: token
    tile*BLOCK_M + r // GROUPS, head hk*GROUPS + r % GROUPS; the padding rows from BLOCK_M * GROUPS on are masked
    off). Each K/V tile and its two scales feed GROUPS x more MMA rows, and the
    mask granularity is BLOCK_M tokens. The key tiles are walked in one loop, as the 16-bit forward's.

    q's scales are one per (BLOCK_M tokens, head): the rows of one program span GROUPS heads, so the q scale is a
    [rows] vector; it multiplies the score rows in the same FMA that applies the scalar (the k scale and softmax scale
    fold into it per key tile: one [rows] multiply per tile). A shared scale per (tile, KV group) would save nothing
    and coarsen every head's grid to the group's amax."""
    tile, hk, offs_m, h, row_ok = packed_rows(tl.program_id(0), H_KV, T, BLOCK_M, GROUPS, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q8 + (offs_m.to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    # padding rows: scale 1 (> 0, so -inf scores stay -inf, never NaN)
    qsc = tl.load(QS + h * N_QB + tile, mask=row_ok, other=1.0) * sm_scale_log2
    lo1 = tl.load(TOK + offs_m, mask=row_ok, other=0)
    hi1 = tl.load(TOK + T + offs_m, mask=row_ok, other=0)
    lo2 = tl.load(TOK + 2 * T + offs_m, mask=row_ok, other=T + 1)  # padding rows: no allowed key in masked tiles
    k_base = K8 + hk.to(tl.int64) * stride_kh
    vt_base = VT8 + hk.to(tl.int64) * HEAD_DIM * T_PAD
    ks_base = KS + hk * N_KB
    vs_base = VS + hk * N_KB
    kv_col = hk * HEAD_DIM

    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    m_i = tl.zeros([ROWS], dtype=tl.float32) - 1.0e30
    v_prev = tl.load(vs_base)  # any finite nonzero value: acc is still zero
    sp = SCHED + tile * 10
    s0, s1, s2, s3, s4, s5, s6, s7, s8, n = walk_bounds(sp)
    for i in range(0, n):
        j, full = walk_tile(i, s0, s1, s2, s3, s4, s5, s6, s7, s8)
        acc, l_i, m_i, v_prev = _fp8_step(
            acc, l_i, m_i, v_prev, q, qsc, k_base, vt_base, ks_base, vs_base, K_DESC, VT_DESC, kv_col, kv_col,
            stride_kt, T_PAD, offs_m, offs_d, lo1, hi1, lo2, j, full, T, BLOCK_N, USE_TMA, EXACT_CAST)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows see no key at all
    acc = acc * (v_prev / l_safe)[:, None]
    tl.store(O + (offs_m.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh)[:, None] + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


_ROT_CACHE: dict = {}


def _rotation_operand(head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's +-1 rotation matrix (cached per head dim, dtype and device)."""
    key = (head_dim, dtype, device)
    if key not in _ROT_CACHE:
        _ROT_CACHE[key] = rotation_pm1(head_dim).to(device=device, dtype=dtype).contiguous()
    return _ROT_CACHE[key]


class FP8QKV(NamedTuple):
    """Quantized operands of the FP8 forward. Dequantized value of ``q8[t, h, :]``: ``q8[t, h, :] * qs[h, t //
    block_m]`` (likewise k with ``ks``, ``block_n``; v is ``vt8[h, :, t] * vs[h, t // block_n]``). With rotation,
    q8 and k8 hold ``q @ rotation_matrix(D)`` and ``k @ rotation_matrix(D)``."""

    q8: torch.Tensor  # [T, Hq, D] float8_e4m3fn
    k8: torch.Tensor  # [T, Hkv, D] float8_e4m3fn
    vt8: torch.Tensor  # [Hkv, D, T_pad] float8_e4m3fn, T_pad = ceil(T / block_n) * block_n, zeros past T
    qs: torch.Tensor  # [Hq, ceil(T / block_m)] fp32
    ks: torch.Tensor  # [Hkv, ceil(T / block_n)] fp32
    vs: torch.Tensor  # [Hkv, ceil(T / block_n)] fp32
    block_m: int
    block_n: int


def quantize_qkv_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
                     rotate: bool = False, quant_warps: int = 8) -> FP8QKV:
    """Quantize q, k, v to e4m3 with one fp32 scale per (tile, head), in one Triton launch (see the module doc).

    q [T, Hq, D], k/v [T, Hkv, D], float16 or bfloat16, unit stride along D. Tiles of ``block_m`` rows for q,
    ``block_n`` rows for k and v. ``rotate``: q and k are multiplied by ``rotation_matrix(D)`` first.
    The pure-torch equivalent is ``fp8_reference.quantize_reference``.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(2) != 1:
            raise ValueError(f"quantize_qkv_fp8: {name} must have unit stride along head_dim")
    nqb, nkb = -(-T // block_m), -(-T // block_n)
    t_pad = nkb * block_n
    dev = q.device
    f8 = torch.float8_e4m3fn
    q8 = torch.empty((T, Hq, D), device=dev, dtype=f8)
    k8 = torch.empty((T, Hkv, D), device=dev, dtype=f8)
    vt8 = torch.empty((Hkv, D, t_pad), device=dev, dtype=f8)
    qs = torch.empty((Hq, nqb), device=dev, dtype=torch.float32)
    ks = torch.empty((Hkv, nkb), device=dev, dtype=torch.float32)
    vs = torch.empty((Hkv, nkb), device=dev, dtype=torch.float32)
    out = FP8QKV(q8, k8, vt8, qs, ks, vs, block_m, block_n)
    if T == 0:
        return out
    rot = _rotation_operand(D, q.dtype, dev) if rotate else qs  # any pointer when unused
    # Small query tiles (16 tokens) are quantized several per program, so that every program moves at
    # least 64 rows (as the key tiles); one scale per block_m rows all the same.
    q_tiles = max(1, min(64 // block_m, triton.next_power_of_2(nqb)))
    grid = (-(-nqb // q_tiles) * Hq + 2 * nkb * Hkv,)
    fp8_quantize_kernel[grid](
        q, k, v, q8, k8, vt8, qs, ks, vs, rot,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        T, t_pad, nqb, nkb, float(torch.tensor(D**-0.5, dtype=torch.float32)),
        H_Q=Hq, H_KV=Hkv, HEAD_DIM=D, BLOCK_Q=block_m, BLOCK_KV=block_n, ROTATE=bool(rotate),
        EXACT_CAST=interpret(), Q_TILES=q_tiles, num_warps=quant_warps,
    )
    return out


def launch_fp8_forward(x: FP8QKV, sched, ranges, scale: float, cfg: FP8AttentionConfig, out: torch.Tensor):
    """The FP8 forward of the quantized ``x`` into ``out`` [T, Hq, D] (contiguous, q's dtype), with the forward
    schedule ``sched`` at cfg's tiles and the per-token ``ranges`` (``fp8_tables``' ``fwd``, ``ranges``)."""
    T, Hq, D = x.q8.shape
    Hkv = x.k8.shape[1]
    if T == 0:
        return out
    t_pad = x.vt8.shape[2]
    use_tma = cfg.tma and tma_ok(x.k8)
    kd = vd = None
    if use_tma:
        kd = descriptor(x.k8.view(T, Hkv * D), cfg.block_n, D)
        vd = descriptor(x.vt8.view(Hkv * D, t_pad), D, cfg.block_n)
    fp8_fwd_kernel[(sched.shape[0] * Hkv,)](
        x.q8, x.k8, x.vt8, x.qs, x.ks, x.vs, out, sched, ranges, kd, vd,
        x.q8.stride(0), x.q8.stride(1), x.k8.stride(0), x.k8.stride(1), out.stride(0), out.stride(1),
        T, t_pad, x.qs.shape[1], x.ks.shape[1], scale * LOG2E,
        H_KV=Hkv, GROUPS=Hq // Hkv, ROWS=packed_row_count(cfg.block_m, Hq // Hkv), HEAD_DIM=D,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=use_tma, EXACT_CAST=interpret(), num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return out


def fp8_tables(layout: PrefixLayout, cfg: FP8AttentionConfig, head_dim: int, dtype: torch.dtype,
               groups: int = 4, window: int | None = None) -> AttentionTables:
    """The layout's tables at cfg's forward tiles under the sliding ``window`` (cached on the layout); the FP8
    forward reads ``fwd`` and ``ranges``.

    The other tiles are the 16-bit default config's: where the two forwards tile alike (the tuned defaults do for GQA
    groups 1, 2 and 4; for the others the 16-bit forward fills 64 or 128 rows and the FP8 one takes 16 tokens), the
    policy's forward and backward on the same layout find these tables built. ``groups``: query heads per KV head
    (the 16-bit config depends on it)."""
    t = default_config(head_dim, dtype, layout.device, groups).tile_shape
    # The constructor, not ``_replace``: the tables are cached on the layout keyed by this tuple, and torch 2.11's
    # dynamo could not rebuild a named tuple made by ``_replace`` when such a cache entry was written in a graph.
    return build_tables(layout, TileShape(cfg.block_m, cfg.block_n, t.kv_m, t.kv_n, t.dq_m, t.dq_n), window)


def fp8_forward(q, k, v, sched, ranges, scale: float, rotate: bool, cfg: FP8AttentionConfig, out=None):
    """Quantize (``quantize_qkv_fp8``) and run the FP8 forward (``launch_fp8_forward``) of contiguous q, k, v."""
    x = quantize_qkv_fp8(q, k, v, cfg.block_m, cfg.block_n, rotate, cfg.quant_warps)
    if out is None:
        out = torch.empty_like(q)
    return launch_fp8_forward(x, sched, ranges, scale, cfg, out)
