"""The backward kernels of the `triton` backend, and their launcher.

Three launches: ``bwd_delta_kernel`` (rowsum(dO * O), the softmax-Jacobian term); ``bwd_kv_kernel``, KV-major: each
program owns one key tile of one KV head, walks the query tiles that see it (the schedule's ``kv``: full tiles
unmasked, boundary tiles masked by the per-key query range ``[k, q_hi)``) for every query head of its GQA group, and
accumulates dk and dv in fp32 in registers; ``bwd_dq_kernel``, query-major, GQA-packed as the forward, walks the
forward's schedule at its own tiles (the schedule's ``dq``). dq without atomics: the backward is bitwise
reproducible, for one more QK^T and dO V^T recompute (dq added up by TMA reduce-adds in the KV-major kernel, as
FlashAttention-3 does, measured 0.54-0.84x as fast: docs/PERFORMANCE.md). P and dS are rounded to the input dtype
before their products.

On Hopper, for 16-bit inputs of head dim 64 or 128 without options or an lse gradient, the KV-major and dq launches
run the Gluon versions of these two kernels instead (``backward_gluon``, ``TritonAttentionConfig.bwd_gluon``) for
GQA groups up to 8 and 64-row tiles: the same results, bit for bit, with the softmax work under the MMAs.

Options, each behind a constexpr so that the kernels without them compile as they did: ``SOFTCAP`` (dS takes the
factor 1 - tanh^2 of the cap); a gradient of the log-sum-exp (``HAS_DLSE`` in the delta kernel: d lse / d s = P, so
dS = P * (dP - (delta - dlse))); ``WINDOW`` in the KV-major kernel. The dq kernel needs no window flag (the windowed
ranges and schedule are exact intervals, as in the forward); a key's windowed queries are not one interval
(``PrefixLayout.key_window_ranges``), so the KV-major kernel walks the exact "dense" part of its tile's range as
before, with the per-element test on the positions added on masked tiles, and the rest of the superset range (only
tiles holding prefix keys within the window of the prefix's end have any) in a second loop that skips every query
tile whose tokens are all at least WINDOW positions past the tile's keys (the schedule's ``kv_qmin``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backward_gluon
from .common import (allowed, descriptor, dot_prec, packed_row_count, packed_rows, softcap_scores, tma_ok, walk_bounds,
                     walk_kv)
from .config import TritonAttentionConfig
from .forward import score_scale


@triton.jit
def _kv_step(
    dk, dv, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, stride_qt, stride_qh, offs_n, offs_d, offs_mm, qhi, hk, g, j,
    full, pos_k, POS, qk_scale, T,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """One (query head g, query tile j) step of the KV-major walk: dk, dv += this tile's share."""
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
    if SOFTCAP > 0.0:
        st, tt = softcap_scores(st, 1.0, SOFTCAP)
    pt = tl.math.exp2(st - lse[None, :])
    if not full:
        qq = offs_m[None, :]
        ok = (qq >= offs_n[:, None]) & (qq < qhi[:, None])
        if WINDOW:
            pos_q = tl.load(POS + offs_m, mask=row_ok, other=0).to(tl.int32)
            ok = ok & ((pos_q[None, :] - pos_k[:, None]) < WINDOW)
        pt = tl.where(ok, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    if SOFTCAP > 0.0:
        dst = (pt * (dpt - delta[None, :]) * (1.0 - tt * tt)).to(q.dtype)
    else:
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk = tl.dot(dst, q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _kv_walk(
    dk, dv, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, stride_qt, stride_qh, offs_n, offs_d, qhi, hk, s0, s1, s2, s3,
    pos_k, POS, QMIN, qk_scale, T,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """The KV-major walk as one loop over (query head g, query tile j), g outer, with a runtime flag choosing the
    per-element mask on the boundary tiles ``[s0, s1)`` and ``[s2, s3)``.

    A branch key tile (the bulk of the keys in every DPO layout) is seen by only its branch's 2-5 query tiles. Split
    into a loop per segment and head, that would be 3 x GROUPS loops of 0-3 iterations each, every one restarting the
    software pipeline (its first q/dO load exposed, no MMA under it) and draining it at the end. One loop of
    GROUPS x (s3 - s0) iterations keeps the q/dO loads of the next (head, tile) in flight under the current MMAs
    across head and segment boundaries.

    Under a window the loop covers the tiles up to the end of the keys' dense ranges (``min(q_hi, k + WINDOW)``),
    and a second loop the rest of the walk, skipping the query tiles wholly outside the window.
    """
    s_end = s3
    if WINDOW:
        dense_hi = tl.max(tl.where(offs_n < T, tl.minimum(qhi, offs_n + WINDOW), 0), 0)
        s_end = tl.minimum(tl.maximum((dense_hi + BLOCK_M - 1) // BLOCK_M, s2), s3)
    n = s_end - s0
    offs_mm = tl.arange(0, BLOCK_M)
    for i in range(0, GROUPS * n):
        g = i // n
        j = s0 + (i - g * n)
        full = (j >= s1) & (j < s2)
        dk, dv = _kv_step(dk, dv, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, stride_qt, stride_qh, offs_n, offs_d,
                          offs_mm, qhi, hk, g, j, full, pos_k, POS, qk_scale, T, GROUPS, HEAD_DIM, BLOCK_M, USE_TMA,
                          DOT_PREC, SOFTCAP, WINDOW)
    if WINDOW:
        pos_k_max = tl.max(tl.where(offs_n < T, pos_k, 0), 0)
        n2 = s3 - s_end
        for i in range(0, GROUPS * n2):
            g = i // n2
            j = s_end + (i - g * n2)
            if tl.load(QMIN + j) - pos_k_max < WINDOW:
                dk, dv = _kv_step(dk, dv, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, stride_qt, stride_qh, offs_n,
                                  offs_d, offs_mm, qhi, hk, g, j, False, pos_k, POS, qk_scale, T, GROUPS, HEAD_DIM,
                                  BLOCK_M, USE_TMA, DOT_PREC, SOFTCAP, WINDOW)
    return dk, dv


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def bwd_delta_kernel(
    O, DO, DELTA,  # o, dO [T, Hq, D] (dO contiguous); DELTA [Hq, T] fp32 out
    stride_ot, stride_oh, stride_dot, stride_doh,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    DLSE=None,  # [Hq, T] fp32: the gradient of the natural-log lse, subtracted from delta (HAS_DLSE)
    HAS_DLSE: tl.constexpr = False,
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
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + h * T + offs_t, mask=ok, other=0.0)
    tl.store(DELTA + h * T + offs_t, delta, mask=ok)


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def bwd_kv_kernel(
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
    POS=None,  # [T] int64 position ids (WINDOW)
    QMIN=None,  # [n_query_tiles] int32: the smallest position of each BLOCK_M-token query tile (WINDOW)
    SOFTCAP: tl.constexpr = 0.0,  # logit soft-cap * log2(e); qk_scale is then softmax_scale / cap (0.0: no cap)
    WINDOW: tl.constexpr = 0,  # sliding window in positions (0: none); SCHED is then the windowed schedule
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
    pos_k = qhi
    if WINDOW:
        pos_k = tl.load(POS + offs_n, mask=col_ok, other=0).to(tl.int32)  # int32: fewer registers
    dk, dv = _kv_walk(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, stride_qt, stride_qh, offs_n, offs_d, qhi,
                      hk, s0, s1, s2, s3, pos_k, POS, QMIN, qk_scale, T, GROUPS, HEAD_DIM, BLOCK_M, USE_TMA, DOT_PREC,
                      SOFTCAP, WINDOW)
    tl.store(DK + kvoff, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kvoff, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
def bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    SCHED, TOK,  # the forward's schedule for this kernel's block sizes
    K_DESC, V_DESC,  # TMA descriptors as in the forward (None without TMA)
    stride_qt, stride_qh, stride_kt, stride_kh,
    T, qk_scale, sm_scale,
    H_KV: tl.constexpr,
    GROUPS: tl.constexpr,
    ROWS: tl.constexpr,  # MMA rows: BLOCK_M * GROUPS rounded up to a power of two (common.packed_rows)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query TOKENS per tile
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr = 0.0,  # logit soft-cap * log2(e); qk_scale is then softmax_scale / cap (0.0: no cap)
):
    """dq, query-major, GQA-packed as the forward (row r: token tile*BLOCK_M + r // G of head hk*G + r % G): no
    atomics, so the backward is bitwise reproducible, for one more QK^T and dO V^T recompute."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    tile, hk, offs_m, hrow, row_ok = packed_rows(pid, H_KV, T, BLOCK_M, GROUPS, ROWS)
    hrow = hrow.to(tl.int64)
    qoff = (hrow * stride_qh + offs_m.to(tl.int64) * stride_qt)[:, None] + offs_d[None, :]
    lse = tl.load(LSE + hrow * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + hrow * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    q = tl.load(Q + qoff, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + qoff, mask=row_ok[:, None], other=0.0)
    lo1 = tl.load(TOK + offs_m, mask=row_ok, other=0)
    hi1 = tl.load(TOK + T + offs_m, mask=row_ok, other=0)
    lo2 = tl.load(TOK + 2 * T + offs_m, mask=row_ok, other=T + 1)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_kh
    sp = SCHED + tile * 10
    dq = _dq_walk(dq, q, do, lse, delta, k_base, v_base, K_DESC, V_DESC, hk * HEAD_DIM, stride_kt, offs_m,
                  offs_d, lo1, hi1, lo2, sp, qk_scale, T, BLOCK_N, USE_TMA, DOT_PREC, SOFTCAP)
    tl.store(DQ + qoff, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dq_walk(
    dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_m, offs_d, lo1, hi1, lo2, sp,
    qk_scale, T,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """The dq kernel's key walk, one loop as the forward's (``common.walk_tile``)."""
    s0, s1, s2, s3, s4, s5, s6, s7, s8, n = walk_bounds(sp)
    offs_n = tl.arange(0, BLOCK_N)
    for i in range(0, n):
        n0, full, k, v = walk_kv(i, s0, s1, s2, s3, s4, s5, s6, s7, s8, k_base, v_base, k_desc, v_desc, kv_col,
                                 stride_kt, offs_n, offs_d, T, BLOCK_N, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if SOFTCAP > 0.0:
            s, t = softcap_scores(s, 1.0, SOFTCAP)
        p = tl.math.exp2(s - lse[:, None])
        if not full:
            kk = (n0 + offs_n)[None, :]
            ok = allowed(kk, lo1, hi1, lo2, offs_m)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if SOFTCAP > 0.0:
            ds = (p * (dp - delta[:, None]) * (1.0 - t * t)).to(k.dtype)
        else:
            ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PREC)
    return dq


def launch_backward(do, q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched, scale: float, cfg: TritonAttentionConfig,
                    softcap: float | None = None, dlse=None, window: int | None = None, positions=None, kv_qmin=None):
    """dq, dk, dv of the forward's o and lse (``launch_forward``) for the output gradient ``do`` and the gradient
    ``dlse`` [Hq, T] of the natural-log lse (None: none); the tables as in ``AttentionTables`` at cfg's tiles
    (``ranges``, ``tokens.q_hi``, ``kv``, ``dq``, and under ``window`` ``tokens.position_ids`` and ``kv_qmin``)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    groups = Hq // Hkv
    do = do.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if T == 0:
        return dq, dk, dv
    # delta = rowsum(dO * O) - dlse, [Hq, T] fp32 (the softmax-Jacobian term).
    delta = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    dlse_args = {} if dlse is None else {"DLSE": dlse.float().contiguous(), "HAS_DLSE": True}
    bwd_delta_kernel[(triton.cdiv(T, 64), Hq)](o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T,
                                                 HEAD_DIM=D, BLOCK_T=64, num_warps=4, **dlse_args)
    qk_scale, cap = score_scale(scale, softcap)
    prec = dot_prec(q.dtype)
    # The Gluon kernels take no option and no lse gradient (sinks): those run on the plain kernels, whose GPU tests
    # cover them; the Gluon ones are tested without. q, dO and dq are contiguous here (the dq kernel relies on it).
    gluon = cfg.bwd_gluon and dlse is None
    gluon_kv = gluon and backward_gluon.supported(q, k, cfg.kv_block_m, cfg.kv_block_n, softcap, window)
    gluon_dq = gluon and backward_gluon.supported_dq(q, k, cfg.dq_block_m, cfg.dq_block_n, softcap, window)
    if gluon_kv or gluon_dq:
        gkd, gvd = backward_gluon.descriptor(k), backward_gluon.descriptor(v)
    use_tma = cfg.bwd_tma and tma_ok(q)
    if gluon_kv:
        backward_gluon.launch_bwd_kv_gluon(gkd, gvd, q, do, lse, delta, dk, dv, kv_sched, q_hi, qk_scale, scale,
                                           cfg.kv_stages)
    else:
        qd = dod = None
        if use_tma:
            qd = descriptor(q.view(T, Hq * D), cfg.kv_block_m, D)
            dod = descriptor(do.view(T, Hq * D), cfg.kv_block_m, D)
        options = {}
        if cap:
            options["SOFTCAP"] = cap
        if window is not None:
            options.update(POS=positions, QMIN=kv_qmin, WINDOW=window)
        bwd_kv_kernel[(kv_sched.shape[0] * Hkv,)](
            q, k, v, do, lse, delta, dk, dv, kv_sched, q_hi, qd, dod,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            T, qk_scale, scale,
            H_KV=Hkv, GROUPS=groups, HEAD_DIM=D, BLOCK_M=cfg.kv_block_m, BLOCK_N=cfg.kv_block_n, USE_TMA=use_tma,
            DOT_PREC=prec, num_warps=cfg.kv_warps, num_stages=cfg.kv_stages, **options,
        )
    if gluon_dq:
        backward_gluon.launch_bwd_dq_gluon(gkd, gvd, q, do, lse, delta, dq, dq_sched, ranges, qk_scale, scale,
                                           cfg.dq_block_m, cfg.dq_stages)
    else:
        kd = vd = None
        if use_tma:
            kd = descriptor(k.view(T, Hkv * D), cfg.dq_block_n, D)
            vd = descriptor(v.view(T, Hkv * D), cfg.dq_block_n, D)
        bwd_dq_kernel[(dq_sched.shape[0] * Hkv,)](
            q, k, v, do, lse, delta, dq, dq_sched, ranges, kd, vd,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            T, qk_scale, scale,
            H_KV=Hkv, GROUPS=groups, ROWS=packed_row_count(cfg.dq_block_m, groups), HEAD_DIM=D, BLOCK_M=cfg.dq_block_m,
            BLOCK_N=cfg.dq_block_n, USE_TMA=use_tma, DOT_PREC=prec, num_warps=cfg.dq_warps,
            num_stages=cfg.dq_stages, SOFTCAP=cap,
        )
    return dq, dk, dv
