"""Token-budget micro-batches: as many pairs per packed row as fit ``max_tokens``, pairs of similar length together.

``PrefixDPOConfig(batching="token_budget", max_tokens_per_batch=T)`` replaces "``per_device_train_batch_size`` pairs
per micro-batch" with "pairs until the packed row would pass T tokens". A pair's size is what it takes in the packed
row (``packing.packed_pair_length``: the prompt once plus both responses, after TRL's truncation), and a row's size
is at most the sum of its pairs' (less where pairs share a prompt or a response), so every micro-batch the collator
packs holds at most T tokens.

With ``groups`` (the pairs of each prompt, ``prefixdpo.data.grouping``) the sampler fills micro-batches with whole
groups instead of single pairs, so a prompt and the responses its pairs share run once per row. A group is cut into
pieces that fit the budget, counted with that sharing (``packing.RowTally``); a piece is then one unit below, with its
packed length. Without groups every pair is a unit of its own.

Per epoch (the order is a function of ``seed`` and the epoch only, so every process of a DDP run builds the same
micro-batches, and a resumed run rebuilds the interrupted epoch's):

1. shuffle the units (with groups: first the pairs within each group, then cut the groups into pieces);
2. cut the shuffled list into chunks of ``chunk_size`` units (large: ~64 micro-batches' worth by default) and sort each
   chunk by packed length, longest first (length-aware grouping: a row then holds pairs of similar length, so rows of
   the same token count also cost about the same attention work, which is quadratic per document, and DDP ranks stay
   in step; the fill is about that of greedy filling in random order; the chunks keep the grouping random across
   epochs);
3. fill micro-batches greedily along the sorted chunks, one after the other: a unit joins the current micro-batch if
   it still fits, else it opens the next one (``chunk_size=1`` is thus plain greedy filling in random order);
4. shuffle the order of the micro-batches.

The number of micro-batches must be the same in every epoch: transformers' Trainer reads ``len(dataloader)`` once
and plans its optimizer steps (and the gradient-accumulation boundaries) from it. Step 3 can give a slightly
different count from one epoch to the next, so the sampler fixes its length to the largest count over the epochs the
run will use (``num_epochs``) and brings a smaller epoch up to it by splitting its micro-batches that hold the most
pairs in two. Splitting never breaks the budget (a row of fewer pairs packs to fewer tokens), and every pair still
appears exactly once per epoch.

With ``shuffle=False`` (evaluation) steps 1 and 4 are skipped and the whole set is one chunk: the tightest fill,
deterministic.

The data side imports no torch.cuda and no triton.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence

from torch.utils.data import Sampler

from .packing import PREFIX_KEY, RowTally, SequenceShape, pair_shapes

CHUNK_MICRO_BATCHES = 64  # default chunk: this many micro-batches' worth of pairs, sorted together


def read_columns(dataset, columns: Sequence[str], read_batch: int = 1024) -> Iterator[dict]:
    """The rows of ``dataset`` restricted to ``columns``; a ``datasets.Dataset`` is read in slices of columns."""
    if hasattr(dataset, "select_columns"):
        cols = dataset.select_columns(list(columns))
        for start in range(0, len(dataset), read_batch):
            part = cols[start : start + read_batch]
            yield from (dict(zip(columns, values)) for values in zip(*(part[c] for c in columns)))
        return
    for i in range(len(dataset)):
        row = dataset[i]
        yield {c: row[c] for c in columns}


def dataset_pair_shapes(
    dataset, max_length: int | None, truncation_mode: str, prefix_sharing: bool
) -> list[tuple[SequenceShape, SequenceShape]]:
    """The shapes (``packing.pair_shapes``) of every pair of a tokenized dataset (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``, and ``prefix_key`` where pairs have one): enough to count any set of its pairs' packed tokens."""
    names = getattr(dataset, "column_names", None) or (list(dataset[0]) if len(dataset) else [])
    columns = ("prompt_ids", "chosen_ids", "rejected_ids") + ((PREFIX_KEY,) if PREFIX_KEY in names else ())
    return [pair_shapes(row, max_length, truncation_mode, prefix_sharing) for row in read_columns(dataset, columns)]


def packed_lengths(shapes: Sequence[tuple[SequenceShape, SequenceShape]]) -> list[int]:
    """Packed length of each pair on its own (``packing.packed_pair_length``), from its shapes."""
    return [RowTally().add(pair) for pair in shapes]


def epoch_rng(purpose: str, seed: int, epoch: int) -> random.Random:
    """The random generator of one epoch's order, from (purpose, seed, epoch) only. A string seed is hashed with
    SHA-512 by ``random.Random``: the same stream on every process and Python run."""
    return random.Random(f"prefixdpo-{purpose}:{seed}:{epoch}")


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose packed row holds at most ``max_tokens``.

    Args:
        lengths: packed length of each pair on its own (``packed_lengths``).
        max_tokens: the token budget of one micro-batch row.
        shuffle: per-epoch random order (training); False gives one deterministic, tightest batching (evaluation).
        seed: the run's seed; epoch ``e`` uses a generator seeded from (seed, e) only.
        chunk_size: units sorted together; default ``CHUNK_MICRO_BATCHES`` micro-batches' worth (from the mean length
            of a unit).
        num_epochs: the epochs the run will iterate (0..num_epochs-1); ``len()`` is the largest micro-batch count
            among them, and every epoch yields exactly that many.
        groups: lists of pair indices to keep together (the pairs of one prompt; every pair in one group), or None.
        shapes: each pair's ``packing.pair_shapes``, to count a piece of a group with its sharing (needed with
            ``groups``).

    ``set_epoch(e)`` selects the epoch (transformers' Trainer and accelerate call it before each epoch).
    ``batch_size`` is None: accelerate's ``BatchSamplerShard`` then deals whole micro-batches of any size round-robin
    to the processes.
    """

    batch_size = None
    drop_last = False

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        chunk_size: int | None = None,
        num_epochs: int = 1,
        groups: Sequence[Sequence[int]] | None = None,
        shapes: Sequence[tuple[SequenceShape, SequenceShape]] | None = None,
    ):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens = int(max_tokens)
        too_long = [(i, n) for i, n in enumerate(self.lengths) if n > self.max_tokens]
        if too_long:
            i, n = max(too_long, key=lambda t: t[1])
            raise ValueError(
                f"{len(too_long)} pair(s) pack to more tokens than max_tokens_per_batch={self.max_tokens} allows on "
                f"their own (the longest: pair {i}, {n} tokens), so no micro-batch can hold them. A pair packs to at "
                "most 2 * max_length tokens (prompt once + both responses): raise max_tokens_per_batch to that, or "
                "lower max_length."
            )
        if groups is not None and shapes is None:
            raise ValueError("groups need the pairs' shapes, to count what a piece of a group packs to")
        self.groups = None if groups is None else [list(g) for g in groups]
        self.shapes = shapes
        self.shuffle = shuffle
        self.seed = int(seed)
        if chunk_size is None:
            units = self._units(None)
            mean = sum(n for _, n in units) / max(len(units), 1)
            chunk_size = max(1, math.ceil(CHUNK_MICRO_BATCHES * self.max_tokens / max(mean, 1.0)))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        horizon = max(1, int(num_epochs)) if shuffle else 1
        self.num_batches = max((len(self._greedy(e)) for e in range(horizon)), default=0)

    # ------------------------------------------------------------------ the batching
    def _units(self, rng: random.Random | None) -> list[tuple[list[int], int]]:
        """(pair indices, packed length) of what the fill places: every pair alone, or the pieces of the groups (each
        group's pairs in ``rng``'s order, cut where the next pair would take the piece past the budget)."""
        if self.groups is None:
            return [([i], n) for i, n in enumerate(self.lengths)]
        units = []
        for group in self.groups:
            members = list(group)
            if rng is not None:
                rng.shuffle(members)
            piece, tally = [], RowTally()
            for i in members:
                if piece and tally.tokens + tally.cost(self.shapes[i]) > self.max_tokens:
                    units.append((piece, tally.tokens))
                    piece, tally = [], RowTally()
                piece.append(i)
                tally.add(self.shapes[i])
            units.append((piece, tally.tokens))
        return units

    def _greedy(self, epoch: int) -> list[list[int]]:
        """Steps 1-4 of the module docstring, before the count is fixed."""
        rng = epoch_rng("token-budget", self.seed, epoch)
        units = self._units(rng if self.shuffle else None)
        if self.shuffle:
            rng.shuffle(units)
            chunks = [units[i : i + self.chunk_size] for i in range(0, len(units), self.chunk_size)]
        else:
            chunks = [units]
        batches: list[list[int]] = []
        batch: list[int] = []
        used = 0
        for chunk in chunks:
            # Longest first; ties keep the (shuffled) chunk order (Python's sort is stable). The last, partly filled
            # micro-batch of a chunk stays open for the next chunk's first units.
            for pairs, n in sorted(chunk, key=lambda unit: -unit[1]):
                if batch and used + n > self.max_tokens:
                    batches.append(batch)
                    batch, used = [], 0
                batch.extend(pairs)
                used += n
        if batch:
            batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of ``epoch``: exactly ``len(self)`` of them, each within the budget."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        batches = self._greedy(epoch)
        if len(batches) > self.num_batches:
            raise RuntimeError(
                f"epoch {epoch} groups into {len(batches)} micro-batches, more than the {self.num_batches} this "
                f"sampler announced for its num_epochs; build it with num_epochs > {epoch}"
            )
        # Bring the count up to len(self): split the micro-batch with the most pairs (the first such) in two halves.
        while len(batches) < self.num_batches:
            j = max(range(len(batches)), key=lambda k: len(batches[k]))
            if len(batches[j]) < 2:  # cannot happen: num_batches <= number of pairs
                raise RuntimeError("cannot split micro-batches of one pair further")
            b = batches[j]
            half = len(b) // 2
            batches[j : j + 1] = [b[:half], b[half:]]
        self._cache = (epoch, batches)
        return batches

    # ------------------------------------------------------------------ the Sampler protocol
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self.batches(self.epoch))

    def __len__(self) -> int:
        return self.num_batches


def batch_token_counts(batches: Iterable[Sequence[int]], lengths: Sequence[int]) -> list[int]:
    """Packed tokens of each micro-batch (for tests and statistics)."""
    return [sum(lengths[i] for i in b) for b in batches]
