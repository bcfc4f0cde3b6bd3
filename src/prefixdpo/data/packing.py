"""Packing tokenized preference pairs into one row of prefix-shared documents (docs/DESIGN.md, "The layout contract").

TRL runs every pair as two sequences, prompt + chosen and prompt + rejected. Here each sequence becomes a branch of a
document whose prefix is its prompt:

    prefix = p[0 : P-1]
    branch = [p[P-1]] + response       (the last prompt token opens the branch; it predicts the response's first token)

Sequences of a micro-batch share a document when their truncated prompts are equal and non-empty: the prompt of a
pair runs once for both of its responses, and a prompt that several pairs have runs once for all of them. Within a
document, sequences whose truncated responses are equal share one branch, so a response that appears in several pairs
of the micro-batch runs once. Each branch position's results are read by every sequence of the branch
(``PackedRow.reads``), so the per-sequence view TRL's loss reads is the one TRL computes, and the gradients of every
pair that reads a branch flow into it.

Truncation follows TRL 1.16's DataCollatorForPreference exactly: prompt+response is cut per sequence to
``max_length`` (``keep_start`` keeps the beginning, ``keep_end`` the end). A sequence whose prompt was cut away
entirely, and every sequence with ``prefix_sharing=False``, is a document of its own (its first kept token opens the
branch and is not scored, as in TRL). A pair may carry ``prefix_key`` (``PREFIX_KEY``): its prompt then shares a
document only with prompts of equal tokens *and* equal key (for image prompts: equal placeholder tokens do not mean
equal images). The data side imports no torch.cuda and no triton.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

PREFIX_KEY = "prefix_key"


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


class SequencePlacement(NamedTuple):
    """Where one of TRL's sequences goes in a packed row.

    ``document``: the key of the document it may share (its truncated prompt), or None for a document of its own;
    ``prefix`` and ``branch``: the document's prefix tokens and the sequence's branch tokens; ``view_offset``: the
    position, in TRL's shifted per-token view, that the branch's first token predicts.
    """

    document: tuple[int, ...] | None
    prefix: list[int]
    branch: list[int]
    view_offset: int


def place_sequence(
    prompt: list[int], completion: list[int], max_length: int | None, truncation_mode: str, prefix_sharing: bool,
    prefix_key=None,
) -> SequencePlacement:
    """The placement of prompt + completion after TRL's truncation (module docstring)."""
    p, c = truncate_sequence(prompt, completion, max_length, truncation_mode)
    if p:
        document = (tuple(p) if prefix_key is None else (prefix_key, tuple(p))) if prefix_sharing else None
        return SequencePlacement(document, p[:-1], [p[-1]] + c, len(p) - 1)
    if c:  # the prompt was cut away: the first kept token opens the branch and is not scored
        return SequencePlacement(None, [], c, 0)
    raise ValueError("a sequence has no tokens left after truncation")


def pair_placements(
    example: dict, max_length: int | None, truncation_mode: str, prefix_sharing: bool
) -> tuple[SequencePlacement, SequencePlacement]:
    """(chosen, rejected) placements of a tokenized pair (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, and
    optionally ``prefix_key``)."""
    prompt = list(example["prompt_ids"])
    prefix_key = example.get(PREFIX_KEY)
    return tuple(
        place_sequence(prompt, list(example[key]), max_length, truncation_mode, prefix_sharing, prefix_key)
        for key in ("chosen_ids", "rejected_ids")
    )


@dataclass
class PackedRow:
    """One packed micro-batch row, host-side lists (the collator turns them into tensors).

    ``input_ids`` [T]; the layout's ``prefix_lens`` and ``branch_lens`` (one list per document); ``targets`` [T]: the
    token a position predicts if it predicts a response token, else -100; ``reads``: (row position, sequence, shifted
    view position) for every response token of every sequence; a branch that several sequences share is read by
    each of them. ``branch_uses``: per branch (row order), how many of TRL's sequences hold it (a prefix is held by
    the sum of its branches'). ``sequences``: TRL's sequences in the micro-batch (two per pair); ``shared_pairs``:
    pairs whose chosen and rejected sequence are in one document.
    """

    input_ids: list[int] = field(default_factory=list)
    prefix_lens: list[int] = field(default_factory=list)
    branch_lens: list[list[int]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    reads: list[tuple[int, int, int]] = field(default_factory=list)
    branch_uses: list[int] = field(default_factory=list)
    sequences: int = 0
    shared_pairs: int = 0

    @property
    def num_branches(self) -> int:
        return sum(len(b) for b in self.branch_lens)

    def add_document(self, prefix: list[int], branches: dict[tuple[int, ...], list[tuple[int, int]]]):
        """A document: ``prefix``, then one branch per key of ``branches`` (its tokens), each read by the
        (sequence, view offset) pairs listed under it."""
        self.input_ids.extend(prefix)
        self.targets.extend([-100] * len(prefix))
        for tokens, readers in branches.items():
            start = len(self.input_ids)
            self.input_ids.extend(tokens)
            self.targets.extend([*tokens[1:], -100])
            for seq, offset in readers:
                self.reads.extend((start + i, seq, offset + i) for i in range(len(tokens) - 1))
            self.branch_uses.append(len(readers))
        self.prefix_lens.append(len(prefix))
        self.branch_lens.append([len(t) for t in branches])


def pack_pairs(
    examples: Sequence[dict],
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    prefix_sharing: bool = True,
) -> PackedRow:
    """Pack tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into one row.

    Sequence ``i`` is pair i's chosen, ``len(examples) + i`` its rejected (the order of TRL's batch). Documents and
    their branches are laid out in the order they first appear; a micro-batch without repeated prompts or responses
    gets one document per pair with the chosen branch, then the rejected one.
    """
    n = len(examples)
    documents: dict = {}  # key -> (prefix, {branch tokens: [(sequence, view offset), ...]})
    row = PackedRow(sequences=2 * n)
    for i, example in enumerate(examples):
        try:
            placements = pair_placements(example, max_length, truncation_mode, prefix_sharing)
        except ValueError as e:
            raise ValueError(f"pair {i}: {e}") from None
        keys = []
        for seq, placement in zip((i, n + i), placements):
            key = placement.document if placement.document is not None else ("own", seq)
            prefix, branches = documents.setdefault(key, (placement.prefix, {}))
            branches.setdefault(tuple(placement.branch), []).append((seq, placement.view_offset))
            keys.append(key)
        row.shared_pairs += keys[0] == keys[1]
    for prefix, branches in documents.values():
        row.add_document(prefix, branches)
    return row


class SequenceShape(NamedTuple):
    """A placement reduced to what a row's length depends on: the document's key and the branch's key, each as
    (length, hash of the tokens), or ``document`` None for a document of its own; and the two lengths."""

    document: tuple[int, int] | None
    prefix_len: int
    branch: tuple[int, int]
    branch_len: int


def sequence_shape(placement: SequencePlacement) -> SequenceShape:
    document = None if placement.document is None else (len(placement.document), hash(placement.document))
    branch = tuple(placement.branch)
    return SequenceShape(document, len(placement.prefix), (len(branch), hash(branch)), len(branch))


def pair_shapes(
    example: dict, max_length: int | None, truncation_mode: str, prefix_sharing: bool
) -> tuple[SequenceShape, SequenceShape]:
    """(chosen, rejected) shapes of a tokenized pair."""
    return tuple(sequence_shape(p) for p in pair_placements(example, max_length, truncation_mode, prefix_sharing))


class RowTally:
    """Tokens and branches of a packed row, counted from the shapes of its pairs as they are added (no row is built).

    Counts exactly what :func:`pack_pairs` packs for the same pairs: a document's prefix once per distinct shared
    prompt, a branch once per distinct response within a document. Prompts and responses are compared by (length,
    hash of their tokens); two different token lists of equal length share a 64-bit hash with negligible probability.
    """

    def __init__(self):
        self.tokens = 0
        self.branches = 0
        self.sequences = 0
        self.unshared_tokens = 0  # TRL's count: every sequence's truncated prompt + response, no padding
        self._documents: set = set()
        self._branches: set = set()

    def add(self, shapes: Iterable[SequenceShape]) -> int:
        """Add sequences (e.g. one pair's two shapes); returns the tokens they add to the row."""
        return self._count(shapes, commit=True)

    def cost(self, shapes: Iterable[SequenceShape]) -> int:
        """The tokens ``add(shapes)`` would add, without adding them."""
        return self._count(shapes, commit=False)

    def _count(self, shapes: Iterable[SequenceShape], commit: bool) -> int:
        documents, branches = self._documents, self._branches
        if not commit:
            documents, branches = set(documents), set(branches)
        tokens = new_branches = sequences = unshared = 0
        for s in shapes:
            sequences += 1
            unshared += s.prefix_len + s.branch_len
            if s.document is None:
                tokens += s.prefix_len + s.branch_len
                new_branches += 1
                continue
            if s.document not in documents:
                documents.add(s.document)
                tokens += s.prefix_len
            if (s.document, s.branch) not in branches:
                branches.add((s.document, s.branch))
                tokens += s.branch_len
                new_branches += 1
        if commit:
            self.tokens += tokens
            self.branches += new_branches
            self.sequences += sequences
            self.unshared_tokens += unshared
        return tokens


def packed_pair_length(
    example: dict, max_length: int | None = None, truncation_mode: str = "keep_start", prefix_sharing: bool = True
) -> int:
    """Tokens pair ``example`` takes in a packed row on its own: exactly ``len(pack_pairs([example], ...).input_ids)``.

    Shared: (P-1) + (1+C) + (1+R) = P + C + R + 1 after truncation; unshared: each truncated prompt+response alone.
    At most 2 * max_length (each truncated sequence is at most max_length, and sharing only removes tokens). A row of
    several pairs takes at most the sum of their lengths (fewer where they share prompts or responses), so this is
    what a token budget counts."""
    return RowTally().add(pair_shapes(example, max_length, truncation_mode, prefix_sharing))
