"""The collator: TRL's padded preference batch (the "view" TRL's loss and metrics read) plus one packed row.

The view is exactly what ``trl.DataCollatorForPreference`` returns (input_ids, attention_mask, completion_mask for
the 2B sequences, chosen first), so TRL's loss code reads the same tensors it reads in TRL. The model never runs on
the view: it runs on ``prefix_packed`` (one row, no padding, each prompt and each response of the micro-batch once),
and the per-token results are gathered into the view's shape (``prefixdpo.modeling.packed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .packing import PackedRow, pack_pairs

PACKED_KEY = "prefix_packed"


@dataclass
class PrefixPackingCollator:
    """Collate tokenized pairs into TRL's batch plus a packed prefix-shared row under ``"prefix_packed"``.

    ``prefix_packed`` holds: ``input_ids`` [1, T], ``shift_labels`` [1, T] (the response token each position
    predicts, -100 elsewhere), ``layout`` (``PrefixLayout.to_dict()``: lengths only; the device builds the rest),
    ``src`` [N] packed positions that predict response tokens and ``dst`` [N] their flat index in the
    [2B, view_width - 1] per-token view (a position of a branch that several sequences share appears once per
    sequence in ``src``; ``dst`` has no repeats), ``branch_uses`` [NB] (how many sequences hold each branch: an MoE
    aux loss weighs the row's tokens by it, as TRL's batch holds them), and ``stats`` (plain ints: packed tokens,
    TRL's tokens without padding and with it, pairs, pairs whose two sequences share a document, sequences,
    branches).
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    prefix_sharing: bool = True

    def __post_init__(self):
        self._view = DataCollatorForPreference(
            pad_token_id=self.pad_token_id, max_length=self.max_length, truncation_mode=self.truncation_mode
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._view(examples)
        row = pack_pairs(examples, self.max_length, self.truncation_mode, self.prefix_sharing)
        batch[PACKED_KEY] = packed_inputs(batch, row, len(examples))
        return batch


def packed_inputs(view: dict[str, Any], row: PackedRow, pairs: int) -> dict[str, Any]:
    """The ``prefix_packed`` entry (``PrefixPackingCollator``) of ``row``, for TRL's padded batch ``view`` of the same
    ``pairs`` pairs."""
    from prefix_attn import PrefixLayout

    layout = PrefixLayout.from_lengths(row.prefix_lens, row.branch_lens)
    width = view["input_ids"].shape[1] - 1
    src = [t for t, _, _ in row.reads]
    dst = [seq * width + pos for _, seq, pos in row.reads]
    return {
        "input_ids": torch.tensor([row.input_ids], dtype=torch.long),
        "shift_labels": torch.tensor([row.targets], dtype=torch.long),
        "layout": layout.to_dict(),
        "src": torch.tensor(src, dtype=torch.long),
        "dst": torch.tensor(dst, dtype=torch.long),
        "branch_uses": torch.tensor(row.branch_uses, dtype=torch.long),
        "stats": {
            "packed_tokens": len(row.input_ids),
            "unshared_tokens": int(view["attention_mask"].sum()),
            "padded_tokens": int(view["attention_mask"].numel()),
            "shared_pairs": row.shared_pairs,
            "pairs": pairs,
            "sequences": row.sequences,
            "branches": row.num_branches,
        },
    }
