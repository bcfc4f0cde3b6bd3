"""Pure-torch references for prefix-shared attention.

``reference_attention`` is the `reference` backend: dense-mask SDPA, differentiable, for CPU, tests and tiny models.
``attention_math`` spells the computation out (scores, mask, softmax, weighted sum) in whatever dtype it is given:
tests run it in float64 as the truth and in the kernel's dtype to derive their tolerances (a kernel may err at most a
small multiple of what the same computation in its dtype errs; no tolerance is tuned to pass).
All functions take q [T, Hq, D], k and v [T, Hkv, D] (Hq a multiple of Hkv) and return [T, Hq, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import PrefixLayout


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_math(q, k, v, layout: PrefixLayout, softmax_scale: float | None = None) -> torch.Tensor:
    """Explicit softmax(q k^T * scale + mask) v in the inputs' dtype. O(T^2) memory."""
    T, Hq, D = q.shape
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    groups = Hq // k.shape[1]
    kk, vv = _expand_kv(k, groups), _expand_kv(v, groups)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    scores = scores.masked_fill(~layout.dense_mask().to(q.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, vv)


def reference_attention(q, k, v, layout: PrefixLayout, softmax_scale: float | None = None) -> torch.Tensor:
    """Dense-mask SDPA over the whole row (the `reference` backend)."""
    T, Hq, D = q.shape
    groups = Hq // k.shape[1]
    mask = layout.dense_mask()
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        _expand_kv(k, groups).transpose(0, 1).unsqueeze(0),
        _expand_kv(v, groups).transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        scale=softmax_scale,
    )
    return out.squeeze(0).transpose(0, 1)
