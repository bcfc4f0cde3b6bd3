"""What the Triton kernels share: the mask, the tile walk, the online-softmax step, the rows of a GQA-packed program,
the K/V tile load (``@triton.jit`` helpers, inlined where they are called), and the launchers' checks.

The layout's semantics: query ``q`` attends to keys ``[lo1[q], hi1[q]) U [lo2[q], q]`` (``PrefixLayout.
query_key_ranges``). A row of a forward schedule (``prefix_attn.schedule``) lists a query tile's key tiles as two
ranges, each split into masked and full segments; the kernels walk both ranges in one loop, deciding per key tile
whether the per-element mask applies.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2: exp(x) = exp2(x * LOG2E)


@triton.jit
def walk_bounds(sp):
    """One query tile's walk from its row of the forward schedule (``forward_schedule``): the key-tile bounds s0..s8
    (range 1 masked [s0, s1), full [s1, s2), masked [s2, s3); range 2 masked [s4, s5), full [s5, s6), masked
    [s6, s7), full [s7, s8), masked [s8, s9)) and the number of steps, (s3 - s0) + (s9 - s4)."""
    s0, s1, s2, s3 = tl.load(sp + 0), tl.load(sp + 1), tl.load(sp + 2), tl.load(sp + 3)
    s4, s5, s6, s7 = tl.load(sp + 4), tl.load(sp + 5), tl.load(sp + 6), tl.load(sp + 7)
    s8, s9 = tl.load(sp + 8), tl.load(sp + 9)
    return s0, s1, s2, s3, s4, s5, s6, s7, s8, (s3 - s0) + (s9 - s4)


@triton.jit
def walk_tile(i, s0, s1, s2, s3, s4, s5, s6, s7, s8):
    """Step i of the walk (range 1 [s0, s3), then range 2 [s4, s9)): its key tile, and whether it is full.

    One loop over both ranges rather than one per segment: with short branches each segment holds 0-3 tiles, and a
    loop per segment would pay the software pipeline's prologue and epilogue (and the TMA/cp.async wait at each loop's
    start) up to eight times per query tile, its loads never overlapping the previous segment's MMAs."""
    n1 = s3 - s0
    j = tl.where(i < n1, s0 + i, s4 + (i - n1))
    full = ((j >= s1) & (j < s2)) | ((j >= s5) & (j < s6)) | ((j >= s7) & (j < s8))
    return j, full


@triton.jit
def allowed(kk, lo1, hi1, lo2, offs_m):
    """The layout's mask for key indices kk [1, BLOCK_N] and queries offs_m: keys [lo1, hi1) U [lo2, q]."""
    return ((kk >= lo1[:, None]) & (kk < hi1[:, None])) | ((kk >= lo2[:, None]) & (kk <= offs_m[:, None]))


@triton.jit
def tanh(x):
    """tanh in fp32 to about one ulp, from exp and a polynomial (neither Triton's interpreter nor its language has
    one): 1 - 2 / (exp(2|x|) + 1) for |x| >= 0.55, which then loses at most a bit to cancellation; below, x + x^3 *
    p(x^2) with a least-squares fit of (tanh(x) - x) / x^3 (largest error 0.54 ulp in fp32 on [0, 0.55])."""
    a = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)  # exp overflows to inf for large |x|: 1.0
    r = a * a
    p = 0.002395352115854621 * r - 0.00841345451772213
    p = p * r + 0.02178262174129486
    p = p * r - 0.05395961180329323
    p = p * r + 0.13333293795585632
    p = p * r - 0.3333333134651184
    y = tl.where(a < 0.55, a + a * (p * r), big)
    return tl.where(x < 0, -y, y)


@triton.jit
def softcap_scores(s, qk_scale, SOFTCAP: tl.constexpr):
    """Soft-capped scores in the log2 domain from unscaled q.k: ``tanh(s * qk_scale) * SOFTCAP`` with the launcher's
    ``qk_scale = softmax_scale / cap`` and ``SOFTCAP = cap * log2(e)``; and the tanh (the backward's dS takes a
    factor 1 - tanh^2)."""
    t = tanh(s * qk_scale)
    return t * SOFTCAP, t


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, qk_scale, DOT_PREC: tl.constexpr):
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
def packed_rows(pid, H_KV, T, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, ROWS: tl.constexpr):
    """The rows of a GQA-packed program: BLOCK_M tokens of query tile ``tile`` x all GROUPS query heads of KV head
    ``hk``, token-major in ROWS = ``packed_row_count(BLOCK_M, GROUPS)`` MMA rows (row r < BLOCK_M * GROUPS: token
    tile*BLOCK_M + r // GROUPS, head hk*GROUPS + r % GROUPS; the rows past BLOCK_M * GROUPS pad the MMA to a power of
    two). Returns the tile, hk, each row's token and query head (int32), and which rows are real (token < T, r <
    BLOCK_M * GROUPS).

    Every K/V tile brought into shared memory feeds GROUPS x more MMA rows than one head would, and the mask
    granularity (the schedule's tiles) is BLOCK_M tokens, not BLOCK_M rows: 16 tokens x 4 heads give a 64-row MMA
    whose tiles straddle branch ends 4x less often. The padding sits at the end, not after each token, so a group
    that is not a power of two wastes at most GROUPS - 1 rows (9 tokens x 7 heads: 63 of 64 rows real), where one
    padded to a power of two per token would waste one row in eight. Programs run the query tiles back to front in
    position order, the H_KV programs of a tile next to each other: the programs in flight read one document's K/V,
    which stay in L2, and a document's longest tiles start first."""
    tile = (T + BLOCK_M - 1) // BLOCK_M - 1 - pid // H_KV
    hk = pid % H_KV
    offs_r = tl.arange(0, ROWS)
    g = offs_r % GROUPS
    offs_m = tile * BLOCK_M + offs_r // GROUPS
    row_ok = (offs_m < T) & (offs_r < BLOCK_M * GROUPS)
    return tile, hk, offs_m, hk * GROUPS + g, row_ok


def packed_row_count(block_m: int, groups: int) -> int:
    """The MMA rows of a GQA-packed program (``packed_rows``): ``block_m`` tokens x ``groups`` heads, rounded up to
    a power of two."""
    return triton.next_power_of_2(block_m * groups)


@triton.jit
def kv_tile(base, desc, n0, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA: tl.constexpr):
    """One [BLOCK_N, D] K or V tile at key n0: a TMA load (rows past T come back as zeros) or a masked load."""
    if USE_TMA:
        x = desc.load([n0, kv_col])
    else:
        ptr = base + n0.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
        x = tl.load(ptr, mask=((n0 + offs_n) < T)[:, None], other=0.0)
    return x


@triton.jit
def walk_kv(i, s0, s1, s2, s3, s4, s5, s6, s7, s8, k_base, v_base, k_desc, v_desc, kv_col, stride_kt, offs_n, offs_d,
            T, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """Step i of the walk with its tiles: the tile's first key n0, whether it is full, and its K and V tiles."""
    j, full = walk_tile(i, s0, s1, s2, s3, s4, s5, s6, s7, s8)
    n0 = j * BLOCK_N
    k = kv_tile(k_base, k_desc, n0, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA)
    v = kv_tile(v_base, v_desc, n0, kv_col, stride_kt, offs_n, offs_d, T, USE_TMA)
    return n0, full, k, v


def interpret() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _major_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def tma_ok(x: torch.Tensor) -> bool:
    """TMA descriptors: on a Hopper-or-newer GPU (or the interpreter), 16-byte aligned rows."""
    if interpret():
        return True
    return x.is_cuda and _major_capability(x.device.index or 0) >= 9 and (x.stride(0) * x.element_size()) % 16 == 0


def descriptor(x: torch.Tensor, rows: int, cols: int):
    """A TMA descriptor over the 2-D tensor ``x`` with [rows, cols] blocks."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(x, [rows, cols])


def dot_prec(dtype: torch.dtype) -> str:
    """``tl.dot``'s precision: IEEE fp32 for fp32 inputs (so the interpreter tests hold the kernels to fp32
    accuracy); tf32 otherwise (ignored for 16-bit inputs)."""
    return "ieee" if dtype == torch.float32 else "tf32"
