"""The run directory of ``amad distill``: one run per directory, checked before any weights load.

- A directory that already holds a run (checkpoints, or the Student, summary and
  plot inputs of a finished run) is refused unless ``--resume`` (continue it
  from its newest complete checkpoint) or ``--overwrite`` (remove the previous
  run's checkpoints and the files ``amad distill`` writes, :data:`RUN_OUTPUTS`,
  naming them; other files stay).
- The directories are created and a probe file is written and removed, so an
  unwritable directory is a config error, not a failure at the first checkpoint.
- On Ctrl-C, :func:`resume_hint` says which checkpoint exists and how to resume.
- :func:`exclusive_lock`: one process at a time on a directory (``amad tune``, ``amad demo``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Iterator

from ..checkpoints import checkpoint_dirs, latest_complete_checkpoint, missing_files, staging_dirs
from ..trainer import DISTILLER_STATE_NAME, TRAINING_ARGS_NAME, DistillationTrainer
from .typed import ConfigError

logger = logging.getLogger("amad.cli")

#: Files whose presence means a finished (or finishing) run: written by ``amad distill`` after training.
RUN_MARKERS = ("summary.json", "plot_inputs.pt", DISTILLER_STATE_NAME)
#: What ``amad distill`` (and ``amad plot``/``evaluate`` with their default outputs) write at the top of a run
#: directory: the Student and its processor (``save_pretrained``), the run's own files. ``--overwrite`` removes these.
RUN_OUTPUTS = (
    *RUN_MARKERS, TRAINING_ARGS_NAME, "config.yaml", "teacher", "plots", "eval_results.json",
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "preprocessor_config.json",
    "processor_config.json", "chat_template.jinja",
)  # fmt: skip


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, busy: str) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``lock_file`` while the block runs (the system releases it with the process,
    even a killed one, so a lock file left behind never blocks a later run); ``ConfigError(busy)`` when another
    process holds it. Not POSIX (no ``fcntl``): nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_writable(directory: Path, key: str) -> None:
    """Write, then remove, a probe file in ``directory``; a :class:`ConfigError` if that fails.

    Folders it had to create for the probe are removed again: a run that stops on a later check leaves nothing.
    """
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    probe = directory / f".amad-write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to {str(directory)!r}: {exc.strerror or exc}") from None
    finally:
        for folder in created:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def previous_run(run_dir: Path, checkpoint_dir: Path) -> list[str]:
    """What shows that ``run_dir`` (final outputs) or ``checkpoint_dir`` already holds a run."""
    found = [path for _, path in checkpoint_dirs(str(checkpoint_dir))] + staging_dirs(str(checkpoint_dir))
    found += [str(run_dir / name) for name in RUN_MARKERS if (run_dir / name).exists()]
    return found


def _listing(paths: list[str], most: int = 6) -> str:
    names = [os.path.basename(p) for p in paths]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_run_dir(args: Any, run_dir: Path, checkpoint_dir: Path, need_optimizer: bool) -> None:
    """The ``--out`` / ``--resume`` / ``--overwrite`` rules of the module docstring; errors are config errors."""
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite: give one (--resume continues the run, --overwrite replaces it)")
    check_writable(run_dir, "--out")
    if checkpoint_dir != run_dir:
        check_writable(checkpoint_dir, "training.output_dir")
    if args.resume is True:
        found = latest_complete_checkpoint(str(checkpoint_dir), DistillationTrainer.checkpoint_files, need_optimizer)
        if found.path is None:
            skipped = f" (incomplete, skipped: {_listing([p for p, _ in found.skipped])})" if found.skipped else ""
            raise ConfigError(f"--resume: no complete checkpoint in {str(checkpoint_dir)!r}{skipped}; start the run "
                              "again with --overwrite")
    elif args.resume:
        path = Path(args.resume)
        if not path.is_dir():
            raise ConfigError(f"--resume: {args.resume!r} is not a directory (give a checkpoint-N directory, or "
                              "--resume alone for the newest complete one)")
        missing = missing_files(str(path), DistillationTrainer.checkpoint_files, need_optimizer)
        if missing:
            raise ConfigError(f"--resume: {args.resume!r} is not a complete checkpoint (missing {', '.join(missing)})")
    elif not args.overwrite:
        found = previous_run(run_dir, checkpoint_dir)
        if found:
            raise ConfigError(
                f"--out: {str(run_dir)!r} already holds a run ({_listing(found)}); pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )


def remove_previous_run(run_dir: Path, checkpoint_dir: Path, keep: Path) -> None:
    """``--overwrite``: delete the previous run's checkpoints and :data:`RUN_OUTPUTS` (never ``keep``), naming them."""
    doomed = [path for _, path in checkpoint_dirs(str(checkpoint_dir))] + staging_dirs(str(checkpoint_dir))
    names = sorted(os.listdir(run_dir)) if run_dir.is_dir() else []
    doomed += [str(run_dir / n) for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in RUN_OUTPUTS)]
    doomed = [p for p in doomed if not (keep.exists() and Path(p).resolve() == keep.resolve())]
    if not doomed:
        return
    logger.warning("--overwrite: removing the previous run from %s: %s", run_dir, ", ".join(
        os.path.relpath(p, run_dir) for p in doomed))
    for path in doomed:  # (another process of a multi-process launch may be removing them too)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=_unless_missing)
        else:
            Path(path).unlink(missing_ok=True)


def _unless_missing(function: Any, path: str, exc_info: Any) -> None:
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def resume_hint(args: Any, run_dir: Path, checkpoint_dir: Path, need_optimizer: bool) -> str:
    """After Ctrl-C: the newest complete checkpoint and the command that resumes from it."""
    found = latest_complete_checkpoint(str(checkpoint_dir), DistillationTrainer.checkpoint_files, need_optimizer)
    if found.path is None:
        return (f"no complete checkpoint in {str(checkpoint_dir)!r} yet (see training.save_strategy / save_steps); "
                "run again with --overwrite to start afresh")
    sets = [part for value in args.set for part in ("--set", value)]
    command = shlex.join(["amad", "distill", str(args.config), "--out", str(run_dir), *sets, "--resume"])
    return f"the newest complete checkpoint is {found.path} (step {found.step}); resume with: {command}"
