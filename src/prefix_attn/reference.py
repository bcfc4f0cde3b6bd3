"""Pure-torch references for prefix-shared attention.

``reference_attention`` is the `reference` backend: dense-mask attention, differentiable, for CPU, tests and tiny
models. ``attention_math`` spells the computation out (scores, soft-cap, mask, sinks, softmax, weighted sum) in
whatever dtype it is given: tests run it in float64 as the truth and in the kernel's dtype to derive their tolerances
(a kernel may err at most a small multiple of what the same computation in its dtype errs; no tolerance is tuned to
pass). All functions take q [T, Hq, D], k and v [T, Hkv, D] (Hq a multiple of Hkv) and return [T, Hq, D].

The options are those of transformers' eager attention functions: ``window`` (a sliding window: query q sees key k
only if their positions differ by less than it, each sequence counting its own positions), ``softcap`` (Gemma 2's
logit soft-capping, ``tanh(s / c) * c`` on the scaled scores before the softmax) and ``sinks`` (gpt-oss's attention
sinks: one learnable logit per query head that joins each softmax's denominator and carries no value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import PrefixLayout, check_window


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_math(q, k, v, layout: PrefixLayout, softmax_scale: float | None = None, *, window: int | None = None,
                   softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit softmax(cap(q k^T * scale) + mask) v in the inputs' dtype, the window tested on the position ids and
    the sinks appended as one more logit column that is dropped after the softmax (as gpt-oss's eager attention
    does). O(T^2) memory."""
    T, Hq, D = q.shape
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    groups = Hq // k.shape[1]
    kk, vv = _expand_kv(k, groups), _expand_kv(v, groups)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = layout.dense_mask().to(q.device)
    window = check_window(window)
    if window is not None:
        pos = layout.position_ids.to(q.device)
        mask = mask & (pos[:, None] - pos[None, :] < window)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        p = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.to(scores.dtype).reshape(Hq, 1, 1).expand(Hq, T, 1)
        p = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("hqk,khd->qhd", p, vv)


def reference_attention(q, k, v, layout: PrefixLayout, softmax_scale: float | None = None, *,
                        window: int | None = None, softcap: float | None = None, return_lse: bool = False):
    """The `reference` backend: attention over the whole row with the layout's dense mask (under ``window``).

    Returns out [T, Hq, D]; with ``return_lse``, (out, lse) where lse [Hq, T] is each query's log-sum-exp of its
    (soft-capped) scaled scores in natural-log units, differentiable. Without a cap or the lse this is SDPA; with
    either, the scores are spelled out in the inputs' dtype."""
    T, Hq, D = q.shape
    groups = Hq // k.shape[1]
    mask = layout.dense_mask(window)
    if softcap is None and not return_lse:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            _expand_kv(k, groups).transpose(0, 1).unsqueeze(0),
            _expand_kv(v, groups).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=softmax_scale,
        )
        return out.squeeze(0).transpose(0, 1)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("qhd,khd->hqk", q, _expand_kv(k, groups)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), _expand_kv(v, groups))
    return (out, lse) if return_lse else out
