"""Commands and model types that other layers add to the ``amad`` command, found by entry point.

The command line never imports the benchmarks: a package (the benchmarks, or a
user's own) declares in its ``pyproject.toml``

    [project.entry-points."amad.commands"]   demo = "amad.bench:main"
    [project.entry-points."amad.model_types"] vlt5 = "amad.bench.models.vlt5"

A command is a ``main(argv: list[str]) -> int``; a model type is a module whose
import registers its configs and models with the ``transformers`` Auto classes.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import Callable

COMMANDS_GROUP = "amad.commands"
MODEL_TYPES_GROUP = "amad.model_types"


def _entries(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def plugin_commands() -> list[str]:
    """Names of the commands that installed packages add (e.g. ``demo``)."""
    return sorted(_entries(COMMANDS_GROUP))


def load_command(name: str) -> Callable[[list[str]], int]:
    """The ``main(argv)`` of the plugin command ``name``."""
    entries = _entries(COMMANDS_GROUP)
    if name not in entries:
        raise RuntimeError(
            f"the {name!r} command is not available: no installed package provides it "
            f"(entry point group {COMMANDS_GROUP!r}); reinstall amad with `make install`"
        )
    return entries[name].load()


def register_model_types() -> None:
    """Import every installed model-type module, so the Auto classes know its ``model_type``."""
    for entry in _entries(MODEL_TYPES_GROUP).values():
        import_module(entry.value)
