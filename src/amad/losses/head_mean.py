"""Head mean: the Teacher's mean map over its heads vs the Student's mean map over its heads.

Per sample, ``T_bar = mean_i T_i`` and ``S_bar = mean_j S_j`` (both ``q x k``,
still row-stochastic), then

* ``kind="mse"``: elements ``(T_bar - S_bar)^2`` on the raw mean maps. Our
  choice: no L2 normalisation, because the mean maps are themselves
  attention distributions whose scale is meaningful (each row sums to 1), so
  this is the plain attention-transfer MSE on one "average head".
* ``kind="kl"``: every query row of the mean maps is a distribution over the
  keys, ``KL(T_bar || S_bar)`` with ``eps = 1e-7`` exactly as
  :func:`~amad.losses.one_to_one` with ``kind="kl"`` on one head.

Reductions as in ``_common`` with one head: ``"mean"`` (default, mask-aware)
or ``"paper"`` (element mean over ``B * q * k``).
"""

from __future__ import annotations

from torch import Tensor

from ..attention import AttentionInputs
from ._blockwise import StatsFn, blockwise_sum, masked_sum, prepare_streaming, reduce_streaming, row_kl
from ._common import apply_mask, check_maps, check_reduction, reduce_per_sample, valid_counts
from .base import AttentionLoss
from .one_to_one import check_kind, matched_head_loss
from .registry import register

__all__ = ["head_mean", "streaming_head_mean", "HeadMeanLoss"]


def head_mean(
    teacher: Tensor,
    student: Tensor,
    *,
    kind: str = "mse",
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``loss(mean_i T_i, mean_j S_j)`` with ``kind`` ``"mse"`` (raw maps) or ``"kl"`` (per query row).

    teacher ``(B, H_t, q, k)``, student ``(B, H_s, q, k)``; mask broadcastable
    to ``(B, 1, q, k)``, True where valid.
    """
    check_kind(kind, name="head_mean")
    check_reduction(reduction, name="head_mean")
    mask = check_maps(teacher, student, mask, name="head_mean")
    teacher_mean = teacher.mean(dim=1, keepdim=True)
    student_mean = student.mean(dim=1, keepdim=True)
    if kind == "kl":
        return matched_head_loss(teacher_mean, student_mean, kind="kl", mask=mask, reduction=reduction)
    batch, _, q, k = teacher.shape
    squared = (apply_mask(teacher_mean, mask) - apply_mask(student_mean, mask)) ** 2
    counts = valid_counts(mask, batch, q * k, teacher.device)
    return reduce_per_sample(squared.reshape(batch, -1).sum(dim=1), 1, q * k, counts, reduction)


def _head_mean_stats(kind: str) -> StatsFn:
    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor]:
        t_mean, s_mean = t.mean(dim=1, keepdim=True), s.mean(dim=1, keepdim=True)
        if kind == "kl":
            return (row_kl(t_mean, s_mean, valid),)
        return (masked_sum((t_mean - s_mean) ** 2, valid),)

    return stats


def streaming_head_mean(
    teacher: AttentionInputs,
    student: AttentionInputs,
    *,
    block_size: int | None = None,
    kind: str = "mse",
    reduction: str = "mean",
) -> Tensor:
    """Streaming :func:`amad.losses.head_mean`: mean Teacher map vs mean Student map, per element or per row."""
    check_kind(kind, name="streaming head_mean")
    check_reduction(reduction, name="streaming head_mean")
    block, work, out_dtype = prepare_streaming(teacher, student, block_size, "streaming head_mean")
    (per_sample,) = blockwise_sum(teacher, student, _head_mean_stats(kind), block_size=block, dtype=work,
                                  name="streaming head_mean")
    return reduce_streaming(per_sample, 1, teacher, student, block, reduction, out_dtype)


@register("head-mean")
class HeadMeanLoss(AttentionLoss):
    """Module form of :func:`head_mean`; options ``kind`` and ``reduction``; streams (:func:`streaming_head_mean`)."""

    map_fn = staticmethod(head_mean)
    streaming_fn = staticmethod(streaming_head_mean)

    def __init__(self, *, kind: str = "mse", reduction: str = "mean") -> None:
        check_kind(kind, name="head-mean")
        check_reduction(reduction, name="head-mean")
        super().__init__(kind=kind, reduction=reduction)
