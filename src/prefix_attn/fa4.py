"""The `fa4` backend: prefix-shared attention as standard causal varlen attention on FlashAttention-4.

FlashAttention-4 (``flash_attn.cute``, the ``flash-attn-4`` package: ``pip install "prefixdpo[fa4]"``) has no
prefix-sharing mask, but the layout decomposes into causal sequences by gathering keys and values:

- each document's first branch, with the prefix before it, is one sequence (prefix + branch 0, causal);
- every later branch is one sequence whose queries are its own tokens and whose keys and values are the prefix's
  followed by its own, gathered: with FlashAttention's bottom-right causal alignment (query i of a sequence of
  ``Lq`` queries and ``Lk`` keys sees keys ``j <= i + Lk - Lq``) its query i sees the whole prefix and branch tokens
  ``0..i``, exactly the layout's mask.

The queries stay the row as it is (the sequences' queries are contiguous in the row, in row order); only K and V are
gathered (``index_select``, whose backward adds the prefix's gradients over the branches). The cumulative sequence
lengths and the gather index are built from the layout's length tensors on their device, with no host sync: their
sizes are host integers the layout carries (``num_branches``, ``unshared_tokens``).

Options ride on FlashAttention-4's own: a sliding window of W positions is its ``window_size_left = W - 1`` (each
sequence's key offsets are the positions of the unshared prompt + response, and the window, like the causal mask, is
bottom-right aligned); soft-capping is its ``softcap``; the log-sum-exp it returns is differentiable (its backward
takes ``dlse``), which is all the sink epilogue (``ops.apply_sinks``) needs.

``varlen_causal_reference`` is the pure-torch meaning of the varlen call, so that the decomposition itself is tested
on any machine; the GPU tests hold the real kernel to float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import PrefixLayout

FA4_PACKAGE = "flash-attn-4==4.0.0b36"  # the version the private forward/backward entry points below are read from


@dataclass(frozen=True)
class VarlenPlan:
    """The layout as varlen sequences: ``cu_q`` / ``cu_k`` [num_sequences + 1] int32 (cumulative query / key lengths),
    ``kv_index`` [unshared_tokens] int64 (the row token each gathered key and value comes from), and host bounds on
    the longest sequence (``max_len``)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    kv_index: torch.Tensor
    max_len: int


def varlen_plan(layout: PrefixLayout) -> VarlenPlan:
    """The decomposition of ``layout`` (module docstring), cached on it."""

    def build():
        dev = layout.device
        nb = layout.num_branches
        doc = layout.branch_doc  # [NB] document of each branch
        prefix = layout.prefix_lens[doc]  # [NB] its document's prefix length
        first = torch.ones(nb, dtype=torch.bool, device=dev)
        first[1:] = doc[1:] != doc[:-1]  # the first branch of each document carries the prefix's queries
        q_len = layout.branch_lens + torch.where(first, prefix, 0)
        k_len = layout.branch_lens + prefix
        zero = torch.zeros(1, dtype=torch.int64, device=dev)
        cu_q = torch.cat([zero, torch.cumsum(q_len, 0)]).to(torch.int32)
        cu_k64 = torch.cat([zero, torch.cumsum(k_len, 0)])
        total_k = layout.unshared_tokens
        # Gathered key g belongs to sequence s = the branch with cu_k[s] <= g < cu_k[s + 1]; its offset o = g - cu_k[s]
        # is a prefix token (o < P: document start + o) or a branch token (branch start + o - P).
        seq = torch.repeat_interleave(torch.arange(nb, device=dev), k_len, output_size=total_k)
        offset = torch.arange(total_k, device=dev) - cu_k64[seq]
        p = prefix[seq]
        source = torch.where(offset < p, layout.doc_starts[doc[seq]] + offset,
                             layout.branch_starts[seq] + offset - p)
        return VarlenPlan(cu_q, cu_k64.to(torch.int32), source, layout.max_doc_span)

    return layout.cached("fa4_varlen_plan", build)


def varlen_causal_reference(q, k, v, cu_q, cu_k, softmax_scale: float, window: int | None = None,
                            softcap: float | None = None, return_lse: bool = False):
    """What FlashAttention's varlen causal call computes (bottom-right alignment), in plain torch, sequence by
    sequence: q [total_q, Hq, D], k/v [total_k, Hkv, D] -> [total_q, Hq, D] (and the lse [Hq, total_q], natural log,
    with ``return_lse``). ``window``: keys at most ``window - 1`` positions before the query (a sliding window of
    ``window`` keys); ``softcap``: ``tanh(s / c) * c`` on the scaled scores. For tests; O(sum of Lq * Lk)."""
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[1], q.shape[0]))
    groups = q.shape[1] // k.shape[1]
    for s in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        qs, ks, vs = q[q0:q1], k[k0:k1].repeat_interleave(groups, 1), v[k0:k1].repeat_interleave(groups, 1)
        i = torch.arange(q1 - q0, device=q.device)[:, None] + (k1 - k0) - (q1 - q0)  # aligned query index
        j = torch.arange(k1 - k0, device=q.device)[None, :]
        allowed = j <= i
        if window is not None:
            allowed &= j > i - window
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse[:, q0:q1] = torch.logsumexp(scores, -1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[:, q0:q1, None]), vs)
    return (out, lse) if return_lse else out


def fa4_available() -> tuple[bool, str]:
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError as e:
        return False, f"FlashAttention-4 is not installed ({e}); pip install \"prefixdpo[fa4]\" ({FA4_PACKAGE})"
    return True, ""


def fa4_supported(device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> tuple[bool, str]:
    """Whether the ``fa4`` backend runs for tensors on ``device`` of ``dtype`` with ``head_dim``; and why not."""
    device = torch.device(device)
    ok, why = fa4_available()
    if not ok:
        return ok, why
    if device.type != "cuda":
        return False, "FlashAttention-4 needs a CUDA GPU"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        return False, f"FlashAttention-4 needs compute capability 9.0 or newer, got {major}.x"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False, f"FlashAttention-4 takes float16 or bfloat16, got {dtype}"
    if head_dim is not None and (head_dim % 8 or not 8 <= head_dim <= 256):
        return False, f"FlashAttention-4 takes head dims 8..256 in steps of 8, got {head_dim}"
    return True, ""


# FlashAttention-4's own forward and backward (the entry points its varlen autograd function calls), wrapped as custom
# ops so that torch.compile traces through the backend as it does through the triton one.


@torch.library.custom_op("prefix_attn::fa4_varlen_fwd", mutates_args=())
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
             max_len: int, scale: float, window_left: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    # window_left: FlashAttention's window_size_left, -1 for none; softcap: 0.0 for none
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_len,
                                   max_seqlen_k=max_len, softmax_scale=scale, causal=True, softcap=softcap or None,
                                   window_size_left=None if window_left < 0 else window_left, return_lse=True)
    return out, lse


@_fa4_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_len, scale, window_left, softcap):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("prefix_attn::fa4_varlen_bwd", mutates_args=())
def _fa4_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, dlse: torch.Tensor | None, cu_q: torch.Tensor, cu_k: torch.Tensor, max_len: int,
             scale: float, window_left: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, do.contiguous(), lse, scale, True, softcap,
                                 window_size_left=None if window_left < 0 else window_left, cu_seqlens_q=cu_q,
                                 cu_seqlens_k=cu_k, max_seqlen_q=max_len, max_seqlen_k=max_len,
                                 dlse=None if dlse is None else dlse.to(lse.dtype).contiguous())
    return dq, dk, dv


@_fa4_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, cu_q, cu_k, max_len, scale, window_left, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_len, scale, window_left, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_len, ctx.scale, ctx.window_left, ctx.softcap = max_len, scale, window_left, softcap
    # An unused lse (no sinks) then reaches the backward as None, not as zeros: FlashAttention-4's backward takes no
    # dlse on that path, as benchmarked (and some of its kernels refuse one).
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if do is None:  # only the lse was used
        do = torch.zeros_like(out)
    dq, dk, dv = _fa4_bwd(do, q, k, v, out, lse, dlse, cu_q, cu_k, ctx.max_len, ctx.scale, ctx.window_left,
                          ctx.softcap)
    return dq, dk, dv, None, None, None, None, None, None


_fa4_fwd.register_autograd(_backward, setup_context=_setup)


def fa4_prefix_attention(q, k, v, layout: PrefixLayout, softmax_scale: float | None = None, *,
                         window: int | None = None, softcap: float | None = None, return_lse: bool = False,
                         varlen=None):
    """Prefix-shared attention over one packed row through FlashAttention-4 (module docstring). q [T, Hq, D],
    k/v [T, Hkv, D] -> [T, Hq, D], and with ``return_lse`` the log-sum-exp [Hq, T] (natural log); differentiable
    in q, k, v (and through the lse). ``window`` and ``softcap`` as ``prefix_attention`` takes them. ``varlen``: the
    varlen causal function ``(q, k_gathered, v_gathered, cu_q, cu_k, max_len, scale, window, softcap) -> (out, lse)``
    (FlashAttention-4's by default; tests pass one built on ``varlen_causal_reference``)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    plan = varlen_plan(layout)
    k_g = k.index_select(0, plan.kv_index)
    v_g = v.index_select(0, plan.kv_index)
    if varlen is None:
        out, lse = _fa4_fwd(q.contiguous(), k_g, v_g, plan.cu_q, plan.cu_k, plan.max_len, scale,
                            -1 if window is None else window - 1, float(softcap or 0.0))
    else:
        out, lse = varlen(q, k_g, v_g, plan.cu_q, plan.cu_k, plan.max_len, scale, window, softcap)
    return (out, lse) if return_lse else out
