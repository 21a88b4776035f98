"""Test-wide settings.

Triton's interpreter (``TRITON_INTERPRET=1``) must be chosen before anything imports
``triton.language``: torch and transformers may import it while other test files are collected,
and its ``@triton.jit`` helpers (``tl.zeros`` ...) are then compiled-mode functions the interpreter
cannot call. No test runs a compiled kernel, so the whole session uses the interpreter.
Tiny tensors run far faster on one intra-op thread.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
