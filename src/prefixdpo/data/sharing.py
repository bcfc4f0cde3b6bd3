"""What sharing prompts and responses in a packed row saves: the two ``prefix_sharing/*`` metrics, and their forecast.

For one micro-batch of B pairs (the trainer logs each metric's mean over the micro-batches of a logging interval):

``prefix_sharing/tokens_saved_frac`` = 1 - (tokens the packed row runs) / (tokens of TRL's layout), where TRL's layout
is every pair's two sequences, truncated prompt + chosen and truncated prompt + rejected, without padding. It counts
every saving together: each pair's prompt run once for both responses, a prompt that several pairs of the micro-batch
have run once for all of them, and each response they share run once.

``prefix_sharing/responses_deduplicated_frac`` = 1 - (branches the packed row runs) / (TRL's sequences, 2B): the
fraction of TRL's sequences whose response does not run again, because the same truncated response to the same
truncated prompt already runs in the row as another sequence's branch. 0 when every sequence has a response of its
own (pairs without repeats: each pair's chosen and rejected are two branches); with m pairs of one prompt over k
distinct responses in one micro-batch, 1 - k / (2m) (UltraFeedback's 6 pairs of 4 completions: 2/3).

:func:`predict_sharing` computes both from tokenized pairs, without a model, for micro-batches chosen by the caller
(the samplers' ``batches(epoch)`` give the trainer's).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .packing import RowTally, pair_shapes


def sharing_fractions(packed_tokens: float, unshared_tokens: float, sequences: float, branches: float):
    """(tokens_saved_frac, responses_deduplicated_frac) of counts summed over micro-batches (module docstring)."""
    return 1.0 - packed_tokens / unshared_tokens, 1.0 - branches / sequences


@dataclass
class SharingForecast:
    """:func:`predict_sharing`'s answer. ``tokens_saved_frac`` and ``responses_deduplicated_frac``: the means over
    micro-batches of the per-micro-batch values (what the trainer's logged values average to over a run on one
    process); ``*_total`` the same fractions of the counts summed over all micro-batches (weighted by tokens and by
    sequences). ``row_tokens``: the packed tokens of each micro-batch's row, in order."""

    micro_batches: int
    pairs: int
    packed_tokens: int
    unshared_tokens: int
    sequences: int
    branches: int
    tokens_saved_frac: float
    responses_deduplicated_frac: float
    tokens_saved_frac_total: float
    responses_deduplicated_frac_total: float
    row_tokens: tuple[int, ...]


def predict_sharing(
    micro_batches: Iterable[Sequence[dict]],
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    prefix_sharing: bool = True,
) -> SharingForecast:
    """Both ``prefix_sharing`` metrics for tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) grouped
    into micro-batches, counted as the collator packs them (TRL's truncation, the same sharing)."""
    tallies = []
    for batch in micro_batches:
        tally = RowTally()
        for example in batch:
            tally.add(pair_shapes(example, max_length, truncation_mode, prefix_sharing))
        if tally.sequences:
            tallies.append(tally)
    if not tallies:
        raise ValueError("predict_sharing needs at least one non-empty micro-batch")
    per_batch = [sharing_fractions(t.tokens, t.unshared_tokens, t.sequences, t.branches) for t in tallies]
    totals = [sum(getattr(t, name) for t in tallies) for name in ("tokens", "unshared_tokens", "sequences", "branches")]
    saved_total, dedup_total = sharing_fractions(*totals)
    return SharingForecast(
        micro_batches=len(tallies),
        pairs=totals[2] // 2,
        packed_tokens=totals[0],
        unshared_tokens=totals[1],
        sequences=totals[2],
        branches=totals[3],
        tokens_saved_frac=sum(f[0] for f in per_batch) / len(per_batch),
        responses_deduplicated_frac=sum(f[1] for f in per_batch) / len(per_batch),
        tokens_saved_frac_total=saved_total,
        responses_deduplicated_frac_total=dedup_total,
        row_tokens=tuple(t.tokens for t in tallies),
    )
