"""Turn rows of the Shapes views into model batches (tensors).

- :class:`VQACollator`: ``input_ids``, ``attention_mask``, ``pixel_values``, ``labels`` (answer ids).
- :class:`Seq2SeqCollator`: VL-T5 generation (translation, captioning): the target
  becomes ``labels`` with padding as -100 (the model shifts it right itself).
- :class:`BlipCaptionCollator`: BLIP's text decoder reads ``<s> caption </s>``
  and predicts every token after ``<s>``; ``labels`` = ``input_ids`` with padding as -100.

Pixels are scaled from [0, 255] to [-1, 1], layout ``(B, 3, 48, 48)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from .shapes import TASK_PREFIX

IGNORE_INDEX = -100


def pixel_values(images: Sequence[Any]) -> Tensor:
    """``(B, 3, H, W)`` float in [-1, 1] from ``(H, W, 3)`` uint8 images (arrays or nested lists)."""
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected images of shape (H, W, 3), got a stack of shape {array.shape}")
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _with_prefix(task: str, texts: Sequence[str]) -> list[str]:
    prefix = TASK_PREFIX[task]
    return [f"{prefix} {t}".strip() for t in texts]


def _encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> dict[str, Tensor]:
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


@dataclass
class VQACollator:
    tokenizer: PreTrainedTokenizerFast

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = _encode(self.tokenizer, _with_prefix("vqa", [r["question"] for r in rows]))
        batch["pixel_values"] = pixel_values([r["image"] for r in rows])
        batch["labels"] = torch.tensor([r["answer_id"] for r in rows], dtype=torch.long)
        return batch


@dataclass
class Seq2SeqCollator:
    """``task`` is "translate" (rows with source/target) or "caption" (rows with caption)."""

    tokenizer: PreTrainedTokenizerFast
    task: str = "translate"

    def __post_init__(self) -> None:
        if self.task not in ("translate", "caption"):
            raise ValueError(f"Seq2SeqCollator task must be 'translate' or 'caption', got {self.task!r}")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        if self.task == "translate":
            sources, targets = [r["source"] for r in rows], [r["target"] for r in rows]
        else:
            sources, targets = ["" for _ in rows], [r["caption"] for r in rows]
        batch = _encode(self.tokenizer, _with_prefix(self.task, sources))
        target = _encode(self.tokenizer, targets)
        batch["labels"] = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE_INDEX)
        batch["pixel_values"] = pixel_values([r["image"] for r in rows])
        return batch


@dataclass
class BlipCaptionCollator:
    tokenizer: PreTrainedTokenizerFast

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        bos = self.tokenizer.bos_token
        batch = _encode(self.tokenizer, [f"{bos} {r['caption']}" for r in rows])
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        batch["pixel_values"] = pixel_values([r["image"] for r in rows])
        return batch
