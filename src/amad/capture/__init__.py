"""Capture of what attention layers compute, from real Hugging Face models.

* ``recorder``  :class:`AttentionRecorder`: records the listed layers through the
  Transformers attention interface, leaving every other layer on its fast path;
* ``hooks``     the projection-hook fallback for models outside that interface (BLIP, ViLT);
* ``tensors``   turning what a layer saw (Q, K, V, mask, bias) into :class:`~amad.attention.AttentionInputs`;
* ``layers``    which modules are attention layers, and the Teacher/Student layer maps (last, uniform, explicit).
"""

from .layers import attention_layers, check_layer_shapes, resolve_layer_pairs, uniform_layer_map
from .recorder import AttentionRecorder

__all__ = ["AttentionRecorder", "attention_layers", "check_layer_shapes", "resolve_layer_pairs", "uniform_layer_map"]
