"""Distillation losses on attention maps (and on Q/K/V, values and logits).

Every map loss takes batched maps ``teacher (B, H_t, q, k)`` and
``student (B, H_s, q, k)`` and returns a scalar. ``get(name)`` returns the
module form of a loss by its registered name. One file per family:

* ``alignment``  AMAD variants mse / kl / token / s2t (``_gram``: the Gram identity)
* ``projected``  ``ProjectedAMAD`` (variant 3, learnable)
* ``one_to_one`` KD-ATT, head j to head j
* ``head_mean``  mean over heads vs mean over heads
* ``rkd``        RKD-D on per-sample map vectors
* ``shd``        squeezing-heads distillation
* ``minilm``     MiniLMv2 multi-head self-attention relations (Q/K/V)
* ``logits``     logit KD for classifiers and teacher-forced sequences

Each family's file holds its map form, its streaming form (``streaming_*``, on
recorded inputs, never a whole map; ``_blockwise`` is the shared engine) and its
module; ``streaming`` gathers the streaming forms under one name.
"""

from . import alignment, head_mean, logits, minilm, one_to_one, projected, rkd, shd, streaming  # noqa: F401  (registration)
from .alignment import *  # noqa: F401,F403
from ._common import NonFiniteError
from .base import AttentionLoss
from .head_mean import *  # noqa: F401,F403
from .logits import *  # noqa: F401,F403
from .minilm import *  # noqa: F401,F403
from .one_to_one import *  # noqa: F401,F403
from .projected import *  # noqa: F401,F403
from .registry import available, get, register
from .rkd import *  # noqa: F401,F403
from .shd import *  # noqa: F401,F403

__all__ = ["AttentionLoss", "NonFiniteError", "available", "get", "register"]
