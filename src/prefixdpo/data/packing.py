"""Packing tokenized preference pairs into one row of prefix-shared documents (shared/DESIGN.md, "The layout").

For a pair with prompt p (P tokens), chosen c and rejected r:

    prefix   = p[0 : P-1]
    branch 0 = [p[P-1]] + c        (the last prompt token opens each branch)
    branch 1 = [p[P-1]] + r

Truncation follows TRL 1.16's DataCollatorForPreference exactly: prompt+response is cut per sequence to
``max_length`` (``keep_start`` keeps the beginning, ``keep_end`` the end). When the two truncated sequences no longer
share a non-empty prompt (``keep_end`` cut into the prompts by different amounts, an empty prompt, or
``prefix_sharing=False``), the pair is packed unshared: each sequence is its own one-branch document, with the same
log-probs TRL computes. The data side imports no torch.cuda and no triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def truncate_sequence(prompt: list[int], completion: list[int], max_length: int | None, mode: str):
    """(kept prompt, kept completion) of prompt+completion cut as TRL's collator cuts it."""
    if max_length is None or len(prompt) + len(completion) <= max_length:
        return prompt, completion
    if mode == "keep_start":
        keep_p = prompt[:max_length]
        return keep_p, completion[: max_length - len(keep_p)]
    if mode == "keep_end":
        drop = len(prompt) + len(completion) - max_length
        if drop <= len(prompt):
            return prompt[drop:], completion
        return [], completion[drop - len(prompt) :]
    raise ValueError(f"Unsupported truncation mode: {mode!r}, expected 'keep_start' or 'keep_end'")


@dataclass
class PackedRow:
    """One packed micro-batch row, host-side lists (the collator turns them into tensors).

    ``input_ids`` [T]; the layout's ``prefix_lens`` and ``branch_lens`` (one list per document); ``targets`` [T]: the
    token a position predicts if it predicts a response token, else -100; ``view_index`` [T]: for those positions,
    the flat index into the [num_sequences, view_width - 1] per-token view (the shifted, padded TRL batch), else -1.
    ``sequence_tokens`` counts tokens of every sequence in its unshared form (prompt + response, as TRL counts them).
    """

    input_ids: list[int] = field(default_factory=list)
    prefix_lens: list[int] = field(default_factory=list)
    branch_lens: list[list[int]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    view_pos: list[tuple[int, int]] = field(default_factory=list)  # (sequence index, shifted position) per token
    shared_pairs: int = 0
    unshared_pairs: int = 0

    def _add_document(self, prefix: list[int], branches: list[tuple[int, int, list[int]]]):
        """branches: (sequence index, view offset of the branch's first token, tokens)."""
        self.input_ids.extend(prefix)
        self.targets.extend([-100] * len(prefix))
        self.view_pos.extend([(-1, -1)] * len(prefix))
        for seq, offset, toks in branches:
            self.input_ids.extend(toks)
            self.targets.extend(toks[1:] + [-100])
            self.view_pos.extend([(seq, offset + i) for i in range(len(toks) - 1)] + [(-1, -1)])
        self.prefix_lens.append(len(prefix))
        self.branch_lens.append([len(t) for _, _, t in branches])

    def add_pair(
        self,
        pair_index: int,
        num_pairs: int,
        prompt: list[int],
        chosen: list[int],
        rejected: list[int],
        max_length: int | None,
        truncation_mode: str,
        prefix_sharing: bool,
    ):
        """Add pair ``pair_index`` of a batch of ``num_pairs``; its sequences are ``pair_index`` (chosen) and
        ``num_pairs + pair_index`` (rejected), the order of TRL's batch."""
        pc, cc = truncate_sequence(prompt, chosen, max_length, truncation_mode)
        pr, cr = truncate_sequence(prompt, rejected, max_length, truncation_mode)
        seqs = ((pair_index, pc, cc), (num_pairs + pair_index, pr, cr))
        if prefix_sharing and pc == pr and len(pc) >= 1:
            P = len(pc)
            # A branch's first token is the last prompt token, at view position P-1; it predicts position P-1.
            self._add_document(pc[:-1], [(s, P - 1, [pc[-1]] + c) for s, _, c in seqs])
            self.shared_pairs += 1
            return
        for s, p, c in seqs:
            if len(p) >= 1:
                self._add_document(p[:-1], [(s, len(p) - 1, [p[-1]] + c)])
            elif len(c) >= 1:  # the prompt was cut away: the first kept token opens the branch and is not scored
                self._add_document([], [(s, 0, c)])
            else:
                raise ValueError(f"pair {pair_index}: a sequence has no tokens left after truncation")
        self.unshared_pairs += 1


def pack_pairs(
    examples: Sequence[dict],
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    prefix_sharing: bool = True,
) -> PackedRow:
    """Pack tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into one row."""
    row = PackedRow()
    n = len(examples)
    for i, ex in enumerate(examples):
        row.add_pair(
            i, n, list(ex["prompt_ids"]), list(ex["chosen_ids"]), list(ex["rejected_ids"]),
            max_length, truncation_mode, prefix_sharing,
        )
    return row


def unshared_token_count(example: dict, max_length: int | None, truncation_mode: str) -> int:
    """Tokens of a pair as TRL runs it: both (truncated) prompt+response sequences."""
    total = 0
    for key in ("chosen_ids", "rejected_ids"):
        p, c = truncate_sequence(list(example["prompt_ids"]), list(example[key]), max_length, truncation_mode)
        total += len(p) + len(c)
    return total


def packed_pair_length(
    example: dict, max_length: int | None = None, truncation_mode: str = "keep_start", prefix_sharing: bool = True
) -> int:
    """Tokens pair ``example`` takes in a packed row: exactly ``len(pack_pairs([example], ...).input_ids)``.

    A row's length is the sum of its pairs' (documents are laid end to end), so this is what a token budget counts.
    Shared: (P-1) + (1+C) + (1+R) = P + C + R + 1 after truncation; unshared: each truncated prompt+response alone.
    At most 2 * max_length (each truncated sequence is at most max_length, and sharing only removes tokens)."""
    prompt = list(example["prompt_ids"])
    pc, cc = truncate_sequence(prompt, list(example["chosen_ids"]), max_length, truncation_mode)
    pr, cr = truncate_sequence(prompt, list(example["rejected_ids"]), max_length, truncation_mode)
    if prefix_sharing and pc == pr and len(pc) >= 1:
        return len(pc) + 1 + len(cc) + len(cr)
    return len(pc) + len(cc) + len(pr) + len(cr)
