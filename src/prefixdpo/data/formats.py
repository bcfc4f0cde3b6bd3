"""Loading preference datasets and turning the common layouts into TRL's preference format, with checks.

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
* ``from``/``value`` messages (ShareGPT style), converted to ``role``/``content``.

Bad input never reaches the trainer silently. Problems of a whole column (missing, wrong type, a conversational
dataset for a tokenizer without a chat template) raise :class:`PreferenceDataError` naming the column and the fix.
Problems of single rows (null or empty response or prompt, chosen equal to rejected, malformed messages) drop the
row, and a WARNING says how many rows were dropped for which reason with an example row index; with
``on_bad_rows="error"`` the first such row raises instead.

The module also holds the length accounting used by ``prefixdpo data-stats`` and the quickstart: tokenized lengths
(through TRL's own dataset preparation), pairs that cannot fit ``max_length``, and the tokens that prefix sharing and
packing save.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

logger = logging.getLogger(__name__)

LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
HH_ASSISTANT_MARKER = "\n\nAssistant:"


class PreferenceDataError(ValueError):
    """A preference dataset that cannot be used as given; the message names the column or row and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json"))
    )


def load_preference_dataset(
    dataset_name: str,
    dataset_config: str | None = None,
    split: str | None = "train",
    revision: str | None = None,
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
    streaming: bool = False,
):
    """Load a dataset from the Hub, from local data files, or from a directory written by ``save_to_disk``.

    Args:
        dataset_name: a Hub id (``"Anthropic/hh-rlhf"``), a local file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``),
            a local directory of such files (the split of each file comes from its name: ``train.jsonl``,
            ``test.jsonl``, ...), or a directory written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``.
        dataset_config: the Hub dataset's configuration name (``name=`` of ``datasets.load_dataset``).
        split: the split to return (slices such as ``"train[:1000]"`` work for the Hub and data files); ``None``
            returns the whole ``DatasetDict``. A single local file is the ``"train"`` split.
        revision: a Hub branch, tag or commit.
        data_files: data files inside a Hub repository or local directory, passed to ``datasets.load_dataset``.
        streaming: return an ``IterableDataset`` (Hub and data files only).

    Raises:
        PreferenceDataError: when the path, Hub id or split does not exist or the files cannot be read, with the
            reason and what to check.
    """
    import datasets

    if not dataset_name:
        raise PreferenceDataError("dataset_name is empty: set it to a Hub dataset id or a local file or directory")
    path = os.path.expanduser(dataset_name)

    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split is None:
                return loaded
            base = split.split("[")[0]
            if base not in loaded:
                raise PreferenceDataError(
                    f"split {split!r} not found in the saved dataset {dataset_name!r}; it has {sorted(loaded)}. "
                    "Set dataset_train_split / dataset_test_split to one of them."
                )
            if "[" in split:
                return datasets.concatenate_datasets([loaded[base]]).select(_slice_indices(split, len(loaded[base])))
            return loaded[base]
        if split not in (None, "train") and "[" not in (split or ""):
            logger.warning("%s is a single saved Dataset (no splits); ignoring split=%r", dataset_name, split)
        return loaded

    kwargs: dict[str, Any] = {}
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in LOCAL_BUILDERS:
            raise PreferenceDataError(
                f"cannot tell the format of {dataset_name!r} from its extension {ext!r}; use one of "
                f"{sorted(LOCAL_BUILDERS)} or a directory written by Dataset.save_to_disk"
            )
        builder = LOCAL_BUILDERS[ext]
        kwargs["data_files"] = {"train": path}
        where = f"the file {dataset_name!r}"
    elif os.path.isdir(path):
        builder = path
        if data_files is not None:
            kwargs["data_files"] = data_files
        where = f"the directory {dataset_name!r}"
    elif os.path.sep in dataset_name and (dataset_name.startswith((".", "/", "~")) or dataset_name.count("/") > 1):
        raise PreferenceDataError(f"{dataset_name!r} looks like a local path but does not exist")
    else:
        builder = dataset_name
        if data_files is not None:
            kwargs["data_files"] = data_files
        where = f"the Hub dataset {dataset_name!r}"
    try:
        return datasets.load_dataset(
            builder, name=dataset_config, split=split, revision=revision, streaming=streaming, **kwargs
        )
    except PreferenceDataError:
        raise
    except ValueError as e:
        if "split" in str(e).lower() or "Unknown split" in str(e):
            raise PreferenceDataError(
                f"split {split!r} not found in {where}: {e}. Set dataset_train_split / dataset_test_split to a split "
                "it has (a single local file is the 'train' split; in a directory the split comes from the file "
                "names: train.jsonl, test.jsonl, validation.jsonl)."
            ) from e
        raise PreferenceDataError(f"could not load {where}: {e}") from e
    except FileNotFoundError as e:
        raise PreferenceDataError(
            f"could not find {where}: {e}. Check the spelling, that the dataset is public or HF_TOKEN is set for a "
            "gated one, and that the machine can reach the Hub (or set HF_HUB_OFFLINE=1 to use the local cache)."
        ) from e
    except Exception as e:  # network errors, Arrow errors while reading local files, ...
        hint = (
            "Check that every row has the same type in each column (prompt/chosen/rejected: all strings or all "
            "lists of {'role', 'content'} messages)."
            if os.path.exists(path)
            else "Check the id, the network (or set HF_HUB_OFFLINE=1 to use the local cache) and HF_TOKEN for gated "
            "datasets."
        )
        raise PreferenceDataError(f"could not load {where}: {type(e).__name__}: {e}. {hint}") from e


def _slice_indices(split: str, n: int) -> range:
    spec = split[split.index("[") + 1 : split.rindex("]")]
    start, _, stop = spec.partition(":")

    def parse(s, default):
        s = s.strip()
        if not s:
            return default
        if s.endswith("%"):
            return int(round(float(s[:-1]) / 100 * n))
        return int(s)

    return range(n)[slice(parse(start, 0), parse(stop, n))]


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
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or all(_blank(m.get("content")) if isinstance(m, dict) else True for m in value)
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
        if _blank(prompt_m):
            return bad, "empty prompt (no shared turns before the responses)"
        if _blank(chosen_m):
            return bad, "empty chosen response"
        if _blank(rejected_m):
            return bad, "empty rejected response"
        if chosen_m == rejected_m:
            return bad, "chosen equals rejected (no preference signal)"
        return {"prompt": prompt_m, "chosen": chosen_m, "rejected": rejected_m}, ""

    # Standard (text) rows.
    for column, value in (("prompt", prompt if has_prompt else ""), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            return bad, f"wrong type in {column} ({type(value).__name__}, expected text)"
    if has_prompt:
        if not prompt.strip():
            return bad, "empty prompt"
        # Responses that repeat the prompt at their start: strip it.
        if chosen.startswith(prompt) and rejected.startswith(prompt) and len(chosen) > len(prompt):
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    else:
        if chosen == rejected:
            return bad, "chosen equals rejected (no preference signal)"
        extracted = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = _hh_cut(extracted["prompt"], extracted["chosen"], extracted["rejected"])
        if not prompt.strip():
            return bad, "empty prompt (chosen and rejected share no beginning)"
    if not chosen.strip():
        return bad, "empty chosen response"
    if not rejected.strip():
        return bad, "empty rejected response"
    if chosen == rejected:
        return bad, "chosen equals rejected (no preference signal)"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, ""


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
    dataset = _rename_columns(dataset, prompt_column=prompt_column, chosen_column=chosen_column,
                              rejected_column=rejected_column)
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
        return {**row, "_problem": problem}

    map_kwargs: dict[str, Any] = {"with_indices": True}
    if is_map_style:
        map_kwargs.update(num_proc=num_proc, desc=f"Normalizing {name} preference pairs")
    # Features are re-inferred: a text prompt may become a list of messages.
    out = dataset.map(fn, **map_kwargs)
    if not is_map_style:
        return out.filter(lambda ex: not ex["_problem"]).remove_columns(["_problem"])

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
    out = out.remove_columns(["_problem"])
    if len(out) == 0:
        raise PreferenceDataError(f"{name} dataset: no usable rows left out of {rows_in} (see the warning above)")
    report = NormalizationReport(name, layout, conversational, rows_in, len(out), dict(counts), examples)
    return (out, report) if return_report else out


def _row_error(name: str, idx: int, problem: str) -> str:
    fixes = {
        "null": "fill or remove the row",
        "empty": "fill or remove the row",
        "chosen equals": "remove the row (identical responses carry no preference)",
        "malformed": "every message needs 'role' and 'content' (or 'from' and 'value')",
        "wrong type": "give the column the same type in every row",
    }
    fix = next((v for k, v in fixes.items() if problem.startswith(k)), "fix or remove the row")
    return f"{name} dataset, row {idx}: {problem}; {fix}, or use on_bad_rows='drop' to drop such rows"


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
        f"({type(tok).__name__}, {getattr(tok, 'name_or_path', '')!r}) has no chat template to render it. Use the "
        "tokenizer of an instruct/chat model, set tokenizer.chat_template to a Jinja template (or copy one with "
        "trl.clone_chat_template), or convert the dataset to text prompt/chosen/rejected strings."
    )


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give a tokenizer without a pad token the eos token as pad (and tell the model), logging that it did.

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
    if model is not None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tok.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = tok.pad_token_id


# ---------------------------------------------------------------------------------------------------------------------
# Lengths
# ---------------------------------------------------------------------------------------------------------------------


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


def _percentiles(values, qs=(50, 90, 95, 99, 100)) -> dict[str, float]:
    if not values:
        return {f"p{q}": 0 for q in qs} | {"mean": 0.0}
    s = sorted(values)
    out = {}
    for q in qs:
        k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
        out[f"p{q}" if q < 100 else "max"] = s[k]
    out["mean"] = sum(s) / len(s)
    return out


def length_statistics(prompt_lens, chosen_lens, rejected_lens, batch_size: int = 8, max_length: int | None = None):
    """Length percentiles and the tokens that prefix sharing and packing save, for pairs taken ``batch_size`` at a
    time in dataset order.

    Token counts per pair with prompt P, chosen C and rejected R tokens:

    * TRL (padded): chosen and rejected sequences of a batch are padded to the batch's longest, 2 * B * max(P+C, P+R);
    * unshared, unpadded: 2P + C + R;
    * prefix-shared, packed (prefixdpo's layout, see DESIGN.md): (P - 1) + (1 + C) + (1 + R) = P + C + R + 1.
    """
    n = len(prompt_lens)
    pairs = list(zip(prompt_lens, chosen_lens, rejected_lens, strict=True))
    padded = 0
    row_tokens = []  # tokens of each packed micro-batch row (batch_size pairs, prefix-shared, no padding)
    for start in range(0, n, batch_size):
        batch = pairs[start : start + batch_size]
        longest = max(max(p + c, p + r) for p, c, r in batch)
        if max_length is not None:
            longest = min(longest, max_length)
        padded += 2 * len(batch) * longest
        row_tokens.append(sum(p + c + r + 1 for p, c, r in batch))
    unshared = sum(2 * p + c + r for p, c, r in pairs)
    shared = sum(p + c + r + 1 for p, c, r in pairs)
    packed_lens = [p + c + r + 1 for p, c, r in pairs]
    # The token budget one packed micro-batch row needs: the largest row of `batch_size` pairs, rounded up to a
    # multiple of 256. Memory per micro-batch scales with it (not with batch_size x the longest pair, as with padding).
    budget = int(math.ceil(max(row_tokens, default=0) / 256) * 256)
    return {
        "pairs": n,
        "prompt": _percentiles(prompt_lens),
        "chosen": _percentiles(chosen_lens),
        "rejected": _percentiles(rejected_lens),
        "packed_pair": _percentiles(packed_lens),
        "tokens_trl_padded": padded,
        "tokens_unshared_unpadded": unshared,
        "tokens_prefix_shared_packed": shared,
        "saved_by_prefix_sharing": unshared - shared,
        "saved_by_packing": padded - unshared,
        "saved_total_fraction": 1 - shared / padded if padded else 0.0,
        "prompt_to_response_ratio": (sum(prompt_lens) / max(1, (sum(chosen_lens) + sum(rejected_lens)) / 2)),
        "micro_batch_row_tokens": _percentiles(row_tokens),
        "suggested_token_budget": budget,
        "batch_size": batch_size,
    }


def format_length_statistics(stats: dict) -> str:
    """A small plain-text table of :func:`length_statistics`."""
    lines = [f"{stats['pairs']} pairs, batches of {stats['batch_size']} pairs"]
    lines.append(f"{'tokens':<14}{'mean':>9}{'p50':>8}{'p90':>8}{'p95':>8}{'p99':>8}{'max':>8}")
    for key in ("prompt", "chosen", "rejected", "packed_pair"):
        s = stats[key]
        lines.append(
            f"{key:<14}{s['mean']:>9.1f}{s['p50']:>8}{s['p90']:>8}{s['p95']:>8}{s['p99']:>8}{s['max']:>8}"
        )
    padded = stats["tokens_trl_padded"]

    def pct(x):
        return f"{100 * x / padded:.1f}%" if padded else "n/a"

    lines += [
        f"tokens, TRL (prompt twice, padded):    {padded:>12,}",
        f"tokens, prompt twice, no padding:      {stats['tokens_unshared_unpadded']:>12,}",
        f"tokens, prefix-shared and packed:      {stats['tokens_prefix_shared_packed']:>12,}",
        f"saved by prefix sharing:               {stats['saved_by_prefix_sharing']:>12,}  ({pct(stats['saved_by_prefix_sharing'])})",
        f"saved by packing (no padding):         {stats['saved_by_packing']:>12,}  ({pct(stats['saved_by_packing'])})",
        f"prompt/response length ratio:          {stats['prompt_to_response_ratio']:>12.2f}",
        f"packed micro-batch row ({stats['batch_size']} pairs): mean {stats['micro_batch_row_tokens']['mean']:.0f}, "
        f"max {stats['micro_batch_row_tokens']['max']} tokens; suggested token budget per micro-batch: "
        f"{stats['suggested_token_budget']}",
    ]
    return "\n".join(lines)
