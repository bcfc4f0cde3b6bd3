"""What an output directory holds, and how a run writes into it without losing or overwriting anything.

* A directory that holds a previous run (a saved model or ``checkpoint-*`` folders) is never written into unless the
  run resumes from it or ``overwrite_output_dir`` says so (:func:`check_start`, called before any model loads).
* A checkpoint is complete when its ``trainer_state.json`` (the last file transformers writes into it) reads as a
  trainer state. ``resume_from_checkpoint=True`` resumes from the newest complete one, naming each incomplete one it
  skips; an explicit path to an incomplete one is refused (:func:`resolve_resume`).
* Saves are staged: every file is written into a hidden folder beside its final place, flushed to disk, and only then
  renamed into place (:func:`publish_checkpoint`, :func:`publish_files`). A kill during a save leaves at most a
  hidden staging folder, which nothing reads and the next save of the same name replaces.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# Files a saved model (full or adapter) consists of, by name or prefix.
MODEL_FILE_PREFIXES = ("model", "pytorch_model", "adapter_model", "config.json", "adapter_config.json")
STAGING_PREFIX = ".staging-"


def _model_files(path: str) -> list[str]:
    names = []
    for name in sorted(os.listdir(path)):
        if name.startswith(MODEL_FILE_PREFIXES) and os.path.isfile(os.path.join(path, name)):
            names.append(name)
    return names


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every ``checkpoint-<step>`` folder in ``output_dir``, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def checkpoint_problem(path: str) -> str:
    """Why the checkpoint folder ``path`` cannot be resumed from ('' when it is complete)."""
    if not os.path.isdir(path):
        return "it does not exist"
    state = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state):
        return f"it has no {TRAINER_STATE} (the save did not finish)"
    try:
        with open(state, encoding="utf-8") as f:
            if "global_step" not in json.load(f):
                return f"its {TRAINER_STATE} has no global_step"
    except (OSError, ValueError):
        return f"its {TRAINER_STATE} cannot be read (the save did not finish)"
    return ""


def previous_run(output_dir: str) -> str:
    """A short description of the previous run ``output_dir`` holds ('' when it holds none)."""
    if not os.path.isdir(output_dir):
        return ""
    parts = []
    files = _model_files(output_dir)
    if files:
        parts.append(f"a saved model ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})")
    ckpts = checkpoint_dirs(output_dir)
    if ckpts:
        parts.append(f"{len(ckpts)} checkpoint folder(s) (newest: {os.path.basename(ckpts[-1][1])})")
    return " and ".join(parts)


def _newest_complete(output_dir: str) -> tuple[str | None, list[str]]:
    """(the newest complete checkpoint or None, the incomplete ones newer than it, each with why)."""
    skipped = []
    for _step, path in reversed(checkpoint_dirs(output_dir)):
        problem = checkpoint_problem(path)
        if not problem:
            return path, skipped
        skipped.append(f"{os.path.basename(path)} ({problem})")
    return None, skipped


def check_start(output_dir: str, resume, overwrite: bool) -> None:
    """Refuse (ValueError, one line), before anything loads, a start that would overwrite a previous run or resume from
    nothing usable. ``resume``: None/False (a fresh run), True (the newest complete checkpoint), or a path."""
    if not resume:
        found = "" if overwrite else previous_run(output_dir)
        if found:
            raise ValueError(
                f"output_dir {output_dir!r} holds a previous run ({found}); to continue it set resume_from_checkpoint: "
                "true, to replace it set overwrite_output_dir: true, or choose another output_dir"
            )
        return
    if resume is not True:
        problem = checkpoint_problem(str(resume))
        if problem:
            raise ValueError(f"cannot resume from {str(resume)!r}: {problem}")
        return
    newest, _ = _newest_complete(output_dir)
    if newest is None and not overwrite and os.path.isdir(output_dir) and _model_files(output_dir):
        raise ValueError(
            f"resume_from_checkpoint is true but {output_dir!r} holds a saved model and no complete checkpoint to "
            "resume from; set overwrite_output_dir: true to train it again from the start, or choose another output_dir"
        )


def resolve_resume(resume, output_dir: str) -> str | None:
    """The checkpoint folder a run resumes from (after :func:`check_start`), or None to start fresh: for True the
    newest complete checkpoint in ``output_dir``, naming in a warning each incomplete one skipped; with none, a fresh
    start (said in a warning)."""
    if not resume:
        return None
    if resume is not True:
        return str(resume)
    newest, skipped = _newest_complete(output_dir)
    if skipped:
        logger.warning("resume_from_checkpoint: skipping incomplete checkpoint(s) in %s: %s", output_dir,
                       "; ".join(skipped))
    if newest is None:
        logger.warning("resume_from_checkpoint: no complete checkpoint in %s; training starts from step 0", output_dir)
        return None
    logger.info("resuming from %s", newest)
    return newest


# ---------------------------------------------------------------------------------------------------------------------
# Staged writes
# ---------------------------------------------------------------------------------------------------------------------


def staging_dir(final_path: str) -> str:
    """The hidden folder beside ``final_path`` that its contents are written into first."""
    parent, name = os.path.split(os.path.normpath(final_path))
    return os.path.join(parent, STAGING_PREFIX + name)


def _fsync_tree(root: str) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clear_staging(path: str) -> None:
    """Remove a staging folder a killed save may have left."""
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def publish_checkpoint(staged: str, final: str) -> None:
    """Flush every file of the staged checkpoint folder, then rename it to ``final`` (replacing an older folder of the
    same name: rename it aside first, so a complete checkpoint of that name exists at every moment but one rename)."""
    _fsync_tree(staged)
    old = None
    if os.path.exists(final):
        old = staging_dir(final) + ".old"
        clear_staging(old)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_files(staged: str, target_dir: str, last: Iterable[str] = ("config.json", "adapter_config.json")) -> None:
    """Flush every file of ``staged``, then move each into ``target_dir`` (sub-folders as a whole), the names in
    ``last`` at the end: a model directory whose config is present then has its weights too. Removes ``staged``."""
    _fsync_tree(staged)
    os.makedirs(target_dir, exist_ok=True)
    names = sorted(os.listdir(staged), key=lambda n: (n in last, n))
    for name in names:
        dst = os.path.join(target_dir, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(staged, name), dst)
    _fsync_dir(target_dir)
    os.rmdir(staged)
