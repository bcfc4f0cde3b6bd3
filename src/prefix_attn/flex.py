"""The `flex` backend: FlexAttention with a BlockMask made directly from the layout's tile tables.

This is the prefix-sharing paper's method, kept as a baseline and a fallback. The BlockMask comes from
``BlockMask.from_kv_blocks`` with full and partial tiles separated (``PrefixLayout.block_mask_tables``), never from
``create_block_mask`` over S x S; the mask_mod reads the per-query key ranges, so partial tiles are exact. Under a
sliding window both come from the windowed ranges (``PrefixLayout.query_key_ranges(window)``, derived from the
position ids), which are exact: tiles wholly outside the window are not in the BlockMask at all. Soft-capping is a
score_mod.
"""

from __future__ import annotations

import functools

import torch

from .layout import PrefixLayout

BLOCK_SIZE = 128


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Automatic dynamic shapes: every packed row has another length, and recompiling per length would dominate.
    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=None)  # one function per cap and device: the compiled flex_attention keeps its graph
def _softcap_mod(softcap: float, device: torch.device):
    # The cap is a captured tensor (a buffer of the compiled graph), not a Python float: for a second cap value dynamo
    # would make the float dynamic, which the score_mod lowering does not take.
    cap = torch.tensor(softcap, dtype=torch.float32, device=device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return score_mod


def build_block_mask(layout: PrefixLayout, block_size: int = BLOCK_SIZE, window: int | None = None):
    """The layout's BlockMask under ``window`` (cached on the layout, so all layers of a forward that share a window
    share it)."""
    from torch.nn.attention.flex_attention import BlockMask

    def build():
        t = layout.block_mask_tables(block_size, window)
        lo1, hi1, lo2 = layout.query_key_ranges(window)

        def mask_mod(b, h, q_idx, kv_idx):
            return ((kv_idx >= lo1[q_idx]) & (kv_idx < hi1[q_idx])) | ((kv_idx >= lo2[q_idx]) & (kv_idx <= q_idx))

        T = layout.total_tokens
        return BlockMask.from_kv_blocks(
            t["kv_num_blocks"][None, None],
            t["kv_indices"][None, None],
            t["full_kv_num_blocks"][None, None],
            t["full_kv_indices"][None, None],
            BLOCK_SIZE=block_size,
            mask_mod=mask_mod,
            seq_lengths=(T, T),
        )

    key = ("flex_block_mask", block_size) if window is None else ("flex_block_mask", block_size, window)
    return layout.cached(key, build)


def flex_prefix_attention(q, k, v, layout: PrefixLayout, softmax_scale: float | None = None, *,
                          window: int | None = None, softcap: float | None = None, return_lse: bool = False):
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D] through FlexAttention (compiled on CUDA, eager elsewhere); with
    ``return_lse``, (out, lse [Hq, T]) with the log-sum-exp in natural-log units (differentiable on CUDA)."""
    from torch.nn.attention import flex_attention as fa

    block_mask = build_block_mask(layout, window=window)
    fn = _compiled_flex() if q.is_cuda else fa.flex_attention
    kwargs = dict(block_mask=block_mask, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
                  score_mod=None if softcap is None else _softcap_mod(float(softcap), q.device))
    if return_lse:
        if hasattr(fa, "AuxRequest"):
            kwargs["return_aux"] = fa.AuxRequest(lse=True)
        else:  # torch before AuxRequest
            kwargs["return_lse"] = True
    out = fn(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
             **kwargs)
    if not return_lse:
        return out.squeeze(0).transpose(0, 1)
    out, aux = out
    lse = aux.lse if hasattr(aux, "lse") else aux
    return out.squeeze(0).transpose(0, 1), lse.squeeze(0)
