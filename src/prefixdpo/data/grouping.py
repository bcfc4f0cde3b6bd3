"""Keeping the pairs of one prompt together in a micro-batch (``group_by_prompt``).

Datasets with several pairs per prompt (UltraFeedback's 4 completions, Nectar's 7 ranked answers, N on-policy samples
per prompt) repeat each prompt, and each response in several pairs. The packed row runs a prompt once for all the
pairs of the micro-batch that have it, and each response once (``packing``), but only for pairs that land in the same
micro-batch: TRL's random order scatters them. The samplers here keep them together:

* ``batching="pairs"``: :class:`PromptGroupedSampler` orders the pairs so that the trainer's cut into
  ``per_device_*_batch_size`` pairs gives micro-batches of whole groups where it can (the number of pairs per
  micro-batch and per step is TRL's);
* ``batching="token_budget"``: ``TokenBudgetBatchSampler`` takes the groups and fills rows with them
  (``prefixdpo.data.batching``).

A group is the pairs whose tokenized ``prompt_ids`` are equal. (The packed row shares by the *truncated* prompt, which
is the prompt itself under ``keep_start``, the mode where TRL keeps every prompt whole; under ``keep_end`` pairs of
one prompt may still be cut differently and then share less.) The loss is a mean over pairs, so which pairs share a
micro-batch does not change what TRL computes for them (``aot`` and ``sft`` excepted, as for any change of
micro-batches; see ``PrefixDPOTrainer``).

Both orders are functions of (seed, epoch) only: every process of a DDP run builds the same micro-batches (accelerate
deals them out whole), and a resumed run rebuilds the interrupted epoch's. The data side imports no torch.cuda.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from .batching import TokenBudgetBatchSampler, dataset_pair_shapes, epoch_rng, packed_lengths, read_columns


def prompt_groups(dataset) -> list[list[int]]:
    """The pairs of each prompt of a tokenized dataset (``prompt_ids``): index lists in the order of each prompt's
    first pair, pairs in dataset order. Prompts are compared by (length, hash of the token ids)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, row in enumerate(read_columns(dataset, ("prompt_ids",))):
        prompt = tuple(row["prompt_ids"])
        groups.setdefault((len(prompt), hash(prompt)), []).append(i)
    return list(groups.values())


def use_prompt_groups(setting: str, groups: Sequence[Sequence[int]], sampling_strategy: str = "random") -> bool:
    """Whether micro-batches keep the pairs of a prompt together (``PrefixDPOConfig.group_by_prompt``): ``always``,
    ``never``, or ``auto``: when some prompt has several pairs and the sampling order is TRL's default (random)."""
    if setting != "auto":
        return setting == "always"
    return sampling_strategy == "random" and any(len(g) > 1 for g in groups)


class PromptGroupedSampler(Sampler[int]):
    """Pair indices in an order whose consecutive runs of ``batch_size`` are micro-batches of whole prompt groups
    where the sizes allow it.

    Per epoch (``shuffle``): shuffle the pairs within each group and the order of the groups; cut every group into
    micro-batches of ``batch_size`` pairs; lay the groups' remainders (fewer than ``batch_size`` pairs each) end to end
    and cut them into micro-batches too (a remainder that crosses a cut is split in two); shuffle the full
    micro-batches and put the one partial micro-batch, if any, last. Without ``shuffle`` (evaluation) the groups keep
    their order and their pairs theirs. Every pair appears once per epoch; ``len()`` is the number of pairs, so the
    DataLoader's batching and accelerate's sharding of it are TRL's.
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, *, shuffle: bool = True, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.groups = [list(g) for g in groups]
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self._num_pairs = sum(len(g) for g in self.groups)

    def batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of ``epoch``, in order."""
        size = self.batch_size
        groups = [list(g) for g in self.groups]
        rng = epoch_rng("prompt-groups", self.seed, epoch)
        if self.shuffle:
            for group in groups:
                rng.shuffle(group)
            rng.shuffle(groups)
        full: list[list[int]] = []
        remainders: list[int] = []
        for group in groups:
            whole = len(group) - len(group) % size
            full.extend(group[i : i + size] for i in range(0, whole, size))
            remainders.extend(group[whole:])
        full.extend(remainders[i : i + size] for i in range(0, len(remainders), size))
        partial = full.pop() if full and len(full[-1]) < size else None
        if self.shuffle:
            rng.shuffle(full)
        return full + ([partial] if partial else [])

    # ------------------------------------------------------------------ the Sampler protocol
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches(self.epoch):
            yield from batch

    def __len__(self) -> int:
        return self._num_pairs


def training_micro_batches(dataset, args, epoch: int = 0, groups: list[list[int]] | None = None) -> list[list[int]]:
    """The micro-batches of ``epoch`` as ``PrefixDPOTrainer`` draws them on one process from a tokenized ``dataset``
    with ``args`` (a ``PrefixDPOConfig``), for forecasts (``sharing.predict_sharing``): grouped by prompt where
    ``group_by_prompt`` applies, filled to the budget with ``batching="token_budget"``. Without grouping in the
    "pairs" mode TRL's sampler decides the order: a seeded shuffle stands in for its random order (another
    permutation, the same statistics), the dataset's order for ``train_sampling_strategy="sequential"``. A token-budget
    run of several epochs may split a few micro-batches in two to keep its count fixed (``TokenBudgetBatchSampler``).
    ``groups``: the pairs of each prompt where they are not the pairs of equal ``prompt_ids`` (image datasets).
    """
    seed = args.data_seed if args.data_seed is not None else args.seed
    groups = prompt_groups(dataset) if groups is None else groups
    grouping = use_prompt_groups(args.group_by_prompt, groups, args.train_sampling_strategy)
    if args.batching == "token_budget":
        shapes = dataset_pair_shapes(dataset, args.max_length, args.truncation_mode, args.prefix_sharing)
        return TokenBudgetBatchSampler(packed_lengths(shapes), args.max_tokens_per_batch, seed=seed,
                                       groups=groups if grouping else None,
                                       shapes=shapes if grouping else None).batches(epoch)
    if grouping:
        return PromptGroupedSampler(groups, args.per_device_train_batch_size, seed=seed).batches(epoch)
    singles = [[i] for i in range(len(dataset))]
    shuffle = args.train_sampling_strategy != "sequential"
    return PromptGroupedSampler(singles, args.per_device_train_batch_size, shuffle=shuffle, seed=seed).batches(epoch)
