"""Pairs from ranked or scored completions (``pairs_from_ranks``).

Some preference datasets hold one row per prompt with a list of completions, each with a score or a rank, instead of
chosen/rejected pairs. :func:`expand_ranked_completions` recognizes two such layouts by their columns and turns every
row into pairs in TRL's preference format (``prompt``/``chosen``/``rejected``):

* openbmb/UltraFeedback (raw): ``instruction`` and ``completions``, a list of {``response``, ``overall_score``, ...};
  a higher score is better. The pairs are conversational: the prompt is the instruction as a user turn, chosen and
  rejected are the responses as assistant turns (the format of HuggingFaceH4/ultrafeedback_binarized).
* berkeley-nest/Nectar: ``prompt`` (text in HH-RLHF's "\\n\\nHuman: ...\\n\\nAssistant:" form) and ``answers``, a list
  of {``answer``, ``rank``, ...}; rank 1 is the best. The pairs are text: the prompt as given, the answers as the
  responses (with a space in front when neither the prompt ends nor the answer starts with whitespace).

The rule, for a prompt's completions ordered from best to worst (equal ones in list order); "the best" is the first of
them, "the worst" the last:

* ``best_vs_rest`` (default): the best against each other completion (k completions: k - 1 pairs);
* ``all``: every two completions, the better one chosen (k (k - 1) / 2 pairs);
* ``best_vs_worst``: the best against the worst (one pair).

A pair the rule names whose two completions have the same score (rank) is a tie: it carries no preference, so it is
dropped, counted and reported in a WARNING. Completions with no text or no numeric score are skipped (counted too); a
prompt left with fewer than two completions makes no pair. The pairs of a prompt share it, and often their responses,
which the packed rows run once per micro-batch (``group_by_prompt``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import combinations

from .batching import read_columns

logger = logging.getLogger(__name__)

RULES = ("best_vs_rest", "all", "best_vs_worst")


@dataclass(frozen=True)
class RankedLayout:
    """Where a ranked layout keeps its prompt, its completions and their text and score."""

    name: str
    prompt: str  # column
    completions: str  # column: a list of dicts
    text: str  # key in each completion
    score: str  # key in each completion
    higher_is_better: bool
    conversational: bool


RANKED_LAYOUTS = (
    RankedLayout("UltraFeedback (instruction + completions[].overall_score)", "instruction", "completions",
                 "response", "overall_score", higher_is_better=True, conversational=True),
    RankedLayout("Nectar (prompt + answers[].rank)", "prompt", "answers", "answer", "rank",
                 higher_is_better=False, conversational=False),
)


def detect_ranked_layout(column_names) -> RankedLayout | None:
    """The ranked layout a dataset with these columns has, or None (a dataset with ``chosen`` has pairs already)."""
    columns = set(column_names or ())
    if "chosen" in columns:
        return None
    return next((lay for lay in RANKED_LAYOUTS if {lay.prompt, lay.completions} <= columns), None)


@dataclass
class RankedPairsReport:
    """What :func:`expand_ranked_completions` made of a split."""

    name: str
    layout: str
    rule: str
    prompts: int
    pairs: int
    ties_dropped: int
    completions_skipped: int
    prompts_without_pairs: int


def _usable(completion, layout: RankedLayout):
    """(text, score) of a completion, or None when it has no text or no numeric score."""
    if not isinstance(completion, dict):
        return None
    text, score = completion.get(layout.text), completion.get(layout.score)
    if not isinstance(text, str) or not text.strip():
        return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
        return None
    return text, score if layout.higher_is_better else -score


def rank_pairs(completions, layout: RankedLayout, rule: str) -> tuple[list[tuple[str, str]], int, int]:
    """(pairs as (chosen text, rejected text), ties dropped, completions skipped) of one prompt's completions."""
    if rule not in RULES:
        raise ValueError(f"pairs_from_ranks must be one of {RULES}, got {rule!r}")
    usable = [u for u in (_usable(c, layout) for c in completions or []) if u is not None]
    skipped = len(completions or []) - len(usable)
    ordered = sorted(usable, key=lambda u: -u[1])  # best first; stable, so equal scores keep the list's order
    if len(ordered) < 2:
        return [], 0, skipped
    if rule == "best_vs_rest":
        candidates = [(ordered[0], other) for other in ordered[1:]]
    elif rule == "all":
        candidates = list(combinations(ordered, 2))
    else:
        candidates = [(ordered[0], ordered[-1])]
    pairs = [(better[0], worse[0]) for better, worse in candidates if better[1] > worse[1]]
    return pairs, len(candidates) - len(pairs), skipped


def _as_pair(prompt, chosen: str, rejected: str, layout: RankedLayout) -> dict:
    if layout.conversational:
        return {"prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    if prompt and not prompt[-1].isspace():
        chosen, rejected = (r if r[:1].isspace() else " " + r for r in (chosen, rejected))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def expand_ranked_completions(dataset, rule: str = "best_vs_rest", *, name: str = "train",
                              return_report: bool = False):
    """Turn a dataset of ranked or scored completions (module docstring) into one row per pair; any other dataset is
    returned as it is (with report None).

    Args:
        dataset: a ``datasets.Dataset`` or ``IterableDataset`` (for the latter the counts are not reported).
        rule: ``"best_vs_rest"``, ``"all"`` or ``"best_vs_worst"`` (``PrefixDPOConfig.pairs_from_ranks``).
        name: the split's name, used in messages.
        return_report: also return a :class:`RankedPairsReport` (None when nothing was expanded).
    """
    import datasets

    if rule not in RULES:
        raise ValueError(f"pairs_from_ranks must be one of {RULES}, got {rule!r}")
    layout = detect_ranked_layout(dataset.column_names)
    if layout is None:
        return (dataset, None) if return_report else dataset

    def expand(batch):
        out = {"prompt": [], "chosen": [], "rejected": []}
        for prompt, completions in zip(batch[layout.prompt], batch[layout.completions]):
            for chosen, rejected in rank_pairs(completions, layout, rule)[0]:
                for key, value in _as_pair(prompt, chosen, rejected, layout).items():
                    out[key].append(value)
        return out

    pairs = dataset.map(expand, batched=True, remove_columns=dataset.column_names)
    report = None
    if isinstance(dataset, datasets.Dataset):
        ties = skipped = without = 0
        for row in read_columns(dataset, (layout.completions,)):
            made, tied, skip = rank_pairs(row[layout.completions], layout, rule)
            ties, skipped, without = ties + tied, skipped + skip, without + (not made)
        report = RankedPairsReport(name, layout.name, rule, len(dataset), len(pairs), ties, skipped, without)
        logger.info("%s dataset: %s layout, %d prompts -> %d pairs (pairs_from_ranks=%s)", name, layout.name,
                    report.prompts, report.pairs, rule)
        if ties or skipped:
            logger.warning(
                "%s dataset: %d pairs of equal score or rank dropped (no preference between them), %d completions "
                "without text or score skipped; %d of %d prompts made no pair.", name, ties, skipped, without,
                report.prompts,
            )
    return (pairs, report) if return_report else pairs
