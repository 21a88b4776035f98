"""The Distiller's own state beside a saved Student: alpha buffers and learnable loss parameters.

A checkpoint of :class:`~amad.trainer.DistillationTrainer` holds the Student as
``student.save_pretrained`` writes it and ``distiller_state.safetensors``: every
entry of the Distiller's state dict outside the Student (``student.`` prefix),
with the attention loss's name and the layer pairs as metadata, so that a
checkpoint of another setup is refused instead of loaded into the wrong places.
"""

from __future__ import annotations

import json
import os

import safetensors.torch
from torch import Tensor

from .distiller import Distiller

DISTILLER_STATE_NAME = "distiller_state.safetensors"
STUDENT_PREFIX = "student."


def split_distiller_state(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a Distiller state dict into the Student's own (prefix removed) and the Distiller's extras."""
    student = {k[len(STUDENT_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(STUDENT_PREFIX)}
    extras = {k: v for k, v in state_dict.items() if not k.startswith(STUDENT_PREFIX)}
    return student, extras


def save_distiller_state(distiller: Distiller, extras: dict[str, Tensor], output_dir: str) -> None:
    """Write the Distiller's extra state (alpha buffers, learnable loss parts) next to the Student."""
    metadata = {
        "format": "pt",
        "attention_loss": json.dumps(distiller.attention_loss_name),
        "layer_pairs": json.dumps([list(pair) for pair in distiller.layer_pairs]),
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in extras.items()}
    safetensors.torch.save_file(tensors, os.path.join(output_dir, DISTILLER_STATE_NAME), metadata=metadata)


def load_distiller_state(distiller: Distiller, checkpoint_dir: str) -> None:
    """Restore what :func:`save_distiller_state` wrote, refusing a checkpoint of another setup."""
    path = os.path.join(checkpoint_dir, DISTILLER_STATE_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{checkpoint_dir!r} has no {DISTILLER_STATE_NAME}: it was not written by DistillationTrainer, so the "
            "Distiller's alpha and learnable loss parameters cannot be restored"
        )
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    saved_loss = json.loads(metadata.get("attention_loss", "null"))
    saved_pairs = [tuple(p) for p in json.loads(metadata.get("layer_pairs", "[]"))]
    if saved_loss != distiller.attention_loss_name or saved_pairs != list(distiller.layer_pairs):
        raise ValueError(
            f"{path} was written for attention_loss={saved_loss!r} on layer pairs {saved_pairs}; this Distiller has "
            f"attention_loss={distiller.attention_loss_name!r} on {list(distiller.layer_pairs)}"
        )
    _, expected = split_distiller_state(distiller.state_dict())
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{path} does not match the Distiller: missing {missing}, unexpected {unexpected}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    distiller.load_state_dict(state, strict=False)
