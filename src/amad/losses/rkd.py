"""RKD-D, the distance-wise relational loss of Park et al. (2019), on attention maps.

Each sample's maps of all heads, flattened, form one vector: ``t_b`` of length
``H_t * q * k`` for the Teacher and ``s_b`` of length ``H_s * q * k`` for the
Student (the lengths may differ: only distances between samples are
compared). For each model the ``B x B`` Euclidean distance matrix
``d(b, c) = ||x_b - x_c||`` is divided by the mean of its positive
off-diagonal entries, and the loss is the Huber (smooth L1, ``beta = 1``) loss
between the two normalised matrices, averaged over all ``B * B`` entries (the
diagonal is 0 in both), as in the original formulation.

It needs a batch of at least two samples. Masked entries are set to 0 before
the vectors are formed. A matrix with no positive distance (all samples
identical) stays all-zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import apply_mask, check_maps, safe_normalize
from .base import AttentionLoss
from .registry import register

__all__ = ["rkd_distance", "RKDDistanceLoss"]


def normalized_distances(vectors: Tensor) -> Tensor:
    """Pairwise Euclidean distances of the rows of ``vectors`` ``(B, D)``, divided by their positive mean.

    Computed directly from differences (not via Gram matrices, which lose
    precision for near-identical samples): the diagonal is exactly 0 and a zero
    distance has a zero (not NaN) gradient.
    """
    distances = torch.cdist(vectors[None], vectors[None], p=2.0, compute_mode="donot_use_mm_for_euclid_dist")[0]
    off_diagonal = ~torch.eye(vectors.shape[0], dtype=torch.bool, device=vectors.device)
    positive = (distances > 0) & off_diagonal
    mean = (distances * positive).sum() / positive.sum().clamp(min=1).to(distances.dtype)
    return safe_normalize(distances, mean)


def rkd_distance(teacher: Tensor, student: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """``mean_{b,c} huber(d_T(b, c) / mu_T - d_S(b, c) / mu_S)`` over the batch.

    teacher ``(B, H_t, q, k)``, student ``(B, H_s, q, k)`` with ``B >= 2``;
    ``mu`` = mean positive off-diagonal distance; optional boolean mask
    broadcastable to ``(B, 1, q, k)`` (False entries are zeroed).
    """
    mask = check_maps(teacher, student, mask, name="rkd_distance")
    if teacher.shape[0] < 2:
        raise ValueError(
            "rkd_distance compares samples with each other and needs a batch of at least 2; got "
            f"Teacher maps {tuple(teacher.shape)} and Student maps {tuple(student.shape)}"
        )
    teacher_vectors = apply_mask(teacher, mask).flatten(1)
    student_vectors = apply_mask(student, mask).flatten(1)
    return F.smooth_l1_loss(
        normalized_distances(student_vectors), normalized_distances(teacher_vectors), beta=1.0, reduction="mean"
    )


@register("rkd-d")
class RKDDistanceLoss(AttentionLoss):
    """Module form of :func:`rkd_distance` (no options)."""

    map_fn = staticmethod(rkd_distance)
    no_streaming_reason = "its distances compare whole per-sample map vectors across the batch"

    def __init__(self) -> None:
        super().__init__()
