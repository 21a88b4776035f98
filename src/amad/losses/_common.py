"""Shared pieces of the map losses: input checks, masks, normalisations, reductions.

Conventions used by every loss on attention maps:

* maps are ``(B, H, q, k)`` probabilities; Teacher and Student share ``B, q, k``;
* ``mask`` is boolean, broadcastable to ``(B, 1, q, k)``, True where valid;
  masked entries are set to zero before the loss sees them;
* ``reduction="paper"``: sum of the element losses / (``B * H * n``), the
  paper's element mean (masked elements still count in the denominator);
* ``reduction="mean"``: per sample, sum of the element losses over valid
  entries / (``H * n_valid``), then the mean over samples that have a valid
  entry. With no mask the two reductions agree; with a mask, padding a batch
  does not change a sample's loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REDUCTIONS = ("paper", "mean")


class NonFiniteError(ValueError):
    """A model's logits, maps or Q/K/V hold NaN or infinite values; ``model`` is "teacher", "student" or None."""

    def __init__(self, message: str, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


#: Half-precision dtypes: losses compute them in float32 and return the input dtype.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_maps(teacher: Tensor, student: Tensor, mask: Tensor | None = None, *, name: str = "loss") -> Tensor | None:
    """Validate a Teacher/Student pair of maps; return the mask expanded to ``(B, 1, q, k)``."""
    for label, t in (("teacher", teacher), ("student", student)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {label} maps must have shape (B, H, q, k); got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} maps must be floating point; got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name}: {label} maps are empty: shape {tuple(t.shape)}")
    b_t, _, q_t, k_t = teacher.shape
    b_s, _, q_s, k_s = student.shape
    if (b_t, q_t, k_t) != (b_s, q_s, k_s):
        raise ValueError(
            f"{name}: Teacher maps {tuple(teacher.shape)} and Student maps {tuple(student.shape)} "
            "must have the same batch size, query length q and key length k"
        )
    for label, t in (("teacher", teacher), ("student", student)):
        if not torch.isfinite(t.detach()).all():
            raise NonFiniteError(f"{name}: {label} maps {tuple(t.shape)} contain NaN or infinite values", label)
    return expand_mask(mask, (b_t, 1, q_t, k_t), name=name)


def expand_mask(mask: Tensor | None, shape: tuple[int, int, int, int], *, name: str = "loss") -> Tensor | None:
    """Expand a boolean mask broadcastable to ``shape`` (= ``(B, 1, q, k)``); clear error otherwise."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name}: mask must be a boolean tensor (True = valid); got {got}")
    if mask.dim() != 4 or any(m not in (1, s) for m, s in zip(mask.shape, shape)):
        raise ValueError(f"{name}: mask of shape {tuple(mask.shape)} is not broadcastable to {shape} (B, 1, q, k)")
    return mask.expand(shape)


def check_reduction(reduction: str, *, name: str = "loss") -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}; got {reduction!r}")


def check_temperature(temperature: float, *, name: str = "loss") -> None:
    """A temperature must be a finite real number > 0 (bools rejected)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"{name}: temperature must be a finite number > 0; got {temperature!r}")


def apply_mask(maps: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the masked entries (``mask`` broadcastable to ``maps``)."""
    if mask is None:
        return maps
    return maps * mask.to(maps.dtype)


def safe_normalize(x: Tensor, norm: Tensor) -> Tensor:
    """``x / norm`` where ``norm > 0``, and 0 where ``norm == 0`` (no NaN, finite gradients)."""
    positive = norm > 0
    return torch.where(positive, x / torch.where(positive, norm, torch.ones_like(norm)), torch.zeros_like(x))


def rownorm2(x: Tensor, dim: int = -1) -> Tensor:
    """L2-normalise along ``dim``; all-zero rows stay zero."""
    return safe_normalize(x, torch.linalg.vector_norm(x, dim=dim, keepdim=True))


def rownorm1(x: Tensor, dim: int = -1) -> Tensor:
    """Divide by the sum along ``dim`` (entries are non-negative); all-zero rows stay zero."""
    return safe_normalize(x, x.sum(dim=dim, keepdim=True))


def valid_counts(mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    """Number of valid ``(q, k)`` entries per sample, ``(B,)``."""
    if mask is None:
        return torch.full((batch,), float(n), device=device)
    return mask.reshape(batch, -1).sum(dim=1).to(torch.get_default_dtype()).to(device)


def reduce_per_sample(per_sample: Tensor, heads: int, n: int, counts: Tensor, reduction: str) -> Tensor:
    """Reduce per-sample sums of element losses to a scalar.

    per_sample: ``(B,)`` sum over heads and valid entries of a sample.
    heads, n: the number of heads and of ``(q, k)`` entries the elements span.
    counts: ``(B,)`` valid entries per sample (``n`` when unmasked).
    """
    if reduction == "paper":
        return per_sample.sum() / (per_sample.shape[0] * heads * n)
    counts = counts.to(per_sample.dtype)
    has_valid = counts > 0
    per = per_sample / (heads * torch.where(has_valid, counts, torch.ones_like(counts)))
    n_samples = has_valid.sum()
    if n_samples == 0:
        return per_sample.sum() * 0.0
    return torch.where(has_valid, per, torch.zeros_like(per)).sum() / n_samples


def kl_elements(target: Tensor, pred: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise ``(t + eps) * (log(t + eps) - log(m + eps))``."""
    t = target + eps
    return t * (torch.log(t) - torch.log(pred + eps))
