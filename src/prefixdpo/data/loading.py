"""Loading datasets: from the Hub, local data files (json, jsonl, parquet, csv, arrow, txt), or ``save_to_disk``
directories. Failures come back as one :class:`~prefixdpo.data.formats.PreferenceDataError` that names the file (and,
for malformed JSON, the line) and what to check."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .formats import PreferenceDataError

logger = logging.getLogger(__name__)

LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}


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
    data_dir: str | None = None,
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
        if _is_empty(path):
            raise PreferenceDataError(f"the file {dataset_name!r} is empty")
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
        if data_dir is not None:
            kwargs["data_dir"] = data_dir
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
        if os.path.exists(path):
            problem = _diagnose_local_files(path, kwargs.get("data_files"))
            if problem:
                raise PreferenceDataError(f"could not load {where}: {problem}") from e
        hint = (
            "Check that every row has the same type in each column (prompt/chosen/rejected: all strings or all "
            "lists of {'role', 'content'} messages)."
            if os.path.exists(path)
            else "Check the id, the network (or set HF_HUB_OFFLINE=1 to use the local cache) and HF_TOKEN for gated "
            "datasets."
        )
        raise PreferenceDataError(f"could not load {where}: {type(e).__name__}: {e}. {hint}") from e


def _is_empty(path: str) -> bool:
    """A file with no bytes, or only whitespace in its first 4 KB and nothing after."""
    if os.path.getsize(path) == 0:
        return True
    if os.path.getsize(path) > 4096:
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def _json_problem(path: str) -> str:
    """Where the JSON / JSON-lines file ``path`` is malformed ('' when it parses)."""
    if _is_empty(path):
        return f"{path} is empty"
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.read(1)
        f.seek(0)
        if first == "[" or path.endswith(".json") and first == "{":
            try:
                json.load(f)
            except json.JSONDecodeError as e:
                if path.endswith(".json") and first == "{" and e.msg.startswith("Extra data"):
                    f.seek(0)  # a .json file holding one object per line
                else:
                    return f"{path}, line {e.lineno}, column {e.colno}: malformed JSON ({e.msg})"
            else:
                return ""
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}, line {lineno}, column {e.colno}: malformed JSON ({e.msg})"
    return ""


def _diagnose_local_files(path: str, data_files) -> str:
    """After the datasets library failed on local files: the first empty or malformed JSON file, if any."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = [os.path.join(root, name) for root, _dirs, names in os.walk(path) for name in sorted(names)]
    for file in files:
        if os.path.splitext(file)[1].lower() in (".json", ".jsonl"):
            problem = _json_problem(file)
            if problem:
                return problem
        elif os.path.splitext(file)[1].lower() in LOCAL_BUILDERS and _is_empty(file):
            return f"{file} is empty"
    return ""


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
# Mixtures and evaluation splits
# ---------------------------------------------------------------------------------------------------------------------


def load_dataset_mixture(entries: list[dict], tokenizer=None, *, streaming: bool = False, renames: dict | None = None,
                         on_bad_rows: str = "drop", num_proc: int | None = None, pairs_from_ranks: str = "best_vs_rest"):
    """TRL's dataset mixture (``datasets:`` in a ``trl dpo`` config), loaded as TRL's ``get_dataset`` loads it (each
    entry's path/name/data_dir/data_files/split, ``columns`` selected, ``fraction`` as the entry's share of the mixture
    without oversampling any entry), except that each entry is checked and normalized on its own first
    (``normalize_preference_dataset``: layout detection, bad rows counted per entry). Entries must agree on text or
    conversational data; a mixture of both is refused naming two such entries."""
    import datasets

    from .formats import mark_normalized, normalize_preference_dataset, rename_columns

    parts, kinds = [], []
    for i, entry in enumerate(entries):
        label = f"datasets[{i}] ({entry['path']})"
        ds = load_preference_dataset(entry["path"], entry.get("name"), split=entry.get("split") or "train",
                                     data_files=entry.get("data_files"), data_dir=entry.get("data_dir"),
                                     streaming=streaming)
        if entry.get("columns") is not None:
            ds = ds.select_columns(list(entry["columns"]))
        ds = rename_columns(ds, **(renames or {}))
        ds, report = normalize_preference_dataset(ds, tokenizer, name=label, on_bad_rows=on_bad_rows,
                                                  num_proc=num_proc, return_report=True,
                                                  pairs_from_ranks=pairs_from_ranks)
        parts.append(ds)
        kinds.append((label, "conversational" if report.conversational else "text"))
    if len({k for _, k in kinds}) > 1:
        first = next(label for label, k in kinds if k == kinds[0][1])
        other = next(label for label, k in kinds if k != kinds[0][1])
        raise PreferenceDataError(
            f"the mixture mixes text and conversational data: {first} is {kinds[0][1]}, {other} is not; convert one "
            "of them (text pairs have no roles to render with a chat template) or train them separately"
        )
    fractions = [entry.get("fraction") for entry in entries]
    if any(f is not None for f in fractions):
        if streaming:
            raise PreferenceDataError("`fraction` in a dataset mixture needs datasets with a length; turn streaming off")
        weights = [f / sum(fractions) for f in fractions]
        total = min(len(ds) / w for ds, w in zip(parts, weights, strict=True) if w > 0)
        parts = [ds.select(range(round(w * total))) for ds, w in zip(parts, weights, strict=True)]
    # Only the columns every entry has (the preference columns, and images if all have them) are combined.
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts[1:])]
    parts = [p.select_columns(common) for p in parts]
    try:
        parts = [p if p.features == parts[0].features else p.cast(parts[0].features) for p in parts]
        combined = datasets.concatenate_datasets(parts)
    except (ValueError, TypeError) as e:
        bad = next(i for i, p in enumerate(parts) if p.features != parts[0].features)
        raise PreferenceDataError(
            f"the mixture's entries cannot be combined: {kinds[bad][0]} has other column types than {kinds[0][0]} "
            f"({str(e).splitlines()[0]})"
        ) from None
    mark_normalized(combined)
    logger.info("dataset mixture: %s", ", ".join(f"{label}: {len(p) if hasattr(p, '__len__') else '?'} rows"
                                                  for (label, _), p in zip(kinds, parts, strict=True)))
    return combined


def split_for_evaluation(dataset, test_size: float, seed: int):
    """(train, eval): ``test_size`` (a share in (0, 1), or a number of rows) of ``dataset`` held out, seeded."""
    if not hasattr(dataset, "train_test_split"):
        raise PreferenceDataError("test_split_size needs a dataset with a length; turn streaming off")
    size = int(test_size) if test_size >= 1 else float(test_size)
    if not 0 < size < len(dataset):
        raise PreferenceDataError(f"test_split_size={test_size} leaves no training or no evaluation rows of "
                                  f"{len(dataset)}")
    from .formats import is_normalized, mark_normalized

    split = dataset.train_test_split(test_size=size, seed=seed)
    if is_normalized(dataset):
        mark_normalized(split["train"])
        mark_normalized(split["test"])
    return split["train"], split["test"]

