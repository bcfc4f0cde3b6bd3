"""The Triton backends' entry points: ``triton_prefix_attention`` (forward and backward) and
``triton_fp8_prefix_attention`` (the FP8 forward), with their support checks.

Each runs eagerly through its launchers, and under ``torch.compile`` through ``torch.library.custom_op`` ops
(``prefix_attn::triton_fwd`` / ``triton_bwd`` with a registered autograd formula, ``prefix_attn::triton_fp8_fwd``)
with fake (meta) implementations, so the compiler can trace through them. The custom op's Python dispatch and its
generated autograd node cost host time on every call (docs/PERFORMANCE.md), which the eager path does not pay.

Numerics: scores, softmax statistics and all accumulators are fp32; P (and dS) are rounded to the input dtype before
their matrix products, as in FlashAttention. fp32 inputs use IEEE fp32 dot products (no tf32), so the CPU
interpreter tests (``TRITON_INTERPRET=1``) can hold the kernels to float32 accuracy.
"""

from __future__ import annotations

import torch

from ..layout import PrefixLayout
from ..schedule import AttentionTables, build_tables
from .backward import launch_backward
from .common import LOG2E, interpret
from .config import FP8AttentionConfig, TritonAttentionConfig, default_config, fp8_default_config, packed_group
from .forward import launch_forward
from .fp8 import fp8_forward, fp8_tables

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LN2 = 0.6931471805599453  # the kernels' lse is base 2; natural log = base 2 * ln 2
FP8_HEAD_DIMS = (64, 128)  # on a GPU; the interpreter takes SUPPORTED_HEAD_DIMS


# ----------------------------------------------------------------------------------------------- 16-bit (and fp32)


# The custom ops carry the options as plain values: softcap 0.0 and window 0 mean none; positions and kv_qmin are the
# window's tables (None without one).


@torch.library.custom_op("prefix_attn::triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fwd_sched: torch.Tensor, ranges: torch.Tensor,
            q_hi: torch.Tensor, kv_sched: torch.Tensor, dq_sched: torch.Tensor, positions: torch.Tensor | None,
            kv_qmin: torch.Tensor | None, scale: float, cfg: list[int], softcap: float, window: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_forward(q, k, v, fwd_sched, ranges, scale, TritonAttentionConfig.from_list(cfg), softcap or None)


@_fwd_op.register_fake
def _(q, k, v, fwd_sched, ranges, q_hi, kv_sched, dq_sched, positions, kv_qmin, scale, cfg, softcap, window):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("prefix_attn::triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            dlse: torch.Tensor | None, ranges: torch.Tensor, q_hi: torch.Tensor, kv_sched: torch.Tensor,
            dq_sched: torch.Tensor, positions: torch.Tensor | None, kv_qmin: torch.Tensor | None, scale: float,
            cfg: list[int], softcap: float, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_backward(do, q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched, scale,
                           TritonAttentionConfig.from_list(cfg), softcap or None, dlse, window or None, positions,
                           kv_qmin)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, ranges, q_hi, kv_sched, dq_sched, positions, kv_qmin, scale, cfg, softcap, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, _fwd_sched, ranges, q_hi, kv_sched, dq_sched, positions, kv_qmin, scale, cfg, softcap, window = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched, positions, kv_qmin)
    ctx.scale, ctx.cfg, ctx.softcap, ctx.window = scale, cfg, softcap, window


def _backward(ctx, do, dlse):
    q, k, v, o, lse, ranges, q_hi, kv_sched, dq_sched, positions, kv_qmin = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    # lse here is base 2 (the kernels'); the backward takes the gradient of the natural-log lse = lse * ln 2.
    dlse = None if dlse is None else dlse * LOG2E
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, dlse, ranges, q_hi, kv_sched, dq_sched, positions, kv_qmin, ctx.scale,
                         ctx.cfg, ctx.softcap, ctx.window)
    return dq, dk, dv, *([None] * 11)


def _setup_context_grads(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.set_materialize_grads(False)


_fwd_op.register_autograd(_backward, setup_context=_setup_context_grads)


class _EagerTritonAttention(torch.autograd.Function):
    """The eager path: the same launchers as the custom ops, without the custom-op dispatch. Returns o, or (o, lse)
    with ``return_lse`` (lse [Hq, T] in natural-log units)."""

    @staticmethod
    def forward(ctx, q, k, v, t: AttentionTables, scale, cfg, softcap, return_lse):
        o, lse = launch_forward(q, k, v, t.fwd, t.ranges, scale, cfg, softcap)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.tables, ctx.scale, ctx.cfg, ctx.softcap = t, scale, cfg, softcap
        ctx.set_materialize_grads(False)
        if not return_lse:
            return o
        return o, lse * LN2

    @staticmethod
    def backward(ctx, do, dlse=None):
        q, k, v, o, lse = ctx.saved_tensors
        t = ctx.tables
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = launch_backward(do, q, k, v, o, lse, t.ranges, t.tokens.q_hi, t.kv, t.dq, ctx.scale, ctx.cfg,
                                     ctx.softcap, dlse, t.window, t.tokens.position_ids, t.kv_qmin)
        return dq, dk, dv, None, None, None, None, None


def _supported(device, dtype, head_dim, name: str, capability: tuple[int, int], need: str, dtypes, head_dims
               ) -> tuple[bool, str]:
    device = torch.device(device)
    if not interpret():  # the interpreter runs every backend on the CPU
        if device.type != "cuda":
            return False, f"the {name} backend needs a CUDA GPU (got {device}; TRITON_INTERPRET=1 runs it on CPU)"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < capability:
            return False, f"GPU compute capability {major}.{minor} < {capability[0]}.{capability[1]} ({need})"
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return False, "bf16 is not supported on this GPU"
    if dtype is not None and dtype not in dtypes:
        return False, f"dtype {dtype} is not supported by {name} ({', '.join(str(d) for d in dtypes)})"
    if head_dim is not None and head_dim not in head_dims:
        return False, f"head_dim {head_dim} is not supported by {name} ({head_dims})"
    return True, ""


def triton_supported(device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> tuple[bool, str]:
    """Whether the triton backend runs for tensors on ``device`` of ``dtype`` with ``head_dim``; and why not."""
    return _supported(device, dtype, head_dim, "triton", (8, 0), "Ampere or newer needed",
                      (torch.float16, torch.bfloat16, torch.float32), SUPPORTED_HEAD_DIMS)


def split_large_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """k and v with each KV head repeated so that the GQA group is at most ``config.MAX_PACKED_GROUP`` (as they are if
    it already is): the group ``config.packed_group`` names."""
    groups = q.shape[1] // max(1, k.shape[1])
    r = groups // packed_group(groups)
    if r == 1:
        return k, v
    return k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)


def triton_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PrefixLayout,
    softmax_scale: float | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    config: TritonAttentionConfig | None = None,
):
    """Prefix-shared attention over one packed row with the Triton kernels. Differentiable in q, k, v.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (GQA; K/V are repeated in memory only for a group
            of more than ``config.MAX_PACKED_GROUP`` query heads). D in (16, 32, 64, 128); dtype float16, bfloat16 or
            float32 (all three the same).
        layout: the row's PrefixLayout, on q's device, with ``total_tokens == T``.
        softmax_scale: defaults to D ** -0.5.
        window: a sliding window in positions (``prefix_attn.prefix_attention``); None: none.
        softcap: logit soft-capping of the scaled scores; None: none.
        return_lse: also return each query's log-sum-exp (natural log, [Hq, T], differentiable).
        config: tile sizes / launch parameters (default: ``default_config``).

    Returns [T, Hq, D] in q's dtype (and the lse with ``return_lse``): query q attends to keys [lo1, hi1) U [lo2, q]
    (``layout.query_key_ranges(window)``).
    """
    T, Hq, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"triton backend: head_dim {D} not supported ({SUPPORTED_HEAD_DIMS})")
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    softcap = None if softcap is None else float(softcap)
    k, v = split_large_groups(q, k, v)
    cfg = config or default_config(D, q.dtype, q.device, Hq // max(1, k.shape[1]))
    t = build_tables(layout, cfg.tile_shape, window)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if not torch.compiler.is_compiling():
        return _EagerTritonAttention.apply(q, k, v, t, scale, cfg, softcap, return_lse)
    positions = None if t.window is None else t.tokens.position_ids
    o, lse = _fwd_op(q, k, v, t.fwd, t.ranges, t.tokens.q_hi, t.kv, t.dq, positions, t.kv_qmin, scale, cfg.as_list(),
                     softcap or 0.0, t.window or 0)
    return (o, lse * LN2) if return_lse else o


# ----------------------------------------------------------------------------------------------- FP8 forward


@torch.library.custom_op("prefix_attn::triton_fp8_fwd", mutates_args=())
def _fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sched: torch.Tensor, ranges: torch.Tensor,
            scale: float, rotate: bool, cfg: list[int]) -> torch.Tensor:
    return fp8_forward(q, k, v, sched, ranges, scale, rotate, FP8AttentionConfig.from_list(cfg))


@_fp8_op.register_fake
def _(q, k, v, sched, ranges, scale, rotate, cfg):
    return torch.empty_like(q)


def fp8_supported(device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> tuple[bool, str]:
    """Whether the FP8 forward runs for tensors on ``device`` of ``dtype`` with ``head_dim``; and why not.

    Needs FP8 tensor cores: a CUDA GPU of compute capability >= 8.9 (Ada; Hopper 9.0 is the target, the only one
    with TMA). TRITON_INTERPRET=1 runs it on the CPU (tests)."""
    return _supported(device, dtype, head_dim, "triton_fp8", (8, 9),
                      "no FP8 tensor cores: 8.9 or newer needed, Hopper 9.0 is the target",
                      (torch.float16, torch.bfloat16), SUPPORTED_HEAD_DIMS if interpret() else FP8_HEAD_DIMS)


def triton_fp8_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PrefixLayout,
    softmax_scale: float | None = None,
    *,
    rotate: bool = False,
    window: int | None = None,
    config: FP8AttentionConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefix-shared attention over one packed row, FP8 (e4m3) forward. NOT differentiable (reference model only).

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D], Hq a multiple of Hkv (GQA). float16 or bfloat16 (all three the same);
            D in (64, 128) on a GPU. Unit stride along D.
        layout: the row's PrefixLayout, on q's device, ``total_tokens == T``.
        softmax_scale: defaults to D ** -0.5.
        rotate: multiply q and k by ``rotation_matrix(D)`` (random signs, then a normalized Hadamard) before
            quantizing: q k^T is unchanged, outlier channels are spread over all channels, the FP8 error drops
            (FlashAttention-3's incoherent processing).
        window: a sliding window in positions (``prefix_attn.prefix_attention``; it reaches the kernel through the
            windowed tables alone); None: none.
        config: tiles / launch parameters (default ``fp8_default_config``).
        out: optional [T, Hq, D] contiguous output buffer in q's dtype (written, and returned).

    Returns [T, Hq, D] in q's dtype: query q attends to keys [lo1, hi1) U [lo2, q] (``layout.query_key_ranges``).
    Raises RuntimeError if grad mode is on and q, k or v requires grad.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise RuntimeError(
            "triton_fp8 attention is forward-only (for the frozen reference model): it has no backward. Call it "
            "under torch.no_grad() / inference_mode, or with inputs that do not require grad; use the 'triton' "
            "backend to train.")
    T, Hq, D = q.shape
    # Checked in eager calls only: the device-capability queries break a torch.compile graph, and the objects the
    # resumed frame then builds (the layout's cached tables) cannot be rebuilt by dynamo across the break.
    ok, why = (True, "") if torch.compiler.is_compiling() else fp8_supported(q.device, q.dtype, D)
    if not ok:
        raise ValueError(f"triton_fp8: {why}")
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    k, v = split_large_groups(q, k, v)
    groups = Hq // max(1, k.shape[1])
    cfg = config or fp8_default_config(D, q.device, groups)
    t = fp8_tables(layout, cfg, D, q.dtype, groups, window)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
            raise ValueError("out must be a contiguous tensor of q's shape and dtype")
        return fp8_forward(q, k, v, t.fwd, t.ranges, scale, rotate, cfg, out)
    if torch.compiler.is_compiling():
        return _fp8_op(q, k, v, t.fwd, t.ranges, scale, bool(rotate), cfg.as_list())
    return fp8_forward(q, k, v, t.fwd, t.ranges, scale, rotate, cfg)
