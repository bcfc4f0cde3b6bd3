"""The layout's per-token tables and tile schedules (``prefix_attn.schedule``), built on the GPU in two or three Triton
launches.

The torch builders of ``prefix_attn.schedule`` are the reference: about 200 small ops, several ms of host launch
overhead for a 16K-token row (docs/PERFORMANCE.md). Here the same integers come from:

1. ``segments_kernel`` (one program): from the three length tensors, each document's start and prefix end and
   each branch's start and end (cumulative sums in chunks with a carry, so any number of documents works).
2. ``token_tile_kernel`` (one program per ``CHUNK`` tokens): each token finds its document and branch by counting
   the starts at or below it (a binary search bounds the starts a chunk can hit), which gives lo1, hi1, lo2, q_hi
   and the position id; the chunk's query and key tiles are reductions over those values (``CHUNK`` is a multiple
   of every tile size it reduces over, so no tile straddles two programs).
3. ``query_tile_kernel``, only for query tiles whose size is not a power of two (a GQA group of 7 packs 9 tokens into
   64 MMA rows: ``triton.common.packed_rows``), which would straddle kernel 2's chunks: their schedule rows from the
   per-token ranges kernel 2 wrote.

Where the dq kernel walks the forward's tiles (the defaults), its schedule is the forward's (the same tensor).

Under a sliding window, kernel 2 also writes the windowed per-token ranges and the per-query-tile smallest positions
of the KV-major backward, and makes the schedules from the windowed ranges (``prefix_attn.schedule``'s module doc).

A launch cannot read what other programs of the same launch write, hence several. Outputs are views into one int32
buffer plus the int64 position ids. The segment table of kernel 1 is cached on the layout (``Segments``): the
position ids, asked for before any attention call, cost both kernels (per-token tables only); each tile shape's
schedules then cost kernel 2 alone (and kernel 3 for query tiles that are not a power of two). The work is O(T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import PrefixLayout
from ..schedule import TileShape, TokenTables

_SEG_BLOCK_A = 1024  # kernel 1: lengths per loop step
_SEG_BLOCK = 32  # kernel 2: document / branch starts compared per loop step (a [CHUNK, _SEG_BLOCK] compare)
_MIN_CHUNK = 256  # kernel 2: tokens per program (at least twice the largest tile)
_MAX_TOKENS = 1 << 28  # int32 index arithmetic inside (3 * T and the buffer offsets stay below 2**31)


# =====================================================================================================================
# 1. Kernels
# =====================================================================================================================


@triton.jit(do_not_specialize=["D", "NB", "T"])  # they change with every row: no recompiles
def segments_kernel(
    PL, BPD, BL,  # prefix_lens [D], branches_per_doc [D], branch_lens [NB] (any integer dtype)
    BC, ADD,  # scratch [NB] int32: branch tokens before each branch; prefix lengths scattered to first branches
    DS, PE, BS, BE,  # out int32: doc start [D + 1] (DS[D] = T), prefix end [D], branch start [NB], branch end [NB]
    D, NB, T,
    BLOCK: tl.constexpr,  # lengths per loop step (tl.arange needs it static)
):
    """Document and branch boundaries from the lengths, one program.

    doc_start[d] = (prefix tokens of docs < d) + (branch tokens of docs < d); a branch starts after all branch
    tokens before it plus the prefixes of its own and earlier documents, which is an inclusive cumulative sum of the
    prefix lengths scattered onto each document's first branch.
    """
    ar = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)  # a scalar tensor: loop carries must not be constexpr
    carry = zero
    for s in range(0, NB, BLOCK):
        idx = s + ar
        m = idx < NB
        ln = tl.load(BL + idx, mask=m, other=0).to(tl.int32)
        tl.store(BC + idx, carry + tl.cumsum(ln, 0) - ln, mask=m)
        tl.store(ADD + idx, tl.zeros([BLOCK], dtype=tl.int32), mask=m)
        carry += tl.sum(ln, 0)
    # Other threads of this program read BC and write ADD next.
    tl.debug_barrier()
    c_fb = zero
    c_cp = zero
    for s in range(0, D, BLOCK):
        idx = s + ar
        m = idx < D
        k = tl.load(BPD + idx, mask=m, other=0).to(tl.int32)
        p = tl.load(PL + idx, mask=m, other=0).to(tl.int32)
        fb = c_fb + tl.cumsum(k, 0) - k  # first branch of each document (distinct: every document has one)
        ds = c_cp + tl.cumsum(p, 0) - p + tl.load(BC + fb, mask=m, other=0)
        tl.store(ADD + fb, p, mask=m)
        tl.store(DS + idx, ds, mask=m)
        tl.store(PE + idx, ds + p, mask=m)
        c_fb += tl.sum(k, 0)
        c_cp += tl.sum(p, 0)
    tl.store(DS + D, T)
    tl.debug_barrier()
    carry = zero
    for s in range(0, NB, BLOCK):
        idx = s + ar
        m = idx < NB
        add = tl.load(ADD + idx, mask=m, other=0)
        bs = tl.load(BC + idx, mask=m, other=0) + carry + tl.cumsum(add, 0)
        tl.store(BS + idx, bs, mask=m)
        tl.store(BE + idx, bs + tl.load(BL + idx, mask=m, other=0).to(tl.int32), mask=m)
        carry += tl.sum(add, 0)


@triton.jit
def _chunk_bounds(DS, bs_off, D, NB, c0, t_last, n_iter):
    """For the chunk [c0, t_last]: the documents (of the D starts at DS) and branches (NB starts at DS + bs_off)
    holding its first and last token, as #{starts <= x} - 1. The four binary searches run as one vector of lanes
    (doc/c0, doc/t_last, branch/c0, branch/t_last), so each step is one round trip to memory, not four."""
    lane = tl.arange(0, 4)
    is_doc = lane < 2
    x = tl.where(lane % 2 == 0, c0, t_last)
    base = tl.where(is_doc, 0, bs_off)
    lo = tl.zeros([4], dtype=tl.int32)
    hi = tl.where(is_doc, D, NB)
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(DS + base + mid, mask=active, other=0)
        lo = tl.where(active & (v <= x), mid + 1, lo)
        hi = tl.where(active & (v > x), mid, hi)
    d_first = tl.sum(tl.where(lane == 0, lo, 0), axis=0) - 1
    d_last = tl.sum(tl.where(lane == 1, lo, 0), axis=0) - 1
    b_first = tl.maximum(tl.sum(tl.where(lane == 2, lo, 0), axis=0) - 1, 0)  # -1: the chunk starts in a prefix
    b_last = tl.sum(tl.where(lane == 3, lo, 0), axis=0) - 1
    return d_first, d_last, b_first, b_last


@triton.jit
def _locate(starts, first, last, t, SEG_BLOCK: tl.constexpr):
    """Per token t: first + #{j in [first, last]: starts[j] <= t} - 1, which for strictly increasing starts is the
    segment holding t when starts[first] <= t and t is at most the token whose segment is last. Only the segments
    the chunk overlaps are compared: the work per program is bounded by them, not by the row's."""
    cnt = tl.zeros(t.shape, dtype=tl.int32)
    for s in range(first, last + 1, SEG_BLOCK):
        j = s + tl.arange(0, SEG_BLOCK)
        st = tl.load(starts + j, mask=j <= last, other=2147483647)
        cnt += tl.sum((st[None, :] <= t[:, None]).to(tl.int32), axis=1)
    return first + cnt - 1


@triton.jit
def _query_tiles(
    SCHED, lo1, hi1, lo2, valid, i, T,
    BM: tl.constexpr,  # query tokens per tile
    BN: tl.constexpr,  # keys per tile
):
    """Forward (or dq) schedule rows of the query tiles ``i`` [NT]: ``PrefixLayout.query_tile_ranges`` followed by
    ``forward_schedule``'s clipping, with the same padding values for rows past T. ``lo1, hi1, lo2`` are the tiles'
    per-token ranges, [NT, X] (tile i's tokens along the second axis, ``valid`` marking real ones)."""
    big = T + 1
    has_r1 = valid & (hi1 > lo1)
    no_r1 = valid & (hi1 <= lo1)
    # Empty first ranges must not widen the tile's first range.
    lo1_min = tl.min(tl.where(has_r1, lo1, big), axis=1)
    hi1_max = tl.max(tl.where(has_r1, hi1, -1), axis=1)
    lo2_min = tl.min(tl.where(valid, lo2, big), axis=1)
    lo2_max = tl.max(tl.where(valid, lo2, -1), axis=1)
    lo1_max = tl.max(tl.where(valid, lo1, -1), axis=1)
    hi1_min = tl.min(tl.where(valid, hi1, big), axis=1)
    n_no_r1 = tl.sum(no_r1.to(tl.int32), axis=1)
    ok = i < (T + BM - 1) // BM
    q_min = i * BM
    q_max = tl.minimum(q_min + BM - 1, T - 1)
    # All divisions below have non-negative operands on real tiles (truncation = floor).
    has1 = hi1_max > lo1_min
    t_lo1 = tl.where(has1, lo1_min // BN, 0)
    t_hi1 = tl.where(has1, (hi1_max + BN - 1) // BN, 0)
    t_lo2 = lo2_min // BN
    t_hi2 = q_max // BN + 1
    merge = has1 & (t_hi1 >= t_lo2)
    t_lo2 = tl.where(merge, tl.minimum(t_lo1, t_lo2), t_lo2)
    t_lo1 = tl.where(merge, 0, t_lo1)
    t_hi1 = tl.where(merge, 0, t_hi1)
    f_lo2 = (lo2_max + BN - 1) // BN
    f_hi2 = tl.maximum((q_min + 1) // BN, f_lo2)
    all1 = n_no_r1 == 0
    f_lo1 = tl.where(all1, (lo1_max + BN - 1) // BN, 0)
    f_hi1 = tl.where(all1, tl.maximum(hi1_min // BN, f_lo1), f_lo1)
    a1 = tl.minimum(tl.maximum(f_lo1, t_lo1), t_hi1)
    b1 = tl.minimum(tl.maximum(f_hi1, a1), t_hi1)
    a2 = tl.minimum(tl.maximum(f_lo1, t_lo2), t_hi2)
    b2 = tl.minimum(tl.maximum(f_hi1, a2), t_hi2)
    c2 = tl.minimum(tl.maximum(f_lo2, b2), t_hi2)
    d2 = tl.minimum(tl.maximum(f_hi2, c2), t_hi2)
    row = SCHED + i * 10
    tl.store(row + 0, t_lo1, mask=ok)
    tl.store(row + 1, a1, mask=ok)
    tl.store(row + 2, b1, mask=ok)
    tl.store(row + 3, t_hi1, mask=ok)
    tl.store(row + 4, t_lo2, mask=ok)
    tl.store(row + 5, a2, mask=ok)
    tl.store(row + 6, b2, mask=ok)
    tl.store(row + 7, c2, mask=ok)
    tl.store(row + 8, d2, mask=ok)
    tl.store(row + 9, t_hi2, mask=ok)


@triton.jit
def _key_tiles(
    SCHED, walk_hi, dense_hi, valid, pid, T,
    CHUNK: tl.constexpr,  # tokens of this program: CHUNK // BN whole key tiles
    BN: tl.constexpr,  # keys per tile
    BM: tl.constexpr,  # query rows per tile
):
    """KV-major backward schedule rows of this program's key tiles (``PrefixLayout.key_tile_ranges`` and
    ``backward_schedule``; padding keys make a tile never full): the walk ends at the largest ``walk_hi``, full
    tiles end before the smallest ``dense_hi`` (both q_hi without a window)."""
    qhi_max = tl.max(tl.reshape(tl.where(valid, walk_hi, -1), [CHUNK // BN, BN]), axis=1)
    qhi_min = tl.min(tl.reshape(tl.where(valid, dense_hi, 0), [CHUNK // BN, BN]), axis=1)
    j = pid * (CHUNK // BN) + tl.arange(0, CHUNK // BN)
    ok = j < (T + BN - 1) // BN
    k0 = j * BN
    lo = k0 // BM
    hi = (qhi_max + BM - 1) // BM
    flo = tl.minimum(tl.maximum((k0 + BN - 1 + BM - 1) // BM, lo), hi)
    fhi = tl.minimum(tl.maximum(qhi_min // BM, flo), hi)
    row = SCHED + j * 4
    tl.store(row + 0, lo, mask=ok)
    tl.store(row + 1, flo, mask=ok)
    tl.store(row + 2, fhi, mask=ok)
    tl.store(row + 3, hi, mask=ok)


@triton.jit(do_not_specialize=["T", "D", "NB", "bs_off", "n_iter", "window"])
def token_tile_kernel(
    DS, PE, BS, BE,  # from segments_kernel
    TOK, QHI, POS,  # out (WRITE_TOK): [3, T] int32 lo1/hi1/lo2, [T] int32 q_hi, [T] int64 position ids
    FWD, KV, DQ,  # out (TILES): schedules [n, 10] / [n, 4] / [n, 10] int32
    WTOK, QMIN,  # out (WINDOWED): [3, T] int32 windowed lo1/hi1/lo2; [n_kv_query_tiles] int32 smallest positions
    T, D, NB,
    bs_off,  # BS - DS in elements (both views of one buffer): the searches treat them as one array
    n_iter,  # binary-search steps: the bit length of max(D, NB)
    window,  # the sliding window in positions (WINDOWED)
    CHUNK: tl.constexpr,  # tokens per program, a multiple of every tile size below
    SEG_BLOCK: tl.constexpr,
    WRITE_TOK: tl.constexpr,  # False when the per-token tables are already cached (only tiles wanted)
    TILES: tl.constexpr,  # False when only the per-token tables are wanted (position_ids before any attention)
    WINDOWED: tl.constexpr,  # the schedules of a sliding window (TILES only)
    FWD_BM: tl.constexpr, FWD_BN: tl.constexpr,
    KV_BN: tl.constexpr, KV_BM: tl.constexpr,
    DQ_BM: tl.constexpr, DQ_BN: tl.constexpr,
    FWD_HERE: tl.constexpr = True,  # the forward schedule is made here (FWD_BM a power of two; else query_tile_kernel)
    DQ_HERE: tl.constexpr = True,  # likewise the dq schedule
):
    """Per token: lo1, hi1, lo2, q_hi and position id (as ``PrefixLayout.query_key_ranges`` and ``position_ids``);
    per tile: the schedule rows.

    A prefix token of document d sees [doc_start, q] and is seen until the document ends; a branch token sees the
    prefix [doc_start, prefix_end) and [branch_start, q] and is seen until its branch ends. Under a window of W
    positions (``PrefixLayout.query_key_ranges(window)``, ``key_window_ranges``): lo1 rises to doc_start + pos - W + 1
    (at most hi1), lo2 to q - W + 1; a key is seen densely up to min(q_hi, k + W), and a prefix key within W of its
    prefix's end is walked up to q_hi.
    """
    pid = tl.program_id(0)
    c0 = pid * CHUNK
    t = c0 + tl.arange(0, CHUNK)
    valid = t < T
    t_last = tl.minimum(c0 + CHUNK, T) - 1
    d_first, d_last, b_first, b_last = _chunk_bounds(DS, bs_off, D, NB, c0, t_last, n_iter)
    d = _locate(DS, d_first, d_last, t, SEG_BLOCK)
    # A prefix token's branch index is meaningless (the previous document's last branch, or -1): clamp, unused.
    b = tl.maximum(_locate(BS, b_first, b_last, t, SEG_BLOCK), 0)
    ds = tl.load(DS + d, mask=valid, other=0)
    de = tl.load(DS + d + 1, mask=valid, other=0)
    pe = tl.load(PE + d, mask=valid, other=0)
    bs = tl.load(BS + b, mask=valid, other=0)
    be = tl.load(BE + b, mask=valid, other=0)
    pre = t < pe
    lo1 = ds
    hi1 = tl.where(pre, ds, pe)
    lo2 = tl.where(pre, ds, bs)
    q_hi = tl.where(pre, de, be)
    pos = tl.where(pre, t - ds, (pe - ds) + (t - bs))  # branches restart at the prefix length
    if WRITE_TOK:
        tl.store(TOK + t, lo1, mask=valid)
        tl.store(TOK + T + t, hi1, mask=valid)
        tl.store(TOK + 2 * T + t, lo2, mask=valid)
        tl.store(QHI + t, q_hi, mask=valid)
        tl.store(POS + t, pos.to(tl.int64), mask=valid)
    if TILES:
        walk_hi = q_hi
        dense_hi = q_hi
        if WINDOWED:
            lo1 = tl.minimum(lo1 + tl.maximum(pos - window + 1, 0), hi1)
            lo2 = tl.maximum(lo2, t - window + 1)
            tl.store(WTOK + t, lo1, mask=valid)
            tl.store(WTOK + T + t, hi1, mask=valid)
            tl.store(WTOK + 2 * T + t, lo2, mask=valid)
            dense_hi = tl.minimum(q_hi, t + window)
            walk_hi = tl.where(pre & (t + window > pe), q_hi, dense_hi)
            qmin = tl.min(tl.reshape(tl.where(valid, pos, 2147483647), [CHUNK // KV_BM, KV_BM]), axis=1)
            i = pid * (CHUNK // KV_BM) + tl.arange(0, CHUNK // KV_BM)
            tl.store(QMIN + i, qmin, mask=i < (T + KV_BM - 1) // KV_BM)
        if FWD_HERE:
            _chunk_query_tiles(FWD, lo1, hi1, lo2, valid, pid, T, CHUNK, FWD_BM, FWD_BN)
        _key_tiles(KV, walk_hi, dense_hi, valid, pid, T, CHUNK, KV_BN, KV_BM)
        if DQ_HERE:
            _chunk_query_tiles(DQ, lo1, hi1, lo2, valid, pid, T, CHUNK, DQ_BM, DQ_BN)


@triton.jit
def _chunk_query_tiles(SCHED, lo1, hi1, lo2, valid, pid, T, CHUNK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """``_query_tiles`` of the CHUNK // BM whole query tiles of this program's [CHUNK] tokens (BM a power of two)."""
    i = pid * (CHUNK // BM) + tl.arange(0, CHUNK // BM)
    _query_tiles(SCHED, tl.reshape(lo1, [CHUNK // BM, BM]), tl.reshape(hi1, [CHUNK // BM, BM]),
                 tl.reshape(lo2, [CHUNK // BM, BM]), tl.reshape(valid, [CHUNK // BM, BM]), i, T, BM, BN)


@triton.jit(do_not_specialize=["T"])
def query_tile_kernel(
    SCHED,  # out: [ceil(T / BM), 10] int32, a forward schedule
    TOK,  # [3, T] int32 per-token lo1, hi1, lo2 (the windowed ones under a window)
    T,
    NT: tl.constexpr,  # query tiles per program
    BM: tl.constexpr,  # query tokens per tile, any number
    BM_P2: tl.constexpr,  # BM rounded up to a power of two (tl.arange)
    BN: tl.constexpr,
):
    """A forward schedule for query tiles of a BM that ``token_tile_kernel`` cannot reduce over (not a power of two:
    tiles straddle its chunks), from the per-token ranges it wrote: each program gathers NT tiles' tokens."""
    i = tl.program_id(0) * NT + tl.arange(0, NT)
    j = tl.arange(0, BM_P2)
    t = i[:, None] * BM + j[None, :]
    valid = (j[None, :] < BM) & (t < T)
    lo1 = tl.load(TOK + t, mask=valid, other=0)
    hi1 = tl.load(TOK + T + t, mask=valid, other=0)
    lo2 = tl.load(TOK + 2 * T + t, mask=valid, other=0)
    _query_tiles(SCHED, lo1, hi1, lo2, valid, i, T, BM, BN)


# =====================================================================================================================
# 2. Launcher
# =====================================================================================================================


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class Segments:
    """Kernel 1's output, cached on the layout under this class: int32 views of document starts [D + 1] (the last
    is T), prefix ends [D], branch starts and ends [NB] (branch starts right after the document starts in memory)."""

    doc_start: torch.Tensor
    prefix_end: torch.Tensor
    branch_start: torch.Tensor
    branch_end: torch.Tensor


class _Arena:
    """Carves one int32 buffer into views; every view starts 64-byte aligned (as a fresh allocation would be, so
    kernels that read them keep their pointer-alignment specialization)."""

    def __init__(self):
        self.size = 0

    def take(self, n: int) -> int:
        off = self.size
        self.size += (n + 15) // 16 * 16
        return off


def fused_tables(layout: PrefixLayout, tile: TileShape | None, tokens: TokenTables | None,
                 window: int | None = None):
    """The per-token tables (``tokens`` when given, else built) and the schedules (fwd, kv, dq, window_ranges,
    kv_qmin; the last two None without a window) at ``tile`` under ``window`` (``tile`` None: none), as
    ``prefix_attn.schedule``'s torch builders make them. None where this path does not apply: T outside [1, 2**28),
    tile sizes other than the query tiles' (``fwd_m``, ``dq_m``) not powers of two. A query tile of a size that is
    not a power of two takes one more launch (``query_tile_kernel``)."""
    if tile is None and tokens is not None:
        return tokens, None
    T, D, NB = layout.total_tokens, layout.num_docs, layout.num_branches
    sizes = [] if tile is None else [tile.fwd_n, tile.kv_m, tile.kv_n, tile.dq_n]
    if not 0 < T < _MAX_TOKENS or not all(_pow2(x) for x in sizes):
        return None
    # Where the dq kernel walks the forward's tiles (the defaults), its schedule is the forward's.
    dq_same = tile is not None and (tile.dq_m, tile.dq_n) == (tile.fwd_m, tile.fwd_n)
    fwd_here = tile is not None and _pow2(tile.fwd_m)
    dq_here = tile is not None and _pow2(tile.dq_m) and not dq_same
    sizes += [tile.fwd_m] if fwd_here else []
    sizes += [tile.dq_m] if dq_here else []
    # A power of two, so a multiple of every tile size it reduces over; at least two tiles per program (no [1]-shaped
    # reductions).
    chunk = max([_MIN_CHUNK] + [2 * x for x in sizes])

    dev = layout.device
    arena = _Arena()
    segs = layout.cached(Segments)
    if segs is None:
        o_bc, o_add, o_ds, o_pe, o_bs, o_be = (arena.take(n) for n in (NB, NB, D + 1, D, NB, NB))
    if tokens is None:
        o_tok, o_qhi = arena.take(3 * T), arena.take(T)
    if tile is not None:
        nqt, nkt, ndq = -(-T // tile.fwd_m), -(-T // tile.kv_n), -(-T // tile.dq_m)
        o_fs, o_ks = arena.take(10 * nqt), arena.take(4 * nkt)
        o_qs = None if dq_same else arena.take(10 * ndq)
        if window is not None:
            nkq = -(-T // tile.kv_m)
            o_wt, o_qm = arena.take(3 * T), arena.take(nkq)
    buf = torch.empty(arena.size, dtype=torch.int32, device=dev)

    def view(off, n):
        return buf[off : off + n]

    if segs is None:
        new = Segments(view(o_ds, D + 1), view(o_pe, D), view(o_bs, NB), view(o_be, NB))
        segments_kernel[(1,)](
            layout.prefix_lens.contiguous(), layout.branches_per_doc.contiguous(), layout.branch_lens.contiguous(),
            view(o_bc, NB), view(o_add, NB), new.doc_start, new.prefix_end, new.branch_start, new.branch_end,
            D, NB, T, BLOCK=_SEG_BLOCK_A, num_warps=4,
        )
        segs = layout.cached(Segments, lambda: new)
    if tokens is None:
        tok, qhi = view(o_tok, 3 * T).view(3, T), view(o_qhi, T)
        pos = torch.empty(T, dtype=torch.int64, device=dev)
    else:
        tok = qhi = pos = buf  # unused
    wt = qm = None
    if tile is not None:
        fs, ks = view(o_fs, 10 * nqt).view(nqt, 10), view(o_ks, 4 * nkt).view(nkt, 4)
        qs = fs if dq_same else view(o_qs, 10 * ndq).view(ndq, 10)
        if window is not None:
            wt, qm = view(o_wt, 3 * T).view(3, T), view(o_qm, nkq)
        t = tile
    else:
        fs = ks = qs = buf  # unused
        t = TileShape(16, 16, 16, 16, 16, 16)
    token_tile_kernel[(-(-T // chunk),)](
        segs.doc_start, segs.prefix_end, segs.branch_start, segs.branch_end, tok, qhi, pos, fs, ks, qs,
        buf if wt is None else wt, buf if qm is None else qm,
        T, D, NB, (segs.branch_start.data_ptr() - segs.doc_start.data_ptr()) // 4, max(D, NB).bit_length(),
        window or 0,
        CHUNK=chunk, SEG_BLOCK=_SEG_BLOCK, WRITE_TOK=tokens is None, TILES=tile is not None,
        WINDOWED=tile is not None and window is not None,
        FWD_BM=t.fwd_m if fwd_here else 16, FWD_BN=t.fwd_n, KV_BN=t.kv_n, KV_BM=t.kv_m,
        DQ_BM=t.dq_m if dq_here else 16, DQ_BN=t.dq_n, FWD_HERE=fwd_here, DQ_HERE=dq_here, num_warps=4,
    )
    if tokens is None:
        tokens = TokenTables(tok, qhi, pos)
    if tile is not None:
        ranges = tokens.ranges if wt is None else wt
        if not fwd_here:
            _gathered_query_tiles(fs, ranges, T, tile.fwd_m, tile.fwd_n)
        if not (dq_same or dq_here):
            _gathered_query_tiles(qs, ranges, T, tile.dq_m, tile.dq_n)
    return tokens, (None if tile is None else (fs, ks, qs, wt, qm))


def _gathered_query_tiles(sched: torch.Tensor, ranges: torch.Tensor, T: int, bm: int, bn: int) -> None:
    """``sched`` (a forward schedule of ``bm``-token query tiles) from the per-token ``ranges``, by
    ``query_tile_kernel``."""
    nt = max(1, min(_MIN_CHUNK // triton.next_power_of_2(bm), triton.next_power_of_2(sched.shape[0])))
    query_tile_kernel[(-(-sched.shape[0] // nt),)](sched, ranges, T, NT=nt, BM=bm, BM_P2=triton.next_power_of_2(bm),
                                                   BN=bn, num_warps=4)


__all__ = ["Segments", "fused_tables", "query_tile_kernel", "segments_kernel", "token_tile_kernel"]
