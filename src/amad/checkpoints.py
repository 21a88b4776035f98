"""Crash-safe checkpoints for a `transformers.Trainer`: written aside, published by one rename.

The Trainer writes ``checkpoint-N`` file by file; a crash (``kill -9``, power
loss, out of memory) in the middle leaves a directory that looks like a
checkpoint and cannot be resumed from. :class:`AtomicCheckpoints` (a mixin for a
``Trainer`` subclass) makes the Trainer write into ``tmp-checkpoint-N/checkpoint-N``
instead, then fsyncs the files and directories, renames the directory to
``checkpoint-N`` (atomic on one filesystem) and fsyncs the parent. So at any
moment the output directory holds complete checkpoints and at most one staging
directory ``tmp-checkpoint-*``, which the next ``train()`` removes (naming it in a
warning).

``train(resume_from_checkpoint=True)`` resumes from the newest *complete*
checkpoint (:func:`latest_complete_checkpoint`): incomplete ones (written by an
older, non-atomic writer, or half deleted by checkpoint rotation) are skipped
with a warning naming them and what they lack. The checkpoint it resumes from is
logged as ``resuming from <dir> (step N)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")
#: Staging directories are ``tmp-checkpoint-N``: outside the Trainer's ``checkpoint-*`` patterns (rotation, resume).
STAGING_PREFIX = "tmp-"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
            ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)


@dataclass
class Found:
    """The newest complete checkpoint of a directory (``path`` None: none) and the incomplete ones skipped."""

    path: str | None
    step: int | None
    skipped: list[tuple[str, list[str]]] = field(default_factory=list)  # (directory, what it lacks)


def checkpoint_dirs(folder: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-N`` directory in ``folder``, oldest step first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def staging_dirs(folder: str) -> list[str]:
    """Staging directories (``tmp-checkpoint-N``) a crash or an interrupt left in ``folder``."""
    if not os.path.isdir(folder):
        return []
    paths = [os.path.join(folder, n) for n in os.listdir(folder)
             if n.startswith(STAGING_PREFIX) and _CHECKPOINT.match(n[len(STAGING_PREFIX) :])]
    return sorted(p for p in paths if os.path.isdir(p))


def missing_files(checkpoint: str, extra_files: tuple[str, ...] = (), need_optimizer: bool = True) -> list[str]:
    """What a resumable checkpoint needs and ``checkpoint`` lacks: trainer state, weights (every shard of an
    index), ``extra_files``, and optimizer and scheduler states unless ``need_optimizer`` is false."""
    required = [TRAINER_STATE_NAME, *extra_files, *(OPTIMIZER_FILES if need_optimizer else ())]
    missing = [name for name in required if not os.path.isfile(os.path.join(checkpoint, name))]
    weights = [name for name in _WEIGHTS if os.path.isfile(os.path.join(checkpoint, name))]
    if not weights:
        missing.append("model weights (model.safetensors or an index)")
    for index in (n for n in weights if n.endswith(".index.json")):
        try:
            with open(os.path.join(checkpoint, index), encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            missing.append(f"a readable {index} ({exc})")
            continue
        missing += [s for s in shards if not os.path.isfile(os.path.join(checkpoint, s))]
    return missing + unreadable_files(checkpoint)


def unreadable_files(checkpoint: str) -> list[str]:
    """Files of ``checkpoint`` whose JSON or safetensors header cannot be read (damaged after it was written)."""
    import safetensors

    problems = []
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        try:
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            elif name.endswith(".safetensors"):
                with safetensors.safe_open(path, framework="pt") as f:
                    f.keys()
        except Exception as exc:  # whatever the reader raises for a damaged file
            problems.append(f"a readable {name} ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})")
    return problems


def latest_complete_checkpoint(folder: str, extra_files: tuple[str, ...] = (), need_optimizer: bool = True) -> Found:
    """The newest checkpoint of ``folder`` that :func:`missing_files` finds complete, and the newer ones skipped."""
    skipped = []
    for step, path in reversed(checkpoint_dirs(folder)):
        missing = missing_files(path, extra_files, need_optimizer)
        if not missing:
            return Found(path, step, skipped)
        skipped.append((path, missing))
    return Found(None, None, skipped)


def checkpoint_step(checkpoint: str) -> int | None:
    """The global step a checkpoint's ``trainer_state.json`` records (None if unreadable)."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fsync_tree(path: str) -> None:
    """Flush every file under ``path``, then the directories (deepest first), to stable storage."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (renames, new files); a no-op where directories cannot be opened (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: str, final: str) -> None:
    """Make the complete directory ``staged`` appear as ``final`` in one rename, durably.

    An existing ``final`` (an older run's checkpoint of the same step) is first moved into ``staged``'s
    parent and deleted after the rename; ``staged``'s parent (the staging root) is removed at the end.
    """
    staging_root = os.path.dirname(staged)
    fsync_tree(staged)
    if os.path.lexists(final):
        logger.warning("replacing the existing %s", final)
        os.rename(final, os.path.join(staging_root, "replaced"))
    os.rename(staged, final)
    fsync_dir(os.path.dirname(final))
    shutil.rmtree(staging_root)


def remove_staging_dirs(folder: str) -> None:
    """Delete the staging directories a crash left in ``folder``, naming them in a warning."""
    for path in staging_dirs(folder):
        logger.warning("removing %s: an incomplete checkpoint left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)


def log_skipped(found: Found) -> None:
    for path, missing in found.skipped:
        logger.warning("skipping incomplete checkpoint %s (missing %s)", path, ", ".join(missing))


class AtomicCheckpoints:
    """Mixin for a ``transformers.Trainer`` subclass (listed before ``Trainer``): crash-safe checkpoints and
    resuming from the newest complete one. ``checkpoint_files``: files the subclass adds to every checkpoint
    (a checkpoint without them is incomplete)."""

    checkpoint_files: tuple[str, ...] = ()
    _staging_root: str | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if self.args.should_save:
            remove_staging_dirs(self.args.output_dir)
        return super().train(self.resolve_checkpoint(resume_from_checkpoint), *args, **kwargs)

    def resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """``True``: the newest complete checkpoint of ``output_dir``; a path: that one, if complete. Logged."""
        need_optimizer = not self.args.save_only_model
        if resume_from_checkpoint is True:
            found = latest_complete_checkpoint(self.args.output_dir, self.checkpoint_files, need_optimizer)
            log_skipped(found)
            if found.path is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no complete checkpoint in {self.args.output_dir!r}"
                    + (f" ({len(found.skipped)} incomplete one(s) skipped)" if found.skipped else "")
                )
            resume_from_checkpoint = found.path
        if not resume_from_checkpoint:
            return None
        path = str(resume_from_checkpoint)
        if not os.path.isdir(path):
            raise ValueError(f"cannot resume from {path!r}: no such directory")
        missing = missing_files(path, self.checkpoint_files, need_optimizer)
        if missing:
            raise ValueError(f"cannot resume from {path!r}: it is not a complete checkpoint (missing "
                             f"{', '.join(missing)})")
        logger.info("resuming from %s (step %s)", path, checkpoint_step(path))
        return path

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being saved, the Trainer writes it under the staging root.
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, written in ``tmp-checkpoint-N/checkpoint-N`` and published by :func:`publish`."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)  # its rotation runs on the staging root: a no-op
        finally:
            self._staging_root = None
        if self.state.best_model_checkpoint == staged:  # this step is the best: record its published name
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state into the staged directory
        if self.args.should_save:
            if os.path.isdir(staged):
                publish(staged, final)
            elif not os.path.isdir(final):  # (published by another node's process on a shared filesystem)
                raise RuntimeError(f"the checkpoint was not written to {staged}")
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        if self._deferred_push:
            self._deferred_push = False
            super()._push_from_checkpoint(final)

    _deferred_push = False

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Hub uploads run in the background: push the published directory, not the staging one.
        if self._staging_root is not None:
            self._deferred_push = True
        else:
            super()._push_from_checkpoint(checkpoint_folder)
