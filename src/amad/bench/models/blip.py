"""Demo-size BLIP captioners (``BlipForConditionalGeneration``) built from a tiny ``BlipConfig``.

The ViT sees 48 x 48 images in 8 x 8 patches (36 patches + [CLS] = 37 tokens);
the BERT-style text decoder uses the Shapes word-level tokenizer. Token ids
must agree with that tokenizer (see :mod:`amad.bench.data.tokenizer`): the decoder
reads ``<s> caption </s>`` (``bos_token_id`` = ``<s>``), generation stops at
``sep_token_id`` = ``eos_token_id`` = ``</s>``, padding is ``<pad>``.
:class:`amad.bench.data.BlipCaptionCollator` builds such batches.

Teacher: 8 heads in the ViT and the text decoder; Student: 4 heads, narrower
and shallower. Patching and tokenizer are shared, so attention maps of
corresponding layers have the same ``q x k``.
"""

from __future__ import annotations

from typing import Any

from transformers import BlipConfig, BlipForConditionalGeneration

__all__ = ["BLIP_SIZES", "make_blip"]

BLIP_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "teacher": {
        "vision": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8),
        "text": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8),
    },
    "student": {
        "vision": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    },
}


def make_blip(size: str = "teacher", *, vocab_size: int, pad_token_id: int = 0, eos_token_id: int = 1,
              bos_token_id: int = 3, image_size: int = 48, patch_size: int = 8, max_length: int = 64,
              vision_overrides: dict[str, Any] | None = None,
              text_overrides: dict[str, Any] | None = None) -> BlipForConditionalGeneration:
    """A randomly initialised BLIP captioner of the given size (ids default to the Shapes tokenizer's)."""
    if size not in BLIP_SIZES:
        raise ValueError(f"unknown BLIP size {size!r}; expected one of {tuple(BLIP_SIZES)}")
    if len({pad_token_id, eos_token_id, bos_token_id}) != 3:
        raise ValueError(f"pad ({pad_token_id}), eos ({eos_token_id}) and bos ({bos_token_id}) ids must differ")
    vision = dict(BLIP_SIZES[size]["vision"], image_size=image_size, patch_size=patch_size,
                  **(vision_overrides or {}))
    text = dict(BLIP_SIZES[size]["text"], vocab_size=vocab_size, max_position_embeddings=max_length,
                pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                sep_token_id=eos_token_id, **(text_overrides or {}))
    config = BlipConfig(vision_config=vision, text_config=text, projection_dim=text["hidden_size"],
                        image_text_hidden_size=text["hidden_size"])
    return BlipForConditionalGeneration(config)
