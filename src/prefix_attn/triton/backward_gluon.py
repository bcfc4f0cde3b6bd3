"""The backward's two main kernels for Hopper, written in Gluon: ``bwd_kv_kernel_gluon`` (dk, dv) and
``bwd_dq_kernel_gluon`` (dq), and their launchers. The `triton` backend runs them on Hopper for 16-bit inputs with
head dim 64 or 128, GQA groups up to 8, no soft-cap or window and no lse gradient (``supported``, ``supported_dq``,
``backward.launch_backward``); the plain-Triton kernels of ``backward`` run every other case, the CPU interpreter's
included.

Same contracts as ``backward.bwd_kv_kernel`` and ``backward.bwd_dq_kernel``: the same schedules and per-token
ranges, GQA handled the same way, no atomics (the backward stays bitwise reproducible), and the same numerics: scores
and accumulators fp32, P and dS rounded to the input dtype before their products. On the GPU they agree bitwise with
the plain kernels on the layouts of scripts/bench_attention.py.

What Gluon adds is the order of a step's MMAs and what runs under them. Plain Triton waits for each wgmma that does
not accumulate right after issuing it, so the exponentials never run under an MMA (``scripts/check_sm90_compile.py``,
column ex2@mma). A KV-major step here:

    S^T = K Q^T and dP^T = V dO^T issued together;
    wait for S^T alone; P^T = exp2(S^T - lse), masked, while dP^T runs;
    dV += P^T dO issued (P^T from registers);
    wait for dP^T; dS^T = P^T (dP^T - delta) while dV runs;
    dK += dS^T Q issued (dS^T from registers); wait for both accumulations.

The dq kernel does the same with S = Q K^T and dP = dO V^T, then dq += dS K. Waiting for the accumulations at the
end of each step, rather than leaving them in flight under the next step's first MMAs, keeps their registers out of
MMAs in flight: the KV kernel then spills 12 bytes instead of 176 (ptxas of Triton 3.9) and ran 1.27x faster than the
version that overlapped them (docs/PERFORMANCE.md).

The tiles the KV kernel walks (q, dO) and those the dq kernel walks (K, V) come in through TMA into rings of STAGES
slots, a slot refilled once the last MMA that reads it is done; what a program keeps (K and V, or the packed q and
dO) is loaded once into shared memory. Each program is one warpgroup over 64 rows, so two programs share an SM, as
with the plain kernels. Gluon does not run in Triton's CPU interpreter: these kernels are held to float64 by the GPU
tests, and a CPU test compiles them for sm_90a with the Triton installed. Gluon's API is experimental: where the
import below fails, the plain kernels run.
"""

from __future__ import annotations

import torch

from .common import _major_capability, interpret, packed_row_count

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # The TMA load's name: ``async_load`` from Triton 3.7, ``async_copy_global_to_shared`` in 3.6.
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    # The shared-memory layout of every tile the kernels take through TMA (16-bit, rows of 64 or 128 elements).
    SMEM_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
except ImportError:  # a Triton without Gluon, or with another layout of it: the plain kernels run
    gluon = None

HEAD_DIMS = (64, 128)
BLOCK = 64  # MMA rows per program (keys of the KV kernel, packed query rows of the dq kernel) and keys per dq step


def available() -> bool:
    """Whether this Triton has the Gluon API the kernels are written against."""
    return gluon is not None


if gluon is not None:

    @gluon.jit
    def _key_tile(i, sb, BLOCK_N: gl.constexpr):
        """Step i's first key and whether its tile is full, from a query tile's walk bounds ``sb`` = (s0, ..., s8)
        of the forward schedule (as ``common.walk_tile``: range 1 [s0, s3), then range 2 [s4, s9))."""
        s0, s1, s2, s3, s4, s5, s6, s7, s8 = sb
        n1 = s3 - s0
        j = gl.where(i < n1, s0 + i, s4 + (i - n1))
        full = ((j >= s1) & (j < s2)) | ((j >= s5) & (j < s6)) | ((j >= s7) & (j < s8))
        return j * BLOCK_N, full

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_smem, v_smem, bar, i, n, sb, kv_col, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr):
        """Issue step i's K and V tiles of the dq walk into slot i % STAGES (nothing past the walk's end)."""
        if i < n:
            n0, _full = _key_tile(i, sb, BLOCK_N)
            slot = i % STAGES
            mbarrier.expect(bar.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [n0, kv_col], bar.index(slot), k_smem.index(slot))
            _tma_load(v_desc, [n0, kv_col], bar.index(slot), v_smem.index(slot))

    @gluon.jit
    def _load_qdo(q_desc, do_desc, q_smem, do_smem, bar, i, total, n, s0, hk, GROUPS: gl.constexpr,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        """Issue step i's q and dO tiles (query head g = i // n, query tile s0 + i % n) into slot i % STAGES."""
        if i < total:
            g = i // n
            m0 = (s0 + (i - g * n)) * BLOCK_M
            col = (hk * GROUPS + g) * HEAD_DIM
            slot = i % STAGES
            mbarrier.expect(bar.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            _tma_load(q_desc, [m0, col], bar.index(slot), q_smem.index(slot))
            _tma_load(do_desc, [m0, col], bar.index(slot), do_smem.index(slot))

    @gluon.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
    def bwd_kv_kernel_gluon(
        K_DESC, V_DESC,  # TMA descriptors over k/v viewed as [T, Hkv * D], block [BLOCK_N, D]
        Q_DESC, DO_DESC,  # TMA descriptors over q/dO viewed as [T, Hq * D], block [BLOCK_M, D]
        LSE, DELTA, DK, DV,  # lse, delta [Hq, T] fp32; dk, dv [T, Hkv, D] out
        SCHED, QHI,  # as bwd_kv_kernel's
        stride_kt, stride_kh,
        T, qk_scale, sm_scale,
        H_KV: gl.constexpr,
        GROUPS: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        dtype: gl.constexpr = K_DESC.dtype
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
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

        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], K_DESC.layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], V_DESC.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], Q_DESC.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], DO_DESC.layout)
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
        zero_st = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout)
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
            # Waiting for dK here, rather than under the next step's S^T and dP^T, keeps dk and dv out of the
            # registers of MMAs in flight: ptxas of Triton 3.9 then spills 12 bytes instead of 176. The slot's last
            # reader is done: refill it.
            dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
            _load_qdo(Q_DESC, DO_DESC, q_smem, do_smem, bar, i + STAGES, total, n, s0, hk, GROUPS, HEAD_DIM, BLOCK_M,
                      STAGES)
        mbarrier.invalidate(kv_bar.index(0))
        for b in gl.static_range(STAGES):
            mbarrier.invalidate(bar.index(b))

        rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        off = (hk.to(gl.int64) * stride_kh + rows.to(gl.int64) * stride_kt)[:, None] + cols[None, :]
        ok_r = (rows < T)[:, None]
        gl.store(DK + off, (dk * sm_scale).to(dtype), mask=ok_r)
        gl.store(DV + off, dv.to(dtype), mask=ok_r)


    @gluon.jit(do_not_specialize=["T"])  # T varies per row: no recompile when it is a multiple of 16
    def bwd_dq_kernel_gluon(
        Q, DO, LSE, DELTA, DQ,  # q, dO, dq [T, Hq, D] (same strides); lse, delta [Hq, T] fp32
        K_DESC, V_DESC,  # TMA descriptors over k/v viewed as [T, Hkv * D], block [BLOCK_N, D]
        SCHED, TOK,  # the forward's schedule for this kernel's tiles, and the per-token ranges
        stride_qt, stride_qh,
        T, qk_scale, sm_scale,
        H_KV: gl.constexpr,
        GROUPS: gl.constexpr,
        ROWS: gl.constexpr,  # MMA rows, 64: BLOCK_M * GROUPS rounded up to a power of two (common.packed_rows)
        HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr,  # query TOKENS per tile
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        """dq as ``backward.bwd_dq_kernel`` (GQA-packed rows, the forward's walk): per key tile, S = Q K^T and
        dP = dO V^T issued together, P computed while dP runs, then dq += dS K."""
        REAL: gl.constexpr = BLOCK_M * GROUPS  # rows past it pad the MMA (common.packed_rows)
        dtype: gl.constexpr = Q.dtype.element_ty
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])
        x_slayout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)

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
        bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(STAGES):
            mbarrier.init(bar.index(b), count=1)
        for b in gl.static_range(STAGES):
            _load_kv(K_DESC, V_DESC, k_smem, v_smem, bar, b, n, sb, kv_col, BLOCK_N, STAGES)

        # q and dO: the packed rows (row r < REAL: token tile*BLOCK_M + r // GROUPS, head hk*GROUPS + r % GROUPS).
        offs_r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
        tok = tile * BLOCK_M + offs_r // GROUPS
        g = offs_r % GROUPS
        ok_ld = (tok < T) & (offs_r < REAL)
        x_off = (tok.to(gl.int64) * stride_qt + (hk * GROUPS + g).to(gl.int64) * stride_qh)[:, None] + offs_d[None, :]
        q_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], x_slayout,
                                           gl.load(Q + x_off, mask=ok_ld[:, None], other=0.0))
        do_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], x_slayout,
                                            gl.load(DO + x_off, mask=ok_ld[:, None], other=0.0))
        fence_async_shared()

        offs_rs = gl.arange(0, ROWS, layout=rows_s)
        offs_m = tile * BLOCK_M + offs_rs // GROUPS
        ok_s = (offs_m < T) & (offs_rs < REAL)
        h_s = (hk * GROUPS + offs_rs % GROUPS).to(gl.int64)
        lse = gl.load(LSE + h_s * T + offs_m, mask=ok_s, other=0.0)
        delta = gl.load(DELTA + h_s * T + offs_m, mask=ok_s, other=0.0)
        lo1 = gl.load(TOK + offs_m, mask=ok_s, other=0)
        hi1 = gl.load(TOK + T + offs_m, mask=ok_s, other=0)
        lo2 = gl.load(TOK + 2 * T + offs_m, mask=ok_s, other=T + 1)  # padded rows: no allowed key
        zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=acc_layout)

        for i in range(0, n):
            slot = i % STAGES
            ph = (i // STAGES) & 1
            mbarrier.wait(bar.index(slot), ph)
            s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp = warpgroup_mma(do_smem, v_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))  # S done; dP still running
            p = gl.exp2(s * qk_scale - lse[:, None])
            n0, full = _key_tile(i, sb, BLOCK_N)
            if not full:
                kk = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                ok = ((kk[None, :] >= lo1[:, None]) & (kk[None, :] < hi1[:, None])) | (
                    (kk[None, :] >= lo2[:, None]) & (kk[None, :] <= offs_m[:, None]))
                p = gl.where(ok, p, 0.0)
            dp = warpgroup_mma_wait(0, deps=(dp, ))
            ds = gl.convert_layout((p * (dp - delta[:, None])).to(dtype), op_layout)
            dq = warpgroup_mma(ds, k_smem.index(slot), dq, is_async=True)
            dq = warpgroup_mma_wait(0, deps=(dq, ))
            _load_kv(K_DESC, V_DESC, k_smem, v_smem, bar, i + STAGES, n, sb, kv_col, BLOCK_N, STAGES)
        for b in gl.static_range(STAGES):
            mbarrier.invalidate(bar.index(b))

        offs_ra = gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
        tok_a = tile * BLOCK_M + offs_ra // GROUPS
        g_a = offs_ra % GROUPS
        ok_a = (tok_a < T) & (offs_ra < REAL)
        offs_da = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        a_off = (tok_a.to(gl.int64) * stride_qt + (hk * GROUPS + g_a).to(gl.int64) * stride_qh)[:, None]
        gl.store(DQ + a_off + offs_da[None, :], (dq * sm_scale).to(dtype), mask=ok_a[:, None])


def _inputs_ok(q: torch.Tensor, k: torch.Tensor, softcap, window) -> bool:
    """Gluon here and not the interpreter, a Hopper GPU (wgmma and this use of TMA are Hopper's alone), 16-bit, head
    dim 64 or 128, q and k contiguous (the launchers view them as [T, H * D] for TMA; v and dO are made so alongside
    them), and no soft-cap or window (the plain kernels take those)."""
    if gluon is None or interpret() or softcap is not None or window is not None or not q.is_cuda:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in HEAD_DIMS:
        return False
    if not (q.is_contiguous() and k.is_contiguous()):
        return False
    return _major_capability(q.device.index or 0) == 9


MAX_GROUP = 8  # the GQA groups the GPU tests hold these kernels to (the default dq tiles of larger ones are 128 rows)


def supported(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, softcap, window) -> bool:
    """Whether ``bwd_kv_kernel_gluon`` runs the dk, dv of these inputs: 64 x 64 tiles, a GQA group of at most
    ``MAX_GROUP`` (the kernel's loop takes any; larger ones have not run on the GPU)."""
    groups = q.shape[1] // k.shape[1]
    return block_m == BLOCK and block_n == BLOCK and groups <= MAX_GROUP and _inputs_ok(q, k, softcap, window)


def supported_dq(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, softcap, window) -> bool:
    """Whether ``bwd_dq_kernel_gluon`` runs the dq of these inputs at the dq kernel's tiles: ``block_m`` tokens x
    the GQA group making 64 rows (`common.packed_row_count`), 64 keys, a group of at most ``MAX_GROUP``."""
    groups = q.shape[1] // k.shape[1]
    return (packed_row_count(block_m, groups) == BLOCK and block_n == BLOCK and groups <= MAX_GROUP
            and _inputs_ok(q, k, softcap, window))


def descriptor(x: torch.Tensor):
    """A TMA descriptor over contiguous ``x`` [T, H, D] viewed as [T, H * D], in [64, D] blocks: the tiles both
    kernels load (K and V are read by both, so the caller builds theirs once)."""
    T, H, D = x.shape
    return TensorDescriptor.from_tensor(x.view(T, H * D), [BLOCK, D], SMEM_LAYOUT)


def launch_bwd_kv_gluon(kd, vd, q, do, lse, delta, dk, dv, kv_sched, q_hi, qk_scale: float, scale: float,
                        stages: int):
    """dk, dv (written) as ``backward.bwd_kv_kernel`` computes them, on this kernel; ``supported`` must hold; kd, vd:
    ``descriptor`` of k and v."""
    T, Hq, D = q.shape
    Hkv = dk.shape[1]
    qd, dod = descriptor(q), descriptor(do)
    bwd_kv_kernel_gluon[(kv_sched.shape[0] * Hkv,)](
        kd, vd, qd, dod, lse, delta, dk, dv, kv_sched, q_hi,
        dk.stride(0), dk.stride(1),
        T, qk_scale, scale,
        H_KV=Hkv, GROUPS=Hq // Hkv, HEAD_DIM=D, BLOCK_M=BLOCK, BLOCK_N=BLOCK, STAGES=stages, num_warps=4,
    )


def launch_bwd_dq_gluon(kd, vd, q, do, lse, delta, dq, dq_sched, ranges, qk_scale: float, scale: float, block_m: int,
                        stages: int):
    """dq (written) as ``backward.bwd_dq_kernel`` computes it, on this kernel; ``supported_dq`` must hold; kd, vd:
    ``descriptor`` of k and v; q, dO and dq contiguous (the kernel reads all three with q's strides)."""
    T, Hq, D = q.shape
    Hkv = kd.shape[1] // D
    groups = Hq // Hkv
    bwd_dq_kernel_gluon[(dq_sched.shape[0] * Hkv,)](
        q, do, lse, delta, dq, kd, vd, dq_sched, ranges,
        q.stride(0), q.stride(1),
        T, qk_scale, scale,
        H_KV=Hkv, GROUPS=groups, ROWS=BLOCK, HEAD_DIM=D, BLOCK_M=block_m,
        BLOCK_N=BLOCK, STAGES=stages, num_warps=4,
    )
