"""``prefix_attention``: the one public entry point, dispatching to a backend.

Backends (all take the same layout and must agree):
- ``reference``: dense-mask SDPA (CPU, tests, tiny models).
- ``flex``: FlexAttention with a BlockMask from the layout's tile tables (the paper's method; baseline, fallback).
- ``triton``: our Triton kernels (Hopper-tuned).
- ``fa4``: FlashAttention-4's causal varlen kernels on a per-branch decomposition of the layout (``prefix_attn.fa4``;
  the optional ``flash-attn-4`` package, Hopper or newer).
- ``sdpa``: torch's ``scaled_dot_product_attention`` (cuDNN's or FlashAttention's dense kernels) on the same
  decomposition, one call per sequence (``prefix_attn.sdpa``); no options.
- ``auto``: ``triton`` where it runs (CUDA GPU, Triton importable), else ``flex`` on CUDA, else ``reference``; on
  the ``triton`` choice, a row whose every document has a long prefix and that needs no option runs on ``sdpa``
  (``sdpa.routes_here``: the dense kernels are faster there).
- ``triton_fp8`` / ``triton_fp8_rotate``: the FP8 (e4m3) forward (``prefix_attn.triton.fp8``), without / with the
  random Hadamard rotation of q and k (FlashAttention-3's incoherent processing). Forward only (the frozen reference
  model): a call whose inputs require grad in grad mode raises. Where FP8 does not run (``fp8_supported``: CUDA
  compute capability >= 8.9, float16/bfloat16, head_dim 64 or 128) it falls back to ``triton`` (else ``auto``'s
  choice), logging a warning that names why (once per reason). The rotation is part of the name, not a flag, so that
  a trainer config's ``fp8_rotation`` reaches the kernel through the one backend string the model's attention layers
  are given.

Options (``prefix_attention``'s keywords), as transformers' attention functions take them: ``window`` (a sliding
window, in each sequence's own positions), ``softcap`` (logit soft-capping) and ``sinks`` (one learnable logit per
query head in every softmax's denominator). A backend's run function takes the options it declares in ``features``
(``window``, ``softcap`` and ``return_lse``: the log-sum-exp of every query's scores, natural log, differentiable,
[Hq, T]); sinks are no backend's business: the one epilogue ``apply_sinks`` turns any backend's (out, lse) into the
output with sinks. A call that needs an option its backend lacks runs on ``triton`` where that runs (else on
``auto``'s choice) instead, with a warning (once per reason); a window that cuts no pair of the row
(``PrefixLayout.biting_window``) is no option at all. An explicitly named backend that does not run here raises one
clear error, except the forward-only FP8 ones, which fall back as said.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .layout import PrefixLayout
from .schedule import AttentionTables, build_tables
from .sdpa import routes_here, sdpa_prefix_attention

logger = logging.getLogger(__name__)


def _reference(q, k, v, layout, scale, **options):
    from .reference import reference_attention

    return reference_attention(q, k, v, layout, scale, **options)


def _flex(q, k, v, layout, scale, **options):
    from .flex import flex_prefix_attention

    return flex_prefix_attention(q, k, v, layout, scale, **options)


def _sdpa(q, k, v, layout, scale, **options):
    return sdpa_prefix_attention(q, k, v, layout, scale)


def _triton(q, k, v, layout, scale, **options):
    try:
        from .triton import triton_prefix_attention
    except ImportError as e:
        raise ValueError(f"attention backend 'triton' is not available in this install ({e})") from e
    return triton_prefix_attention(q, k, v, layout, scale, **options)


def _fa4(q, k, v, layout, scale, **options):
    from .fa4 import fa4_prefix_attention

    return fa4_prefix_attention(q, k, v, layout, scale, **options)


def _fa4_supported(device, dtype, head_dim) -> tuple[bool, str]:
    from .fa4 import fa4_supported

    return fa4_supported(device, dtype, head_dim)


def _fp8(rotate: bool):
    def run(q, k, v, layout, scale, **options):
        from .triton import triton_fp8_prefix_attention

        return triton_fp8_prefix_attention(q, k, v, layout, scale, rotate=rotate, **options)

    return run


def _triton_supported(device, dtype, head_dim) -> tuple[bool, str]:
    try:
        from .triton import triton_supported
    except ImportError as e:  # triton missing
        return False, f"the triton backend cannot be imported ({e})"
    return triton_supported(device, dtype, head_dim)


def _fp8_supported(device, dtype, head_dim) -> tuple[bool, str]:
    try:
        from .triton import fp8_supported
    except ImportError as e:  # triton missing
        return False, f"triton_fp8 cannot be imported ({e})"
    return fp8_supported(device, dtype, head_dim)


ALL_FEATURES = frozenset({"window", "softcap", "return_lse"})
_FEATURE_NAMES = {"window": "sliding windows", "softcap": "logit soft-capping", "return_lse": "attention sinks"}


@dataclass(frozen=True)
class _Backend:
    # (q, k, v, layout, softmax_scale, **options) -> out, or (out, lse) with return_lse=True; options: those of
    # ``features`` the call needs (window=int, softcap=float, return_lse=True), no others
    run: Callable
    supported: Callable | None = None  # (device, dtype, head_dim) -> (runs here, why not); None: runs everywhere
    forward_only: bool = False  # no backward: refuses inputs that require grad, falls back where it does not run
    features: frozenset = frozenset()  # the options ``run`` takes


_BACKENDS = {
    "reference": _Backend(_reference, features=ALL_FEATURES),
    "flex": _Backend(_flex, features=ALL_FEATURES),
    "triton": _Backend(_triton, _triton_supported, features=ALL_FEATURES),
    "fa4": _Backend(_fa4, _fa4_supported, features=ALL_FEATURES),
    "sdpa": _Backend(_sdpa),
    "triton_fp8": _Backend(_fp8(rotate=False), _fp8_supported, forward_only=True, features=frozenset({"window"})),
    "triton_fp8_rotate": _Backend(_fp8(rotate=True), _fp8_supported, forward_only=True,
                                  features=frozenset({"window"})),
}
BACKENDS = ("auto", *_BACKENDS)
FP8_BACKENDS = tuple(name for name, b in _BACKENDS.items() if b.forward_only)
_warned: set[str] = set()


def _warn_once(msg: str, *args) -> None:
    key = msg % args
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def _fallback(device, dtype, head_dim) -> str:
    """Where a call goes that its backend cannot take: ``triton`` where it runs, else ``auto``'s choice."""
    return "triton" if _triton_supported(device, dtype, head_dim)[0] else resolve_backend("auto", device, dtype,
                                                                                          head_dim)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                    head_dim: int | None = None, features: frozenset = frozenset()) -> str:
    """The concrete backend ``backend`` means for tensors on ``device`` (``auto`` picks the best that runs) when the
    call needs the options ``features`` (module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        ok, why = _triton_supported(device, dtype, head_dim)
        if ok:
            return "triton"
        _warn_once("prefix_attn: the triton backend does not run here (%s); using flex", why)
        return "flex"
    b = _BACKENDS[backend]
    missing = sorted(features - b.features)
    if missing:
        fallback = _fallback(device, dtype, head_dim)
        _warn_once("prefix_attn: the %s backend has no %s; using the %s backend for those layers", backend,
                   " or ".join(_FEATURE_NAMES[f] for f in missing), fallback)
        return fallback
    if b.supported is None:
        return backend
    ok, why = b.supported(device, dtype, head_dim)
    if ok:
        return backend
    if not b.forward_only:
        raise ValueError(f"attention backend {backend!r} does not run here: {why}")
    fallback = _fallback(device, dtype, head_dim)
    _warn_once("prefix_attn: %s does not run here (%s); falling back to the %s backend (no FP8)", backend, why,
               fallback)
    return fallback


def attention_tables(layout: PrefixLayout, backend: str, dtype: torch.dtype, head_dim: int, groups: int,
                     window: int | None = None) -> AttentionTables | None:
    """Everything ``backend`` reads from ``layout`` when it runs q/k/v of ``dtype``, ``head_dim`` and ``groups`` query
    heads per KV head under the sliding ``window`` (None: none), built now (and cached on the layout).

    For the ``triton`` backend these are the per-token ranges, the position ids and the tile schedules; their shapes
    depend only on ``layout.total_tokens`` (tiles are fixed-size pieces of the row), so two layouts of one length can
    swap them by copying (``use_tables``, ``AttentionTables.copy_``), which is what a CUDA graph captured for one row
    length needs. The window is taken as given, even where it cuts no pair of this row (``prefix_attention`` would
    then read the unwindowed tables): a graph must read the same tables whatever row it replays. None for the other
    backends (their tables' shapes follow the documents)."""
    if resolve_backend(backend, layout.device, dtype, head_dim) != "triton":
        return None
    from .triton import default_config

    return build_tables(layout, default_config(head_dim, dtype, layout.device, groups).tile_shape, window)


def _check(q, k, v, layout):
    if not isinstance(layout, PrefixLayout):
        raise ValueError(f"layout must be a PrefixLayout, got {type(layout).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [total_tokens, heads, head_dim], got shape "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    T = layout.total_tokens
    if q.shape[0] != T or k.shape[0] != T or v.shape[0] != T:
        raise ValueError(f"q, k, v must have total_tokens={T} rows (the layout's), got {q.shape[0]}, {k.shape[0]}, "
                         f"{v.shape[0]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}; build it there or call layout.to()")


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention sinks as an epilogue: the output of the softmax whose denominator also holds ``exp(sinks[h])``
    (a logit with no value), from the output ``out`` [T, Hq, D] and log-sum-exp ``lse`` [Hq, T] (natural log) of the
    softmax without it: out * Z / (Z + exp(sink)) = out * sigmoid(lse - sink). Differentiable in all three (the
    gradient reaches the scores through lse); computed in fp32."""
    w = torch.sigmoid(lse.float() - sinks.float()[:, None])
    return (out.float() * w.t().unsqueeze(-1)).to(out.dtype)


def _check_options(q, softcap, sinks):
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                    and softcap > 0):
        raise ValueError(f"softcap must be a positive number (or None), got {softcap!r}")
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or sinks.shape != (q.shape[1],)):
        raise ValueError(f"sinks must be a tensor of one logit per query head, shape ({q.shape[1]},), got "
                         f"{tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    if sinks is not None and sinks.device != q.device:
        raise ValueError(f"sinks are on {sinks.device} but q is on {q.device}")


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PrefixLayout,
    softmax_scale: float | None = None,
    backend: str = "reference",
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefix-shared attention over one packed row.

    Args:
        q: [total_tokens, Hq, head_dim]. k, v: [total_tokens, Hkv, head_dim], Hq a multiple of Hkv (GQA, no repeat).
        layout: the row's :class:`PrefixLayout` (on q's device).
        softmax_scale: defaults to head_dim ** -0.5.
        backend: ``auto`` | ``triton`` | ``fa4`` | ``sdpa`` | ``flex`` | ``reference`` | ``triton_fp8`` |
            ``triton_fp8_rotate`` (the FP8 forward, without / with rotation; forward only, falls back to ``triton`` with a warning where FP8 does
            not run or lacks an option the call needs).
        window: a sliding window of this many positions (transformers' ``sliding_window``): a query sees an allowed
            key only if ``pos(q) - pos(k) < window``, positions counted per sequence as ``layout.position_ids`` does.
        softcap: logit soft-capping (Gemma 2's ``attn_logit_softcapping``): the scaled scores s become
            ``tanh(s / softcap) * softcap`` before the softmax.
        sinks: [Hq] attention sinks (gpt-oss's ``sinks``): a logit per query head joined to every softmax's
            denominator, with no value (``apply_sinks``).

    Returns [total_tokens, Hq, head_dim]: query q attends to keys [lo1, hi1) U [lo2, q] (``layout.query_key_ranges``):
    a prefix token to its prefix causally, a branch token to its document's whole prefix and its own branch causally.
    Differentiable in q, k, v (and sinks) for every backend but the FP8 ones (they raise if called with inputs that
    require grad in grad mode, also where they fall back).
    """
    _check(q, k, v, layout)
    _check_options(q, softcap, sinks)
    if (backend in _BACKENDS and _BACKENDS[backend].forward_only and torch.is_grad_enabled()
            and any(x is not None and x.requires_grad for x in (q, k, v, sinks))):
        raise RuntimeError(
            f"attention backend {backend!r} is forward-only (for the frozen reference model): it has no backward. "
            "Call it under torch.no_grad() / inference_mode, or with inputs that do not require grad; use 'triton' "
            "to train.")
    options = {}
    window = layout.biting_window(window)
    if window is not None:
        options["window"] = window
    if softcap is not None:
        options["softcap"] = float(softcap)
    if sinks is not None:
        options["return_lse"] = True
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1], frozenset(options))
    if backend == "auto" and name == "triton" and not options and routes_here(layout):
        name = "sdpa"
    out = _BACKENDS[name].run(q, k, v, layout, softmax_scale, **options)
    return out if sinks is None else apply_sinks(*out, sinks)
