"""Token-budget micro-batches: as many pairs per packed row as fit ``max_tokens``, pairs of similar length together.

``PrefixDPOConfig(batching="token_budget", max_tokens_per_batch=T)`` replaces "``per_device_train_batch_size`` pairs
per micro-batch" with "pairs until the packed row would pass T tokens". A pair's size is what it takes in the packed
row (``packing.packed_pair_length``: the prompt once plus both responses, after TRL's truncation), and a row's size
is the sum of its pairs', so every micro-batch the collator packs holds at most T tokens.

Per epoch (the order is a function of ``seed`` and the epoch only, so every process of a DDP run builds the same
micro-batches, and a resumed run rebuilds the interrupted epoch's):

1. shuffle the pairs;
2. cut the shuffled list into chunks of ``chunk_size`` pairs (large: ~64 micro-batches' worth by default) and sort each
   chunk by packed length, longest first (length-aware grouping: a row then holds pairs of similar length, so rows of
   the same token count also cost about the same attention work, which is quadratic per document, and DDP ranks stay
   in step; the fill is about that of greedy filling in random order; the chunks keep the grouping random across
   epochs);
3. fill micro-batches greedily along the sorted chunks, one after the other: a pair joins the current micro-batch if
   it still fits, else it opens the next one (``chunk_size=1`` is thus plain greedy filling in random order);
4. shuffle the order of the micro-batches.

The number of micro-batches must be the same in every epoch: transformers' Trainer reads ``len(dataloader)`` once
and plans its optimizer steps (and the gradient-accumulation boundaries) from it. Step 3 can give a slightly
different count from one epoch to the next, so the sampler fixes its length to the largest count over the epochs the
run will use (``num_epochs``) and brings a smaller epoch up to it by splitting its micro-batches that hold the most
pairs in two. Splitting never breaks the budget, and every pair still appears exactly once per epoch.

With ``shuffle=False`` (evaluation) steps 1 and 4 are skipped and the whole set is one chunk: the tightest fill,
deterministic.

The data side imports no torch.cuda and no triton.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence

from torch.utils.data import Sampler

from .packing import packed_pair_length

CHUNK_MICRO_BATCHES = 64  # default chunk: this many micro-batches' worth of pairs, sorted together


def packed_lengths(
    dataset, max_length: int | None, truncation_mode: str, prefix_sharing: bool, read_batch: int = 1024
) -> list[int]:
    """Packed length of every pair of a tokenized dataset (``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    lengths: list[int] = []
    n = len(dataset)
    if hasattr(dataset, "select_columns"):  # datasets.Dataset: read the three columns in slices
        cols = dataset.select_columns(list(keys))
        for start in range(0, n, read_batch):
            part = cols[start : start + read_batch]
            for p, c, r in zip(part["prompt_ids"], part["chosen_ids"], part["rejected_ids"]):
                lengths.append(
                    packed_pair_length(
                        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}, max_length, truncation_mode,
                        prefix_sharing,
                    )
                )
        return lengths
    for i in range(n):
        lengths.append(packed_pair_length(dataset[i], max_length, truncation_mode, prefix_sharing))
    return lengths


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random.Random`: the same stream on every process and Python run.
    return random.Random(f"prefixdpo-token-budget:{seed}:{epoch}")


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose packed lengths sum to at most ``max_tokens``.

    Args:
        lengths: packed length of each pair (``packed_lengths``).
        max_tokens: the token budget of one micro-batch row.
        shuffle: per-epoch random order (training); False gives one deterministic, tightest batching (evaluation).
        seed: the run's seed; epoch ``e`` uses a generator seeded from (seed, e) only.
        chunk_size: pairs sorted together; default ``CHUNK_MICRO_BATCHES`` micro-batches' worth (from the mean length).
        num_epochs: the epochs the run will iterate (0..num_epochs-1); ``len()`` is the largest micro-batch count
            among them, and every epoch yields exactly that many.

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
        self.shuffle = shuffle
        self.seed = int(seed)
        if chunk_size is None:
            mean = sum(self.lengths) / max(len(self.lengths), 1)
            chunk_size = max(1, math.ceil(CHUNK_MICRO_BATCHES * self.max_tokens / max(mean, 1.0)))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        horizon = max(1, int(num_epochs)) if shuffle else 1
        self.num_batches = max((len(self._greedy(e)) for e in range(horizon)), default=0)

    # ------------------------------------------------------------------ the batching
    def _greedy(self, epoch: int) -> list[list[int]]:
        """Steps 1-4 of the module docstring, before the count is fixed."""
        order = list(range(len(self.lengths)))
        rng = _epoch_rng(self.seed, epoch)
        if self.shuffle:
            rng.shuffle(order)
            chunks = [order[i : i + self.chunk_size] for i in range(0, len(order), self.chunk_size)]
        else:
            chunks = [order]
        batches: list[list[int]] = []
        batch: list[int] = []
        used = 0
        for chunk in chunks:
            # Longest first; ties keep the (shuffled) chunk order (Python's sort is stable). The last, partly filled
            # micro-batch of a chunk stays open for the next chunk's first pairs.
            for i in sorted(chunk, key=lambda i: -self.lengths[i]):
                n = self.lengths[i]
                if batch and used + n > self.max_tokens:
                    batches.append(batch)
                    batch, used = [], 0
                batch.append(i)
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
