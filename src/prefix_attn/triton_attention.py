"""The `triton` backend: FlashAttention-2-style prefix-sharing attention in Triton, forward and backward.

Semantics (DESIGN.md, "The layout"): query ``q`` attends to keys ``[lo1[q], hi1[q]) U [lo2[q], q]``
(``PrefixLayout.query_key_ranges``); key ``k`` is seen by queries ``[k, q_hi[k])`` (``key_query_ranges``).

Three layers, as in DESIGN.md style 4:

1. ``@triton.jit`` kernels. The forward walks, for each query tile, only the key tiles of the layout's tile ranges
   (``PrefixLayout.query_tile_ranges``), in one loop: a tile where every query sees every key runs without any
   per-element mask; only the boundary tiles load the per-query ranges and mask. One program computes all query heads
   of one KV head (GQA packing). The backward is KV-major: each program owns one key tile of one KV head, walks the
   query tiles that see it (``key_tile_ranges``; full tiles unmasked, boundary tiles masked by the per-key query
   range), for every query head of its GQA group, accumulating dk and dv in fp32 in registers; dq comes from a
   separate query-major kernel that reuses the forward's schedule (no atomics: bitwise reproducible).
2. The launchers: shapes, strides, grid, block sizes, and the tables the kernels read (``prefix_attn.schedule``:
   built from the layout on its device, cached on it so all layers of a forward share them). Tiles run in position
   order, all heads of a tile next to each other (the K/V they read stay in L2).
3. ``torch.library.custom_op`` ops (``prefix_attn::triton_fwd`` / ``triton_bwd``) with a registered autograd
   formula and fake (meta) implementations, so ``torch.compile`` can trace through the backend.

Numerics: scores, softmax statistics and all accumulators are fp32; P (and dS) are rounded to the input dtype before
their matrix products, as in FlashAttention. fp32 inputs use IEEE fp32 dot products (no tf32), so the CPU
interpreter tests (``TRITON_INTERPRET=1``) can hold the kernel to float32 accuracy.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields, replace

import torch
import triton
import triton.language as tl

from .layout import PrefixLayout
from .schedule import AttentionTables, TileShape, build_tables

_LOG2E = 1.4426950408889634


# =====================================================================================================================
# 1. Kernels
# =====================================================================================================================


@triton.jit
def _tile_segments(sp):
    """The ten key-tile bounds of one query tile's walk (a row of ``forward_schedule``): range 1 masked [s0, s1),
    full [s1, s2), masked [s2, s3); range 2 masked [s4, s5), full [s5, s6), masked [s6, s7), full [s7, s8),
    masked [s8, s9)."""
    return (tl.load(sp + 0), tl.load(sp + 1), tl.load(sp + 2), tl.load(sp + 3), tl.load(sp + 4), tl.load(sp + 5),
            tl.load(sp + 6), tl.load(sp + 7), tl.load(sp + 8), tl.load(sp + 9))


@triton.jit
def _walk_tile(i, s0, s1, s2, s3, s4, s5, s6, s7, s8):
    """Step i of the merged walk (range 1 [s0, s3), then range 2 [s4, s9)): its key tile, and whether it is full."""
    n1 = s3 - s0
    j = tl.where(i < n1, s0 + i, s4 + (i - n1))
    full = ((j >= s1) & (j < s2)) | ((j >= s5) & (j < s6)) | ((j >= s7) & (j < s8))
    return j, full


@triton.jit
def _allowed(kk, lo1, hi1, lo2, offs_m):
    """The layout's mask for key indices kk [1, BLOCK_N] and queries offs_m: [lo1, hi1) U [lo2, q] (DESIGN.md)."""
    return ((kk >= lo1[:, None]) & (kk < hi1[:, None])) | ((kk >= lo2[:, None]) & (kk <= offs_m[:, None]))


@triton.jit
def _online_softmax_step(acc, l_i, m_i, s, v, qk_scale, DOT_PREC: tl.constexpr):
    """One key tile of the forward: fold the unscaled scores s (-inf where masked) and the tile's v into the running
    row max m_i (log2 domain), row sum l_i and output accumulator acc. m_i starts finite (-1e30), so a row with no
    allowed key in this tile gets p = 0, never NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _packed_rows(pid, H_KV, T, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr):
    """The rows of a GQA-packed program: BLOCK_M tokens of query tile ``tile`` x all GROUPS query heads of KV head
    ``hk``, token-major (row r: token tile*BLOCK_M + r // GROUPS_P2, head hk*GROUPS + r % GROUPS_P2). Returns the
    tile, hk, each row's token and query head (int32), and which rows are real (token < T, head < GROUPS).

    Programs run the query tiles back to front in position order, the H_KV programs of a tile next to each other:
    the programs in flight read one document's K/V, which stay in L2, and a document's longest tiles start first."""
    tile = (T + BLOCK_M - 1) // BLOCK_M - 1 - pid // H_KV
    hk = pid % H_KV
    offs_r = tl.arange(0, BLOCK_M * GROUPS_P2)
    g = offs_r % GROUPS_P2
    offs_m = tile * BLOCK_M + offs_r // GROUPS_P2
    row_ok = (offs_m < T) & (g < GROUPS)
    return tile, hk, offs_m, hk * GROUPS + g, row_ok


@triton.jit
def _fwd_merged(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, sp,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The forward's key-tile walk as one loop: range 1 ``[s0, s3)`` then range 2 ``[s4, s9)``, a runtime flag per
    key tile choosing the per-element mask. One software-pipelined loop rather than one per segment: with short
    branches each segment holds 0-3 tiles, and a loop per segment would pay the pipeline's prologue and epilogue (and
    the TMA/cp.async wait at each loop's start) up to eight times per tile, its loads never overlapping the previous
    segment's MMAs."""
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _tile_segments(sp)
    n1 = s3 - s0
    offs_n = tl.arange(0, BLOCK_N)
    for i in range(0, n1 + (s9 - s4)):
        j, full = _walk_tile(i, s0, s1, s2, s3, s4, s5, s6, s7, s8)
        n0 = j * BLOCK_N
        k = _fwd_kv_tile(k_base, k_desc, n0, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA)
        v = _fwd_kv_tile(v_base, v_desc, n0, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if not full:
            s = tl.where(_allowed((n0 + offs_n)[None, :], lo1, hi1, lo2, offs_m), s, float("-inf"))
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v, qk_scale, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_kv_tile(base, desc, n0, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA: tl.constexpr):
    """One [BLOCK_N, D] K or V tile at key n0: a TMA load (rows past T come back as zeros) or a masked load."""
    if USE_TMA:
        x = desc.load([n0, kv_col])
    else:
        ptr = base + n0.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
        x = tl.load(ptr, mask=((n0 + offs_n) < T)[:, None], other=0.0)
    return x


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def _fwd_packed_kernel(
    Q, K, V, O, LSE,  # q [T, Hq, D], k/v [T, Hkv, D], o [T, Hq, D], lse [Hq, T] fp32 (log2 domain)
    SCHED, TOK,  # SCHED [n_q_tiles, 10] int32: the forward schedule for BLOCK_M-token query tiles; TOK [3, T] int32
    K_DESC, V_DESC,  # TMA descriptors over k/v viewed as [T, Hkv * D], block [BLOCK_N, D] (None without TMA)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    T, qk_scale,
    H_KV: tl.constexpr,  # KV heads: program id -> (query tile, KV head)
    GROUPS: tl.constexpr,  # query heads per KV head, all computed by one program
    GROUPS_P2: tl.constexpr,  # GROUPS rounded up to a power of two (tl.arange); the extra rows are masked off
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query TOKENS per tile (the schedule's); the MMA has BLOCK_M * GROUPS_P2 rows
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,  # K/V tiles through TMA descriptors (Hopper; rows past T come back as zeros)
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (exact fp32), "tf32" otherwise (ignored for 16-bit inputs)
):
    """GQA-packed forward: one program computes BLOCK_M query tokens for ALL the query heads of
    one KV head, stacked token-major as a [BLOCK_M * GROUPS_P2, D] operand (row r: token tile*BLOCK_M + r // G, head
    hk*G + r % G; q[t, hk*G:(hk+1)*G, :] is contiguous, so the load and store stay coalesced). Every K/V tile brought
    into shared memory feeds GROUPS x more MMA rows, and the mask granularity (the schedule's tiles) is BLOCK_M tokens,
    not BLOCK_M rows: 16 tokens x 4 heads give a 64-row wgmma whose tiles straddle branch ends 4x less often."""
    tile, hk, offs_m, h, row_ok = _packed_rows(tl.program_id(0), H_KV, T, BLOCK_M, GROUPS, GROUPS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    h = h.to(tl.int64)
    q = tl.load(Q + (offs_m.to(tl.int64) * stride_qt + h * stride_qh)[:, None] + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    lo1 = tl.load(TOK + offs_m, mask=row_ok, other=0)
    hi1 = tl.load(TOK + T + offs_m, mask=row_ok, other=0)
    lo2 = tl.load(TOK + 2 * T + offs_m, mask=row_ok, other=T + 1)  # padded rows: no allowed key
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_kh

    acc = tl.zeros([BLOCK_M * GROUPS_P2, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUPS_P2], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M * GROUPS_P2], dtype=tl.float32) - 1.0e30
    sp = SCHED + tile * 10
    acc, l_i, m_i = _fwd_merged(acc, l_i, m_i, q, k_base, v_base, K_DESC, V_DESC, hk * HEAD_DIM, stride_kt, offs_m,
                                offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (token >= T or head >= GROUPS) see no key at all
    acc = acc / l_safe[:, None]
    tl.store(O + (offs_m.to(tl.int64) * stride_ot + h * stride_oh)[:, None] + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h * T + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_kv_merged(
    dk, dv, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, stride_qt, stride_qh, offs_n, offs_d, qhi, hk, s0, s1, s2, s3,
    qk_scale, T,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The KV-major walk as one loop over (query head g, query tile j), g outer, with a runtime flag choosing the
    per-element mask on the boundary tiles ``[s0, s1)`` and ``[s2, s3)``.

    A branch key tile (the bulk of the keys in every DPO layout) is seen by only its branch's 2-5 query tiles. Split
    into a loop per segment and head, that would be 3 x GROUPS loops of 0-3 iterations each, every one restarting the
    software pipeline (its first q/dO load exposed, no MMA under it) and draining it at the end. One loop of
    GROUPS x (s3 - s0) iterations keeps the q/dO loads of the next (head, tile) in flight under the current MMAs
    across head and segment boundaries.
    """
    n = s3 - s0
    offs_mm = tl.arange(0, BLOCK_M)
    for i in range(0, GROUPS * n):
        g = i // n
        j = s0 + (i - g * n)
        full = (j >= s1) & (j < s2)
        h = (hk * GROUPS + g).to(tl.int64)
        m0 = j * BLOCK_M
        offs_m = m0 + offs_mm
        row_ok = offs_m < T
        if USE_TMA:
            q = q_desc.load([m0, (hk * GROUPS + g) * HEAD_DIM])
            do = do_desc.load([m0, (hk * GROUPS + g) * HEAD_DIM])
        else:
            qoff = h * stride_qh + m0.to(tl.int64) * stride_qt + offs_mm[:, None] * stride_qt + offs_d[None, :]
            q = tl.load(Q + qoff, mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + qoff, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + h * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + h * T + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if not full:
            qq = offs_m[None, :]
            ok = (qq >= offs_n[:, None]) & (qq < qhi[:, None])
            pt = tl.where(ok, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def _bwd_delta_kernel(
    O, DO, DELTA,  # o, dO [T, Hq, D] (dO contiguous); DELTA [Hq, T] fp32 out
    stride_ot, stride_oh, stride_dot, stride_doh,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
):
    """delta[h, t] = sum_d o[t, h, d] * dO[t, h, d] in fp32: the softmax-Jacobian term of the backward, in one read of
    o and dO (the torch expression would materialize three fp32 copies of [T, Hq, D])."""
    h = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_t < T
    t64 = offs_t.to(tl.int64)[:, None]
    o = tl.load(O + h * stride_oh + t64 * stride_ot + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + h * stride_doh + t64 * stride_dot + offs_d[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + h * T + offs_t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    SCHED, QHI,  # SCHED [n_k_tiles, 4] int32 query-tile segments, QHI [T] int32
    Q_DESC, DO_DESC,  # TMA descriptors over q/dO viewed as [T, Hq * D], block [BLOCK_M, D] (None without TMA)
    stride_qt, stride_qh, stride_kt, stride_kh,
    T, qk_scale, sm_scale,
    H_KV: tl.constexpr,  # KV heads: program id -> (key tile, KV head)
    GROUPS: tl.constexpr,  # query heads per KV head: each program sums dk, dv over its group
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per tile (must match the schedule's)
    BLOCK_N: tl.constexpr,  # keys per tile (must match the schedule's)
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """KV-major backward: dk, dv of one key tile of one KV head, summed over the query heads of its GQA group. Key
    tiles run front to back in position order (prefix key tiles first), the H_KV programs of a tile next to each other,
    so the programs in flight read one document's q/dO."""
    pid = tl.program_id(0)
    tile = pid // H_KV
    hk = pid % H_KV
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    kvoff = hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
    k = tl.load(K + kvoff, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kvoff, mask=col_ok[:, None], other=0.0)
    qhi = tl.load(QHI + offs_n, mask=col_ok, other=0)  # padding keys are seen by no query
    sp = SCHED + tile * 4
    s0 = tl.load(sp + 0)  # masked [s0, s1), full [s1, s2), masked [s2, s3)
    s1 = tl.load(sp + 1)
    s2 = tl.load(sp + 2)
    s3 = tl.load(sp + 3)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _bwd_kv_merged(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, stride_qt, stride_qh, offs_n, offs_d, qhi,
                            hk, s0, s1, s2, s3, qk_scale, T, GROUPS, HEAD_DIM, BLOCK_M, USE_TMA, DOT_PREC)
    tl.store(DK + kvoff, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kvoff, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    SCHED, TOK,  # the forward's schedule for this kernel's block sizes
    K_DESC, V_DESC,  # TMA descriptors as in the forward (None without TMA)
    stride_qt, stride_qh, stride_kt, stride_kh,
    T, qk_scale, sm_scale,
    H_KV: tl.constexpr,
    GROUPS: tl.constexpr,
    GROUPS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query TOKENS per tile; the MMA has BLOCK_M * GROUPS_P2 rows
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dq, query-major, GQA-packed as the forward (row r: token tile*BLOCK_M + r // G of head hk*G + r % G): no
    atomics, so the backward is bitwise reproducible, for one more QK^T and dO V^T recompute."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    tile, hk, offs_m, hrow, row_ok = _packed_rows(pid, H_KV, T, BLOCK_M, GROUPS, GROUPS_P2)
    hrow = hrow.to(tl.int64)
    qoff = (hrow * stride_qh + offs_m.to(tl.int64) * stride_qt)[:, None] + offs_d[None, :]
    lse = tl.load(LSE + hrow * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + hrow * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M * GROUPS_P2, HEAD_DIM], dtype=tl.float32)
    q = tl.load(Q + qoff, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + qoff, mask=row_ok[:, None], other=0.0)
    lo1 = tl.load(TOK + offs_m, mask=row_ok, other=0)
    hi1 = tl.load(TOK + T + offs_m, mask=row_ok, other=0)
    lo2 = tl.load(TOK + 2 * T + offs_m, mask=row_ok, other=T + 1)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_kh
    sp = SCHED + tile * 10
    dq = _bwd_dq_merged(dq, q, do, lse, delta, k_base, v_base, K_DESC, V_DESC, hk * HEAD_DIM, stride_kt, offs_m,
                        offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC)
    tl.store(DQ + qoff, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_dq_merged(
    dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, sp,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The dq kernel's key-tile walk, one loop as ``_fwd_merged``'s."""
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _tile_segments(sp)
    n1 = s3 - s0
    offs_n = tl.arange(0, BLOCK_N)
    for i in range(0, n1 + (s9 - s4)):
        j, full = _walk_tile(i, s0, s1, s2, s3, s4, s5, s6, s7, s8)
        n0 = j * BLOCK_N
        k = _fwd_kv_tile(k_base, k_desc, n0, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA)
        v = _fwd_kv_tile(v_base, v_desc, n0, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if not full:
            kk = (n0 + offs_n)[None, :]
            ok = _allowed(kk, lo1, hi1, lo2, offs_m)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PREC)
    return dq


# =====================================================================================================================
# 2. Schedules and launchers
# =====================================================================================================================


class _IntFieldsConfig:
    """A frozen dataclass of int/bool fields that travels through a ``torch.library.custom_op`` as ``list[int]``."""

    def as_list(self) -> list[int]:
        return [int(getattr(self, f.name)) for f in fields(self)]

    @classmethod
    def from_list(cls, xs):
        return cls(**{f.name: (bool(int(x)) if isinstance(f.default, bool) else int(x)) for f, x in zip(fields(cls), xs)})


@dataclass(frozen=True)
class TritonAttentionConfig(_IntFieldsConfig):
    """Tile sizes and launch parameters. ``fwd_*``: the forward (``fwd_block_m`` query TOKENS per tile: the kernel
    packs all query heads of a KV head, so its MMA has ``fwd_block_m x next_pow2(Hq / Hkv)`` rows); ``kv_*``: the
    KV-major backward (``kv_block_n`` keys per program, ``kv_block_m`` queries per step); ``dq_*``: the dq kernel
    (``dq_block_m`` tokens, packed as the forward). ``fwd_tma`` / ``bwd_tma``: the forward's K/V and the backward's
    q/dO (KV-major kernel) and K/V (dq kernel) loads through TMA descriptors (Hopper or newer; ignored elsewhere)."""

    fwd_block_m: int = 16
    fwd_block_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 3
    kv_block_m: int = 64
    kv_block_n: int = 128
    kv_warps: int = 8
    kv_stages: int = 2
    dq_block_m: int = 32
    dq_block_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    fwd_tma: bool = True
    bwd_tma: bool = True

    @property
    def tile_shape(self) -> TileShape:
        """The tile sizes the schedules are built for."""
        return TileShape(self.fwd_block_m, self.fwd_block_n, self.kv_block_m, self.kv_block_n, self.dq_block_m,
                         self.dq_block_n)


# The configs ``default_config`` chooses from. On a GPU the packed kernels' *_block_m (query tokens per tile) is then
# sized from the GQA group; the values here are those of a group of 4.
_CONFIGS = {
    # 16-bit inputs on a GPU (head dims 64 and 128 alike): the H100 sweep of scripts/bench_attention.py
    # (docs/PERFORMANCE.md, "doc_order_all_pack16").
    "cuda_16bit": TritonAttentionConfig(
        fwd_block_m=16, fwd_block_n=64, fwd_warps=4, fwd_stages=3, kv_block_m=64, kv_block_n=128, kv_warps=8,
        kv_stages=2, dq_block_m=32, dq_block_n=64, dq_warps=8, dq_stages=2, fwd_tma=True, bwd_tma=True),
    # fp32 inputs on a GPU: smaller tiles (twice the bytes per element).
    "cuda_fp32": TritonAttentionConfig(
        fwd_block_m=16, fwd_block_n=32, fwd_warps=4, fwd_stages=2, kv_block_m=32, kv_block_n=64, kv_warps=4,
        kv_stages=1, dq_block_m=16, dq_block_n=32, dq_warps=4, dq_stages=1, fwd_tma=False, bwd_tma=False),
    # The CPU interpreter: small tiles keep the tests fast and make short rows cross many tiles.
    "interpreter": TritonAttentionConfig(
        fwd_block_m=16, fwd_block_n=16, fwd_warps=4, fwd_stages=1, kv_block_m=16, kv_block_n=32, kv_warps=4,
        kv_stages=1, dq_block_m=16, dq_block_n=16, dq_warps=4, dq_stages=1, fwd_tma=True, bwd_tma=True),
}
# MMA rows the packed kernels aim at on a GPU (tokens = rows / next_pow2(group), at least 16): 64 in the forward
# (16 tokens x 4 heads, measured), 64 in the fp32 dq kernel, 128 in the 16-bit one; 8 warps beyond 64 rows.
_PACKED_ROWS = {"cuda_16bit": (64, 128), "cuda_fp32": (64, 64)}
_OVERRIDE: TritonAttentionConfig | None = None


def set_default_config(cfg: TritonAttentionConfig | None) -> None:
    """Use ``cfg`` for every call that passes no config (None restores the table)."""
    global _OVERRIDE
    _OVERRIDE = cfg


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device, groups: int = 4) -> TritonAttentionConfig:
    """The config for ``dtype`` and ``groups`` query heads per KV head on ``device`` (``set_default_config``
    overrides it). ``head_dim`` does not choose among the tuned configs today (64 and 128 got the same one)."""
    if _OVERRIDE is not None:
        return _OVERRIDE
    if device.type != "cuda":
        return _CONFIGS["interpreter"]
    return _gpu_config("cuda_16bit" if dtype in (torch.float16, torch.bfloat16) else "cuda_fp32", max(1, groups))


@functools.lru_cache(maxsize=None)  # called once per attention call: no dataclass built per layer
def _gpu_config(kind: str, groups: int) -> TritonAttentionConfig:
    g = triton.next_power_of_2(groups)
    fwd_rows, dq_rows = _PACKED_ROWS[kind]
    fwd_m, dq_m = max(fwd_rows // g, 16), max(dq_rows // g, 16)
    cfg = _CONFIGS[kind]
    return replace(cfg, fwd_block_m=fwd_m, fwd_warps=4 if fwd_m * g <= 64 else 8, dq_block_m=dq_m,
                   dq_warps=cfg.dq_warps if dq_m * g <= dq_rows else 8)


@functools.lru_cache(maxsize=None)
def _major_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _tma_ok(x: torch.Tensor) -> bool:
    """TMA descriptors: on a Hopper-or-newer GPU (or the interpreter), 16-byte aligned rows."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return x.is_cuda and _major_capability(x.device.index or 0) >= 9 and (x.stride(0) * x.element_size()) % 16 == 0


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_fwd(q, k, v, sched, ranges, scale, cfg: TritonAttentionConfig):
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    use_tma = cfg.fwd_tma and _tma_ok(q)
    kd = vd = None
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(k.view(T, Hkv * D), [cfg.fwd_block_n, D])
        vd = TensorDescriptor.from_tensor(v.view(T, Hkv * D), [cfg.fwd_block_n, D])
    _fwd_packed_kernel[(sched.shape[0] * Hkv,)](
        q, k, v, o, lse, sched, ranges, kd, vd,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
        T, scale * _LOG2E,
        H_KV=Hkv, GROUPS=Hq // Hkv, GROUPS_P2=triton.next_power_of_2(Hq // Hkv), HEAD_DIM=D,
        BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n, USE_TMA=use_tma, DOT_PREC=_dot_prec(q.dtype),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return o, lse


def _launch_bwd(do, q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched, scale, cfg: TritonAttentionConfig):
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    groups = Hq // Hkv
    do = do.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if T == 0:
        return dq, dk, dv
    # delta = rowsum(dO * O), [Hq, T] fp32 (the softmax-Jacobian term).
    delta = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(T, 64), Hq)](o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T,
                                                 HEAD_DIM=D, BLOCK_T=64, num_warps=4)
    qk_scale = scale * _LOG2E
    prec = _dot_prec(q.dtype)
    use_tma = cfg.bwd_tma and _tma_ok(q)
    qd = dod = kd = vd = None
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        qd = TensorDescriptor.from_tensor(q.view(T, Hq * D), [cfg.kv_block_m, D])
        dod = TensorDescriptor.from_tensor(do.view(T, Hq * D), [cfg.kv_block_m, D])
        kd = TensorDescriptor.from_tensor(k.view(T, Hkv * D), [cfg.dq_block_n, D])
        vd = TensorDescriptor.from_tensor(v.view(T, Hkv * D), [cfg.dq_block_n, D])
    _bwd_kv_kernel[(kv_sched.shape[0] * Hkv,)](
        q, k, v, do, lse, delta, dk, dv, kv_sched, q_hi, qd, dod,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        T, qk_scale, scale,
        H_KV=Hkv, GROUPS=groups, HEAD_DIM=D, BLOCK_M=cfg.kv_block_m, BLOCK_N=cfg.kv_block_n, USE_TMA=use_tma,
        DOT_PREC=prec, num_warps=cfg.kv_warps, num_stages=cfg.kv_stages,
    )
    _bwd_dq_kernel[(dq_sched.shape[0] * Hkv,)](
        q, k, v, do, lse, delta, dq, dq_sched, ranges, kd, vd,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        T, qk_scale, scale,
        H_KV=Hkv, GROUPS=groups, GROUPS_P2=triton.next_power_of_2(groups), HEAD_DIM=D, BLOCK_M=cfg.dq_block_m,
        BLOCK_N=cfg.dq_block_n, USE_TMA=use_tma, DOT_PREC=prec, num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
    )
    return dq, dk, dv


# =====================================================================================================================
# 3. Custom ops and autograd
# =====================================================================================================================


@torch.library.custom_op("prefix_attn::triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fwd_sched: torch.Tensor, ranges: torch.Tensor,
            q_hi: torch.Tensor, kv_sched: torch.Tensor, dq_sched: torch.Tensor, scale: float, cfg: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(q, k, v, fwd_sched, ranges, scale, TritonAttentionConfig.from_list(cfg))


@_fwd_op.register_fake
def _(q, k, v, fwd_sched, ranges, q_hi, kv_sched, dq_sched, scale, cfg):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("prefix_attn::triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            ranges: torch.Tensor, q_hi: torch.Tensor, kv_sched: torch.Tensor, dq_sched: torch.Tensor, scale: float,
            cfg: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(do, q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched, scale, TritonAttentionConfig.from_list(cfg))


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched, scale, cfg):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, _fwd_sched, ranges, q_hi, kv_sched, dq_sched, scale, cfg = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched)
    ctx.scale = scale
    ctx.cfg = cfg


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched, ctx.scale, ctx.cfg)
    return dq, dk, dv, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerTritonAttention(torch.autograd.Function):
    """The eager path: the same launchers as the custom ops, without the custom-op dispatch.

    The custom op's Python dispatch and its generated autograd node cost host time on every call (docs/PERFORMANCE.md:
    ~0.6 ms per call on an H100, on steps that are bound by host time). torch.compile traces the custom ops instead
    (``triton_prefix_attention`` picks by ``torch.compiler.is_compiling()``).
    """

    @staticmethod
    def forward(ctx, q, k, v, t: AttentionTables, scale, cfg):
        o, lse = _launch_fwd(q, k, v, t.fwd, t.tokens.ranges, scale, cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.tables, ctx.scale, ctx.cfg = t, scale, cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        t = ctx.tables
        dq, dk, dv = _launch_bwd(do, q, k, v, o, lse, t.tokens.ranges, t.tokens.q_hi, t.kv, t.dq, ctx.scale, ctx.cfg)
        return dq, dk, dv, None, None, None


# =====================================================================================================================
# Public API
# =====================================================================================================================

_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def triton_supported(device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> tuple[bool, str]:
    """Whether the triton backend runs for tensors on ``device`` of ``dtype`` with ``head_dim``; and why not."""
    device = torch.device(device)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda" and not interpret:
        return False, f"the triton backend needs a CUDA GPU (got device {device}; TRITON_INTERPRET=1 runs it on CPU)"
    if device.type == "cuda" and not interpret:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return False, f"GPU compute capability {major}.{minor} < 8.0 (Ampere or newer needed)"
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return False, "bf16 is not supported on this GPU"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    if head_dim is not None and head_dim not in _SUPPORTED_HEAD_DIMS:
        return False, f"head_dim {head_dim} is not supported ({_SUPPORTED_HEAD_DIMS})"
    return True, ""


def triton_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PrefixLayout,
    softmax_scale: float | None = None,
    *,
    config: TritonAttentionConfig | None = None,
) -> torch.Tensor:
    """Prefix-shared attention over one packed row with the Triton kernels. Differentiable in q, k, v.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (GQA; K/V are never repeated in memory).
            D in (16, 32, 64, 128); dtype float16, bfloat16 or float32 (all three the same).
        layout: the row's PrefixLayout, on q's device, with ``total_tokens == T``.
        softmax_scale: defaults to D ** -0.5.
        config: tile sizes / launch parameters (default: ``default_config``).

    Returns [T, Hq, D] in q's dtype: query q attends to keys [lo1, hi1) U [lo2, q] (``layout.query_key_ranges``).
    """
    T, Hq, D = q.shape
    if D not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"triton backend: head_dim {D} not supported ({_SUPPORTED_HEAD_DIMS})")
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    cfg = config or default_config(D, q.dtype, q.device, Hq // max(1, k.shape[1]))
    t = build_tables(layout, cfg.tile_shape)
    if not torch.compiler.is_compiling():
        return _EagerTritonAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), t, scale, cfg)
    o, _lse = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), t.fwd, t.tokens.ranges, t.tokens.q_hi, t.kv,
                      t.dq, scale, cfg.as_list())
    return o


__all__ = ["TritonAttentionConfig", "default_config", "set_default_config", "triton_prefix_attention",
           "triton_supported"]
