"""The forward kernel for Hopper in Gluon (``fwd_kernel_gluon``) and its launcher: the `triton` backend's forward
where ``TritonAttentionConfig.fwd_gluon`` is set and ``supported`` holds (Hopper, 16-bit, head dim 64 or 128, 64
packed rows of a GQA group of at most ``backward_gluon.MAX_GROUP``, no soft-cap); ``forward.fwd_kernel`` elsewhere.

Same contract as ``forward.fwd_kernel``: the forward schedule's walk, GQA-packed rows (``common.packed_rows``), fp32
scores and statistics, P rounded to the input dtype before P @ V, the log-sum-exp in base 2.

What it changes is what runs under the MMAs. Plain Triton issues S = Q K^T, waits, runs the softmax, issues P V and
waits again: the exponentials of a program never run under one of its own MMAs, and the profile of the plain kernel
at a 16K prefix shows barrier stalls beside its TMA copies (docs/PERFORMANCE.md). Here the K/V tiles come through a
ring of TMA slots on mbarriers, and a step overlaps the softmax with the previous tile's P V, as FlashAttention-3's
intra-warpgroup pipelining does:

    S_i = Q K_i^T issued; O += P_{i-1} V_{i-1} issued;
    wait for S_i alone; the row max, P_i and the row sum of tile i while P_{i-1} V_{i-1} runs;
    wait for O; O *= exp2(m_{i-1} - m_i); the slot of tile i-1 refilled.

O gets the same operations in the same order as in the plain kernel (rescale, then add P V), only issued earlier.
"""

from __future__ import annotations

import torch

from .backward_gluon import _inputs_ok, _key_tile, _tma_load, gluon
from .common import packed_row_count

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .backward_gluon import SMEM_LAYOUT


if gluon is not None:

    @gluon.jit
    def _scores(s, m_i, l_i, i, sb, lo1, hi1, lo2, offs_m, qk_scale, s_layout: gl.constexpr,
                BLOCK_N: gl.constexpr):
        """Tile i's softmax step from its unscaled scores s: masked where the tile is not full, the new row max
        (log2 domain), the rescale of what came before, P and the new row sum."""
        n0, full = _key_tile(i, sb, BLOCK_N)
        if not full:
            kk = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            ok = ((kk[None, :] >= lo1[:, None]) & (kk[None, :] < hi1[:, None])) | (
                (kk[None, :] >= lo2[:, None]) & (kk[None, :] <= offs_m[:, None]))
            s = gl.where(ok, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _take_turn(turn, t, HALF: gl.constexpr, PINGPONG: gl.constexpr):
        """Ping-pong: wait until the other consumer has issued its t-th (HALF 1) or (t-1)-th (HALF 0) group of
        MMAs, so that the two issue in turns and one's softmax runs under the other's MMAs (a fresh barrier's wait
        on parity 1 returns at once: consumer 0 goes first)."""
        if PINGPONG:
            mbarrier.wait(turn.index(HALF), (t & 1) ^ (1 - HALF))

    @gluon.jit
    def _give_turn(turn, HALF: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - HALF))

    @gluon.jit
    def _producer(K_DESC, V_DESC, k_smem, v_smem, k_full, v_full, k_empty, v_empty, n, sb, kv_col,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """The loading warp: each tile's K, then its V, into its ring's slot once both consumers have released the
        slot (a fresh barrier's wait on parity 1 returns at once: the first round)."""
        for i in range(0, n):
            slot = i % STAGES
            ph = ((i // STAGES) & 1) ^ 1
            n0, _full = _key_tile(i, sb, BLOCK_N)
            mbarrier.wait(k_empty.index(slot), ph)
            mbarrier.expect(k_full.index(slot), K_DESC.block_type.nbytes)
            _tma_load(K_DESC, [n0, kv_col], k_full.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), ph)
            mbarrier.expect(v_full.index(slot), V_DESC.block_type.nbytes)
            _tma_load(V_DESC, [n0, kv_col], v_full.index(slot), v_smem.index(slot))

    @gluon.jit
    def _consumer(O, LSE, q_smem, k_smem, v_smem, k_full, v_full, k_empty, v_empty, turn, TOK, stride_qt, stride_qh,
                  T, qk_scale, tile, hk, n, sb,
                  HALF: gl.constexpr, GROUPS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
        """One warpgroup's 64 packed rows (rows 64 * HALF on) over the whole walk, and their epilogue: each slot
        released to the loading warp once this warpgroup's last MMA reading it is done."""
        R: gl.constexpr = 64
        REAL: gl.constexpr = BLOCK_M * GROUPS  # rows past it pad the MMA (common.packed_rows)
        dtype: gl.constexpr = O.dtype.element_ty
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_a: gl.constexpr = gl.SliceLayout(1, acc_layout)
        q_half = q_smem.slice(HALF * R, R)

        offs_rs = HALF * R + gl.arange(0, R, layout=rows_s)
        offs_m = tile * BLOCK_M + offs_rs // GROUPS
        ok_s = (offs_m < T) & (offs_rs < REAL)
        lo1 = gl.load(TOK + offs_m, mask=ok_s, other=0)
        hi1 = gl.load(TOK + T + offs_m, mask=ok_s, other=0)
        lo2 = gl.load(TOK + 2 * T + offs_m, mask=ok_s, other=T + 1)  # padded rows: no allowed key
        zero_s = gl.zeros([R, BLOCK_N], gl.float32, layout=s_layout)
        acc = gl.zeros([R, HEAD_DIM], gl.float32, layout=acc_layout)
        m_i = gl.full([R], -1.0e30, gl.float32, layout=rows_s)  # finite: a row with no key in a tile gets p = 0
        l_i = gl.zeros([R], gl.float32, layout=rows_s)

        # Tile 0: its scores and P, before the loop that overlaps each tile's softmax with the previous P V.
        mbarrier.wait(k_full.index(0), 0)
        _take_turn(turn, 0, HALF, PINGPONG)
        s = warpgroup_mma(q_half, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        _give_turn(turn, HALF, PINGPONG)
        s = warpgroup_mma_wait(0, deps=(s, ))
        mbarrier.arrive(k_empty.index(0))
        p, alpha, m_i, l_i = _scores(s, m_i, l_i, 0, sb, lo1, hi1, lo2, offs_m, qk_scale, s_layout, BLOCK_N)
        p_op = gl.convert_layout(p.to(dtype), op_layout)
        for i in range(1, n):
            slot = i % STAGES
            prev = (i - 1) % STAGES
            mbarrier.wait(k_full.index(slot), (i // STAGES) & 1)
            mbarrier.wait(v_full.index(prev), ((i - 1) // STAGES) & 1)
            _take_turn(turn, i, HALF, PINGPONG)
            s = warpgroup_mma(q_half, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            _give_turn(turn, HALF, PINGPONG)
            s = warpgroup_mma_wait(1, deps=(s, ))  # S_i done; P_{i-1} V_{i-1} still running
            mbarrier.arrive(k_empty.index(slot))
            p, alpha, m_i, l_i = _scores(s, m_i, l_i, i, sb, lo1, hi1, lo2, offs_m, qk_scale, s_layout, BLOCK_N)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(v_empty.index(prev))
            acc = acc * gl.convert_layout(alpha, rows_a)[:, None]
            p_op = gl.convert_layout(p.to(dtype), op_layout)
        last = (n - 1) % STAGES
        mbarrier.wait(v_full.index(last), ((n - 1) // STAGES) & 1)
        _take_turn(turn, n, HALF, PINGPONG)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        _give_turn(turn, HALF, PINGPONG)
        acc = warpgroup_mma_wait(0, deps=(acc, ))

        l_safe = gl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (token >= T, or past REAL) see no key
        gl.store(LSE + (hk * GROUPS + offs_rs % GROUPS).to(gl.int64) * T + offs_m, m_i + gl.log2(l_safe), mask=ok_s)
        offs_ra = HALF * R + gl.arange(0, R, layout=rows_a)
        tok_a = tile * BLOCK_M + offs_ra // GROUPS
        ok_a = (tok_a < T) & (offs_ra < REAL)
        offs_da = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        a_off = (tok_a.to(gl.int64) * stride_qt + (hk * GROUPS + offs_ra % GROUPS).to(gl.int64) * stride_qh)[:, None]
        o = acc / gl.convert_layout(l_safe, rows_a)[:, None]
        gl.store(O + a_off + offs_da[None, :], o.to(dtype), mask=ok_a[:, None])

    @gluon.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
    def fwd_kernel_gluon(
        Q, O, LSE,  # q, o [T, Hq, D] (same strides); lse [Hq, T] fp32 (log2 domain)
        K_DESC, V_DESC,  # TMA descriptors over k/v viewed as [T, Hkv * D], block [BLOCK_N, D]
        SCHED, TOK,  # the forward schedule at BLOCK_M tokens x BLOCK_N keys, the per-token ranges
        stride_qt, stride_qh,
        T, qk_scale,
        H_KV: gl.constexpr,
        GROUPS: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr,  # query TOKENS per tile: BLOCK_M * GROUPS fill (at most) 128 packed rows
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,  # registers per thread of the second consumer warpgroup (setmaxnreg)
        PINGPONG: gl.constexpr,  # the consumers issue their MMAs in turns
    ):
        ROWS: gl.constexpr = 128  # two consumer warpgroups of 64 rows
        REAL: gl.constexpr = BLOCK_M * GROUPS
        dtype: gl.constexpr = Q.dtype.element_ty
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])
        x_slayout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        pid = gl.program_id(0)
        tile = (T + BLOCK_M - 1) // BLOCK_M - 1 - pid // H_KV  # back to front, as common.packed_rows
        hk = pid % H_KV
        kv_col = hk * HEAD_DIM
        sp = SCHED + tile * 10
        sb = (gl.load(sp + 0), gl.load(sp + 1), gl.load(sp + 2), gl.load(sp + 3), gl.load(sp + 4), gl.load(sp + 5),
              gl.load(sp + 6), gl.load(sp + 7), gl.load(sp + 8))
        n = (sb[3] - sb[0]) + (gl.load(sp + 9) - sb[4])  # >= 1: every query sees itself

        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], K_DESC.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], V_DESC.layout)
        # K and V in rings of their own: K_i's slot is free once S_i is done, V_i's once P_i V_i is, a step later.
        # A slot is free once both consumers release it (count 2).
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(STAGES):
            mbarrier.init(k_full.index(b), count=1)
            mbarrier.init(v_full.index(b), count=1)
            mbarrier.init(k_empty.index(b), count=2)
            mbarrier.init(v_empty.index(b), count=2)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)

        # q: the packed rows (row r < REAL: token tile*BLOCK_M + r // GROUPS, head hk*GROUPS + r % GROUPS).
        offs_r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
        tok = tile * BLOCK_M + offs_r // GROUPS
        ok_ld = (tok < T) & (offs_r < REAL)
        x_off = (tok.to(gl.int64) * stride_qt + (hk * GROUPS + offs_r % GROUPS).to(gl.int64) * stride_qh)[:, None] \
            + offs_d[None, :]
        q_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], x_slayout,
                                           gl.load(Q + x_off, mask=ok_ld[:, None], other=0.0))
        fence_async_shared()

        # Constexprs cross into the partitions only wrapped (a bare one arrives as a tensor).
        gl.warp_specialize([
            (_consumer, (O, LSE, q_smem, k_smem, v_smem, k_full, v_full, k_empty, v_empty, turn, TOK, stride_qt,
                         stride_qh, T, qk_scale, tile, hk, n, sb, gl.constexpr(0), gl.constexpr(GROUPS),
                         gl.constexpr(HEAD_DIM), gl.constexpr(BLOCK_M), gl.constexpr(BLOCK_N), gl.constexpr(STAGES),
                         gl.constexpr(PINGPONG))),
            (_consumer, (O, LSE, q_smem, k_smem, v_smem, k_full, v_full, k_empty, v_empty, turn, TOK, stride_qt,
                         stride_qh, T, qk_scale, tile, hk, n, sb, gl.constexpr(1), gl.constexpr(GROUPS),
                         gl.constexpr(HEAD_DIM), gl.constexpr(BLOCK_M), gl.constexpr(BLOCK_N), gl.constexpr(STAGES),
                         gl.constexpr(PINGPONG))),
            (_producer, (K_DESC, V_DESC, k_smem, v_smem, k_full, v_full, k_empty, v_empty, n, sb, kv_col,
                         gl.constexpr(BLOCK_N), gl.constexpr(STAGES))),
        ], [4, 1], [CONSUMER_REGS, 24])


ROWS = 128  # packed rows per program: two consumer warpgroups of 64
CONSUMER_REGS = 232  # registers per thread of a consumer warpgroup once the loading warp gives its own back


def supported(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, softcap) -> bool:
    """Whether ``fwd_kernel_gluon`` runs the forward of these inputs at the forward's tiles: ``block_m`` tokens x
    the GQA group making 128 rows, 64 or 128 keys, a group of at most ``backward_gluon.MAX_GROUP``, no soft-cap (a
    window needs nothing of the kernel: its schedule and ranges are the windowed ones)."""
    from .backward_gluon import MAX_GROUP

    groups = q.shape[1] // k.shape[1]
    return (packed_row_count(block_m, groups) == ROWS and block_n in (64, 128) and groups <= MAX_GROUP
            and _inputs_ok(q, k, softcap, None))


def launch_forward_gluon(q, k, v, o, lse, sched, ranges, qk_scale: float, block_m: int, block_n: int, stages: int,
                         pingpong: bool = False):
    """o and lse (written) as ``forward.fwd_kernel`` computes them, on this kernel; ``supported`` must hold; q and o
    contiguous (the kernel reads both with q's strides)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    kd = TensorDescriptor.from_tensor(k.view(T, Hkv * D), [block_n, D], SMEM_LAYOUT)
    vd = TensorDescriptor.from_tensor(v.view(T, Hkv * D), [block_n, D], SMEM_LAYOUT)
    fwd_kernel_gluon[(sched.shape[0] * Hkv,)](
        q, o, lse, kd, vd, sched, ranges,
        q.stride(0), q.stride(1),
        T, qk_scale,
        H_KV=Hkv, GROUPS=Hq // Hkv, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
        CONSUMER_REGS=CONSUMER_REGS, PINGPONG=pingpong, num_warps=4,
    )
