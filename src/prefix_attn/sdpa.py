"""The `sdpa` backend: the per-branch decomposition of the layout (``prefix_attn.fa4``'s) on torch's
``scaled_dot_product_attention``, one call per sequence; and when ``auto`` routes a row here.

- Each document's prefix with its first branch is one causal sequence, a contiguous slice of the row. SDPA with
  ``is_causal`` runs it on the fastest dense kernel torch has for the GPU (cuDNN's or FlashAttention's).
- Each later branch attends to the prefix and to itself: its keys and values are the prefix's followed by its own
  (concatenated), under a bottom-right causal mask (query i sees the whole prefix and branch tokens 0..i).
- The sequences' outputs, in row order, are the row's output. Autograd adds the prefix's key and value gradients over
  the sequences that read them.

GQA: K and V are repeated to the query heads (as transformers' ``repeat_kv`` does for SDPA).

Why it exists: at long prompts the prefix's causal block is most of a row's attention, and a dense causal kernel runs
it faster per FLOP than our Triton backward does (docs/PERFORMANCE.md). So ``auto`` sends a row here when every
document in it has a prefix of at least ``DENSE_PREFIX_MIN`` tokens and the call needs no option (window, soft-cap,
sinks), and keeps the Triton kernels for everything else (short documents, many branches, the options).

The sequence boundaries are host integers: the layout's lengths are read to the host once per layout (one device
sync, cached on the layout). ``routes_here`` asks for them only when the row's longest document could qualify
(``max_doc_span``, a host integer), so rows of short documents never sync. Not under ``torch.compile`` or CUDA-graph
capture (both keep the Triton kernels). The dense kernels' backward is not bitwise reproducible (FlashAttention's and
cuDNN's accumulate dq with atomics unless torch's deterministic mode is on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .layout import PrefixLayout

# The prefix length from which ``auto`` runs a row here. End to end (1B shape, one pair per step, an H200:
# docs/PERFORMANCE.md), against the Triton kernels with their Gluon backward, the decomposition was 0.95x at a
# 16K-token prompt and 1.01x at 32K; against the plain-Triton backward before it, 1.05x at 32K, 1.15x at 64K and 1.31x
# at 128K. Attention alone its forward+backward is faster at long prefixes, its forward not, and a step runs three
# forwards (policy, checkpoint recompute, reference) for one backward. The measured crossover.
DENSE_PREFIX_MIN = 32000


def host_documents(layout: PrefixLayout) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """(first token, prefix length, branch lengths) of each document, as host integers (one sync, cached)."""

    def build():
        d = layout.num_docs
        flat = torch.cat([layout.prefix_lens.long(), layout.branches_per_doc.long(), layout.branch_lens.long()])
        flat = flat.tolist()  # the one sync
        prefix, per_doc, lens = flat[:d], flat[d:2 * d], flat[2 * d:]
        docs, start, b = [], 0, 0
        for p, n in zip(prefix, per_doc):
            branches = tuple(lens[b:b + n])
            docs.append((start, p, branches))
            start += p + sum(branches)
            b += n
        return tuple(docs)

    return layout.cached("host_documents", build)


def routes_here(layout: PrefixLayout, threshold: int | None = None) -> bool:
    """Whether ``auto`` runs this row on the decomposition: every document's prefix has at least ``threshold``
    (default ``DENSE_PREFIX_MIN``) tokens, and the call is not being compiled or captured."""
    threshold = DENSE_PREFIX_MIN if threshold is None else threshold
    if layout.num_docs == 0 or layout.max_doc_span <= threshold:
        return False
    if torch.compiler.is_compiling() or (layout.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False
    return min(p for _, p, _ in host_documents(layout)) >= threshold


# cuDNN's fused attention first: on Hopper it is the fastest of torch's kernels (docs/PERFORMANCE.md), and torch's
# own order puts FlashAttention-2 before it. A call cuDNN does not take (a boolean mask, a head dim it lacks, the
# CPU) goes down the list.
_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _attend(q, k, v, scale, mask=None, causal=False):
    """SDPA of q [L, Hq, D] over k, v [S, Hkv, D] (K/V repeated to Hq heads), as [L, Hq, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    with sdpa_kernel(_PRIORITY, set_priority=True):
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask, is_causal=causal, scale=scale)
    return out[0].transpose(0, 1)


def _branch_mask(layout: PrefixLayout, p: int, n: int, device) -> torch.Tensor:
    """The bottom-right causal mask [n, p + n] of a later branch of n tokens over a prefix of p, built once per layout
    and shape (every layer of a forward asks for the same ones)."""
    masks = layout.cached("sdpa_branch_masks", dict)
    key = (p, n, str(device))
    if key not in masks:
        masks[key] = torch.ones(n, p + n, dtype=torch.bool, device=device).tril(diagonal=p)
    return masks[key]


def sdpa_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PrefixLayout,
                          softmax_scale: float | None = None) -> torch.Tensor:
    """Prefix-shared attention over one packed row (``prefix_attention``'s contract), one SDPA call per sequence of
    the decomposition (module docstring). q [T, Hq, D]; k, v [T, Hkv, D]."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    pieces = []
    for start, p, branches in host_documents(layout):
        first_end = start + p + branches[0]
        pieces.append(_attend(q[start:first_end], k[start:first_end], v[start:first_end], scale, causal=True))
        b0 = first_end
        for n in branches[1:]:
            b1 = b0 + n
            if p == 0:
                pieces.append(_attend(q[b0:b1], k[b0:b1], v[b0:b1], scale, causal=True))
            else:
                keys = torch.cat([k[start:start + p], k[b0:b1]])
                values = torch.cat([v[start:start + p], v[b0:b1]])
                pieces.append(_attend(q[b0:b1], keys, values, scale, mask=_branch_mask(layout, p, n, q.device)))
            b0 = b1
    return torch.cat(pieces) if pieces else torch.empty_like(q)
