"""One-to-one attention transfer (KD-ATT, the paper's eq. 8): Student head j learns Teacher head j.

For the matched heads ``j < H = min(H_t, H_s)``, per sample:

* ``kind="mse"``: each head's ``q x k`` map is flattened to a row of length
  ``n = q*k`` and L2-normalised, as in AMAD variant 1; elements
  ``(T^_j - S^_j)^2``.
* ``kind="kl"``: every query row is a distribution over the keys
  (L1-normalised), as in AMAD variant 2; elements
  ``(t + eps) * (log(t + eps) - log(s + eps))`` with ``eps = 1e-7``.

The Teacher heads ``j >= H_s`` are discarded. When ``H_s > H_t`` the Student
heads ``j >= H_t`` get no loss and no gradient: there is no Teacher head for
them. Reductions (see ``_common``) count ``H`` = the number of matched heads.
"""

from __future__ import annotations

from torch import Tensor

from ..attention import AttentionInputs
from ._blockwise import StatsFn, blockwise_sum, flat, prepare_streaming, reduce_streaming, row_kl, safe_sqrt
from ._common import (
    apply_mask,
    check_maps,
    check_reduction,
    kl_elements,
    reduce_per_sample,
    rownorm1,
    rownorm2,
    safe_normalize,
    valid_counts,
)
from .base import AttentionLoss
from .registry import register

__all__ = ["one_to_one", "streaming_one_to_one", "OneToOneLoss"]

KINDS = ("mse", "kl")


def check_kind(kind: str, *, name: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {KINDS}; got {kind!r}")


def matched_head_loss(teacher: Tensor, student: Tensor, *, kind: str, mask: Tensor | None, reduction: str) -> Tensor:
    """The one-to-one loss on maps already checked by ``check_maps`` (``mask`` expanded or None)."""
    heads = min(teacher.shape[1], student.shape[1])
    batch, _, q, k = teacher.shape
    t = apply_mask(teacher[:, :heads], mask)
    s = apply_mask(student[:, :heads], mask)
    if kind == "mse":
        elements = (rownorm2(t.flatten(2)) - rownorm2(s.flatten(2))) ** 2
    else:
        elements = kl_elements(rownorm1(t), rownorm1(s))
    per_sample = elements.reshape(batch, -1).sum(dim=1)
    counts = valid_counts(mask, batch, q * k, teacher.device)
    return reduce_per_sample(per_sample, heads, q * k, counts, reduction)


def one_to_one(
    teacher: Tensor,
    student: Tensor,
    *,
    kind: str = "mse",
    mask: Tensor | None = None,
    reduction: str = "paper",
) -> Tensor:
    """KD-ATT: ``sum_{j < min(H_t, H_s)} loss(T_j, S_j)``, reduced as ``reduction`` says.

    teacher ``(B, H_t, q, k)``, student ``(B, H_s, q, k)``: attention probabilities.
    kind: ``"mse"`` (L2-normalised flattened maps) or ``"kl"`` (per query row).
    mask: boolean, broadcastable to ``(B, 1, q, k)``, True where valid.
    reduction: ``"paper"`` (element mean over ``B * H * q * k``) or ``"mean"`` (mask-aware).
    """
    check_kind(kind, name="one_to_one")
    check_reduction(reduction, name="one_to_one")
    mask = check_maps(teacher, student, mask, name="one_to_one")
    return matched_head_loss(teacher, student, kind=kind, mask=mask, reduction=reduction)


def _matched_stats(heads: int, kind: str) -> StatsFn:
    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor, ...]:
        t, s = t[:, :heads], s[:, :heads]
        if kind == "kl":
            return (row_kl(t, s, valid),)
        ft, fs = flat(t), flat(s)
        return (ft * fs).sum(dim=-1), (ft * ft).sum(dim=-1), (fs * fs).sum(dim=-1)

    return stats


def streaming_one_to_one(
    teacher: AttentionInputs,
    student: AttentionInputs,
    *,
    block_size: int | None = None,
    kind: str = "mse",
    reduction: str = "paper",
) -> Tensor:
    """Streaming :func:`amad.losses.one_to_one`: Teacher head j vs Student head j, ``j < min(H_t, H_s)``.

    ``kind="mse"``: ``||T^_j - S^_j||^2 = 2 - 2 <t_j, s_j> / (|t_j| |s_j|)`` from three sums per head.
    """
    check_kind(kind, name="streaming one_to_one")
    check_reduction(reduction, name="streaming one_to_one")
    block, work, out_dtype = prepare_streaming(teacher, student, block_size, "streaming one_to_one")
    heads = min(teacher.num_heads, student.num_heads)
    sums = blockwise_sum(teacher, student, _matched_stats(heads, kind), block_size=block, dtype=work,
                         name="streaming one_to_one")
    if kind == "kl":
        per_sample = sums[0]
    else:
        inner, t_sq, s_sq = sums
        cosine = safe_normalize(inner, safe_sqrt(t_sq) * safe_sqrt(s_sq))
        per_sample = ((t_sq > 0).to(inner.dtype) + (s_sq > 0).to(inner.dtype) - 2 * cosine).sum(dim=-1)
    return reduce_streaming(per_sample, heads, teacher, student, block, reduction, out_dtype)


@register("one-to-one")
class OneToOneLoss(AttentionLoss):
    """Module form of :func:`one_to_one`; options ``kind`` and ``reduction``; streams (:func:`streaming_one_to_one`)."""

    map_fn = staticmethod(one_to_one)
    streaming_fn = staticmethod(streaming_one_to_one)

    def __init__(self, *, kind: str = "mse", reduction: str = "paper") -> None:
        check_kind(kind, name="one-to-one")
        check_reduction(reduction, name="one-to-one")
        super().__init__(kind=kind, reduction=reduction)
