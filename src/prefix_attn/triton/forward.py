"""The forward kernel of the `triton` backend, and its launcher.

For each query tile, the kernel walks only the key tiles of the layout's forward schedule (``prefix_attn.schedule``)
in one loop: a tile where every query sees every key runs without any per-element mask; only the boundary tiles load
the per-query ranges and mask. One program computes BLOCK_M query tokens for all the query heads of one KV head
(``common.packed_rows``). Scores, softmax statistics and the accumulator are fp32; P is rounded to the input dtype
before P @ V, as in FlashAttention. It also writes the log-sum-exp (base 2) the backward needs.

A sliding window needs nothing of the kernel: its per-token ranges and schedule are the windowed ones
(``AttentionTables.ranges``), which skip the tiles wholly outside the window. Soft-capping is a constexpr
(``SOFTCAP``: the cap in log2 units, 0.0 without), so the kernel without it compiles as it did.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (LOG2E, allowed, descriptor, dot_prec, online_softmax_step, packed_row_count, packed_rows,
                     softcap_scores, tma_ok, walk_bounds, walk_kv)
from .config import TritonAttentionConfig


@triton.jit
def _walk(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, sp,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """A query tile's key walk (``common.walk_tile``): range 1 ``[s0, s3)`` then range 2 ``[s4, s9)``, the mask on
    the tiles that are not full."""
    s0, s1, s2, s3, s4, s5, s6, s7, s8, n = walk_bounds(sp)
    offs_n = tl.arange(0, BLOCK_N)
    for i in range(0, n):
        n0, full, k, v = walk_kv(i, s0, s1, s2, s3, s4, s5, s6, s7, s8, k_base, v_base, k_desc, v_desc, kv_col,
                                 stride_kt, offs_n, offs_d, T, BLOCK_N, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # unscaled; the scale folds into one FMA
        step_scale = qk_scale
        if SOFTCAP > 0.0:
            s, _t = softcap_scores(s, qk_scale, SOFTCAP)
            step_scale = 1.0
        if not full:
            s = tl.where(allowed((n0 + offs_n)[None, :], lo1, hi1, lo2, offs_m), s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, step_scale, DOT_PREC)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def fwd_kernel(
    Q, K, V, O, LSE,  # q [T, Hq, D], k/v [T, Hkv, D], o [T, Hq, D], lse [Hq, T] fp32 (log2 domain)
    SCHED, TOK,  # SCHED [n_q_tiles, 10] int32: the forward schedule for BLOCK_M-token query tiles; TOK [3, T] int32
    K_DESC, V_DESC,  # TMA descriptors over k/v viewed as [T, Hkv * D], block [BLOCK_N, D] (None without TMA)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    T, qk_scale,
    H_KV: tl.constexpr,  # KV heads: program id -> (query tile, KV head)
    GROUPS: tl.constexpr,  # query heads per KV head, all computed by one program
    ROWS: tl.constexpr,  # MMA rows: BLOCK_M * GROUPS rounded up to a power of two (common.packed_rows)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query TOKENS per tile (the schedule's); the MMA has ROWS rows
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,  # K/V tiles through TMA descriptors (Hopper; rows past T come back as zeros)
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (exact fp32), "tf32" otherwise (ignored for 16-bit inputs)
    SOFTCAP: tl.constexpr = 0.0,  # logit soft-cap * log2(e); qk_scale is then softmax_scale / cap (0.0: no cap)
):
    """One program: BLOCK_M query tokens x all query heads of one KV head, stacked token-major as a
    [ROWS, D] operand (q[t, hk*G:(hk+1)*G, :] is contiguous, so the load and store stay coalesced)."""
    tile, hk, offs_m, h, row_ok = packed_rows(tl.program_id(0), H_KV, T, BLOCK_M, GROUPS, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    h = h.to(tl.int64)
    q = tl.load(Q + (offs_m.to(tl.int64) * stride_qt + h * stride_qh)[:, None] + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    lo1 = tl.load(TOK + offs_m, mask=row_ok, other=0)
    hi1 = tl.load(TOK + T + offs_m, mask=row_ok, other=0)
    lo2 = tl.load(TOK + 2 * T + offs_m, mask=row_ok, other=T + 1)  # padded rows: no allowed key
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_kh

    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    m_i = tl.zeros([ROWS], dtype=tl.float32) - 1.0e30
    sp = SCHED + tile * 10
    acc, l_i, m_i = _walk(acc, l_i, m_i, q, k_base, v_base, K_DESC, V_DESC, hk * HEAD_DIM, stride_kt, offs_m, offs_d,
                          lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC, SOFTCAP)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (token >= T, or past BLOCK_M * GROUPS) see no key
    acc = acc / l_safe[:, None]
    tl.store(O + (offs_m.to(tl.int64) * stride_ot + h * stride_oh)[:, None] + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h * T + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


def score_scale(scale: float, softcap: float | None) -> tuple[float, float]:
    """The kernels' (qk_scale, SOFTCAP) for ``softmax_scale`` and a soft-cap (None: none): scores in the log2 domain
    are q.k * qk_scale, or with a cap tanh(q.k * qk_scale) * SOFTCAP."""
    if softcap is None:
        return scale * LOG2E, 0.0
    return scale / softcap, softcap * LOG2E


def launch_forward(q, k, v, sched, ranges, scale: float, cfg: TritonAttentionConfig, softcap: float | None = None):
    """o [T, Hq, D] and lse [Hq, T] (fp32, base 2) of contiguous q [T, Hq, D], k/v [T, Hkv, D]; ``sched`` the forward
    schedule at cfg's tiles, ``ranges`` the per-token ranges (``AttentionTables.fwd``, ``.ranges``); ``softcap``:
    the logit soft-cap (None: none)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    use_tma = cfg.fwd_tma and tma_ok(q)
    qk_scale, cap = score_scale(scale, softcap)
    kd = vd = None
    if use_tma:
        kd = descriptor(k.view(T, Hkv * D), cfg.fwd_block_n, D)
        vd = descriptor(v.view(T, Hkv * D), cfg.fwd_block_n, D)
    fwd_kernel[(sched.shape[0] * Hkv,)](
        q, k, v, o, lse, sched, ranges, kd, vd,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
        T, qk_scale,
        H_KV=Hkv, GROUPS=Hq // Hkv, ROWS=packed_row_count(cfg.fwd_block_m, Hq // Hkv), HEAD_DIM=D,
        BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n, USE_TMA=use_tma, DOT_PREC=dot_prec(q.dtype),
        SOFTCAP=cap, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return o, lse
