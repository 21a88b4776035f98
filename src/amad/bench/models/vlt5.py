"""VL-T5-style vision-language models on stock Hugging Face T5, at demo size.

The image is cut into ``patch_size`` x ``patch_size`` patches (48 / 8 -> 36),
each linearly projected (a strided convolution) to ``d_model``, given a learned
position embedding and RMS-normalised like T5's token embeddings; these 36
visual tokens are prefixed to the text token embeddings of the T5 encoder, and
the attention mask is extended by 36 ones. Every attention layer is the stock
``T5Attention`` (reached through the Transformers attention interface), so
module names are T5's: ``encoder.block.{i}.layer.0.SelfAttention``,
``decoder.block.{i}.layer.0.SelfAttention``, ``decoder.block.{i}.layer.1.EncDecAttention``.

- :class:`VLT5ForConditionalGeneration`: translation / captioning, teacher-forced
  ``labels`` and ``generate()`` (a ``T5ForConditionalGeneration``).
- :class:`VLT5ForVQA`: VL-T5's discriminative VQA: the decoder reads one
  decoder-start token, and an MLP on its output classifies the answer.

Teacher and Student differ in width, depth and head count (12 vs 8 heads) but
share patching and tokenizer, so their attention maps have the same ``q x k``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoModelForVisualQuestionAnswering,
    T5Config,
    T5ForConditionalGeneration,
    initialization as init,
)
from transformers.modeling_outputs import BaseModelOutput, ModelOutput
from transformers.models.t5.modeling_t5 import T5LayerNorm, T5PreTrainedModel, T5Stack

__all__ = [
    "VLT5Config", "VLT5ForConditionalGeneration", "VLT5ForVQA", "VLT5VQAOutput", "VLT5_SIZES", "make_vlt5",
]


@strict
class VLT5Config(T5Config):
    """A ``T5Config`` plus the image patching and the number of VQA answers."""

    model_type = "vlt5"
    image_size: int = 48
    patch_size: int = 8
    num_channels: int = 3
    num_answers: int = 0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_answers < 0:
            raise ValueError(f"num_answers must be >= 0, got {self.num_answers}")
        super().__post_init__(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _init_std(layer: nn.Linear | nn.Conv2d, std: float) -> nn.Linear | nn.Conv2d:
    """Mark a layer to be initialised N(0, std^2) with zero bias (instead of T5's std 1)."""
    layer._amad_init_std = std
    return layer


class VisualEmbedding(nn.Module):
    """Pixels ``(B, C, H, W)`` -> visual tokens ``(B, num_patches, d_model)``."""

    def __init__(self, config: VLT5Config) -> None:
        super().__init__()
        self.config = config
        patch = nn.Conv2d(config.num_channels, config.d_model, config.patch_size, stride=config.patch_size)
        self.patch = _init_std(patch, (config.num_channels * config.patch_size**2) ** -0.5)
        self.position = nn.Embedding(config.num_patches, config.d_model)
        self.norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def forward(self, pixel_values: Tensor) -> Tensor:
        c, s = self.config.num_channels, self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(f"pixel_values must be (B, {c}, {s}, {s}), got {tuple(pixel_values.shape)}")
        x = self.patch(pixel_values.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)
        return self.norm(x + self.position.weight)


def extend_encoder_mask(attention_mask: Tensor | None, encoder_length: int, num_patches: int) -> Tensor | None:
    """The text mask ``(B, L)`` extended to the ``num_patches + L`` encoder positions (visual tokens are valid).

    A mask that already covers ``encoder_length`` positions is returned as is.
    """
    if attention_mask is None or attention_mask.shape[-1] == encoder_length:
        return attention_mask
    if attention_mask.dim() != 2 or attention_mask.shape[-1] + num_patches != encoder_length:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} fits neither the text ({encoder_length - num_patches} "
            f"tokens) nor the whole encoder input ({encoder_length} = {num_patches} patches + text)"
        )
    visual = attention_mask.new_ones(attention_mask.shape[0], num_patches)
    return torch.cat([visual, attention_mask], dim=1)


class VLT5PreTrainedModel(T5PreTrainedModel):
    """Shared parts: config class, initialisation and the vision-language encoder pass."""

    config_class = VLT5Config
    shared: nn.Embedding
    encoder: T5Stack
    visual: VisualEmbedding

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Transformers calls this only on modules that own parameters directly, so the layers
        # added here carry their init std themselves (see `_init_std`).
        super()._init_weights(module)
        std = getattr(module, "_amad_init_std", None)
        if std is not None:
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)

    def encode(
        self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutput:
        """Run the encoder on ``[visual tokens; text tokens]``; its output has ``num_patches + L`` positions."""
        if input_ids is None or pixel_values is None:
            raise ValueError("the VL-T5 encoder needs both input_ids and pixel_values")
        visual = self.visual(pixel_values)
        if visual.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values batch {visual.shape[0]} != input_ids batch {input_ids.shape[0]}")
        embeds = torch.cat([visual, self.shared(input_ids)], dim=1)
        mask = extend_encoder_mask(attention_mask, embeds.shape[1], self.config.num_patches)
        return self.encoder(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    def _encoder_outputs(self, encoder_outputs: Any, input_ids: Tensor | None, pixel_values: Tensor | None,
                         attention_mask: Tensor | None, kwargs: dict[str, Any]) -> tuple[BaseModelOutput, Tensor | None]:
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, pixel_values, attention_mask, **kwargs)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        length = encoder_outputs.last_hidden_state.shape[1]
        return encoder_outputs, extend_encoder_mask(attention_mask, length, self.config.num_patches)


class VLT5ForConditionalGeneration(VLT5PreTrainedModel, T5ForConditionalGeneration):
    """T5 with visual tokens prefixed to the encoder input: translation and captioning."""

    def __init__(self, config: VLT5Config) -> None:
        super().__init__(config)
        self.visual = VisualEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_outputs: Any = None,
        past_key_values: Any = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """As ``T5ForConditionalGeneration.forward``; ``attention_mask`` is the text mask (or the full one)."""
        encoder_outputs, mask = self._encoder_outputs(encoder_outputs, input_ids, pixel_values, attention_mask, kwargs)
        outputs = super().forward(
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )
        # With precomputed encoder outputs, T5's output-capturing leaves encoder_attentions empty.
        if encoder_outputs.attentions and not outputs.encoder_attentions:
            outputs.encoder_attentions = encoder_outputs.attentions
        return outputs

    @torch.no_grad()
    def generate(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                 attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        """Encode text and image once, then decode with the usual ``GenerationMixin.generate`` options."""
        if "encoder_outputs" in kwargs:
            return super().generate(attention_mask=attention_mask, **kwargs)
        encoder_outputs = self.encode(input_ids, pixel_values, attention_mask)
        length = encoder_outputs.last_hidden_state.shape[1]
        mask = extend_encoder_mask(attention_mask, length, self.config.num_patches)
        if mask is None:
            mask = torch.ones(input_ids.shape[0], length, dtype=torch.long, device=input_ids.device)
        return super().generate(encoder_outputs=encoder_outputs, attention_mask=mask, **kwargs)


class AnswerHead(nn.Module):
    """VL-T5's answer classifier: Linear -> GELU -> LayerNorm -> Linear."""

    def __init__(self, d_model: int, num_answers: int) -> None:
        super().__init__()
        self.dense = _init_std(nn.Linear(d_model, 2 * d_model), d_model**-0.5)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(2 * d_model)
        self.out = _init_std(nn.Linear(2 * d_model, num_answers), (2 * d_model) ** -0.5)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.out(self.norm(self.act(self.dense(hidden))))


@dataclass
class VLT5VQAOutput(ModelOutput):
    """``logits`` ``(B, num_answers)``; attentions only with ``output_attentions=True``."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    encoder_last_hidden_state: Tensor | None = None
    decoder_last_hidden_state: Tensor | None = None
    encoder_attentions: tuple[Tensor, ...] | None = None
    decoder_attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


class VLT5ForVQA(VLT5PreTrainedModel):
    """Discriminative VQA: classify the answer from the decoder output at the decoder start token."""

    _tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}

    def __init__(self, config: VLT5Config) -> None:
        if config.num_answers < 1:
            raise ValueError(f"VLT5ForVQA needs config.num_answers >= 1, got {config.num_answers}")
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder, encoder_config.use_cache = False, False
        self.encoder = T5Stack(encoder_config)
        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder, decoder_config.use_cache = True, False
        decoder_config.num_layers = config.num_decoder_layers
        self.decoder = T5Stack(decoder_config)
        self.visual = VisualEmbedding(config)
        self.answer_head = AnswerHead(config.d_model, config.num_answers)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(new_embeddings)
        self.decoder.set_input_embeddings(new_embeddings)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        encoder_outputs: Any = None,
        **kwargs: Any,
    ) -> VLT5VQAOutput:
        """``labels``: answer ids ``(B,)`` (long, -100 ignored) -> cross-entropy ``loss``."""
        encoder_outputs, mask = self._encoder_outputs(encoder_outputs, input_ids, pixel_values, attention_mask, kwargs)
        hidden = encoder_outputs.last_hidden_state
        start = torch.full((hidden.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long,
                           device=hidden.device)
        decoded = self.decoder(input_ids=start, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                               use_cache=False, **kwargs)
        logits = self.answer_head(decoded.last_hidden_state[:, 0])
        loss = None
        if labels is not None:
            if labels.dtype != torch.long or labels.shape != logits.shape[:1]:
                raise TypeError(f"labels must be long answer ids of shape ({logits.shape[0]},), got "
                                f"{labels.dtype} {tuple(labels.shape)}")
            loss = nn.functional.cross_entropy(logits, labels.to(logits.device), ignore_index=-100)
        return VLT5VQAOutput(
            loss=loss, logits=logits,
            encoder_last_hidden_state=hidden, decoder_last_hidden_state=decoded.last_hidden_state,
            encoder_attentions=getattr(encoder_outputs, "attentions", None),
            decoder_attentions=getattr(decoded, "attentions", None),
            cross_attentions=getattr(decoded, "cross_attentions", None),
        )


AutoConfig.register("vlt5", VLT5Config, exist_ok=True)
AutoModelForSeq2SeqLM.register(VLT5Config, VLT5ForConditionalGeneration, exist_ok=True)
AutoModelForVisualQuestionAnswering.register(VLT5Config, VLT5ForVQA, exist_ok=True)

# Teacher 12 heads, Student 8 heads, both 16 dims per head (the paper's 12 -> 8 of T5 base -> small).
VLT5_SIZES: dict[str, dict[str, Any]] = {
    "teacher": dict(d_model=192, num_heads=12, d_kv=16, d_ff=512, num_layers=3, num_decoder_layers=3),
    "student": dict(d_model=128, num_heads=8, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2),
}
TASKS = ("vqa", "translate", "caption")


def make_vlt5(size: str = "teacher", task: str = "vqa", *, vocab_size: int, num_answers: int = 0,
              pad_token_id: int = 0, eos_token_id: int = 1, **overrides: Any) -> VLT5PreTrainedModel:
    """A randomly initialised VL-T5 of the given size for ``task`` ("vqa", "translate" or "caption").

    ``overrides`` replace any ``VLT5Config`` field (e.g. ``patch_size``). The
    decoder starts from the pad token, as in T5. Dropout is off by default: the
    demo trains from scratch for a few hundred steps, far from overfitting.
    """
    if size not in VLT5_SIZES:
        raise ValueError(f"unknown VL-T5 size {size!r}; expected one of {tuple(VLT5_SIZES)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "vqa" and num_answers < 1:
        raise ValueError(f"task 'vqa' needs num_answers >= 1, got {num_answers}")
    fields = dict(VLT5_SIZES[size], vocab_size=vocab_size, num_answers=num_answers if task == "vqa" else 0,
                  pad_token_id=pad_token_id, eos_token_id=eos_token_id, decoder_start_token_id=pad_token_id,
                  dropout_rate=0.0)
    fields.update(overrides)
    config = VLT5Config(**fields)
    model = VLT5ForVQA(config) if task == "vqa" else VLT5ForConditionalGeneration(config)
    return model
