"""Tiny task models of every supported family, sized by (layers, heads), and batches for them.

Used by the Distiller tests: a Teacher and a Student are two builds of the same
family with different head counts (and layer counts), so they share tokenizer
and image patching. Every model is built from a config (no downloads), with
dropout off so that two forward passes agree, hidden size ``HEAD_DIM * heads``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as hf
from torch import Tensor, nn

VOCAB = 40
HEAD_DIM = 4
IMAGE = dict(image_size=8, patch_size=4)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def text_config(layers: int, heads: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HEAD_DIM * heads, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=16, max_position_embeddings=16, **NO_DROPOUT)


def vision_config(layers: int, heads: int) -> dict:
    return dict(IMAGE, hidden_size=HEAD_DIM * heads, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=16, **NO_DROPOUT)


def bert(layers: int, heads: int) -> nn.Module:
    return hf.BertForSequenceClassification(hf.BertConfig(**text_config(layers, heads), num_labels=3))


def vit(layers: int, heads: int, patch_size: int = 4) -> nn.Module:
    config = hf.ViTConfig(**dict(vision_config(layers, heads), patch_size=patch_size), num_labels=3)
    return hf.ViTForImageClassification(config)


def deit(layers: int, heads: int) -> nn.Module:
    return hf.DeiTForImageClassification(hf.DeiTConfig(**vision_config(layers, heads), num_labels=3))


def t5(layers: int, heads: int) -> nn.Module:
    config = hf.T5Config(vocab_size=VOCAB, d_model=HEAD_DIM * heads, d_kv=HEAD_DIM, d_ff=16, num_layers=layers,
                         num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                         dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return hf.T5ForConditionalGeneration(config)


def blip(layers: int, heads: int) -> nn.Module:
    text = dict(text_config(layers, heads), encoder_hidden_size=HEAD_DIM * heads)
    # BLIP's vision tower initialises with std 1e-10 by default: all maps would be uniform.
    vision = dict(vision_config(layers, heads), attention_dropout=0.0, initializer_range=0.02)
    del vision["attention_probs_dropout_prob"], vision["hidden_dropout_prob"]
    return hf.BlipForConditionalGeneration(hf.BlipConfig(text_config=text, vision_config=vision))


def vilt(layers: int, heads: int) -> nn.Module:
    config = hf.ViltConfig(**text_config(layers, heads), **IMAGE, max_image_length=-1, num_labels=3)
    return hf.ViltForQuestionAnswering(config)


def gpt2(layers: int, heads: int) -> nn.Module:
    config = hf.GPT2Config(n_embd=HEAD_DIM * heads, n_layer=layers, n_head=heads, vocab_size=VOCAB, n_positions=16,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return hf.GPT2LMHeadModel(config)


def llama(layers: int, heads: int) -> nn.Module:
    """Grouped-query attention: half as many key/value heads as query heads."""
    config = hf.LlamaConfig(hidden_size=HEAD_DIM * heads, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=heads // 2, intermediate_size=16, vocab_size=VOCAB,
                            max_position_embeddings=16, head_dim=HEAD_DIM)
    return hf.LlamaForCausalLM(config)


# -- batches -----------------------------------------------------------------------------------------------------


def token_ids(batch: int, length: int, *, pad_from: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids (no 0s) and a right-padded 0/1 mask: the last sample padded from ``pad_from`` (ids set to 0)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
        input_ids[-1, pad_from:] = 0
    return input_ids, mask


def pixels(batch: int = 2, size: int = 8, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def class_labels(batch: int = 2) -> Tensor:
    return torch.arange(batch) % 3


def masked_labels(ids: Tensor, mask: Tensor) -> Tensor:
    """Sequence labels with -100 where the mask is 0."""
    return ids.masked_fill(mask == 0, -100)


def text_classification_batch(padded: bool = True) -> dict:
    input_ids, mask = token_ids(2, 7, pad_from=4 if padded else None)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": class_labels()}


def image_classification_batch(padded: bool = True) -> dict:
    return {"pixel_values": pixels(), "labels": class_labels()}


def seq2seq_batch(padded: bool = True, *, source_length: int = 7, target_length: int = 5) -> dict:
    """T5 with Teacher forcing: padded source and padded (-100) labels of another length."""
    input_ids, mask = token_ids(2, source_length, pad_from=4 if padded else None)
    target, target_mask = token_ids(2, target_length, pad_from=3 if padded else None, seed=2)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": masked_labels(target, target_mask),
            "decoder_attention_mask": target_mask}


def captioning_batch(padded: bool = True) -> dict:
    input_ids, mask = token_ids(2, 6, pad_from=4 if padded else None)
    return {"pixel_values": pixels(), "input_ids": input_ids, "attention_mask": mask,
            "labels": masked_labels(input_ids, mask)}


def vqa_batch(padded: bool = True) -> dict:
    input_ids, mask = token_ids(2, 6, pad_from=4 if padded else None)
    labels = torch.zeros(2, 3)
    labels[0, 1] = labels[1, 2] = 1.0
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels(), "labels": labels}


def causal_lm_batch(padded: bool = True) -> dict:
    input_ids, mask = token_ids(2, 7, pad_from=4 if padded else None)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": masked_labels(input_ids, mask)}


@dataclass(frozen=True)
class Family:
    """How to build a model of the family and a batch for it; ``stacks``: the stack keys ``layers="last"`` pairs."""

    build: Callable[[int, int], nn.Module]
    batch: Callable[..., dict]
    stacks: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    "bert": Family(bert, text_classification_batch, ("self",)),
    "vit": Family(vit, image_classification_batch, ("self",)),
    "deit": Family(deit, image_classification_batch, ("self",)),
    "t5": Family(t5, seq2seq_batch, ("encoder.self", "decoder.self", "decoder.cross")),
    "blip": Family(blip, captioning_batch, ("vision.self", "text.self", "text.cross")),
    "vilt": Family(vilt, vqa_batch, ("self",)),
    "gpt2": Family(gpt2, causal_lm_batch, ("self",)),
    "llama_gqa": Family(llama, causal_lm_batch, ("self",)),
}


def teacher_and_student(
    family: str, *, teacher_heads: int = 4, student_heads: int = 2, teacher_layers: int = 2, student_layers: int = 2,
    dtype: torch.dtype = torch.float32, seed: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """Two differently initialised models of ``family`` (the Teacher with more heads by default)."""
    build = FAMILIES[family].build
    torch.manual_seed(seed)
    teacher = build(teacher_layers, teacher_heads).to(dtype)
    torch.manual_seed(seed + 1)
    student = build(student_layers, student_heads).to(dtype)
    return teacher, student


def peaked_pair(family: str) -> tuple[nn.Module, nn.Module]:
    """:func:`teacher_and_student` with every linear weight drawn wider (std 0.5 instead of 0.02): peaked attention
    maps, so that an attention loss is sizeable (the sharding tests compare it, not just KD)."""
    teacher, student = teacher_and_student(family)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in [*teacher.modules(), *student.modules()]:
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)
    return teacher, student
