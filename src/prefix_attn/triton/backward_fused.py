"""The backward in one Gluon kernel for Hopper: dk, dv and dq from the KV-major walk (``bwd_fused_kernel_gluon``),
the `triton` backend's backward where ``TritonAttentionConfig.bwd_fused`` is set and ``supported`` holds.

Not run on a GPU: it compiles for sm_90a with Triton 3.6 and 3.9 (12 and 64 bytes of spills, 208 KB of shared
memory), and its predecessor with pointer atomics instead of the TMA reduce-add was measured (docs/PERFORMANCE.md).

FlashAttention-3's backward computes dq inside the KV-major loop: a step's dS already exists there, so dq's share
dS K costs one MMA, where the separate dq kernel (``backward_gluon.bwd_dq_kernel_gluon``) recomputes S = Q K^T and
dP = dO V^T first: five MMAs per tile pair instead of seven. The shares of the programs that walk the same query tile
are summed in an fp32 buffer by TMA reduce-adds, in an order that varies from run to run: dq is not bitwise
reproducible on this path (dk and dv are).

A program holds 128 keys of one KV head on two warpgroups (64 keys each, the same instruction stream, one program per
SM), so that the dq share of a 64-query tile takes its 128-key reduction from both warpgroups' dS at once. A step:

    S^T = K Q^T and dP^T = V dO^T issued together (each warpgroup its 64 keys);
    P^T while dP^T runs; dV += P^T dO issued; dS^T while dV runs;
    dS^T stored to shared memory; both warpgroups meet; dK += dS^T Q and dq_share = dS K issued (each warpgroup
    D / 2 columns of dq_share);
    wait for all three; the q/dO slot refilled; dq_share stored to one of two fp32 staging tiles and reduce-added
    into the buffer by TMA (the other tile's reduce may still be reading).

K, V and dS are read through an index the compiler cannot fold (``z``, 0 at run time): their MMA descriptors are
then computed in the loop rather than hoisted out of it and held in registers, which made ptxas spill 268 bytes a
thread instead of 12 (Triton 3.6).
"""

from __future__ import annotations

import torch

from . import backward_gluon
from .backward_gluon import SMEM_LAYOUT, _load_qdo, _tma_load, gluon

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language import _core as gl_core
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if hasattr(tma, "async_atomic_add"):  # Triton 3.7 and later
        _tma_add = tma.async_atomic_add
    else:  # Triton 3.6 builds the same operation but its Gluon does not name it

        @gl_core.builtin
        def _tma_add(tensor_desc, coord, src, _semantic=None):
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(gl_core.ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle,
                                                      coord, src.handle)

    # A barrier of the program's warps: ``barrier`` from Triton 3.7, ``thread_barrier`` in 3.6.
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    # The fp32 staging tiles of the reduce-add: rows of D fp32 (512 bytes at D = 128), unswizzled.
    DQ_SMEM_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)

BLOCK_N = 128  # keys per program: two warpgroups of 64
BLOCK_M = 64  # queries per step


if gluon is not None:

    @gluon.jit(do_not_specialize=["T", "T_PAD"])
    def bwd_fused_kernel_gluon(
        K_DESC, V_DESC,  # TMA descriptors over k/v viewed as [T, Hkv * D], block [BLOCK_N, D]
        Q_DESC, DO_DESC,  # TMA descriptors over q/dO viewed as [T, Hq * D], block [BLOCK_M, D]
        DQ_DESC,  # TMA descriptor over the dq buffer [Hq, T_PAD, D] fp32 viewed as [Hq * T_PAD, D], block [BLOCK_M, D]
        LSE, DELTA, DK, DV,  # lse, delta [Hq, T] fp32; dk, dv [T, Hkv, D] out
        SCHED, QHI,  # as bwd_kv_kernel's, at BLOCK_N keys x BLOCK_M queries
        stride_kt, stride_kh,
        T, T_PAD, qk_scale, sm_scale,
        H_KV: gl.constexpr,
        GROUPS: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        dtype: gl.constexpr = K_DESC.dtype
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                            instr_shape=[16, HEAD_DIM // 2, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        keys_l: gl.constexpr = gl.SliceLayout(1, st_layout)
        queries_l: gl.constexpr = gl.SliceLayout(0, st_layout)

        pid = gl.program_id(0)
        tile = pid // H_KV
        hk = pid % H_KV
        n0 = tile * BLOCK_N
        sp = SCHED + tile * 4
        s0 = gl.load(sp + 0)  # masked [s0, s1), full [s1, s2), masked [s2, s3)
        s1 = gl.load(sp + 1)
        s2 = gl.load(sp + 2)
        s3 = gl.load(sp + 3)
        n = s3 - s0
        total = GROUPS * n

        k_all = gl.allocate_shared_memory(dtype, [1, BLOCK_N, HEAD_DIM], K_DESC.layout)
        v_all = gl.allocate_shared_memory(dtype, [1, BLOCK_N, HEAD_DIM], V_DESC.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], Q_DESC.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], DO_DESC.layout)
        ds_all = gl.allocate_shared_memory(dtype, [1, BLOCK_N, BLOCK_M], SMEM_LAYOUT)
        dq_stage = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, HEAD_DIM], DQ_DESC.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar.index(0), count=1)
        for b in gl.static_range(STAGES):
            mbarrier.init(bar.index(b), count=1)
        mbarrier.expect(kv_bar.index(0), K_DESC.block_type.nbytes + V_DESC.block_type.nbytes)
        _tma_load(K_DESC, [n0, hk * HEAD_DIM], kv_bar.index(0), k_all.index(0))
        _tma_load(V_DESC, [n0, hk * HEAD_DIM], kv_bar.index(0), v_all.index(0))
        for b in gl.static_range(STAGES):
            _load_qdo(Q_DESC, DO_DESC, q_smem, do_smem, bar, b, total, n, s0, hk, GROUPS, HEAD_DIM, BLOCK_M, STAGES)

        offs_n = n0 + gl.arange(0, BLOCK_N, layout=keys_l)
        qhi = gl.load(QHI + offs_n, mask=offs_n < T, other=0)  # padding keys are seen by no query
        offs_mm = gl.arange(0, BLOCK_M, layout=queries_l)
        zero_st = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout)
        zero_dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
        mbarrier.wait(kv_bar.index(0), 0)

        for i in range(0, total):
            slot = i % STAGES
            z = (i + T) >> 30  # 0 (i < total and T < 2**28), not known to be: see the module's docstring
            k_smem = k_all.index(z)
            v_smem = v_all.index(z)
            ds_smem = ds_all.index(z)
            g = i // n
            j = s0 + (i - g * n)
            h = hk * GROUPS + g
            offs_m = j * BLOCK_M + offs_mm
            row_ok = offs_m < T
            lse = gl.load(LSE + h.to(gl.int64) * T + offs_m, mask=row_ok, other=0.0)
            delta = gl.load(DELTA + h.to(gl.int64) * T + offs_m, mask=row_ok, other=0.0)
            mbarrier.wait(bar.index(slot), (i // STAGES) & 1)
            st = warpgroup_mma(k_smem, q_smem.index(slot).permute((1, 0)), zero_st, use_acc=False, is_async=True)
            dpt = warpgroup_mma(v_smem, do_smem.index(slot).permute((1, 0)), zero_st, use_acc=False, is_async=True)
            st = warpgroup_mma_wait(1, deps=(st, ))  # S^T done; dP^T still running
            pt = gl.exp2(st * qk_scale - lse[None, :])
            if (j < s1) | (j >= s2):
                ok = (offs_m[None, :] >= offs_n[:, None]) & (offs_m[None, :] < qhi[:, None])
                pt = gl.where(ok, pt, 0.0)
            dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), op_layout), do_smem.index(slot), dv, is_async=True)
            dpt = warpgroup_mma_wait(1, deps=(dpt, ))  # dP^T done; dV still running
            ds_smem.store((pt * (dpt - delta[None, :])).to(dtype))
            fence_async_shared()
            _cta_barrier()  # both warpgroups' dS^T are in shared memory
            dk = warpgroup_mma(ds_smem, q_smem.index(slot), dk, is_async=True)
            dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, zero_dq, use_acc=False, is_async=True)
            dk, dv, dq = warpgroup_mma_wait(0, deps=(dk, dv, dq))
            # Both warpgroups are done with the q/dO slot and with dS^T, and the reduce-add that read this staging
            # tile two steps back has finished reading it.
            tma.store_wait(1)
            _cta_barrier()
            _load_qdo(Q_DESC, DO_DESC, q_smem, do_smem, bar, i + STAGES, total, n, s0, hk, GROUPS, HEAD_DIM, BLOCK_M,
                      STAGES)
            stage = dq_stage.index(i % 2)
            stage.store(dq)
            fence_async_shared()
            _cta_barrier()
            _tma_add(DQ_DESC, [h * T_PAD + j * BLOCK_M, 0], stage)
        tma.store_wait(0)
        mbarrier.invalidate(kv_bar.index(0))
        for b in gl.static_range(STAGES):
            mbarrier.invalidate(bar.index(b))

        rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        off = (hk.to(gl.int64) * stride_kh + rows.to(gl.int64) * stride_kt)[:, None] + cols[None, :]
        ok_r = (rows < T)[:, None]
        gl.store(DK + off, (dk * sm_scale).to(dtype), mask=ok_r)
        gl.store(DV + off, dv.to(dtype), mask=ok_r)


def supported(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, softcap, window) -> bool:
    """Whether ``bwd_fused_kernel_gluon`` runs the backward of these inputs at the KV-major tiles ``block_m`` queries
    x ``block_n`` keys: the Gluon kernels' conditions (``backward_gluon._inputs_ok``, a GQA group of at most
    ``backward_gluon.MAX_GROUP``), at 64 x 128 tiles; the dq buffer's rows, Hq x T rounded up to 64, must fit TMA's int32
    coordinates."""
    T, Hq = q.shape[0], q.shape[1]
    groups = Hq // k.shape[1]
    return (block_m == BLOCK_M and block_n == BLOCK_N and groups <= backward_gluon.MAX_GROUP
            and Hq * (T + BLOCK_M) < 2**31 and backward_gluon._inputs_ok(q, k, softcap, window))


def launch_bwd_fused_gluon(q, k, v, do, lse, delta, dk, dv, kv_sched, q_hi, qk_scale: float,
                           scale: float) -> torch.Tensor:
    """dk, dv (written) and dq (returned) of the KV-major walk at BLOCK_M x BLOCK_N tiles (``kv_sched`` and ``q_hi``
    built for them); ``supported`` must hold; q, k, v and dO contiguous [T, H, D]. Two q/dO slots: with the
    staging tiles a third does not fit in shared memory (245 KB; an SM has 227)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    t_pad = -(-T // BLOCK_M) * BLOCK_M  # a head's query tiles stay within its rows of the buffer
    dq_acc = torch.zeros((Hq, t_pad, D), device=q.device, dtype=torch.float32)

    def desc(x, rows):
        return TensorDescriptor.from_tensor(x.view(x.shape[0], -1), [rows, D], SMEM_LAYOUT)

    dq_desc = TensorDescriptor.from_tensor(dq_acc.view(Hq * t_pad, D), [BLOCK_M, D], DQ_SMEM_LAYOUT)
    bwd_fused_kernel_gluon[(kv_sched.shape[0] * Hkv,)](
        desc(k, BLOCK_N), desc(v, BLOCK_N), desc(q, BLOCK_M), desc(do, BLOCK_M), dq_desc,
        lse, delta, dk, dv, kv_sched, q_hi,
        dk.stride(0), dk.stride(1),
        T, t_pad, qk_scale, scale,
        H_KV=Hkv, GROUPS=Hq // Hkv, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=2, num_warps=8,
    )
    return torch.empty_like(q).copy_((dq_acc[:, :T] * scale).transpose(0, 1))
