"""Turning the common preference layouts into TRL's preference format, with checks.

TRL's preference format is one row per pair with the columns ``prompt``, ``chosen`` and ``rejected``, either all
strings ("standard") or all lists of ``{"role", "content"}`` messages ("conversational", rendered by the tokenizer's
chat template). :func:`normalize_preference_dataset` brings these layouts to it:

* explicit prompt, standard or conversational (TL;DR: ``prompt``/``chosen``/``rejected`` strings);
* implicit prompt: no ``prompt`` column, ``chosen`` and ``rejected`` begin with the same text or the same turns
  (HH-RLHF: ``"\\n\\nHuman: ... \\n\\nAssistant: <answer>"``); the prompt is their shared beginning (TRL's
  ``extract_prompt``), cut back to the end of the last ``"\\n\\nAssistant:"`` marker for HH-RLHF-style text;
* UltraFeedback-binarized: a ``prompt`` string with ``chosen``/``rejected`` conversations that repeat the user turn
  (TRL's ``maybe_extract_prompt``);
* a conversational prompt whose turns are repeated at the start of ``chosen``/``rejected``;
* multi-turn conversations (the prompt is every turn before the first one where the two differ);
* ``from``/``value`` messages (ShareGPT style), converted to ``role``/``content``;
* messages whose content is a list of parts (``{"type": "text", "text": ...}``, ``{"type": "image"}``), as
  vision-language datasets have them; other columns (``images``) are kept.

Bad input never reaches the trainer silently. Problems of a whole column (missing, wrong type, a conversational
dataset for a tokenizer without a chat template) raise :class:`PreferenceDataError` naming the column and the fix.
Rows that cannot train (a null value, a value of the wrong type, malformed messages, a conversation with no response
turn) or carry no preference (chosen equal to rejected) are dropped, and a WARNING says how many for which reason with
an example row index; with ``on_bad_rows="error"`` the first such row raises instead. Rows with an empty prompt or
response train as TRL trains them (an empty text response is the eos token alone); a WARNING counts them. The trainer applies :func:`normalize_for_training` to every
dataset it is given, so the Python API and the command line read data the same way.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

HH_ASSISTANT_MARKER = "\n\nAssistant:"
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class PreferenceDataError(ValueError):
    """A preference dataset that cannot be used as given; the message names the column or row and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Schema: what each column holds
# ---------------------------------------------------------------------------------------------------------------------

STRING, MESSAGES, MESSAGE, OTHER = "string", "messages", "message", "other"


def _feature_kind(feature) -> str:
    from datasets import LargeList, List, Value

    if isinstance(feature, Value):
        return STRING if feature.dtype in ("string", "large_string") else OTHER
    if isinstance(feature, (List, LargeList)):
        inner = feature.feature
        if isinstance(inner, dict) and (
            ("role" in inner and "content" in inner) or ("from" in inner and "value" in inner)
        ):
            return MESSAGES
        return OTHER
    if isinstance(feature, dict) and (("role" in feature and "content" in feature) or "from" in feature):
        return MESSAGE
    return OTHER


def _value_kind(value) -> str:
    if isinstance(value, str):
        return STRING
    if isinstance(value, dict) and ("role" in value or "from" in value):
        return MESSAGE
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return MESSAGES
    return OTHER


def _column_kind(dataset, column: str) -> str:
    features = getattr(dataset, "features", None)
    if features is not None and column in features:
        feature = features[column]
        if type(feature).__name__ == "Json" and hasattr(dataset, "__len__"):
            # Values of mixed types (datasets >= 5 loads them as Json): the column has the kind most rows have;
            # rows of another type are dropped (or raise) row by row.
            counts = Counter(_value_kind(v) for v in dataset[column] if v is not None)
            counts.pop(OTHER, None)
            return counts.most_common(1)[0][0] if counts else OTHER
        return _feature_kind(feature)
    # No features (some IterableDatasets): look at the first non-null value.
    for row in dataset:
        if row.get(column) is not None:
            return _value_kind(row[column])
    return OTHER


def _describe_feature(dataset, column: str) -> str:
    features = getattr(dataset, "features", None)
    return repr(features[column]) if features is not None and column in features else "unknown"


def _check_columns(dataset) -> dict[str, str]:
    columns = list(dataset.column_names or next(iter(dataset)).keys())
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        if {"prompt", "completion", "label"} <= set(columns):
            raise PreferenceDataError(
                f"the dataset is unpaired (prompt/completion/label, the KTO format), not pairs; it has no "
                f"{'/'.join(missing)} column. DPO needs a chosen and a rejected response per prompt."
            )
        raise PreferenceDataError(
            f"the dataset has no {' and no '.join(repr(m) for m in missing)} column (it has {columns}). DPO needs "
            "'chosen' and 'rejected' (and optionally 'prompt'). If your columns have other names, rename them: "
            "--chosen_column/--rejected_column/--prompt_column in the CLI, or dataset.rename_column(old, new)."
        )
    kinds = {}
    for column in ("prompt", "chosen", "rejected"):
        if column not in columns:
            continue
        kind = _column_kind(dataset, column)
        if kind == OTHER:
            raise PreferenceDataError(
                f"column {column!r} has type {_describe_feature(dataset, column)}; expected text (a string per row) "
                "or a conversation (a list of {'role': ..., 'content': ...} messages per row). Convert it with "
                "dataset.map before training."
            )
        kinds[column] = kind
    resp = {kinds["chosen"] == STRING, kinds["rejected"] == STRING}
    if len(resp) != 1:
        raise PreferenceDataError(
            f"'chosen' is {kinds['chosen']} but 'rejected' is {kinds['rejected']}; both must be text or both "
            "conversations"
        )
    return kinds


# ---------------------------------------------------------------------------------------------------------------------
# Row normalization
# ---------------------------------------------------------------------------------------------------------------------


def _to_messages(value) -> list | None:
    """A conversation as a list of {'role', 'content'} dicts (from/value renamed), or None when malformed."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return None
    out = []
    for message in value:
        if not isinstance(message, dict):
            return None
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            return None
        if role in ("human", "user"):
            role = "user"
        elif role in ("gpt", "assistant", "bot"):
            role = "assistant"
        new = {k: v for k, v in message.items() if k not in ("from", "value")}
        new["role"], new["content"] = role, content
        out.append(new)
    return out


def _blank(value) -> bool:
    """Whether a text, a message list or a message's content list holds nothing to train on (an image part counts
    as something)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        if "content" in value:  # a message
            return _blank(value["content"])
        if value.get("type", "text") == "text":  # a content part
            return _blank(value.get("text"))
        return False  # an image (or other non-text) part
    if isinstance(value, list):
        return not value or all(_blank(m) for m in value)
    return False


def _hh_cut(prompt: str, chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF text: end the extracted prompt right after the last '\\n\\nAssistant:' it contains, so that a response
    whose first words happen to agree is not cut in the middle."""
    cut = prompt.rfind(HH_ASSISTANT_MARKER)
    if cut < 0:
        return prompt, chosen, rejected
    end = cut + len(HH_ASSISTANT_MARKER)
    if end == len(prompt):
        return prompt, chosen, rejected
    tail = prompt[end:]
    return prompt[:end], tail + chosen, tail + rejected


def _normalize_row(example: dict, conversational: bool) -> tuple[dict, str]:
    """Return ({'prompt','chosen','rejected'}, problem) for one row; problem is '' when the row is usable."""
    from trl.data_utils import extract_prompt

    empty = [] if conversational else ""
    bad = {"prompt": empty, "chosen": empty, "rejected": empty}
    chosen, rejected = example.get("chosen"), example.get("rejected")
    has_prompt = "prompt" in example
    prompt = example.get("prompt")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            return bad, f"null {name}"
    if has_prompt and prompt is None:
        return bad, "null prompt"

    if conversational:
        # A conversational prompt with text responses: the responses become assistant turns.
        chosen_m = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else _to_messages(chosen)
        rejected_m = (
            [{"role": "assistant", "content": rejected}] if isinstance(rejected, str) else _to_messages(rejected)
        )
        for column, value, messages in (("chosen", chosen, chosen_m), ("rejected", rejected, rejected_m)):
            if messages is None:
                if not isinstance(value, (list, dict)):
                    return bad, f"wrong type in {column} ({type(value).__name__}, expected a list of messages)"
                return bad, f"malformed messages in {column} (each needs a role and a non-null content)"
        prompt_m = None
        if has_prompt and not isinstance(prompt, str):
            prompt_m = _to_messages(prompt)
            if prompt_m is None:
                return bad, "malformed messages in prompt (each needs a role and a non-null content)"
        if prompt_m is not None:
            n = len(prompt_m)
            # Conversations that repeat the prompt's turns at their start: strip them.
            if n and chosen_m[:n] == prompt_m and rejected_m[:n] == prompt_m:
                chosen_m, rejected_m = chosen_m[n:], rejected_m[n:]
        else:
            # Implicit prompt, or a text prompt next to conversations that contain it (UltraFeedback-binarized):
            # the prompt is the turns the two conversations share (TRL's extract_prompt).
            if chosen_m == rejected_m:
                return bad, "chosen equals rejected (no preference signal)"
            extracted = extract_prompt({"chosen": chosen_m, "rejected": rejected_m})
            prompt_m, chosen_m, rejected_m = extracted["prompt"], extracted["chosen"], extracted["rejected"]
            if not prompt_m and isinstance(prompt, str) and prompt.strip():
                prompt_m = [{"role": "user", "content": prompt}]
        for column, messages in (("chosen", chosen_m), ("rejected", rejected_m)):
            if not messages:
                return bad, f"no messages in {column} after the prompt's turns"
        if chosen_m == rejected_m:
            return bad, "chosen equals rejected (no preference signal)"
        return {"prompt": prompt_m, "chosen": chosen_m, "rejected": rejected_m}, ""

    # Standard (text) rows.
    for column, value in (("prompt", prompt if has_prompt else ""), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            return bad, f"wrong type in {column} ({type(value).__name__}, expected text)"
    if has_prompt:
        # Responses that repeat the prompt at their start: strip it.
        if prompt and chosen.startswith(prompt) and rejected.startswith(prompt) and len(chosen) > len(prompt):
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    else:
        if chosen == rejected:
            return bad, "chosen equals rejected (no preference signal)"
        extracted = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = _hh_cut(extracted["prompt"], extracted["chosen"], extracted["rejected"])
    if chosen == rejected:
        return bad, "chosen equals rejected (no preference signal)"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, ""


def _empty_parts(row: dict) -> str:
    """Which parts of a usable row are empty ('' when none): they train as TRL trains them (an empty text response
    is the eos token alone), and are counted so that they are seen."""
    empty = [name for name in ("prompt", "chosen", "rejected") if _blank(row[name])]
    return f"empty {' and '.join(empty)}" if empty else ""


@dataclass
class NormalizationReport:
    """What :func:`normalize_preference_dataset` did: the layout it found and the rows it dropped, by reason."""

    name: str
    layout: str
    conversational: bool
    rows_in: int
    rows_out: int
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)  # reason -> first row index
    empty: dict[str, int] = field(default_factory=dict)  # kept rows with an empty part, by which parts

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


def _detect_layout(kinds: dict[str, str]) -> str:
    prompt = kinds.get("prompt")
    resp = kinds["chosen"]
    if prompt is None:
        return "implicit prompt, conversational" if resp != STRING else "implicit prompt, text (HH-RLHF style)"
    if prompt == STRING and resp != STRING:
        return "text prompt + conversations repeating it (UltraFeedback-binarized style)"
    if prompt != STRING:
        return "explicit prompt, conversational"
    return "explicit prompt, text (TL;DR style)"


def normalize_preference_dataset(
    dataset,
    tokenizer=None,
    *,
    name: str = "train",
    on_bad_rows: str = "drop",
    prompt_column: str | None = None,
    chosen_column: str | None = None,
    rejected_column: str | None = None,
    num_proc: int | None = None,
    return_report: bool = False,
    pairs_from_ranks: str = "best_vs_rest",
):
    """Turn a preference dataset of a common layout into TRL's format (``prompt``/``chosen``/``rejected``), checked.

    Args:
        dataset: a ``datasets.Dataset`` (or ``IterableDataset``: rows are checked lazily and dropped rows are
            logged at the end of the first pass only by the count seen so far, so prefer a ``Dataset``).
        tokenizer: the tokenizer the trainer will use. Needed to check that conversational data can be rendered
            (a chat template is required); ``None`` skips that check.
        name: the split's name, used in messages.
        on_bad_rows: ``"drop"`` (default) drops unusable rows and logs a WARNING with the count per reason and an
            example row index; ``"error"`` raises :class:`PreferenceDataError` at the first one.
        prompt_column, chosen_column, rejected_column: names of the columns to use as prompt/chosen/rejected when
            the dataset calls them something else.
        num_proc: processes for ``dataset.map``.
        return_report: also return a :class:`NormalizationReport`.
        pairs_from_ranks: how a dataset of ranked or scored completions per prompt becomes pairs first
            (``ranked.expand_ranked_completions``; other datasets are not touched).

    Returns:
        The normalized dataset (other columns are kept), and the report when ``return_report``.

    Raises:
        PreferenceDataError: missing column, wrong column type, chosen/rejected of different kinds, conversational
            data with a tokenizer that has no chat template, no usable row left, or (with ``on_bad_rows="error"``) a
            bad row.
    """
    import datasets

    if on_bad_rows not in ("drop", "error"):
        raise ValueError(f"on_bad_rows must be 'drop' or 'error', got {on_bad_rows!r}")
    from .ranked import expand_ranked_completions

    dataset = _rename_columns(dataset, prompt_column=prompt_column, chosen_column=chosen_column,
                              rejected_column=rejected_column)
    dataset = expand_ranked_completions(dataset, pairs_from_ranks, name=name)
    kinds = _check_columns(dataset)
    conversational = kinds["chosen"] != STRING or kinds.get("prompt", STRING) != STRING
    layout = _detect_layout(kinds)
    if conversational and tokenizer is not None:
        check_chat_template(tokenizer, name=name)
    is_map_style = isinstance(dataset, datasets.Dataset)
    rows_in = len(dataset) if is_map_style else -1
    logger.info("%s dataset: %s layout%s", name, layout, f", {rows_in} rows" if rows_in >= 0 else "")

    def fn(example, idx):
        row, problem = _normalize_row(example, conversational)
        if problem and on_bad_rows == "error":
            raise PreferenceDataError(_row_error(name, idx, problem))
        return {**row, "_problem": problem, "_empty": "" if problem else _empty_parts(row)}

    map_kwargs: dict[str, Any] = {"with_indices": True}
    if is_map_style:
        map_kwargs.update(num_proc=num_proc, desc=f"Normalizing {name} preference pairs")
    # Features are re-inferred: a text prompt may become a list of messages.
    out = dataset.map(fn, **map_kwargs)
    if not is_map_style:
        return out.filter(lambda ex: not ex["_problem"]).remove_columns(["_problem", "_empty"])

    problems = out["_problem"]
    counts: Counter = Counter(p for p in problems if p)
    examples: dict[str, int] = {}
    for i, p in enumerate(problems):
        if p and p not in examples:
            examples[p] = i
    if counts:
        keep = [i for i, p in enumerate(problems) if not p]
        out = out.select(keep)
        detail = "; ".join(f"{n} x {reason} (e.g. row {examples[reason]})" for reason, n in counts.most_common())
        logger.warning(
            "%s dataset: dropped %d of %d rows that cannot train: %s. Fix the data, or pass on_bad_rows='error' to "
            "stop at the first one.", name, sum(counts.values()), rows_in, detail
        )
    empties = Counter(e for e in out["_empty"] if e)
    if empties:
        detail = "; ".join(f"{n} x {what}" for what, n in empties.most_common())
        logger.warning("%s dataset: %d rows have an empty part (%s); they train as TRL trains them (an empty text "
                       "response is its eos token alone)", name, sum(empties.values()), detail)
    out = out.remove_columns(["_problem", "_empty"])
    mark_normalized(out)
    if len(out) == 0:
        raise PreferenceDataError(f"{name} dataset: no usable rows left out of {rows_in} (see the warning above)")
    report = NormalizationReport(name, layout, conversational, rows_in, len(out), dict(counts), examples,
                                 dict(empties))
    return (out, report) if return_report else out


# Fingerprints of datasets this module produced (or combined from its outputs): the trainer does not normalize them again.
_NORMALIZED: set[str] = set()


def mark_normalized(dataset) -> None:
    """Record that ``dataset`` is already in the normalized format (e.g. a concatenation of normalized datasets)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        _NORMALIZED.add(fingerprint)


def is_normalized(dataset) -> bool:
    """Whether ``dataset`` came out of ``normalize_preference_dataset`` (or was marked so)."""
    return getattr(dataset, "_fingerprint", None) in _NORMALIZED


def normalize_for_training(dataset, processing_class, name: str, on_bad_rows: str = "drop", num_proc=None,
                           pairs_from_ranks: str = "best_vs_rest"):
    """What the trainer does with every dataset it is given: ``normalize_preference_dataset`` unless it is None,
    already tokenized (``prompt_ids``...), or already normalized by this module."""
    if dataset is None:
        return None
    columns = getattr(dataset, "column_names", None) or []
    if all(c in columns for c in TOKENIZED_COLUMNS):
        return dataset
    if is_normalized(dataset):
        return dataset
    return normalize_preference_dataset(dataset, processing_class, name=name, on_bad_rows=on_bad_rows,
                                        num_proc=num_proc, pairs_from_ranks=pairs_from_ranks)


def _row_error(name: str, idx: int, problem: str) -> str:
    fixes = {
        "null": "fill or remove the row",
        "no messages": "give each conversation its response turn(s) after the prompt's",
        "chosen equals": "remove the row (identical responses carry no preference)",
        "malformed": "every message needs 'role' and 'content' (or 'from' and 'value')",
        "wrong type": "give the column the same type in every row",
    }
    fix = next((v for k, v in fixes.items() if problem.startswith(k)), "fix or remove the row")
    return f"{name} dataset, row {idx}: {problem}; {fix}, or use on_bad_rows='drop' to drop such rows"


def rename_columns(dataset, prompt_column=None, chosen_column=None, rejected_column=None):
    """``dataset`` with the named columns renamed to ``prompt``/``chosen``/``rejected`` (a column already holding
    that name is dropped for it)."""
    return _rename_columns(dataset, prompt_column=prompt_column, chosen_column=chosen_column,
                           rejected_column=rejected_column)


def _rename_columns(dataset, **mapping):
    renames = {}
    for target, source in (("prompt", mapping.get("prompt_column")), ("chosen", mapping.get("chosen_column")),
                           ("rejected", mapping.get("rejected_column"))):
        if source and source != target:
            if source not in (dataset.column_names or []):
                raise PreferenceDataError(
                    f"{target}_column={source!r} is not a column of the dataset (it has {dataset.column_names})"
                )
            renames[source] = target
    if renames:
        clashing = [t for t in renames.values() if t in dataset.column_names and t not in renames]
        if clashing:
            dataset = dataset.remove_columns(clashing)
        dataset = dataset.rename_columns(renames)
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer checks
# ---------------------------------------------------------------------------------------------------------------------


def check_chat_template(tokenizer, name: str = "train") -> None:
    """Raise a clear error when conversational data meets a tokenizer that cannot render conversations."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    if getattr(tokenizer, "chat_template", None) or getattr(tok, "chat_template", None):
        return
    raise PreferenceDataError(
        f"the {name} dataset is conversational (lists of role/content messages) but the tokenizer "
        f"({type(tok).__name__}, {getattr(tok, 'name_or_path', '')!r}) has no chat template to render it; set "
        "chat_template_path to a Jinja file or template, use a chat model's tokenizer (trl.clone_chat_template copies "
        "one), or convert the dataset to text prompt/chosen/rejected strings"
    )


def set_chat_template(processing_class, template: str) -> None:
    """Give the tokenizer (and a processor holding one) the chat template ``template``: the path of a Jinja file
    (``.jinja``/``.j2``) or the template text itself."""
    import os

    if template.endswith((".jinja", ".j2")) or (os.path.sep in template and "{" not in template):
        if not os.path.isfile(template):
            raise FileNotFoundError(f"chat_template_path {template!r} does not exist")
        with open(template, encoding="utf-8") as f:
            template = f.read()
    elif "{{" not in template and "{%" not in template:
        raise PreferenceDataError(
            f"chat_template_path {template[:60]!r} is neither a .jinja/.j2 file nor a Jinja template (no {{{{ or {{% in "
            "it)"
        )
    tok = getattr(processing_class, "tokenizer", processing_class)
    tok.chat_template = template
    if tok is not processing_class:
        processing_class.chat_template = template


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token the eos token as pad, logging that it did (the trainer tells the model).

    Raises:
        PreferenceDataError: when there is neither a pad nor an eos token.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise PreferenceDataError(
                f"the tokenizer {getattr(tok, 'name_or_path', '')!r} has neither a pad nor an eos token; set one, e.g. "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and model.resize_token_embeddings(len(tokenizer))"
            )
        tok.pad_token = tok.eos_token
        logger.warning(
            "The tokenizer has no pad token; using its eos token %r (id %d) as pad. Packed rows carry no padding, "
            "so this only affects padded evaluation and the reference path.", tok.eos_token, tok.eos_token_id
        )



