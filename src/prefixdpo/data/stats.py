"""Length accounting: what the trainer will run, counted before it runs. Used by ``prefixdpo data-stats``, the
quickstart, and the trainer's own report of the pairs ``max_length`` drops or cuts.

Every count follows the trainer's rules exactly: TRL's tokenization (``tokenize_preference_dataset``), TRL's
``max_length`` rule (a pair whose prompt alone fills ``max_length`` is dropped under ``keep_start``; every other
sequence prompt+response is cut to ``max_length``), and the packed layout's length of each pair
(``packing.packed_pair_length``). Three token counts per dataset, with one definition each:

* ``tokens_trl``: what TRL runs without padding, prompt+chosen and prompt+rejected per pair, truncated;
* ``tokens_trl_padded``: what TRL's padded batches hold (each micro-batch of ``batch_size`` pairs padded to its
  longest sequence);
* ``tokens_packed``: what the packed rows hold (the prompt once per pair, no padding).

``tokens_saved_frac = 1 - tokens_packed / tokens_trl`` is the logged metric ``prefix_sharing/tokens_saved_frac`` (the
trainer logs it per step; this is the same ratio over the whole dataset), and ``trl_padding_frac = 1 - tokens_trl /
tokens_trl_padded`` is ``packing/trl_padding_frac``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace

from .formats import PreferenceDataError, ensure_pad_token
from .packing import packed_pair_length, truncate_sequence

logger = logging.getLogger(__name__)

BUDGET_ROUND = 256  # suggested token budgets are rounded up to a multiple of this


def tokenize_preference_dataset(dataset, tokenizer, num_proc: int | None = None):
    """Tokenize exactly as TRL's DPOTrainer does (``DPOTrainer._prepare_dataset``: prompt extraction, eos on text
    responses, chat template, the prompt/completion split), without dropping anything for ``max_length``.

    Returns the dataset with ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` columns added.
    """
    from trl import DPOTrainer

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ensure_pad_token(tok)
    host = SimpleNamespace(_tokenizer=tok)
    args = SimpleNamespace(dataset_num_proc=num_proc, max_length=None, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(host, dataset, tokenizer, args, "preference")


def tokenized_lengths(dataset) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token counts from a dataset with ``prompt_ids``/``chosen_ids``/``rejected_ids``."""
    lens = dataset.map(
        lambda ex: {
            "_p": len(ex["prompt_ids"]),
            "_c": len(ex["chosen_ids"]),
            "_r": len(ex["rejected_ids"]),
        },
        remove_columns=dataset.column_names,
    )
    return lens["_p"], lens["_c"], lens["_r"]


@dataclass
class OverlongReport:
    """Pairs that do not fit ``max_length`` as TRL 1.16 applies it (each of prompt+chosen and prompt+rejected)."""

    n_pairs: int
    max_length: int | None
    truncation_mode: str
    dropped: int = 0  # the prompt alone fills max_length: TRL drops the pair (keep_start)
    truncated: int = 0  # prompt + a response is longer than max_length: tokens are cut
    tokens_cut: int = 0
    first_dropped: int | None = None
    first_truncated: int | None = None


def report_overlong_pairs(
    prompt_lens, chosen_lens, rejected_lens, max_length: int | None, truncation_mode: str = "keep_start",
    name: str = "train",
) -> OverlongReport:
    """Count (and log at WARNING) the pairs that cannot fit ``max_length``, given their tokenized lengths.

    TRL's rule, which the trainer applies: with ``truncation_mode="keep_start"`` a pair whose prompt alone has
    ``max_length`` tokens or more is dropped; any other pair whose prompt+chosen or prompt+rejected is longer than
    ``max_length`` is truncated to it. This function changes nothing; it makes both visible.
    """
    report = OverlongReport(len(prompt_lens), max_length, truncation_mode)
    if max_length is None:
        return report
    for i, (p, c, r) in enumerate(zip(prompt_lens, chosen_lens, rejected_lens, strict=True)):
        if truncation_mode == "keep_start" and p >= max_length:
            report.dropped += 1
            if report.first_dropped is None:
                report.first_dropped = i
            continue
        cut = max(0, p + c - max_length) + max(0, p + r - max_length)
        if cut:
            report.truncated += 1
            report.tokens_cut += cut
            if report.first_truncated is None:
                report.first_truncated = i
    if report.dropped:
        logger.warning(
            "%s dataset: %d of %d pairs have a prompt of max_length=%d tokens or more and will be dropped (e.g. row "
            "%d). Raise max_length, or shorten/filter those prompts.", name, report.dropped, report.n_pairs,
            max_length, report.first_dropped,
        )
    if report.truncated:
        logger.warning(
            "%s dataset: %d of %d pairs are longer than max_length=%d and will be truncated (%d tokens cut in all, "
            "e.g. row %d). Raise max_length to keep them whole; `prefixdpo data-stats` suggests a value.",
            name, report.truncated, report.n_pairs, max_length, report.tokens_cut, report.first_truncated,
        )
    return report


def report_prepared_dataset(n_before: int, prepared, max_length: int | None, truncation_mode: str,
                            name: str = "train") -> OverlongReport:
    """After the trainer tokenized a split: say how many pairs TRL's max_length rule dropped and how many it will
    truncate. Raises PreferenceDataError when none is left."""
    dropped = n_before - len(prepared)
    if dropped:
        logger.warning(
            "%s dataset: %d of %d pairs were dropped because the prompt alone has max_length=%s tokens or more "
            "(TRL's rule with truncation_mode='keep_start'). Raise max_length or filter long prompts.",
            name, dropped, n_before, max_length,
        )
    if len(prepared) == 0:
        raise PreferenceDataError(
            f"no {name} pairs left to train on: all {n_before} were dropped because their prompt alone has "
            f"max_length={max_length} tokens or more; raise max_length or filter long prompts"
        )
    report = report_overlong_pairs(*tokenized_lengths(prepared), max_length, truncation_mode, name=name)
    report.dropped += dropped
    return report


def _percentiles(values, qs=(50, 90, 95, 99, 100)) -> dict[str, float]:
    if not values:
        return {f"p{q}" if q < 100 else "max": 0 for q in qs} | {"mean": 0.0}
    s = sorted(values)
    out = {}
    for q in qs:
        k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
        out[f"p{q}" if q < 100 else "max"] = s[k]
    out["mean"] = sum(s) / len(s)
    return out


def kept_by_max_length(pairs, max_length: int | None, truncation_mode: str) -> list[int]:
    """Indices of the pairs TRL's ``max_length`` rule keeps (under ``keep_start`` it drops a pair whose prompt alone
    has ``max_length`` tokens or more)."""
    if max_length is None or truncation_mode != "keep_start":
        return list(range(len(pairs)))
    return [i for i, ex in enumerate(pairs) if len(ex["prompt_ids"]) < max_length]


def dataset_statistics(pairs, micro_batches=None, batch_size: int = 8, max_length: int | None = None,
                       truncation_mode: str = "keep_start", prefix_sharing: bool = True, pairs_in: int | None = None
                       ) -> dict:
    """What training on the tokenized ``pairs`` (dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``) runs,
    counted with the trainer's rules (module docstring). ``pairs`` are those TRL's max_length rule keeps
    (:func:`kept_by_max_length`; ``pairs_in`` is how many there were before, for the report). ``micro_batches``: lists
    of indices into ``pairs`` as the trainer draws them (``grouping.training_micro_batches``); by default
    ``batch_size`` consecutive pairs. The packed tokens and both ``prefix_sharing/*`` fractions come from
    ``sharing.predict_sharing``, the trainer's own definition.

    Raises PreferenceDataError when no pair would train."""
    from .sharing import predict_sharing

    pairs = list(pairs)
    n_in = len(pairs) if pairs_in is None else pairs_in
    if not pairs:
        raise PreferenceDataError(
            f"no pair would train: all {n_in} pairs have a prompt of max_length={max_length} tokens or more "
            "(TRL drops them); raise max_length or filter long prompts"
        )
    if micro_batches is None:
        micro_batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    prompt_l, chosen_l, rejected_l, packed = [], [], [], []
    longest_seq = []  # per pair, its longer truncated sequence: what TRL's padded batch pads to
    truncated = 0
    for ex in pairs:
        prompt = list(ex["prompt_ids"])
        pc, cc = truncate_sequence(prompt, list(ex["chosen_ids"]), max_length, truncation_mode)
        pr, cr = truncate_sequence(prompt, list(ex["rejected_ids"]), max_length, truncation_mode)
        if len(pc) + len(cc) < len(prompt) + len(ex["chosen_ids"]) or len(pr) + len(cr) < len(prompt) + len(
                ex["rejected_ids"]):
            truncated += 1
        prompt_l.append(max(len(pc), len(pr)))
        chosen_l.append(len(cc))
        rejected_l.append(len(cr))
        packed.append(packed_pair_length(ex, max_length, truncation_mode, prefix_sharing))
        longest_seq.append(max(len(pc) + len(cc), len(pr) + len(cr)))
    forecast = predict_sharing([[pairs[i] for i in b] for b in micro_batches], max_length, truncation_mode,
                               prefix_sharing)
    padded = sum(2 * len(b) * max(longest_seq[i] for i in b) for b in micro_batches if b)
    row_tokens = list(forecast.row_tokens)
    tokens_trl, tokens_packed = forecast.unshared_tokens, forecast.packed_tokens
    longest = max(packed)
    floor = max(longest, max_length or 0, max(row_tokens))
    return {
        "pairs_in": n_in,
        "pairs": len(pairs),
        "pairs_dropped": n_in - len(pairs),
        "pairs_truncated": truncated,
        "micro_batches": len(row_tokens),
        "batch_size": batch_size,
        "max_length": max_length,
        "truncation_mode": truncation_mode,
        "prompt": _percentiles(prompt_l),
        "chosen": _percentiles(chosen_l),
        "rejected": _percentiles(rejected_l),
        "packed_pair": _percentiles(packed),
        "tokens_trl_padded": padded,
        "tokens_trl": tokens_trl,
        "tokens_packed": tokens_packed,
        "saved_by_prefix_sharing": tokens_trl - tokens_packed,
        "saved_by_packing": padded - tokens_trl,
        "tokens_saved_frac": forecast.tokens_saved_frac_total,
        "tokens_saved_frac_mean": forecast.tokens_saved_frac,
        "responses_deduplicated_frac": forecast.responses_deduplicated_frac_total,
        "responses_deduplicated_frac_mean": forecast.responses_deduplicated_frac,
        "trl_padding_frac": 1 - tokens_trl / padded,
        "prompt_to_response_ratio": sum(prompt_l) / max(1, (sum(chosen_l) + sum(rejected_l)) / 2),
        "micro_batch_row_tokens": _percentiles(row_tokens),
        "longest_packed_pair": longest,
        "suggested_token_budget": int(math.ceil(floor / BUDGET_ROUND) * BUDGET_ROUND),
    }


def training_statistics(tokenized, args) -> dict:
    """:func:`dataset_statistics` of a tokenized dataset as ``PrefixDPOTrainer`` with ``args`` trains it: the pairs TRL
    keeps, in the micro-batches the trainer draws in the first epoch."""
    from .grouping import training_micro_batches

    kept = tokenized.select(kept_by_max_length(tokenized, args.max_length, args.truncation_mode))
    micro_batches = training_micro_batches(kept, args) if len(kept) else []
    return dataset_statistics(list(kept), micro_batches, batch_size=args.per_device_train_batch_size,
                              max_length=args.max_length, truncation_mode=args.truncation_mode,
                              prefix_sharing=args.prefix_sharing, pairs_in=len(tokenized))


def format_statistics(stats: dict) -> str:
    """A small plain-text table of :func:`dataset_statistics`."""
    lines = [f"{stats['pairs']} pairs train ({stats['pairs_dropped']} of {stats['pairs_in']} dropped by "
             f"max_length={stats['max_length']}, {stats['pairs_truncated']} truncated) in {stats['micro_batches']} "
             "micro-batches as the trainer draws them"]
    lines.append(f"{'tokens':<14}{'mean':>9}{'p50':>8}{'p90':>8}{'p95':>8}{'p99':>8}{'max':>8}")
    for key in ("prompt", "chosen", "rejected", "packed_pair"):
        s = stats[key]
        lines.append(
            f"{key:<14}{s['mean']:>9.1f}{s['p50']:>8}{s['p90']:>8}{s['p95']:>8}{s['p99']:>8}{s['max']:>8}"
        )
    trl, padded = stats["tokens_trl"], stats["tokens_trl_padded"]
    lines += [
        f"tokens, TRL (prompt twice, padded):      {padded:>12,}",
        f"tokens, TRL without its padding:         {trl:>12,}",
        f"tokens, prefix-shared and packed:        {stats['tokens_packed']:>12,}",
        f"saved by prefix sharing:                 {stats['saved_by_prefix_sharing']:>12,}  "
        f"({100 * stats['tokens_saved_frac']:.1f}% of TRL's unpadded tokens: prefix_sharing/tokens_saved_frac)",
        f"saved by packing (TRL's padding):        {stats['saved_by_packing']:>12,}  "
        f"({100 * stats['trl_padding_frac']:.1f}% of TRL's padded tokens: packing/trl_padding_frac)",
        f"responses run once for several pairs:    {100 * stats['responses_deduplicated_frac']:>11.1f}%  "
        "(prefix_sharing/responses_deduplicated_frac)",
        f"prompt/response length ratio:            {stats['prompt_to_response_ratio']:>12.2f}",
        *([f"image tokens, TRL / packed:              {stats['image_tokens_trl']:>12,} / {stats['image_tokens_packed']:,}"
           f"  ({100 * stats['image_tokens_saved_frac']:.1f}% saved; images through the vision tower "
           f"{stats['images_trl']:,} -> {stats['images_packed']:,})"] if "image_tokens_trl" in stats else []),
        f"packed micro-batch row: mean {stats['micro_batch_row_tokens']['mean']:.0f}, "
        f"max {stats['micro_batch_row_tokens']['max']} tokens; longest pair {stats['longest_packed_pair']}; "
        f"suggested token budget per micro-batch: {stats['suggested_token_budget']}",
    ]
    return "\n".join(lines)
