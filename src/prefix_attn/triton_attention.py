"""The `triton` backend: FlashAttention-2-style prefix-sharing attention in Triton, forward and backward.

Semantics (DESIGN.md, "The layout"): query ``q`` attends to keys ``[lo1[q], hi1[q]) U [lo2[q], q]``
(``PrefixLayout.query_key_ranges``); key ``k`` is seen by queries ``[k, q_hi[k])`` (``key_query_ranges``).

Three layers, as in DESIGN.md style 4:

1. ``@triton.jit`` kernels. The forward walks, for each query tile, only the key tiles of the layout's tile ranges
   (``PrefixLayout.query_tile_ranges``): a tile where every query sees every key runs without any per-element mask;
   only the boundary tiles load the per-query ranges and mask. The backward is KV-major: each program owns one key
   tile of one KV head, walks the query tiles that see it (``key_tile_ranges``; full tiles unmasked, boundary tiles
   masked by the per-key query range), for every query head of its GQA group, accumulating dk and dv in fp32 in
   registers; dq is either accumulated in an fp32 buffer with atomics (FA2's design) or, with
   ``deterministic=True``, computed by a separate query-major kernel that reuses the forward's schedule.
2. The launchers: shapes, strides, grid, block sizes, and the tile schedules (built from the layout on its device,
   O(tiles) vectorized torch ops as the reference, three fused Triton launches on a GPU (``triton_schedule``);
   cached on the layout so all layers of a forward share them). The grid runs the tiles with the most work first,
   with all heads of a tile next to each other (the K/V they read stay in L2).
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
from .triton_schedule import fused_build, fused_enabled

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
def _query_tile(pid, per_tile, ORDER, T, BLOCK_M: tl.constexpr, DOC_ORDER: tl.constexpr):
    """The query tile of program ``pid`` (``per_tile`` programs per tile, one per head or KV head): the schedule's
    longest-first ORDER, or with ``doc_order`` the tiles back to front in position order (a document's longest tiles
    first, one document's K/V shared by the programs in flight)."""
    if DOC_ORDER:
        tile = (T + BLOCK_M - 1) // BLOCK_M - 1 - pid // per_tile
    else:
        tile = tl.load(ORDER + pid // per_tile)
    return tile


@triton.jit
def _packed_rows(pid, H_KV, ORDER, T, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr,
                 DOC_ORDER: tl.constexpr):
    """The rows of a GQA-packed program: BLOCK_M tokens of query tile ``tile`` x all GROUPS query heads of KV head
    ``hk``, token-major (row r: token tile*BLOCK_M + r // GROUPS_P2, head hk*GROUPS + r % GROUPS_P2). Returns the
    tile, hk, each row's token and query head (int32), and which rows are real (token < T, head < GROUPS)."""
    tile = _query_tile(pid, H_KV, ORDER, T, BLOCK_M, DOC_ORDER)
    hk = pid % H_KV
    offs_r = tl.arange(0, BLOCK_M * GROUPS_P2)
    g = offs_r % GROUPS_P2
    offs_m = tile * BLOCK_M + offs_r // GROUPS_P2
    row_ok = (offs_m < T) & (g < GROUPS)
    return tile, hk, offs_m, hk * GROUPS + g, row_ok


@triton.jit
def _fwd_walk(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2,
              sp, qk_scale, T, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
              MERGED: tl.constexpr, PREFETCH: tl.constexpr):
    """A query tile's whole key walk, in the loop structure the config chose (prefetch / merged / eight loops)."""
    if MERGED and PREFETCH:
        acc, l_i, m_i = _fwd_merged_prefetch(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt,
                                             offs_m, offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA,
                                             DOT_PREC)
    elif MERGED:
        acc, l_i, m_i = _fwd_merged(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m,
                                    offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC)
    else:
        acc, l_i, m_i = _fwd_walk8(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m,
                                   offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_range(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, start, end,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # boundary tiles: bounds checks and the per-element mask; full tiles: neither
    USE_TMA: tl.constexpr,  # K/V tiles through TMA descriptors (Hopper; rows past T come back as zeros)
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (exact fp32), "tf32" otherwise (ignored for 16-bit inputs)
):
    offs_n = tl.arange(0, BLOCK_N)
    for j in range(start, end):
        n0 = j * BLOCK_N
        if USE_TMA:
            k = k_desc.load([n0, kv_col])
            v = v_desc.load([n0, kv_col])
        else:
            kp = k_base + n0.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
            vp = v_base + n0.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
            if MASKED:
                inb = (n0 + offs_n) < T
                k = tl.load(kp, mask=inb[:, None], other=0.0)
                v = tl.load(vp, mask=inb[:, None], other=0.0)
            else:
                k = tl.load(kp)
                v = tl.load(vp)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # unscaled; the scale folds into one FMA below
        if MASKED:
            s = tl.where(_allowed((n0 + offs_n)[None, :], lo1, hi1, lo2, offs_m), s, float("-inf"))
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v, qk_scale, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_merged(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, sp,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The forward's key-tile walk as ONE loop (``fwd_merged``): range 1 ``[s0, s3)`` then range 2 ``[s4, s9)``, a
    runtime flag per key tile choosing the per-element mask. Same tiles and arithmetic as the eight ``_fwd_range``
    loops, but one software-pipelined loop: with short branches each of the eight loops runs 0-3 iterations, so the
    pipeline's prologue/epilogue (and the TMA/cp.async wait at each loop's start) is paid up to eight times per tile
    and loads never overlap the previous segment's MMAs. Row order of the tiles differs (rounding only)."""
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


@triton.jit
def _fwd_merged_prefetch(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, sp,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """``_fwd_merged`` with the QK^T of the next key tile in flight during the softmax of the current one
    (``fwd_prefetch_qk``; FA3's intra-warpgroup overlap, expressed so that Triton 3.6's Hopper wgmma pipelining and
    ptxas keep it; scripts/check_sm90_compile.py checks the PTX: ``ex2@mma`` 34, no C7514).

    Iteration i = -1 .. n-1 (key tile j(i) of the merged walk): (1) acc += P_{i-1} V_{i-1}, the previous tile's
    P@V, deferred (P = 0 for i <= 0); (2) S_{i+1} = q K_{i+1}^T; (3) the softmax of S_i (issued one iteration
    earlier; S_{-1} = -inf with the mask off, a no-op) and the rescale of acc. Triton makes (1) synchronous (its result
    is rescaled in the same iteration); its wait retires every wgmma in flight, so S_i is ready, and (2) becomes
    "properly async": its result is only yielded, then read after that wait, so it runs under the softmax.
    The last iteration recomputes tile j(n-1) in (2) (discarded; always an in-walk tile, no out-of-bounds load); the
    last P@V follows the loop. An empty walk (n = 0) runs only iteration -1 (P = 0; it reads tile s4 with rows past T
    masked / zero-filled). P is carried in fp32 and cast at (1): a 16-bit P carried across the iteration becomes a
    shared-memory wgmma operand (8 KB more, a store per tile). Cost per program: one P@V with P = 0, one discarded
    QK^T, one softmax over -inf, and a select on full tiles too. Same tiles, order and rounding as ``_fwd_merged``."""
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _tile_segments(sp)
    n1 = s3 - s0
    n = n1 + (s9 - s4)
    offs_n = tl.arange(0, BLOCK_N)
    ROWS: tl.constexpr = q.shape[0]
    # Iteration -1 only issues S_0: its softmax runs on S = -inf with the mask off (m, l, acc unchanged, P = 0).
    s = tl.full([ROWS, BLOCK_N], float("-inf"), tl.float32)
    p = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for i in range(-1, n):
        # (1) P@V of the previous tile (first in the body: synchronous; its wait also completes S_i).
        ip = tl.maximum(i - 1, 0)
        jp = tl.where(ip < n1, s0 + ip, s4 + (ip - n1))
        v = _fwd_kv_tile(v_base, v_desc, jp * BLOCK_N, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA)
        acc = tl.dot(p.to(q.dtype), v, acc, input_precision=DOT_PREC)
        # (3a) this tile's mask, applied before (2) is issued: the select is the last read of the S_i registers, so
        # (2) can write its result into them (no copy of the in-flight accumulator at the loop's back edge, which
        # would make ptxas serialize the wgmmas). The mask is chosen in the branch and applied outside it: a branch
        # reading S would be scheduled before (1)'s wait, and Triton would then wait for (2) at once.
        j, full = _walk_tile(i, s0, s1, s2, s3, s4, s5, s6, s7, s8)
        full = full | (i < 0)
        if full:
            ok = tl.full([ROWS, BLOCK_N], 1, tl.int1)
        else:
            kk = (j * BLOCK_N + offs_n)[None, :]
            ok = _allowed(kk, lo1, hi1, lo2, offs_m)
        s = tl.where(ok, s, float("-inf"))
        # (2) QK^T of the next tile, left in flight (the last iteration recomputes its own tile, discarded).
        inx = tl.maximum(tl.minimum(i + 1, n - 1), 0)
        jn = tl.where(inx < n1, s0 + inx, s4 + (inx - n1))
        k = _fwd_kv_tile(k_base, k_desc, jn * BLOCK_N, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA)
        s_next = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        # (3b) the rest of this tile's softmax, under (2).
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        s = s_next
    if n > 0:
        jl = tl.where(n - 1 < n1, s0 + (n - 1), s4 + (n - 1 - n1))
        v = _fwd_kv_tile(v_base, v_desc, jl * BLOCK_N, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA)
        acc = tl.dot(p.to(q.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def _fwd_kernel(
    Q, K, V, O, LSE,  # q [T, Hq, D], k/v [T, Hkv, D], o [T, Hq, D], lse [Hq, T] fp32 (log2 domain)
    SCHED, ORDER, TOK,  # SCHED [n_q_tiles, 10] int32 segment bounds, ORDER [n_q_tiles] tile order, TOK [3, T] int32
    K_DESC, V_DESC,  # TMA descriptors over k/v viewed as [T, Hkv * D], block [BLOCK_N, D] (None without TMA)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    T, qk_scale,
    H_Q: tl.constexpr,  # query heads: program id -> (tile, head) decomposition
    GROUPS: tl.constexpr,  # query heads per KV head (GQA)
    HEAD_DIM: tl.constexpr,  # block width of the feature dimension (tl.arange needs it static)
    BLOCK_M: tl.constexpr,  # query rows per tile (must match the schedule's)
    BLOCK_N: tl.constexpr,  # keys per tile (must match the schedule's)
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MERGED: tl.constexpr = False,  # one loop over all key tiles (``_fwd_merged``) instead of eight
    DOC_ORDER: tl.constexpr = False,  # tiles back to front in position order instead of ORDER (``doc_order``)
    PREFETCH: tl.constexpr = False,  # with MERGED: next tile's QK^T in flight under the softmax (``fwd_prefetch_qk``)
):
    pid = tl.program_id(0)
    tile = _query_tile(pid, H_Q, ORDER, T, BLOCK_M, DOC_ORDER)
    h = pid % H_Q
    hk = h // GROUPS
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q_base = Q + h.to(tl.int64) * stride_qh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lo1 = tl.load(TOK + offs_m, mask=row_ok, other=0)
    hi1 = tl.load(TOK + T + offs_m, mask=row_ok, other=0)
    lo2 = tl.load(TOK + 2 * T + offs_m, mask=row_ok, other=T + 1)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_kh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    sp = SCHED + tile * 10
    acc, l_i, m_i = _fwd_walk(acc, l_i, m_i, q, k_base, v_base, K_DESC, V_DESC, hk * HEAD_DIM, stride_kt, offs_m,
                              offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC, MERGED, PREFETCH)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (q >= T) see no key at all
    acc = acc / l_safe[:, None]
    o_base = O + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + h.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _fwd_walk8(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, sp,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The forward's key-tile walk as eight loops: the full tiles first (no mask), then the masked ones."""
    # Range 1 (shared prefix): masked [s0, s1), full [s1, s2), masked [s2, s3).
    # Range 2 (causal part): masked [s4, s5), full [s5, s6), masked [s6, s7), full [s7, s8), masked [s8, s9).
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _tile_segments(sp)
    args = (q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, *args, s1, s2, qk_scale, T, BLOCK_N, False, USE_TMA, DOT_PREC)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, *args, s5, s6, qk_scale, T, BLOCK_N, False, USE_TMA, DOT_PREC)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, *args, s7, s8, qk_scale, T, BLOCK_N, False, USE_TMA, DOT_PREC)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, *args, s0, s1, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, *args, s2, s3, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, *args, s4, s5, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, *args, s6, s7, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, *args, s8, s9, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def _fwd_packed_kernel(
    Q, K, V, O, LSE,  # as in _fwd_kernel
    SCHED, ORDER, TOK,  # the forward schedule for BLOCK_M-token query tiles
    K_DESC, V_DESC,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    T, qk_scale,
    H_KV: tl.constexpr,  # KV heads: program id -> (query tile, KV head)
    GROUPS: tl.constexpr,  # query heads per KV head, all computed by one program
    GROUPS_P2: tl.constexpr,  # GROUPS rounded up to a power of two (tl.arange); the extra rows are masked off
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query TOKENS per tile (the schedule's); the MMA has BLOCK_M * GROUPS_P2 rows
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MERGED: tl.constexpr,
    DOC_ORDER: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
):
    """GQA-packed forward (``fwd_pack_gqa``): one program computes BLOCK_M query tokens for ALL the query heads of
    one KV head, stacked token-major as a [BLOCK_M * GROUPS_P2, D] operand (row r: token tile*BLOCK_M + r // G, head
    hk*G + r % G; q[t, hk*G:(hk+1)*G, :] is contiguous, so the load and store stay coalesced). Every K/V tile brought
    into shared memory feeds GROUPS x more MMA rows, and the mask granularity (the schedule's tiles) is BLOCK_M tokens,
    not BLOCK_M rows: 16 tokens x 4 heads give a 64-row wgmma whose tiles straddle branch ends 4x less often."""
    tile, hk, offs_m, h, row_ok = _packed_rows(tl.program_id(0), H_KV, ORDER, T, BLOCK_M, GROUPS, GROUPS_P2,
                                               DOC_ORDER)
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
    acc, l_i, m_i = _fwd_walk(acc, l_i, m_i, q, k_base, v_base, K_DESC, V_DESC, hk * HEAD_DIM, stride_kt, offs_m,
                              offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC, MERGED, PREFETCH)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    tl.store(O + (offs_m.to(tl.int64) * stride_ot + h * stride_oh)[:, None] + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h * T + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_kv_range(
    dk, dv, k, v, q_base, do_base, q_desc, do_desc, q_col, lse_base, delta_base, dq_base, stride_qt, stride_dqt,
    offs_n, offs_d, qhi, start, end, qk_scale, sm_scale, T,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,  # boundary query tiles: bounds checks and the per-element mask; full tiles: neither
    ATOMIC_DQ: tl.constexpr,  # accumulate dq into the fp32 buffer with atomics (else a separate dq kernel does it)
    USE_TMA: tl.constexpr,  # q / dO tiles through TMA descriptors (rows past T come back as zeros)
    DOT_PREC: tl.constexpr,
):
    offs_mm = tl.arange(0, BLOCK_M)
    for j in range(start, end):
        m0 = j * BLOCK_M
        offs_m = m0 + offs_mm
        qoff = m0.to(tl.int64) * stride_qt + offs_mm[:, None] * stride_qt + offs_d[None, :]
        if USE_TMA:
            q = q_desc.load([m0, q_col])
            do = do_desc.load([m0, q_col])
        if MASKED:
            row_ok = offs_m < T
            if not USE_TMA:
                q = tl.load(q_base + qoff, mask=row_ok[:, None], other=0.0)
                do = tl.load(do_base + qoff, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            if not USE_TMA:
                q = tl.load(q_base + qoff)
                do = tl.load(do_base + qoff)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Transposed scores: [BLOCK_N keys, BLOCK_M queries].
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if MASKED:
            qq = offs_m[None, :]
            ok = (qq >= offs_n[:, None]) & (qq < qhi[:, None])
            pt = tl.where(ok, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC) * sm_scale
            dqp = dq_base + m0.to(tl.int64) * stride_dqt + offs_mm[:, None] * stride_dqt + offs_d[None, :]
            if MASKED:
                tl.atomic_add(dqp, dq, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dqp, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_kv_merged(
    dk, dv, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, DQ, stride_qt, stride_qh, stride_dqt, stride_dqh, offs_n, offs_d,
    qhi, hk, s0, s1, s2, s3, qk_scale, sm_scale, T,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The KV-major walk as ONE loop over (query head g, query tile j), g outer (``bwd_merged``), with a runtime
    flag choosing the per-element mask on the boundary tiles ``[s0, s1)`` and ``[s2, s3)``.

    Why this should move the backward most: a branch key tile (the bulk of the keys in every DPO layout) is seen by
    only its branch's 2-5 query tiles, split into up to three loops per query head, so the 8-warp, 2-stage kernel
    runs 3 x GROUPS loops of 0-3 iterations each: every loop restarts the software pipeline (its first q/dO load is
    exposed, no MMA overlaps it) and drains it at the end. One loop of GROUPS x (s3 - s0) iterations keeps the
    q/dO loads of the next (head, tile) in flight under the current MMAs across head and segment boundaries.
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
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC) * sm_scale
            dqp = DQ + h * stride_dqh + m0.to(tl.int64) * stride_dqt + offs_mm[:, None] * stride_dqt + offs_d[None, :]
            tl.atomic_add(dqp, dq, mask=row_ok[:, None], sem="relaxed")
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
    o and dO (the torch expression materialized three fp32 copies of [T, Hq, D])."""
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
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ,  # DQ: fp32 [T, Hq, D] accumulation buffer (used when ATOMIC_DQ)
    SCHED, ORDER, QHI,  # SCHED [n_k_tiles, 4] int32 query-tile segments, ORDER [n_k_tiles], QHI [T] int32
    Q_DESC, DO_DESC,  # TMA descriptors over q/dO viewed as [T, Hq * D], block [BLOCK_M, D] (None without TMA)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dqt, stride_dqh,
    T, qk_scale, sm_scale,
    H_KV: tl.constexpr,  # KV heads: program id -> (key tile, KV head)
    GROUPS: tl.constexpr,  # query heads per KV head: each program sums dk, dv over its group
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per tile (must match the schedule's)
    BLOCK_N: tl.constexpr,  # keys per tile (must match the schedule's)
    ATOMIC_DQ: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MERGED: tl.constexpr = False,  # one loop over (query head, query tile) (``_bwd_kv_merged``) instead of 3 x GROUPS
    DOC_ORDER: tl.constexpr = False,  # key tiles front to back in position order instead of ORDER (``doc_order``)
):
    pid = tl.program_id(0)
    if DOC_ORDER:
        tile = pid // H_KV
    else:
        tile = tl.load(ORDER + pid // H_KV)
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
    if MERGED:
        dk, dv = _bwd_kv_merged(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, DQ, stride_qt, stride_qh, stride_dqt,
                                stride_dqh, offs_n, offs_d, qhi, hk, s0, s1, s2, s3, qk_scale, sm_scale, T, GROUPS,
                                HEAD_DIM, BLOCK_M, ATOMIC_DQ, USE_TMA, DOT_PREC)
    else:
        for g in range(GROUPS):
            h = (hk * GROUPS + g).to(tl.int64)
            q_base = Q + h * stride_qh
            do_base = DO + h * stride_qh
            dq_base = DQ + h * stride_dqh
            lse_base = LSE + h * T
            delta_base = DELTA + h * T
            args = (q_base, do_base, Q_DESC, DO_DESC, (hk * GROUPS + g) * HEAD_DIM, lse_base, delta_base, dq_base,
                    stride_qt, stride_dqt, offs_n, offs_d, qhi)
            dk, dv = _bwd_kv_range(dk, dv, k, v, *args, s1, s2, qk_scale, sm_scale, T, BLOCK_M, False, ATOMIC_DQ,
                                   USE_TMA, DOT_PREC)
            dk, dv = _bwd_kv_range(dk, dv, k, v, *args, s0, s1, qk_scale, sm_scale, T, BLOCK_M, True, ATOMIC_DQ,
                                   USE_TMA, DOT_PREC)
            dk, dv = _bwd_kv_range(dk, dv, k, v, *args, s2, s3, qk_scale, sm_scale, T, BLOCK_M, True, ATOMIC_DQ,
                                   USE_TMA, DOT_PREC)
    tl.store(DK + kvoff, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kvoff, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_range(
    dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2,
    start, end, qk_scale, T,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for j in range(start, end):
        n0 = j * BLOCK_N
        if USE_TMA:
            k = k_desc.load([n0, kv_col])
            v = v_desc.load([n0, kv_col])
        else:
            kp = k_base + n0.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
            vp = v_base + n0.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
            if MASKED:
                inb = (n0 + offs_n) < T
                k = tl.load(kp, mask=inb[:, None], other=0.0)
                v = tl.load(vp, mask=inb[:, None], other=0.0)
            else:
                k = tl.load(kp)
                v = tl.load(vp)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            kk = (n0 + offs_n)[None, :]
            ok = _allowed(kk, lo1, hi1, lo2, offs_m)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    SCHED, ORDER, TOK,  # the forward's schedule for this kernel's block sizes
    K_DESC, V_DESC,  # TMA descriptors as in the forward (None without TMA)
    stride_qt, stride_qh, stride_kt, stride_kh,
    T, qk_scale, sm_scale,
    H_Q: tl.constexpr,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MERGED: tl.constexpr = False,  # one loop over all key tiles (``_bwd_dq_merged``) instead of eight
    PACK: tl.constexpr = False,  # GQA packing: program = (query tile, KV head), rows = BLOCK_M tokens x GROUPS_P2 heads
    GROUPS_P2: tl.constexpr = 1,  # GROUPS rounded up to a power of two (PACK only)
    DOC_ORDER: tl.constexpr = False,  # tiles back to front in position order instead of ORDER (``doc_order``)
):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    if PACK:
        # As in _fwd_packed_kernel: row r = token tile*BLOCK_M + r // G of head hk*G + r % G (token-major).
        tile, hk, offs_m, hrow, row_ok = _packed_rows(pid, H_Q // GROUPS, ORDER, T, BLOCK_M, GROUPS, GROUPS_P2,
                                                      DOC_ORDER)
        hrow = hrow.to(tl.int64)
        qoff = (hrow * stride_qh + offs_m.to(tl.int64) * stride_qt)[:, None] + offs_d[None, :]
        lse = tl.load(LSE + hrow * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + hrow * T + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M * GROUPS_P2, HEAD_DIM], dtype=tl.float32)
    else:
        tile = _query_tile(pid, H_Q, ORDER, T, BLOCK_M, DOC_ORDER)
        h = pid % H_Q
        hk = h // GROUPS
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        qoff = h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :]
        lse = tl.load(LSE + h.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + h.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q = tl.load(Q + qoff, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + qoff, mask=row_ok[:, None], other=0.0)
    lo1 = tl.load(TOK + offs_m, mask=row_ok, other=0)
    hi1 = tl.load(TOK + T + offs_m, mask=row_ok, other=0)
    lo2 = tl.load(TOK + 2 * T + offs_m, mask=row_ok, other=T + 1)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_kh
    sp = SCHED + tile * 10
    if MERGED:
        dq = _bwd_dq_merged(dq, q, do, lse, delta, k_base, v_base, K_DESC, V_DESC, hk * HEAD_DIM, stride_kt, offs_m,
                            offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC)
    else:
        dq = _bwd_dq_walk8(dq, q, do, lse, delta, k_base, v_base, K_DESC, V_DESC, hk * HEAD_DIM, stride_kt, offs_m,
                           offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC)
    tl.store(DQ + qoff, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_dq_walk8(
    dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, sp,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _tile_segments(sp)
    args = (q, do, lse, delta, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2)
    dq = _bwd_dq_range(dq, *args, s1, s2, qk_scale, T, BLOCK_N, False, USE_TMA, DOT_PREC)
    dq = _bwd_dq_range(dq, *args, s5, s6, qk_scale, T, BLOCK_N, False, USE_TMA, DOT_PREC)
    dq = _bwd_dq_range(dq, *args, s7, s8, qk_scale, T, BLOCK_N, False, USE_TMA, DOT_PREC)
    dq = _bwd_dq_range(dq, *args, s0, s1, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    dq = _bwd_dq_range(dq, *args, s2, s3, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    dq = _bwd_dq_range(dq, *args, s4, s5, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    dq = _bwd_dq_range(dq, *args, s6, s7, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    dq = _bwd_dq_range(dq, *args, s8, s9, qk_scale, T, BLOCK_N, True, USE_TMA, DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_merged(
    dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, sp,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The dq kernel's key-tile walk as one loop, as ``_fwd_merged`` (``bwd_merged``)."""
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
    """Tile sizes and launch parameters. ``fwd_*``: forward; ``kv_*``: backward KV-major kernel (``kv_block_n`` keys
    per program, ``kv_block_m`` queries per step); ``dq_*``: the deterministic dq kernel. ``deterministic``: dq from a
    separate query-major kernel instead of fp32 atomics (bitwise reproducible, one more QK^T and dO V^T recompute)."""

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    kv_block_m: int = 64
    kv_block_n: int = 128
    kv_warps: int = 8
    kv_stages: int = 2
    dq_block_m: int = 128
    dq_block_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    deterministic: bool = False
    fwd_tma: bool = False  # forward K/V loads through TMA descriptors (Hopper+ only; ignored elsewhere)
    bwd_tma: bool = False  # backward q/dO (KV-major kernel) and K/V (dq kernel) loads through TMA descriptors
    # GQA packing of the forward (``_fwd_packed_kernel``): one program per (query tile, KV head) computes all
    # Hq/Hkv query heads, so ``fwd_block_m`` counts TOKENS and the MMA has fwd_block_m x groups rows (16 x 4 = 64).
    fwd_pack_gqa: bool = False
    # The forward's eight key-tile loops (full tiles, then masked ones) as one loop with a runtime mask flag.
    fwd_merged: bool = False
    # The backward's loops as one loop each: KV-major over (query head, query tile), dq kernel over key tiles.
    bwd_merged: bool = False
    # GQA packing of the deterministic dq kernel (as ``fwd_pack_gqa``; ``dq_block_m`` counts tokens).
    dq_pack_gqa: bool = False
    # Launch order: tiles in position order, document by document (query-major kernels back to front, so a
    # document's longest tiles go first; the KV-major kernel front to back, prefix key tiles first), all heads of a
    # tile next to each other, instead of the whole row's tiles longest-first. The programs running at once then read
    # one document's K/V (backward: its q/dO), which stay in L2; longest-first interleaves every document (measured
    # on an H100, 16K row of 2048/256+256 documents: forward L2 hit rate 67%, 1.0 GB read from DRAM for 0.19 GB of
    # q/k/v; KV-major backward 36%, 1.7 GB).
    doc_order: bool = False
    # FA3-style intra-warpgroup overlap in the merged forward loop (``_fwd_merged_prefetch``): the QK^T of key tile
    # j+1 is issued before the softmax of tile j, whose P@V is deferred to the next iteration, so the wgmma runs
    # under the softmax. Only with ``fwd_merged`` (packed or not); ignored by the eight-loop walk.
    fwd_prefetch_qk: bool = False



# Configs keyed on (head_dim, 16-bit or not). Picked from the H100 sweep in scripts/bench_attention.py
# (docs/PERFORMANCE.md); override with set_default_config().
_CONFIGS: dict[tuple[int, bool], TritonAttentionConfig] = {
    # H100 sweep, 2026-11-24 (docs/PERFORMANCE.md, "doc_order_all_pack16"): GQA-packed forward and dq kernels,
    # one merged loop per tile, document-ordered launch; KV-major backward 64 queries x 128 keys. The packed
    # kernels' *_block_m (query tokens per tile) is set from the GQA group size in ``default_config``.
    (64, True): TritonAttentionConfig(16, 64, 4, 3, 64, 128, 8, 2, 32, 64, 8, 2, deterministic=True, fwd_tma=True,
                                      bwd_tma=True, fwd_pack_gqa=True, fwd_merged=True, bwd_merged=True,
                                      dq_pack_gqa=True, doc_order=True),
    (128, True): TritonAttentionConfig(16, 64, 4, 3, 64, 128, 8, 2, 32, 64, 8, 2, deterministic=True, fwd_tma=True,
                                       bwd_tma=True, fwd_pack_gqa=True, fwd_merged=True, bwd_merged=True,
                                       dq_pack_gqa=True, doc_order=True),
}
_OVERRIDE: TritonAttentionConfig | None = None


def set_default_config(cfg: TritonAttentionConfig | None) -> None:
    """Use ``cfg`` for every call that passes no config (None restores the table)."""
    global _OVERRIDE
    _OVERRIDE = cfg


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device, groups: int = 4) -> TritonAttentionConfig:
    """The config for ``head_dim``, ``dtype`` and ``groups`` query heads per KV head (``set_default_config``
    overrides it). On a GPU the packed kernels get as many query tokens per tile as make 64 MMA rows in the forward
    (16 tokens x 4 heads, measured) and 128 in the dq kernel, at least 16 tokens (8 warps beyond 64 rows)."""
    if _OVERRIDE is not None:
        return _OVERRIDE
    if device.type != "cuda":  # the CPU interpreter: small tiles keep the tests fast and exercise many tiles
        return TritonAttentionConfig(32, 16, 4, 1, 16, 32, 4, 1, 32, 16, 4, 1)
    return _gpu_config(64 if head_dim <= 64 else 128, dtype in (torch.float16, torch.bfloat16), max(1, groups))


@functools.lru_cache(maxsize=None)  # called once per attention call: no dataclass built per layer
def _gpu_config(hd: int, half: bool, groups: int) -> TritonAttentionConfig:
    cfg = _CONFIGS.get((hd, half))
    if cfg is None:  # fp32 on a GPU: smaller tiles (twice the bytes per element)
        return TritonAttentionConfig(64, 32, 4, 2, 32, 64, 4, 1, 64, 32, 4, 1)
    if not cfg.fwd_pack_gqa:
        return cfg
    g = triton.next_power_of_2(groups)
    fwd_m = max(64 // g, 16)
    return replace(cfg, fwd_block_m=fwd_m, fwd_warps=4 if fwd_m * g <= 64 else 8,
                   dq_block_m=max(128 // g, 16) if cfg.dq_pack_gqa else cfg.dq_block_m)


def _tok_ranges(layout: PrefixLayout) -> torch.Tensor:
    """[3, T] int32: lo1, hi1, lo2 per query."""
    return layout._cached("triton_tok", lambda: torch.stack(layout.query_key_ranges()).to(torch.int32).contiguous())


def _q_hi(layout: PrefixLayout) -> torch.Tensor:
    return layout._cached("triton_qhi", lambda: layout.key_query_ranges()[1].to(torch.int32).contiguous())


def forward_schedule(layout: PrefixLayout, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile, the key-tile segments the forward (and the dq kernel) walk, and the launch order.

    Returns ``sched`` [n_q_tiles, 10] int32 and ``order`` [n_q_tiles] int32. Row i: range 1 (prefix part)
    ``masked [s0, s1), full [s1, s2), masked [s2, s3)``; range 2 (causal part, or the union when the layout merged
    the two) ``masked [s4, s5), full [s5, s6), masked [s6, s7), full [s7, s8), masked [s8, s9)``. The full
    sub-ranges are the layout's ``full_*`` tiles clipped to each range (subsets of full tiles stay full); in a merged
    range the prefix-full tiles come before the causal-full ones. ``order``: tiles by descending number of key tiles
    (the longest work first), stable, so neighbouring tiles of one document stay together.
    """

    def build():
        r = layout.query_tile_ranges(block_m, block_n)
        f1lo, f1hi, f2lo, f2hi = r["full_lo1"], r["full_hi1"], r["full_lo2"], r["full_hi2"]

        def clip(x, lo, hi):
            return torch.minimum(torch.maximum(x, lo), hi)

        lo1, hi1 = r["lo1"], r["hi1"]
        a1 = clip(f1lo, lo1, hi1)
        b1 = clip(f1hi, a1, hi1)
        lo2, hi2 = r["lo2"], r["hi2"]
        a2 = clip(f1lo, lo2, hi2)
        b2 = clip(f1hi, a2, hi2)
        c2 = clip(f2lo, b2, hi2)
        d2 = clip(f2hi, c2, hi2)
        sched = torch.stack([lo1, a1, b1, hi1, lo2, a2, b2, c2, d2, hi2], 1).to(torch.int32).contiguous()
        work = (hi1 - lo1) + (hi2 - lo2)
        order = torch.argsort(work, descending=True, stable=True).to(torch.int32)
        return sched, order

    return layout._cached(("triton_fwd_sched", block_m, block_n), build)


def backward_schedule(layout: PrefixLayout, block_n: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key tile, the query-tile segments the KV-major backward walks, and the launch order.

    Returns ``sched`` [n_k_tiles, 4] int32: ``masked [s0, s1), full [s1, s2), masked [s2, s3)`` from
    ``key_tile_ranges``; a query tile is full when it lies inside every key's query range ``[k, q_hi[k])``, i.e. it
    starts at or after the tile's last key and ends before the smallest ``q_hi``. ``order``: longest first.
    """

    def build():
        r = layout.key_tile_ranges(block_n, block_m)
        lo, hi = r["lo"].long(), r["hi"].long()
        T = layout.total_tokens
        nkt = lo.numel()
        pad = nkt * block_n - T
        _, q_hi = layout.key_query_ranges()
        qhi_min = torch.nn.functional.pad(q_hi, (0, pad), value=0).view(nkt, block_n).amin(1)  # padding: never full
        k_last = torch.arange(nkt, device=lo.device) * block_n + (block_n - 1)
        flo = torch.minimum(torch.maximum((k_last + block_m - 1) // block_m, lo), hi)
        fhi = torch.minimum(torch.maximum(qhi_min // block_m, flo), hi)
        sched = torch.stack([lo, flo, fhi, hi], 1).to(torch.int32).contiguous()
        order = torch.argsort(hi - lo, descending=True, stable=True).to(torch.int32)
        return sched, order

    return layout._cached(("triton_bwd_sched", block_n, block_m), build)


def build_schedules(layout: PrefixLayout, cfg: TritonAttentionConfig) -> dict[str, torch.Tensor]:
    """Everything the kernels read from the layout (cached on it). Timed by scripts/bench_attention.py.

    On a CUDA layout the fused builder (``triton_schedule``, three Triton launches) fills the cache first, under the
    keys of the torch functions below, which then only read it; they remain the reference (and the path under
    ``torch.compile``, on CPU, and with ``PREFIX_ATTN_FUSED_SCHEDULE=0``).
    """
    if fused_enabled(layout.device) and not torch.compiler.is_compiling():
        fused_build(layout, cfg)
    fs, fo = forward_schedule(layout, cfg.fwd_block_m, cfg.fwd_block_n)
    ks, ko = backward_schedule(layout, cfg.kv_block_n, cfg.kv_block_m)
    out = {"tok": _tok_ranges(layout), "q_hi": _q_hi(layout), "fwd_sched": fs, "fwd_order": fo,
           "kv_sched": ks, "kv_order": ko}
    if cfg.deterministic:
        out["dq_sched"], out["dq_order"] = forward_schedule(layout, cfg.dq_block_m, cfg.dq_block_n)
    else:
        out["dq_sched"], out["dq_order"] = fs, fo  # unused
    return out


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


def _launch_fwd(q, k, v, sched, order, tok, scale, cfg: TritonAttentionConfig):
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    grid = (order.numel() * Hq,)
    use_tma = cfg.fwd_tma and _tma_ok(q)
    kd = vd = None
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(k.view(T, Hkv * D), [cfg.fwd_block_n, D])
        vd = TensorDescriptor.from_tensor(v.view(T, Hkv * D), [cfg.fwd_block_n, D])
    if cfg.fwd_pack_gqa:
        _fwd_packed_kernel[(order.numel() * Hkv,)](
            q, k, v, o, lse, sched, order, tok, kd, vd,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
            T, scale * _LOG2E,
            H_KV=Hkv, GROUPS=Hq // Hkv, GROUPS_P2=triton.next_power_of_2(Hq // Hkv), HEAD_DIM=D,
            BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n, USE_TMA=use_tma, DOT_PREC=_dot_prec(q.dtype),
            MERGED=cfg.fwd_merged, DOC_ORDER=cfg.doc_order, PREFETCH=cfg.fwd_merged and cfg.fwd_prefetch_qk,
            num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
        )
        return o, lse
    _fwd_kernel[grid](
        q, k, v, o, lse, sched, order, tok, kd, vd,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
        T, scale * _LOG2E,
        H_Q=Hq, GROUPS=Hq // Hkv, HEAD_DIM=D, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n,
        USE_TMA=use_tma, DOT_PREC=_dot_prec(q.dtype), MERGED=cfg.fwd_merged, DOC_ORDER=cfg.doc_order,
        PREFETCH=cfg.fwd_merged and cfg.fwd_prefetch_qk, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return o, lse


def _launch_bwd(do, q, k, v, o, lse, tok, q_hi, kv_sched, kv_order, dq_sched, dq_order, scale,
                cfg: TritonAttentionConfig):
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    groups = Hq // Hkv
    do = do.contiguous()
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if T == 0:
        return torch.zeros_like(q), dk, dv
    # delta = rowsum(dO * O), [Hq, T] fp32 (the softmax-Jacobian term).
    delta = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(T, 64), Hq)](o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T,
                                                 HEAD_DIM=D, BLOCK_T=64, num_warps=4)
    atomic = not cfg.deterministic
    dq_acc = (torch.zeros((T, Hq, D), device=q.device, dtype=torch.float32) if atomic
              else q.new_empty(0, dtype=torch.float32))
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
    _bwd_kv_kernel[(kv_order.numel() * Hkv,)](
        q, k, v, do, lse, delta, dk, dv, dq_acc, kv_sched, kv_order, q_hi, qd, dod,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        Hq * D if atomic else 0, D if atomic else 0,
        T, qk_scale, scale,
        H_KV=Hkv, GROUPS=groups, HEAD_DIM=D, BLOCK_M=cfg.kv_block_m, BLOCK_N=cfg.kv_block_n,
        ATOMIC_DQ=atomic, USE_TMA=use_tma, DOT_PREC=prec, MERGED=cfg.bwd_merged, DOC_ORDER=cfg.doc_order,
        num_warps=cfg.kv_warps, num_stages=cfg.kv_stages,
    )
    if atomic:
        dq = dq_acc.to(q.dtype)
    else:
        dq = torch.empty_like(q)
        pack = cfg.dq_pack_gqa
        _bwd_dq_kernel[(dq_order.numel() * (Hkv if pack else Hq),)](
            q, k, v, do, lse, delta, dq, dq_sched, dq_order, tok, kd, vd,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            T, qk_scale, scale,
            H_Q=Hq, GROUPS=groups, HEAD_DIM=D, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n,
            USE_TMA=use_tma, DOT_PREC=prec, MERGED=cfg.bwd_merged, DOC_ORDER=cfg.doc_order, PACK=pack,
            GROUPS_P2=triton.next_power_of_2(groups) if pack else 1,
            num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
        )
    return dq, dk, dv


# =====================================================================================================================
# 3. Custom ops and autograd
# =====================================================================================================================


@torch.library.custom_op("prefix_attn::triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fwd_sched: torch.Tensor, fwd_order: torch.Tensor,
            tok: torch.Tensor, q_hi: torch.Tensor, kv_sched: torch.Tensor, kv_order: torch.Tensor,
            dq_sched: torch.Tensor, dq_order: torch.Tensor, scale: float, cfg: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(q, k, v, fwd_sched, fwd_order, tok, scale, TritonAttentionConfig.from_list(cfg))


@_fwd_op.register_fake
def _(q, k, v, fwd_sched, fwd_order, tok, q_hi, kv_sched, kv_order, dq_sched, dq_order, scale, cfg):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("prefix_attn::triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            tok: torch.Tensor, q_hi: torch.Tensor, kv_sched: torch.Tensor, kv_order: torch.Tensor,
            dq_sched: torch.Tensor, dq_order: torch.Tensor, scale: float, cfg: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(do, q, k, v, o, lse, tok, q_hi, kv_sched, kv_order, dq_sched, dq_order, scale,
                       TritonAttentionConfig.from_list(cfg))


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, tok, q_hi, kv_sched, kv_order, dq_sched, dq_order, scale, cfg):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, _fs, _fo, tok, q_hi, kv_sched, kv_order, dq_sched, dq_order, scale, cfg = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, tok, q_hi, kv_sched, kv_order, dq_sched, dq_order)
    ctx.scale = scale
    ctx.cfg = cfg


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, tok, q_hi, kv_sched, kv_order, dq_sched, dq_order = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, tok, q_hi, kv_sched, kv_order, dq_sched, dq_order, ctx.scale, ctx.cfg)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerTritonAttention(torch.autograd.Function):
    """The eager path: the same launchers as the custom ops, without the custom-op dispatch.

    Measured on an H100 (scripts/profile_step.py, 1B Llama, HH-RLHF shape): the custom op's Python dispatch and its
    generated autograd node cost ~0.6 ms of host time per call, ~40 ms per training step, on a step that is host
    bound. torch.compile traces the custom ops instead (``triton_prefix_attention`` picks by
    ``torch.compiler.is_compiling()``).
    """

    @staticmethod
    def forward(ctx, q, k, v, s, scale, cfg):
        o, lse = _launch_fwd(q, k, v, s["fwd_sched"], s["fwd_order"], s["tok"], scale, cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.sched, ctx.scale, ctx.cfg = s, scale, cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        s = ctx.sched
        dq, dk, dv = _launch_bwd(do, q, k, v, o, lse, s["tok"], s["q_hi"], s["kv_sched"], s["kv_order"],
                                 s["dq_sched"], s["dq_order"], ctx.scale, ctx.cfg)
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
    s = build_schedules(layout, cfg)
    if not torch.compiler.is_compiling():
        return _EagerTritonAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), s, scale, cfg)
    o, _lse = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), s["fwd_sched"], s["fwd_order"], s["tok"],
                      s["q_hi"], s["kv_sched"], s["kv_order"], s["dq_sched"], s["dq_order"], scale, cfg.as_list())
    return o


__all__ = ["TritonAttentionConfig", "build_schedules", "backward_schedule", "default_config", "forward_schedule",
           "set_default_config", "triton_prefix_attention", "triton_supported"]
