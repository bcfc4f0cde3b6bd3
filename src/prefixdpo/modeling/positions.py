"""Position ids of a packed row for models with multi-axis rotary positions (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
GLM-4V): image tokens get (temporal, height, width) positions, text tokens the same value on every axis.

The model's own rope-index function (``get_rope_index``) numbers each document's prompt exactly as it numbers that
prompt at the start of TRL's sequence (the numbering is a function of the sequence from its start, and a document
stands alone in the row). A branch is the prompt's last token followed by a response: that token keeps its prompt
position, and the response, which is text, continues where the rope index would continue it in TRL's sequence
prompt + response: at one past the largest position of the prompt, on every axis. A text-only document gets
0, 1, 2, ... on every axis: the layout's own position ids.
"""

from __future__ import annotations

import torch

from prefix_attn import PrefixLayout


def rope_index_function(model):
    """The model's multi-axis rope-index function (``get_rope_index`` of the model or of its inner ``model``), or
    None for a model with 1-D positions."""
    for owner in (model, getattr(model, "model", None)):
        fn = getattr(owner, "get_rope_index", None)
        if callable(fn):
            return fn
    return None


def multi_axis_position_ids(rope_index, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                            layout: PrefixLayout, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """[A, 1, T] position ids (A axes) of a packed row (``input_ids`` [T], the modality of each token
    ``mm_token_type_ids`` [T]) whose documents' images have grids ``image_grid_thw`` [images, 3] in row order.

    Runs on the host: the rope index walks each prompt in Python (one device sync for the whole row here instead of
    many inside it); the result goes to ``input_ids``'s device."""
    device = input_ids.device
    ids, types = input_ids.cpu(), mm_token_type_ids.cpu()
    prefix_lens = layout.prefix_lens.tolist()
    per_doc = layout.branches_per_doc.tolist()
    branch_lens = layout.branch_lens.tolist()
    # Each document's prompt: its prefix and the token that opens its branches (the prompt's last token).
    starts, prompts, b = [], [], 0
    pos = 0
    for prefix, nb in zip(prefix_lens, per_doc):
        starts.append(pos)
        prompts.append((pos, prefix + 1))
        pos += prefix + sum(branch_lens[b : b + nb])
        b += nb
    width = max(n for _, n in prompts)
    batch_ids = torch.zeros(len(prompts), width, dtype=ids.dtype)
    batch_types = torch.zeros(len(prompts), width, dtype=types.dtype)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for d, (start, n) in enumerate(prompts):
        batch_ids[d, :n] = ids[start : start + n]
        batch_types[d, :n] = types[start : start + n]
        mask[d, :n] = 1
    grid = image_grid_thw.cpu() if image_grid_thw is not None else None
    prompt_pos, _ = rope_index(batch_ids, mm_token_type_ids=batch_types, image_grid_thw=grid, video_grid_thw=None,
                               attention_mask=mask)
    axes = prompt_pos.shape[0]
    out = torch.empty(axes, ids.numel(), dtype=torch.long)
    b = 0
    for d, (prefix, nb) in enumerate(zip(prefix_lens, per_doc)):
        start = starts[d]
        p = prompt_pos[:, d, : prefix + 1].long()
        out[:, start : start + prefix] = p[:, :prefix]
        nxt = int(p.max()) + 1
        at = start + prefix
        for length in branch_lens[b : b + nb]:
            out[:, at] = p[:, prefix]
            out[:, at + 1 : at + length] = torch.arange(nxt, nxt + length - 1)
            at += length
        b += nb
    return out.unsqueeze(1).to(device)
