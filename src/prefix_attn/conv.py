"""Causal short convolutions over a packed row of prefix-shared documents (LFM2's ``ShortConv`` layers).

A depthwise causal convolution of kernel L reads, at each token, the token itself and its L-1 predecessors *in its
own sequence* (the unshared prompt + response): a branch's first tokens read the end of their document's prefix, not
the previous branch. With p = pos(t) - j the position j tokens back, the predecessor is: none if p < 0 (the
sequence's left zero padding); t - j if that lies in t's own segment (t - j >= lo2[t]: the prefix for a prefix token,
its branch for a branch token); else the prefix token at position p, doc_start + p. That is the sliding window's
rule with a window of L positions, so a packed convolution is a gather of L-1 shifted copies, each weighted per lag.
Its backward (autograd's scatter-add) sums a prefix token's gradient over every branch that reads it, as the unshared
sequences sum theirs through the shared weights.
"""

from __future__ import annotations

import torch

from .layout import PrefixLayout


def sequence_predecessors(layout: PrefixLayout, lags: int) -> torch.Tensor:
    """[lags, T] int64: for lag j = 1..lags (row j - 1), the index of the token j positions before each token in its
    own sequence, or T where there is none (cached on the layout)."""

    def build():
        lo1, _, lo2 = layout.query_key_ranges()  # lo1 is the document's start for every token
        T = layout.total_tokens
        t = torch.arange(T, device=layout.device)
        j = torch.arange(1, lags + 1, device=layout.device)[:, None]
        p = layout.position_ids[None, :] - j
        src = torch.where(t - j >= lo2, t - j, lo1 + p)
        return torch.where(p >= 0, src, T)

    return layout.cached(("predecessors", lags), build)


def prefix_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         layout: PrefixLayout) -> torch.Tensor:
    """The depthwise causal convolution ``F.conv1d(x, weight[:, None], bias, padding=L - 1, groups=C)[..., :T]`` of
    every sequence of the row, computed once per packed token. x [T, C], weight [C, L], bias [C] or None; returns
    [T, C] in x's dtype, computed in the weight's dtype (as transformers' ``causal_conv1d_fn``)."""
    T, C = x.shape
    L = weight.shape[1]
    xw = x.to(weight.dtype)
    out = xw * weight[:, L - 1]
    if L > 1:
        padded = torch.cat([xw, xw.new_zeros(1, C)])  # row T: the zero a missing predecessor reads
        prev = padded[sequence_predecessors(layout, L - 1)]  # [L - 1, T, C]
        out = out + (prev * weight.t()[: L - 1].flip(0)[:, None, :]).sum(0)  # lag j: weight[:, L - 1 - j]
    if bias is not None:
        out = out + bias
    return out.to(x.dtype)


__all__ = ["prefix_causal_conv1d", "sequence_predecessors"]
