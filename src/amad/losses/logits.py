"""Logit distillation ``L_KD``: cross-entropy of the Student's softened predictions against the Teacher's.

At one position (a classifier's output, or one target token under Teacher forcing):

    CE = - sum_c softmax(z_T / tau)_c * log_softmax(z_S / tau)_c

* classification, logits ``(B, C)``: the mean of CE over the batch;
* sequences, logits ``(B, L, V)``: per sample, CE summed over the valid
  (non-padding) positions, then the mean over the samples that have a valid
  position (``reduction="sequence"``, the paper's form), or the mean over all
  valid tokens of the batch (``reduction="token"``).

A position is padding where ``labels == ignore_index`` (if ``labels`` is
given) or where ``mask`` is False (if given). The paper uses ``tau = 1``;
by default the loss is not multiplied by ``tau^2`` (Hinton et al.'s gradient
rescaling for ``tau != 1``): set ``scale_by_temperature_squared=True`` for it.

Top-k KD (``top_k=k``, for large vocabularies): at each position the Teacher's
``k`` largest logits ``I = topk(z_T, k)`` are renormalised among themselves,
and the Student's full-vocabulary log-probabilities are read at those indices:

    CE_k = - sum_{c in I} softmax(z_T[I] / tau)_c * log_softmax(z_S / tau)_c

The Teacher's ``(B, L, V)`` probability tensor is never built (only
``(B, L, k)``), and only ``k`` Teacher logits per position are needed, e.g.
when they were stored offline. With ``k = V`` it is the full CE above.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._common import NonFiniteError, check_temperature

__all__ = ["OutputLoss", "default_output_loss", "logit_kd", "token_mask"]

REDUCTIONS = ("sequence", "token")


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    for label, z in (("student", student_logits), ("teacher", teacher_logits)):
        if not isinstance(z, Tensor):
            raise TypeError(f"logit_kd: {label}_logits must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"logit_kd: {label}_logits must be floating point; got {z.dtype}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() not in (2, 3):
        raise ValueError(
            f"logit_kd: Student logits {tuple(student_logits.shape)} and Teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape, (B, C) or (B, L, V)"
        )
    if student_logits.shape[-1] == 0 or student_logits.shape[0] == 0:
        raise ValueError(f"logit_kd: logits are empty: shape {tuple(student_logits.shape)}")
    pair = (("student", student_logits), ("teacher", teacher_logits))
    # one host read (a host-device synchronisation on GPUs) for both; each is examined only if it fails
    if bool(torch.stack([torch.isfinite(z.detach()).all() for _, z in pair]).all()):
        return
    for label, z in pair:
        if not torch.isfinite(z.detach()).all():
            raise NonFiniteError(f"logit_kd: {label} logits {tuple(z.shape)} contain NaN or infinite values", label)


def _valid_positions(logits: Tensor, labels: Tensor | None, mask: Tensor | None, ignore_index: int) -> Tensor | None:
    """Boolean ``logits.shape[:-1]``, True for positions that count, or None if all do."""
    positions = tuple(logits.shape[:-1])
    valid = None
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.is_floating_point() or tuple(labels.shape) != positions:
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"logit_kd: labels must be an integer tensor of shape {positions}; got {got}")
        valid = labels != ignore_index
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != positions:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"logit_kd: mask must be a boolean tensor of shape {positions}; got {got}")
        valid = mask if valid is None else valid & mask
    return valid


def _check_top_k(top_k: int | None, classes: int) -> None:
    if top_k is None:
        return
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"logit_kd: top_k must be None or an integer >= 1; got {top_k!r}")
    if top_k > classes:
        raise ValueError(f"logit_kd: top_k={top_k} is larger than the {classes} classes of the logits")


def _teacher_target_and_student_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, top_k: int | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(p_T, log p_S)`` over the full vocabulary, or over the Teacher's top-k indices (renormalised p_T).

    Top-k: ``log p_S(c) = z_S[c] / tau - logsumexp(z_S / tau)``, so no ``(B, L, V)`` log-softmax is kept.
    """
    student = student_logits.to(dtype)
    student = student / temperature if temperature != 1 else student
    if top_k is None:
        return torch.softmax(teacher_logits.to(dtype) / temperature, dim=-1), torch.log_softmax(student, dim=-1)
    values, indices = teacher_logits.topk(top_k, dim=-1)
    log_pred = student.gather(-1, indices) - torch.logsumexp(student, dim=-1, keepdim=True)
    return torch.softmax(values.to(dtype) / temperature, dim=-1), log_pred


def logit_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "sequence",
    scale_by_temperature_squared: bool = False,
    top_k: int | None = None,
) -> Tensor:
    """``CE(softmax(z_T / tau), log_softmax(z_S / tau))``, summed over a sequence's valid tokens, mean over samples.

    student_logits, teacher_logits: ``(B, C)`` or ``(B, L, V)``, same shape.
    labels: integer ``(B,)`` / ``(B, L)``; positions equal to ``ignore_index`` are ignored.
    mask: boolean ``(B,)`` / ``(B, L)``, True where a position counts.
    reduction: ``"sequence"`` or ``"token"`` (see the module doc).
    top_k: None (every class) or ``k``: KD on the Teacher's ``k`` largest logits, renormalised (module doc).
    """
    _check_logits(student_logits, teacher_logits)
    check_temperature(temperature, name="logit_kd")
    if reduction not in REDUCTIONS:
        raise ValueError(f"logit_kd: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    _check_top_k(top_k, student_logits.shape[-1])
    valid = _valid_positions(student_logits, labels, mask, ignore_index)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    target, log_pred = _teacher_target_and_student_log_probs(student_logits, teacher_logits, temperature, top_k, dtype)
    ce = -(target * log_pred).sum(dim=-1)
    if valid is None:
        valid = torch.ones_like(ce, dtype=torch.bool)
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    if ce.dim() == 1:  # classification: one position per sample
        ce, valid = ce[:, None], valid[:, None]
    per_sample = ce.sum(dim=1)
    if reduction == "sequence":
        has_valid = valid.any(dim=1)
        loss = per_sample.sum() / has_valid.sum().clamp(min=1).to(dtype)
    else:
        loss = per_sample.sum() / valid.sum().clamp(min=1).to(dtype)
    return loss * temperature**2 if scale_by_temperature_squared else loss


# -- the Distiller's default output loss: logit KD read from model outputs -----------------
OutputLoss = Callable[[Any, Any, dict], Tensor]


def _model_logits(outputs: Any) -> Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)):
        logits = outputs[0]
    if not isinstance(logits, Tensor):
        raise ValueError(
            "logit KD needs model outputs with `.logits`; pass `output_loss=` for models without logits "
            "(e.g. an embedding loss), or kd_weight=0"
        )
    return logits


def token_mask(batch: dict, length: int) -> Tensor | None:
    """Which of ``length`` sequence positions are real tokens, from the batch (or None = all)."""
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape[1] == length:
        return labels != -100
    for key in ("decoder_attention_mask", "attention_mask"):
        mask = batch.get(key)
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] == length:
            return mask.bool()
    return None


def default_output_loss(temperature: float, top_k: int | None = None) -> OutputLoss:
    """Logit KD (docs/method.md): classification (B, C) or per-token (B, L, V) with padding ignored.

    ``top_k``: KD on the Teacher's ``top_k`` largest logits per position, renormalised (``logit_kd``).
    """

    def kd(student_outputs: Any, teacher_outputs: Any, batch: dict) -> Tensor:
        s, t = _model_logits(student_outputs), _model_logits(teacher_outputs)
        mask = token_mask(batch, s.shape[1]) if s.dim() == 3 else None
        return logit_kd(s, t, temperature=temperature, mask=mask, top_k=top_k)

    return kd
