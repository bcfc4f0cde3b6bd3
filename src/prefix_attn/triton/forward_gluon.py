"""The forward kernel of the `triton` backend written in Gluon for Hopper, and its launcher.

Same contract as ``forward.fwd_kernel`` (the same tables, schedule, GQA-packed rows, numerics and outputs o and the
base-2 lse), for 16-bit inputs with head dim 64 or 128 and no options. What Gluon adds is control of the wgmma
queue, which plain Triton does not give: Triton waits for the score MMA S = Q K^T right after issuing it, and
waiting for it also waits for the previous tile's P V, so the softmax never runs under an MMA. Here each step issues
S_i = Q K_i^T and then O += P_{i-1} V_{i-1}, waits for S_i alone (wgmma groups complete in order), computes the
softmax of S_i while P_{i-1} V_{i-1} runs, and only then waits for it and rescales O: FlashAttention-3's
intra-warpgroup overlap. K and V come in through TMA into two-slot rings, each with its own mbarriers, and a slot is
refilled as soon as the MMA that read it is done (K's after S, V's after P V), one step or more ahead of its use.

One program is one warpgroup (BLOCK_M tokens x GROUPS_P2 heads = 64 rows), so two programs share an SM as with the
plain kernel. Gluon does not run in Triton's CPU interpreter: this kernel is held to float64 by the GPU tests, and a
CPU test compiles it for sm_90a. Gluon's API is experimental; ``available`` says whether the Triton installed has
what this kernel uses.
"""

from __future__ import annotations

import torch
import triton

from .common import _major_capability

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # The TMA load's name: ``async_load`` from Triton 3.7, ``async_copy_global_to_shared`` in 3.6 (the GPU image's).
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
except ImportError:  # a Triton without Gluon (or with another layout of it): the plain kernel runs
    gluon = None

HEAD_DIMS = (64, 128)
ROWS = 64  # MMA rows per program: one warpgroup
# With a producer warp (WS) the program is two warpgroups; launched at 128 registers a thread, two programs fit an SM,
# and the producer hands all but 24 of its registers to the MMA warpgroup (setmaxnreg: 232 there).
WS_MAXNREG = 128


def available() -> bool:
    """Whether this Triton has the Gluon API the kernel is written against."""
    return gluon is not None


if gluon is not None:

    @gluon.jit
    def _key_tile(i, sb, BLOCK_N: gl.constexpr):
        """Step i's first key and whether its tile is full, from the query tile's walk bounds ``sb`` = (s0, ..., s8)
        of the forward schedule (as ``common.walk_tile``: range 1 [s0, s3), then range 2 [s4, s9))."""
        s0, s1, s2, s3, s4, s5, s6, s7, s8 = sb
        n1 = s3 - s0
        j = gl.where(i < n1, s0 + i, s4 + (i - n1))
        full = ((j >= s1) & (j < s2)) | ((j >= s5) & (j < s6)) | ((j >= s7) & (j < s8))
        return j * BLOCK_N, full

    @gluon.jit
    def _load(desc, smem, bar, i, n, sb, kv_col, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Issue step i's K (or V) tile into slot i % STAGES (nothing past the walk's end)."""
        if i < n:
            n0, _full = _key_tile(i, sb, BLOCK_N)
            slot = i % STAGES
            mbarrier.expect(bar.index(slot), desc.block_type.nbytes)
            _tma_load(desc, [n0, kv_col], bar.index(slot), smem.index(slot))

    @gluon.jit
    def _scores(s, i, sb, m_i, l_i, qk_scale, offs_m, lo1, hi1, lo2, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Step i's masked online-softmax update from its unscaled scores s: P (fp32), alpha, and the new row max
        and row sum (as ``common.online_softmax_step``)."""
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
    def _attend(Q, O, LSE, TOK, k_smem, v_smem, k_bar, v_bar, k_free, v_free, K_DESC, V_DESC, sb, n, tile, hk, kv_col,
                stride_qt, stride_qh, stride_ot, stride_oh, T, qk_scale,
                GROUPS: gl.constexpr, GROUPS_P2: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr):
        """The MMA warpgroup's work: q, the key walk, the output. With ``WS`` a producer warp issues the K/V copies
        and this warpgroup frees each slot through ``k_free`` / ``v_free``; without, it issues them itself."""
        ROWS_: gl.constexpr = BLOCK_M * GROUPS_P2
        dtype: gl.constexpr = Q.dtype.element_ty
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])
        q_slayout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        # q: the packed rows (row r: token tile*BLOCK_M + r // GROUPS_P2, head hk*GROUPS + r % GROUPS_P2), loaded
        # under the first K/V copies and put in shared memory for the score MMA.
        offs_r = gl.arange(0, ROWS_, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
        tok = tile * BLOCK_M + offs_r // GROUPS_P2
        g = offs_r % GROUPS_P2
        ok_ld = (tok < T) & (g < GROUPS)
        q_off = tok.to(gl.int64) * stride_qt + (hk * GROUPS + g).to(gl.int64) * stride_qh
        q = gl.load(Q + q_off[:, None] + offs_d[None, :], mask=ok_ld[:, None], other=0.0)
        q_smem = gl.allocate_shared_memory(dtype, [ROWS_, HEAD_DIM], q_slayout, q)
        fence_async_shared()

        # The per-row ranges, in the score layout's rows.
        offs_rs = gl.arange(0, ROWS_, layout=rows_s)
        offs_m = tile * BLOCK_M + offs_rs // GROUPS_P2
        ok_s = (offs_m < T) & (offs_rs % GROUPS_P2 < GROUPS)
        lo1 = gl.load(TOK + offs_m, mask=ok_s, other=0)
        hi1 = gl.load(TOK + T + offs_m, mask=ok_s, other=0)
        lo2 = gl.load(TOK + 2 * T + offs_m, mask=ok_s, other=T + 1)  # padded rows: no allowed key

        m_i = gl.full([ROWS_], -1.0e30, gl.float32, layout=rows_s)
        l_i = gl.zeros([ROWS_], gl.float32, layout=rows_s)
        s_acc = gl.zeros([ROWS_, BLOCK_N], gl.float32, layout=s_layout)
        acc = gl.zeros([ROWS_, HEAD_DIM], gl.float32, layout=o_layout)

        # Step 0: its scores alone.
        mbarrier.wait(k_bar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_acc, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        if WS:
            mbarrier.arrive(k_free.index(0), count=1)
        else:
            _load(K_DESC, k_smem, k_bar, STAGES, n, sb, kv_col, BLOCK_N, STAGES)
        p, alpha, m_i, l_i = _scores(s, 0, sb, m_i, l_i, qk_scale, offs_m, lo1, hi1, lo2, BLOCK_N, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        for i in range(1, n):
            slot = i % STAGES
            prev = (i - 1) % STAGES
            mbarrier.wait(k_bar.index(slot), (i // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_acc, use_acc=False, is_async=True)
            mbarrier.wait(v_bar.index(prev), ((i - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))  # S_i done; P_{i-1} V_{i-1} still running
            if WS:
                mbarrier.arrive(k_free.index(slot), count=1)
            else:
                _load(K_DESC, k_smem, k_bar, i + STAGES, n, sb, kv_col, BLOCK_N, STAGES)
            p, alpha, m_i, l_i = _scores(s, i, sb, m_i, l_i, qk_scale, offs_m, lo1, hi1, lo2, BLOCK_N, s_layout)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            if WS:
                mbarrier.arrive(v_free.index(prev), count=1)
            else:
                _load(V_DESC, v_smem, v_bar, i - 1 + STAGES, n, sb, kv_col, BLOCK_N, STAGES)
            acc = acc * gl.convert_layout(alpha, rows_o)[:, None]

        last = (n - 1) % STAGES
        mbarrier.wait(v_bar.index(last), ((n - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))

        l_safe = gl.where(l_i == 0.0, 1.0, l_i)  # only padding rows see no key at all
        o = acc / gl.convert_layout(l_safe, rows_o)[:, None]
        offs_ro = gl.arange(0, ROWS_, layout=rows_o)
        tok_o = tile * BLOCK_M + offs_ro // GROUPS_P2
        g_o = offs_ro % GROUPS_P2
        ok_o = (tok_o < T) & (g_o < GROUPS)
        offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o_off = tok_o.to(gl.int64) * stride_ot + (hk * GROUPS + g_o).to(gl.int64) * stride_oh
        gl.store(O + o_off[:, None] + offs_do[None, :], o.to(dtype), mask=ok_o[:, None])
        h_s = (hk * GROUPS + offs_rs % GROUPS_P2).to(gl.int64)
        gl.store(LSE + h_s * T + offs_m, m_i + gl.log2(l_safe), mask=ok_s)

    @gluon.jit
    def _produce(K_DESC, V_DESC, k_smem, v_smem, k_bar, v_bar, k_free, v_free, sb, n, kv_col, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr):
        """The producer warp: step i's K and V tiles into slot i % STAGES once the MMAs that read the slot's last
        tiles are done (the first round of slots is free)."""
        for i in range(0, n):
            slot = i % STAGES
            ph = ((i // STAGES) & 1) ^ 1
            n0, _full = _key_tile(i, sb, BLOCK_N)
            mbarrier.wait(k_free.index(slot), ph, pred=i >= STAGES)
            mbarrier.expect(k_bar.index(slot), K_DESC.block_type.nbytes)
            _tma_load(K_DESC, [n0, kv_col], k_bar.index(slot), k_smem.index(slot))
            mbarrier.wait(v_free.index(slot), ph, pred=i >= STAGES)
            mbarrier.expect(v_bar.index(slot), V_DESC.block_type.nbytes)
            _tma_load(V_DESC, [n0, kv_col], v_bar.index(slot), v_smem.index(slot))

    @gluon.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
    def fwd_kernel_gluon(
        Q, O, LSE,  # q, o [T, Hq, D]; lse [Hq, T] fp32 (log2 domain)
        K_DESC, V_DESC,  # TMA descriptors over k/v viewed as [T, Hkv * D], block [BLOCK_N, D]
        SCHED, TOK,  # as fwd_kernel's
        stride_qt, stride_qh, stride_ot, stride_oh,
        T, qk_scale,
        H_KV: gl.constexpr,
        GROUPS: gl.constexpr,
        GROUPS_P2: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr,  # query TOKENS per tile; BLOCK_M * GROUPS_P2 == 64 rows
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,  # K and V tiles in flight: each has a ring of STAGES slots
        WS: gl.constexpr = False,  # a producer warp issues the K/V copies (warp specialization)
    ):
        dtype: gl.constexpr = Q.dtype.element_ty
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
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(b), count=1)
            mbarrier.init(v_bar.index(b), count=1)
        if WS:
            k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for b in gl.static_range(STAGES):
                mbarrier.init(k_free.index(b), count=1)
                mbarrier.init(v_free.index(b), count=1)
            gl.warp_specialize([
                (_attend, (Q, O, LSE, TOK, k_smem, v_smem, k_bar, v_bar, k_free, v_free, K_DESC, V_DESC, sb, n, tile,
                           hk, kv_col, stride_qt, stride_qh, stride_ot, stride_oh, T, qk_scale, GROUPS, GROUPS_P2,
                           HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, WS)),
                (_produce, (K_DESC, V_DESC, k_smem, v_smem, k_bar, v_bar, k_free, v_free, sb, n, kv_col, BLOCK_N,
                            STAGES)),
            ], [1], [24])
            for b in gl.static_range(STAGES):
                mbarrier.invalidate(k_free.index(b))
                mbarrier.invalidate(v_free.index(b))
        else:
            for b in gl.static_range(STAGES):
                _load(K_DESC, k_smem, k_bar, b, n, sb, kv_col, BLOCK_N, STAGES)
                _load(V_DESC, v_smem, v_bar, b, n, sb, kv_col, BLOCK_N, STAGES)
            _attend(Q, O, LSE, TOK, k_smem, v_smem, k_bar, v_bar, k_bar, v_bar, K_DESC, V_DESC, sb, n, tile, hk,
                    kv_col, stride_qt, stride_qh, stride_ot, stride_oh, T, qk_scale, GROUPS, GROUPS_P2, HEAD_DIM,
                    BLOCK_M, BLOCK_N, STAGES, WS)
        for b in gl.static_range(STAGES):
            mbarrier.invalidate(k_bar.index(b))
            mbarrier.invalidate(v_bar.index(b))


def supported(q: torch.Tensor, k: torch.Tensor, block_m: int, softcap) -> bool:
    """Whether this kernel runs the forward of these inputs: Gluon here, a Hopper GPU, 16-bit, head dim 64 or 128,
    64 packed rows, rows TMA can address, and no soft-cap (windows need nothing of the kernel)."""
    if gluon is None or softcap is not None or not q.is_cuda:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in HEAD_DIMS:
        return False
    if _major_capability(q.device.index or 0) != 9:  # wgmma and this TMA use are Hopper's alone
        return False
    groups = q.shape[1] // k.shape[1]
    return block_m * triton.next_power_of_2(groups) == ROWS and (k.shape[1] * k.shape[2] * k.element_size()) % 16 == 0


def launch_forward_gluon(q, k, v, sched, ranges, qk_scale: float, block_m: int, block_n: int, stages: int,
                         ws: bool = False):
    """o, lse as ``forward.launch_forward`` (without a soft-cap), on this kernel; ``supported`` must hold."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    kd = TensorDescriptor.from_tensor(k.view(T, Hkv * D), [block_n, D], layout)
    vd = TensorDescriptor.from_tensor(v.view(T, Hkv * D), [block_n, D], layout)
    groups = Hq // Hkv
    fwd_kernel_gluon[(sched.shape[0] * Hkv,)](
        q, o, lse, kd, vd, sched, ranges,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1),
        T, qk_scale,
        H_KV=Hkv, GROUPS=groups, GROUPS_P2=triton.next_power_of_2(groups), HEAD_DIM=D, BLOCK_M=block_m,
        BLOCK_N=block_n, STAGES=stages, WS=ws, num_warps=4, **({"maxnreg": WS_MAXNREG} if ws else {}),
    )
    return o, lse
