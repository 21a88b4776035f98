"""Fault injection for tests/test_crash_safety.py: ``amad distill`` in a forked child that dies where it is told.

The child is forked from a fresh forkserver process that has imported torch,
transformers and the command line once (little start-up cost per child, and no
state left behind by earlier tests in the pytest process: logging handlers,
threads, patched functions), installs its fault (a patch of the
functions that write checkpoint files, of ``os.rename`` or of the training step:
test hooks, not library code), runs ``amad.cli.main(argv)`` with its output in
a log file, and exits with the command's code, or is killed by the fault.

Faults, ``(kind, where)``:

- ``("step", n)``: SIGKILL when the step after global step ``n`` begins;
- ``("kill", "a/b")``: SIGKILL just before a file whose path ends in ``/a/b`` is written;
- ``("torn", "a/b")``: write that file, cut it to half its size, then SIGKILL (a torn write);
- ``("interrupt", "a/b")``: SIGINT (Ctrl-C) just before that file is written;
- ``("rename", "a")``: SIGKILL just before a directory is renamed to a path ending in ``/a``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

Fault = tuple[str, Any]


def _die(sig: int = signal.SIGKILL) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


def _matches(path: Any, where: str) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith("/" + where)


def _wrap_writer(owner: Any, name: str, kind: str, where: str, path_arg: int) -> None:
    """Replace ``owner.name`` (a function writing a file, its path the argument ``path_arg``) by a faulty one."""
    real = getattr(owner, name)

    def faulty(*args: Any, **kwargs: Any) -> Any:
        path = args[path_arg] if len(args) > path_arg else kwargs.get("filename", kwargs.get("f"))
        if not _matches(path, where):
            return real(*args, **kwargs)
        if kind == "interrupt":
            _die(signal.SIGINT)  # Python raises KeyboardInterrupt here, as after a Ctrl-C
        if kind == "torn":
            result = real(*args, **kwargs)
            os.truncate(path, os.path.getsize(path) // 2)
            _die()
            return result
        _die()

    setattr(owner, name, faulty)


def install_fault(fault: Fault | None) -> None:
    """Patch, in this (child) process, what ``fault`` names."""
    if fault is None:
        return
    kind, where = fault
    if kind == "step":
        from amad.trainer import DistillationTrainer

        real_step = DistillationTrainer.training_step

        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.state.global_step == where:
                _die()
            return real_step(self, *args, **kwargs)

        DistillationTrainer.training_step = step
    elif kind == "rename":
        real_rename = os.rename

        def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if _matches(dst, where):
                _die()
            real_rename(src, dst, *args, **kwargs)

        os.rename = rename
    elif kind in ("kill", "torn", "interrupt"):
        import safetensors.torch
        import torch
        import transformers.modeling_utils

        _wrap_writer(torch, "save", kind, where, 1)  # optimizer, scheduler, RNG state, training_args.bin
        _wrap_writer(safetensors.torch, "save_file", kind, where, 1)  # distiller_state.safetensors
        _wrap_writer(transformers.modeling_utils, "safe_save_file", kind, where, 1)  # the Student's weights
    else:
        raise ValueError(f"unknown fault {fault!r}")


def _child(argv: list[str], fault: Fault | None, log: str) -> None:
    stream = open(log, "w", buffering=1)
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch

    torch.set_num_threads(1)  # as tests/conftest.py sets it for the test process: tiny models run faster
    code = 1
    try:
        install_fault(fault)
        from amad.cli import main

        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        stream.flush()
        os._exit(code)


def run_distill(argv: list[str], fault: Fault | None, log: Path, timeout: float = 300) -> tuple[int, str]:
    """Run ``amad <argv>`` in a forked child with ``fault``; its exit code (``-9``: SIGKILLed) and output."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["crash_worker", "amad.cli.commands"])
    process = context.Process(target=_child, args=(argv, fault, str(log)))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise TimeoutError(f"amad {' '.join(argv)} with fault {fault} ran over {timeout} s:\n{log.read_text()}")
    return process.exitcode, log.read_text()
