"""The Teacher's contribution to distillation, computed once per token block and replayed: ``amad demo --llm``
trains many Students (methods x seeds) on the same blocks, and the Teacher's forward pass is about half of a step.

:class:`CachedTeacher` stands in for a Llama-architecture Teacher (SmolLM2) wherever the Teacher is called with
``input_ids`` (and an ``attention_mask`` without padding): in a :class:`amad.Distiller` and in
:func:`amad.cli.causal_lm.evaluate_causal_lm`. Blocks are keyed by their token ids. The first time a block is
seen the real Teacher runs on it, and the cache stores

* its logits: all of them (``top_k=None``, for evaluation: perplexity and KL need the whole distribution), or
  the ``top_k`` largest per position with their indices (for training with ``Distiller(kd_top_k=top_k)``);
* for each layer in ``layers``: the input of that layer's self-attention (the normalised hidden states).

Every call (a hit, or the miss just filled) returns the stored logits, a ``(B, L, V)`` tensor holding the
stored top-k values and the lowest float32 elsewhere (finite, as the KD's checks want; its top-k is exactly the
Teacher's top-k, so use it only with top-k KD), and re-runs only the
stored layers' self-attention modules of the real Teacher on their stored inputs, with the position
embeddings and causal mask the model builds, so an :class:`amad.AttentionRecorder` on those modules records
the very Q, K and V of a full forward pass. Top-k KD from the cache equals top-k KD from the live Teacher, and
with ``top_k`` = the vocabulary, the full KD.

The module names are those of the wrapped Teacher under ``teacher.``: ``teacher.model.layers.29.self_attn``.
Attention layers not in ``layers`` are not run: recording them gives nothing (an error in the Distiller).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["CachedTeacher"]


class CachedTeacher(nn.Module):
    """A Llama-style causal LM Teacher whose logits and chosen layers' attention inputs are cached per block."""

    def __init__(self, teacher: nn.Module, *, layers: Sequence[int] = (), top_k: int | None = None) -> None:
        super().__init__()
        vocabulary = int(teacher.config.vocab_size)
        if top_k is not None and not 1 <= top_k <= vocabulary:
            raise ValueError(f"top_k must be in 1..{vocabulary} (the vocabulary) or None; got {top_k}")
        decoder = getattr(teacher, "model", None)
        if not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
            raise ValueError(f"CachedTeacher needs a Llama-style causal LM (model.layers, model.rotary_emb); got "
                             f"{type(teacher).__name__}")
        bad = [i for i in layers if not 0 <= i < len(decoder.layers)]
        if bad:
            raise ValueError(f"layers {bad} are not layers of the Teacher (0..{len(decoder.layers) - 1})")
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = teacher.config
        self.layers = tuple(layers)
        self.top_k = top_k
        self.store: dict[tuple[int, ...], tuple[Tensor, Tensor | None, tuple[Tensor, ...]]] = {}
        self.teacher_passes = 0  # blocks the real Teacher ran on

    def _attention(self, layer: int) -> nn.Module:
        return self.teacher.model.layers[layer].self_attn

    @torch.no_grad()
    def _fill(self, input_ids: Tensor, keys: list[tuple[int, ...]]) -> None:
        """Run the real Teacher on the blocks not stored yet and store them."""
        first_row: dict[tuple[int, ...], int] = {}
        for i, key in enumerate(keys):
            if key not in self.store:
                first_row.setdefault(key, i)
        missing = list(first_row.values())
        if not missing:
            return
        captured: dict[int, Tensor] = {}

        def hook(layer: int) -> Any:
            def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[layer] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
            return grab

        handles = [self._attention(i).register_forward_pre_hook(hook(i), with_kwargs=True) for i in self.layers]
        try:
            logits = self.teacher(input_ids=input_ids[missing]).logits.float()
        finally:
            for handle in handles:
                handle.remove()
        self.teacher_passes += len(missing)
        if self.top_k is None:
            values, indices = logits, None
        else:
            values, indices = logits.topk(self.top_k, dim=-1)
            indices = indices.to(torch.int32)
        for n, i in enumerate(missing):
            self.store[keys[i]] = (values[n].clone(), None if indices is None else indices[n].clone(),
                                   tuple(captured[layer][n].clone() for layer in self.layers))

    def _logits(self, keys: list[tuple[int, ...]], length: int) -> Tensor:
        if self.top_k is None:
            return torch.stack([self.store[k][0] for k in keys])
        values = torch.stack([self.store[k][0] for k in keys])
        logits = values.new_full((len(keys), length, int(self.config.vocab_size)), torch.finfo(values.dtype).min)
        indices = torch.stack([self.store[k][1] for k in keys]).long()
        return logits.scatter_(-1, indices, values)

    @torch.no_grad()
    def _replay_attention(self, keys: list[tuple[int, ...]], input_ids: Tensor) -> None:
        from transformers.masking_utils import create_causal_mask

        if not self.layers:
            return
        batch, length = input_ids.shape
        position_ids = torch.arange(length, device=input_ids.device)[None]
        first = torch.stack([self.store[k][2][0] for k in keys])
        mask = create_causal_mask(config=self.config, inputs_embeds=first, attention_mask=torch.ones_like(input_ids),
                                  past_key_values=None, position_ids=position_ids)
        position_embeddings = self.teacher.model.rotary_emb(first, position_ids=position_ids)
        for n, layer in enumerate(self.layers):
            hidden = first if n == 0 else torch.stack([self.store[k][2][n] for k in keys])
            self._attention(layer)(hidden_states=hidden, attention_mask=mask, position_ids=position_ids,
                                   position_embeddings=position_embeddings)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> CausalLMOutputWithPast:
        """The stored outputs of these blocks (the real Teacher runs on blocks not seen before)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("CachedTeacher stores whole blocks: give blocks without padding (attention_mask all 1)")
        keys = [tuple(row) for row in input_ids.tolist()]
        self._fill(input_ids, keys)
        self._replay_attention(keys, input_ids)
        return CausalLMOutputWithPast(logits=self._logits(keys, input_ids.shape[1]))
