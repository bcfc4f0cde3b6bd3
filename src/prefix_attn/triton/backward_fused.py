"""A KV-major backward that also computes dq (Gluon, Hopper): ``bwd_fused_kernel_gluon``. An experiment, measured
slower than the two-kernel backward (docs/PERFORMANCE.md) and removed in the next commit. FUSED_DQ_MODE (environment)
picks what a step does after dK, for taking the cost apart: 0 the whole step, 1 the dq MMA without the atomic adds,
2 neither (no dq).

FlashAttention-3's backward computes dq inside the KV-major loop: a step's dS already exists there, so dq's share
dS K costs one MMA, where the separate dq kernel recomputes S = Q K^T and dP = dO V^T first (five MMAs per tile pair
instead of seven). The shares of the programs that walk the same query tile are summed in an fp32 buffer by
atomic adds, so the result is not bitwise reproducible: the order of the adds varies from run to run.

A program holds 128 keys of one KV head on two warpgroups (64 keys each, the same instruction stream), so that the
dq share of a query tile, [64 queries x D], takes its 128-key reduction from both warpgroups' dS at once. A step:

    S^T = K Q^T and dP^T = V dO^T issued together (each warpgroup its 64 keys);
    P^T while dP^T runs; dV += P^T dO issued; dS^T while dV runs; dK += dS^T Q issued;
    dS^T stored to shared memory; both warpgroups meet; dq_share = dS K issued (each warpgroup D / 2 columns);
    wait for all three; the q/dO slot refilled; dq_share added into the fp32 buffer (fire-and-forget reductions).
"""

from __future__ import annotations

import os

import torch

from .backward_gluon import SMEM_LAYOUT, _load_qdo, _tma_load, gluon

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # A barrier of the program's warps: ``barrier`` from Triton 3.7, ``thread_barrier`` in 3.6.
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier

BLOCK_N = 128  # keys per program: two warpgroups of 64
BLOCK_M = 64  # queries per step


if gluon is not None:

    @gluon.jit(do_not_specialize=["T"])
    def bwd_fused_kernel_gluon(
        K_DESC, V_DESC,  # TMA descriptors over k/v viewed as [T, Hkv * D], block [BLOCK_N, D]
        Q_DESC, DO_DESC,  # TMA descriptors over q/dO viewed as [T, Hq * D], block [BLOCK_M, D]
        LSE, DELTA, DK, DV,  # lse, delta [Hq, T] fp32; dk, dv [T, Hkv, D] out
        DQA,  # dq accumulator [Hq, T, D] fp32, zeroed; unscaled
        SCHED, QHI,  # as bwd_kv_kernel's, at BLOCK_N keys x BLOCK_M queries
        stride_kt, stride_kh,
        T, qk_scale, sm_scale,
        H_KV: gl.constexpr,
        GROUPS: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        DQ_MODE: gl.constexpr = 0,
    ):
        dtype: gl.constexpr = K_DESC.dtype
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                            instr_shape=[16, HEAD_DIM // 2, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        ds_slayout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
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

        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], K_DESC.layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], V_DESC.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], Q_DESC.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], DO_DESC.layout)
        ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_slayout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar.index(0), count=1)
        for b in gl.static_range(STAGES):
            mbarrier.init(bar.index(b), count=1)
        mbarrier.expect(kv_bar.index(0), K_DESC.block_type.nbytes + V_DESC.block_type.nbytes)
        _tma_load(K_DESC, [n0, hk * HEAD_DIM], kv_bar.index(0), k_smem)
        _tma_load(V_DESC, [n0, hk * HEAD_DIM], kv_bar.index(0), v_smem)
        for b in gl.static_range(STAGES):
            _load_qdo(Q_DESC, DO_DESC, q_smem, do_smem, bar, b, total, n, s0, hk, GROUPS, HEAD_DIM, BLOCK_M, STAGES)

        offs_n = n0 + gl.arange(0, BLOCK_N, layout=keys_l)
        qhi = gl.load(QHI + offs_n, mask=offs_n < T, other=0)  # padding keys are seen by no query
        offs_mm = gl.arange(0, BLOCK_M, layout=queries_l)
        dq_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
        dq_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_layout))
        zero_st = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout)
        zero_dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
        mbarrier.wait(kv_bar.index(0), 0)

        for i in range(0, total):
            slot = i % STAGES
            g = i // n
            j = s0 + (i - g * n)
            h = (hk * GROUPS + g).to(gl.int64)
            offs_m = j * BLOCK_M + offs_mm
            row_ok = offs_m < T
            lse = gl.load(LSE + h * T + offs_m, mask=row_ok, other=0.0)
            delta = gl.load(DELTA + h * T + offs_m, mask=row_ok, other=0.0)
            mbarrier.wait(bar.index(slot), (i // STAGES) & 1)
            qt = q_smem.index(slot).permute((1, 0))
            dot = do_smem.index(slot).permute((1, 0))
            st = warpgroup_mma(k_smem, qt, zero_st, use_acc=False, is_async=True)
            dpt = warpgroup_mma(v_smem, dot, zero_st, use_acc=False, is_async=True)
            st = warpgroup_mma_wait(1, deps=(st, ))  # S^T done; dP^T still running
            pt = gl.exp2(st * qk_scale - lse[None, :])
            if (j < s1) | (j >= s2):
                ok = (offs_m[None, :] >= offs_n[:, None]) & (offs_m[None, :] < qhi[:, None])
                pt = gl.where(ok, pt, 0.0)
            pt_op = gl.convert_layout(pt.to(dtype), op_layout)
            dv = warpgroup_mma(pt_op, do_smem.index(slot), dv, is_async=True)
            dpt = warpgroup_mma_wait(1, deps=(dpt, ))  # dP^T done; dV still running
            dst = (pt * (dpt - delta[None, :])).to(dtype)
            ds_op = gl.convert_layout(dst, op_layout)
            dk = warpgroup_mma(ds_op, q_smem.index(slot), dk, is_async=True)
            if DQ_MODE < 2:
                ds_smem.store(dst)
                fence_async_shared()
                _cta_barrier()  # both warpgroups' dS^T are in shared memory
                dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, zero_dq, use_acc=False, is_async=True)
                dk, dv, dq = warpgroup_mma_wait(0, deps=(dk, dv, dq))
                _cta_barrier()  # both warpgroups are done with the slot and with ds_smem
                _load_qdo(Q_DESC, DO_DESC, q_smem, do_smem, bar, i + STAGES, total, n, s0, hk, GROUPS, HEAD_DIM,
                          BLOCK_M, STAGES)
                rows = j * BLOCK_M + dq_rows
                ptrs = DQA + ((h * T + rows.to(gl.int64)) * HEAD_DIM)[:, None] + dq_cols[None, :]
                if DQ_MODE == 0:
                    gl.atomic_add(ptrs, dq, mask=(rows < T)[:, None], sem="relaxed")
                else:
                    gl.store(ptrs, dq, mask=(rows < T)[:, None] & (T < 0))
            else:
                dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
                _cta_barrier()
                _load_qdo(Q_DESC, DO_DESC, q_smem, do_smem, bar, i + STAGES, total, n, s0, hk, GROUPS, HEAD_DIM,
                          BLOCK_M, STAGES)
        mbarrier.invalidate(kv_bar.index(0))
        for b in gl.static_range(STAGES):
            mbarrier.invalidate(bar.index(b))

        rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        off = (hk.to(gl.int64) * stride_kh + rows.to(gl.int64) * stride_kt)[:, None] + cols[None, :]
        ok_r = (rows < T)[:, None]
        gl.store(DK + off, (dk * sm_scale).to(dtype), mask=ok_r)
        gl.store(DV + off, dv.to(dtype), mask=ok_r)


def launch_bwd_fused_gluon(q, k, v, do, lse, delta, dk, dv, kv_sched, q_hi, qk_scale: float, scale: float,
                           stages: int = 2) -> torch.Tensor:
    """dk, dv (written) and dq (returned) of the KV-major walk at BLOCK_N x BLOCK_M tiles (``kv_sched`` and ``q_hi``
    built for them); q, k, v, dO contiguous [T, H, D], 16-bit, head dim 64 or 128, on Hopper."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    kd = TensorDescriptor.from_tensor(k.view(T, Hkv * D), [BLOCK_N, D], SMEM_LAYOUT)
    vd = TensorDescriptor.from_tensor(v.view(T, Hkv * D), [BLOCK_N, D], SMEM_LAYOUT)
    qd = TensorDescriptor.from_tensor(q.view(T, Hq * D), [BLOCK_M, D], SMEM_LAYOUT)
    dod = TensorDescriptor.from_tensor(do.view(T, Hq * D), [BLOCK_M, D], SMEM_LAYOUT)
    dqa = torch.zeros((Hq, T, D), device=q.device, dtype=torch.float32)
    bwd_fused_kernel_gluon[(kv_sched.shape[0] * Hkv,)](
        kd, vd, qd, dod, lse, delta, dk, dv, dqa, kv_sched, q_hi,
        dk.stride(0), dk.stride(1),
        T, qk_scale, scale,
        H_KV=Hkv, GROUPS=Hq // Hkv, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=stages, DQ_MODE=int(os.environ.get("FUSED_DQ_MODE", "0")), num_warps=8,
    )
    return (dqa * scale).to(q.dtype).transpose(0, 1)


def supported(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, softcap, window) -> bool:
    """Whether ``bwd_fused_kernel_gluon`` runs these inputs: the Gluon kernels' conditions, at its tiles."""
    from .backward_gluon import MAX_GROUP, _inputs_ok

    groups = q.shape[1] // k.shape[1]
    return block_m == BLOCK_M and block_n == BLOCK_N and groups <= MAX_GROUP and _inputs_ok(q, k, softcap, window)
