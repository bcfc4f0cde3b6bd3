"""The `flex` backend: FlexAttention with a BlockMask made directly from the layout's tile tables.

This is the prefix-sharing paper's method, kept as a baseline and a fallback. The BlockMask comes from
``BlockMask.from_kv_blocks`` with full and partial tiles separated (``PrefixLayout.block_mask_tables``), never from
``create_block_mask`` over S x S; the mask_mod reads the per-query key ranges, so partial tiles are exact.
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


def build_block_mask(layout: PrefixLayout, block_size: int = BLOCK_SIZE):
    """The layout's BlockMask (cached on the layout, so all layers of a forward share it)."""
    from torch.nn.attention.flex_attention import BlockMask

    def build():
        t = layout.block_mask_tables(block_size)
        lo1, hi1, lo2 = layout.query_key_ranges()

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

    return layout.cached(("flex_block_mask", block_size), build)


def flex_prefix_attention(q, k, v, layout: PrefixLayout, softmax_scale: float | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D] through FlexAttention (compiled on CUDA, eager elsewhere)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = build_block_mask(layout)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out = fn(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        block_mask=block_mask,
        scale=softmax_scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)
