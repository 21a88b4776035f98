"""Squeezing-heads distillation (SHD): merge Teacher heads pairwise until there are ``H_s``.

No public code or full text of SHD exists; the closed-form merge weight below
is ours, derived from its published description.

Squeezing, in rounds while ``H > H_s``: merge the adjacent pairs
``(0, 1), (2, 3), ...`` but only ``min(floor(H / 2), H - H_s)`` of them; the
other heads pass through unchanged and in order (12 -> 8: one round of 4
pairs; 12 -> 5: 6 pairs, then 1). A pair ``(p, q)`` becomes, per sample,

    A = alpha * A_p + (1 - alpha) * A_q          (still row-stochastic)
    alpha = <D X_p, D Y> / ||D Y||^2, clipped to [0, 1]; 0.5 when D Y = 0,

with ``D = A_p - A_q``, ``Y = X_p + X_q`` and ``X_h`` the head's value vectors
``(k, d_v)`` (``V_h``, or ``V_h W_O^h`` if the caller knows the output
projection). ``alpha`` minimises ``||A Y - (A_p X_p + A_q X_q)||^2``: the merged
map applied to the summed values reproduces the pair's summed output. Our
choice for the next round: the merged head carries ``X_merged = X_p + X_q``,
which keeps exactly that reading: every merged head stands for the summed
output of the Teacher heads it absorbed, so later rounds keep approximating
``sum_h A_h X_h`` of the original heads. ``alpha`` is a constant (no gradient):
the Teacher is frozen.

Then each merged map is softened, ``softmax(log(A) / tau)`` over the keys
(zero entries, e.g. masked keys, stay 0) and matched to Student head j by
``KL(T_j || S_j)`` per query row, as :func:`~amad.losses.one_to_one` with
``kind="kl"``. When ``H_s >= H_t`` nothing is squeezed: Teacher head j is
matched to Student head j for ``j < H_t`` and the extra Student heads get no
loss (our choice, the same rule as one-to-one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import AttentionInputs
from ._blockwise import StatsFn, blockwise_sum, prepare_streaming, reduce_streaming, row_kl, teacher_blocks
from ._common import NonFiniteError, apply_mask, check_maps, check_reduction, check_temperature, rownorm1
from .base import AttentionLoss, combined_mask
from .one_to_one import matched_head_loss
from .registry import register

__all__ = ["shd", "streaming_shd", "squeeze_heads", "squeeze_plan", "squeeze_coefficients", "pair_merge_alpha", "SHDLoss"]


def squeeze_plan(num_teacher_heads: int, num_student_heads: int) -> list[list[tuple[int, ...]]]:
    """The merge rounds from ``H_t`` to ``H_s`` heads.

    Each round lists the groups forming the next round's heads, in order, as
    indices into the current heads: ``(p, p + 1)`` for a merged pair, ``(h,)``
    for a head passed through. Empty when ``H_s >= H_t``.
    """
    if num_teacher_heads < 1 or num_student_heads < 1:
        raise ValueError(f"squeeze_plan: head counts must be >= 1; got {num_teacher_heads} -> {num_student_heads}")
    rounds: list[list[tuple[int, ...]]] = []
    heads = num_teacher_heads
    while heads > num_student_heads:
        pairs = min(heads // 2, heads - num_student_heads)
        groups: list[tuple[int, ...]] = [(2 * i, 2 * i + 1) for i in range(pairs)]
        groups += [(h,) for h in range(2 * pairs, heads)]
        rounds.append(groups)
        heads -= pairs
    return rounds


@torch.no_grad()
def pair_merge_alpha(map_p: Tensor, map_q: Tensor, values_p: Tensor, values_q: Tensor) -> Tensor:
    """Per-sample least-squares merge weight ``(B,)`` of maps ``(B, q, k)`` with values ``(B, k, d_v)``."""
    difference = map_p - map_q
    dx = difference @ values_p
    dy = difference @ (values_p + values_q)
    numerator = (dx * dy).sum(dim=(1, 2))
    denominator = (dy * dy).sum(dim=(1, 2))
    has_direction = denominator > 0
    alpha = numerator / torch.where(has_direction, denominator, torch.ones_like(denominator))
    return torch.where(has_direction, alpha.clamp(0.0, 1.0), torch.full_like(alpha, 0.5))


def _squeeze(maps: Tensor, values: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Merged maps ``(B, num_heads, q, k)`` and their values ``(B, num_heads, k, d_v)``."""
    for groups in squeeze_plan(maps.shape[1], num_heads):
        merged_maps, merged_values = [], []
        for group in groups:
            if len(group) == 1:
                merged_maps.append(maps[:, group[0]])
                merged_values.append(values[:, group[0]])
                continue
            p, q = group
            alpha = pair_merge_alpha(maps[:, p], maps[:, q], values[:, p], values[:, q])[:, None, None]
            merged_maps.append(alpha * maps[:, p] + (1.0 - alpha) * maps[:, q])
            merged_values.append(values[:, p] + values[:, q])
        maps, values = torch.stack(merged_maps, dim=1), torch.stack(merged_values, dim=1)
    return maps, values


def _check_values(values: Tensor, maps: Tensor, *, name: str) -> Tensor:
    """Values must be finite floats ``(B, H, k, d_v)`` matching maps ``(B, H, q, k)``; cast to the maps' dtype."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{name}: Teacher values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 4 or not values.is_floating_point():
        raise ValueError(
            f"{name}: Teacher values must be floating point (B, H, k, d_v); got {values.dtype} {tuple(values.shape)}"
        )
    b, h, _, k = maps.shape
    if (values.shape[0], values.shape[1], values.shape[2]) != (b, h, k):
        raise ValueError(
            f"{name}: Teacher values {tuple(values.shape)} do not match Teacher maps {tuple(maps.shape)}; "
            "expected (B, H_t, k, d_v) with the maps' B, H_t and k"
        )
    if not torch.isfinite(values.detach()).all():
        raise NonFiniteError(f"{name}: Teacher values {tuple(values.shape)} contain NaN or infinite values", "teacher")
    return values.to(maps.dtype)


def squeeze_heads(maps: Tensor, values: Tensor, num_heads: int) -> Tensor:
    """Merge heads of ``maps`` ``(B, H, q, k)`` with values ``(B, H, k, d_v)`` down to ``num_heads`` (1..H)."""
    if maps.dim() != 4:
        raise ValueError(f"squeeze_heads: maps must be (B, H, q, k); got {tuple(maps.shape)}")
    if not 1 <= num_heads <= maps.shape[1]:
        raise ValueError(
            f"squeeze_heads: maps {tuple(maps.shape)} have {maps.shape[1]} heads; num_heads must be in "
            f"1..{maps.shape[1]}, got {num_heads}"
        )
    values = _check_values(values, maps, name="squeeze_heads")
    return _squeeze(maps, values, num_heads)[0]


def soften(maps: Tensor, temperature: float) -> Tensor:
    """``softmax(log(A) / tau)`` over the keys; zero entries stay 0 and all-zero rows stay all-zero."""
    positive = maps > 0
    logits = torch.log(torch.where(positive, maps, torch.ones_like(maps))) / temperature
    logits = torch.where(positive, logits, torch.full_like(logits, float("-inf")))
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return rownorm1(torch.exp(logits - top))


def shd(
    teacher: Tensor,
    student: Tensor,
    teacher_values: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``sum_j KL(soften(squeeze(T))_j || S_j)`` per query row, reduced over ``min(H_t, H_s)`` heads.

    teacher ``(B, H_t, q, k)``, student ``(B, H_s, q, k)``, teacher_values
    ``(B, H_t, k, d_v)``; mask broadcastable to ``(B, 1, q, k)`` (masked entries
    are zeroed before the merge weights are computed); reduction ``"mean"``
    (mask-aware) or ``"paper"`` (element mean).
    """
    check_reduction(reduction, name="shd")
    check_temperature(temperature, name="shd")
    mask = check_maps(teacher, student, mask, name="shd")
    values = _check_values(teacher_values, teacher, name="shd")
    merged = apply_mask(teacher, mask)
    if student.shape[1] < teacher.shape[1]:
        merged = _squeeze(merged, values, student.shape[1])[0]
    return matched_head_loss(soften(merged, temperature), student, kind="kl", mask=mask, reduction=reduction)


# -- streaming form ------------------------------------------------------------------
def _teacher_values(teacher: AttentionInputs, dtype: torch.dtype) -> Tensor:
    values = teacher.value
    if values is None:
        raise ValueError(
            f"streaming shd needs the Teacher's value vectors, but the Teacher inputs have value=None "
            f"(query {tuple(teacher.query.shape)}); record the values of this layer"
        )
    b, h, k = teacher.batch_size, teacher.num_heads, teacher.k_len
    if values.dim() != 4 or tuple(values.shape[:3]) != (b, h, k) or not values.is_floating_point():
        raise ValueError(
            f"streaming shd: Teacher values must be floating point (B, H_t, k, d_v) = ({b}, {h}, {k}, d_v); "
            f"got {values.dtype} {tuple(values.shape)}"
        )
    if not torch.isfinite(values).all():
        raise NonFiniteError(
            f"streaming shd: Teacher values {tuple(values.shape)} contain NaN or infinite values", "teacher"
        )
    return values.detach().to(dtype)


@torch.no_grad()
def squeeze_coefficients(teacher: AttentionInputs, student: AttentionInputs, block_size: int,
                         dtype: torch.dtype) -> Tensor:
    """``C`` ``(B, H_s, H_t)`` with squeezed Teacher head ``h = sum_g C[b, h, g] T_g`` (SHD's merge rounds).

    Each round's merged heads are mixtures of the original heads, so the pair
    weights ``alpha = <D X_p, D Y> / ||D Y||^2`` (clipped to [0, 1], 0.5 when
    ``D Y = 0``) need one Teacher pass accumulating both inner products over blocks.
    """
    values = _teacher_values(teacher, dtype)
    batch, h_t = teacher.batch_size, teacher.num_heads
    coeffs = torch.eye(h_t, dtype=dtype, device=values.device).expand(batch, h_t, h_t)
    members = torch.eye(h_t, dtype=dtype, device=values.device)  # head h carries X = sum_g members[h, g] V_g
    for groups in squeeze_plan(h_t, student.num_heads):
        firsts = [g[0] for g in groups if len(g) == 2]
        seconds = [g[1] for g in groups if len(g) == 2]
        x_first = torch.einsum("pg,bgkd->bpkd", members[firsts], values)
        x_sum = x_first + torch.einsum("pg,bgkd->bpkd", members[seconds], values)
        diff = coeffs[:, firsts] - coeffs[:, seconds]
        numerator = values.new_zeros(batch, len(firsts))
        denominator = values.new_zeros(batch, len(firsts))
        for t in teacher_blocks(teacher, student, block_size, dtype):
            d_maps = torch.einsum("bpg,bgrk->bprk", diff, t)
            dx, dy = d_maps @ x_first, d_maps @ x_sum
            numerator += (dx * dy).sum(dim=(2, 3))
            denominator += (dy * dy).sum(dim=(2, 3))
        has_direction = denominator > 0
        ratio = numerator / torch.where(has_direction, denominator, torch.ones_like(denominator))
        alpha = torch.where(has_direction, ratio.clamp(0.0, 1.0), torch.full_like(ratio, 0.5))[..., None]
        merged = alpha * coeffs[:, firsts] + (1 - alpha) * coeffs[:, seconds]
        coeffs = torch.cat([merged, coeffs[:, [g[0] for g in groups if len(g) == 1]]], dim=1)
        members = torch.cat([members[firsts] + members[seconds], members[[g[0] for g in groups if len(g) == 1]]])
    return coeffs


def _shd_stats(temperature: float, heads: int, coeffs: Tensor | None) -> StatsFn:
    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor]:
        merged = t if coeffs is None else torch.einsum("bhg,bgrk->bhrk", coeffs, t)
        target = apply_mask(soften(merged[:, :heads], temperature), valid)
        return (row_kl(target, s[:, :heads], valid),)

    return stats


def streaming_shd(
    teacher: AttentionInputs,
    student: AttentionInputs,
    *,
    block_size: int | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Streaming :func:`amad.losses.shd`; the Teacher's values come from ``teacher.value``."""
    check_reduction(reduction, name="streaming shd")
    check_temperature(temperature, name="streaming shd")
    block, work, out_dtype = prepare_streaming(teacher, student, block_size, "streaming shd")
    coeffs = None
    if student.num_heads < teacher.num_heads:
        coeffs = squeeze_coefficients(teacher, student, block, work)
    else:
        _teacher_values(teacher, work)  # the same error as the map form when values are missing
    heads = min(teacher.num_heads, student.num_heads)
    stats = _shd_stats(temperature, heads, coeffs)
    (per_sample,) = blockwise_sum(teacher, student, stats, block_size=block, dtype=work, name="streaming shd")
    return reduce_streaming(per_sample, heads, teacher, student, block, reduction, out_dtype)


@register("shd")
class SHDLoss(AttentionLoss):
    """Module form of :func:`shd`; options ``temperature`` and ``reduction``.

    Needs the Teacher's value vectors: :meth:`from_inputs` takes them from the
    recorded Teacher inputs (``teacher.value``); on maps, pass ``teacher_values=``.
    Its streaming form is :func:`streaming_shd` (one Teacher pass per merge round).
    """

    needs = "values"
    streaming_fn = staticmethod(streaming_shd)

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean") -> None:
        check_reduction(reduction, name="shd")
        check_temperature(temperature, name="shd")
        super().__init__(temperature=temperature, reduction=reduction)

    def forward(
        self, teacher: Tensor, student: Tensor, mask: Tensor | None = None, *, teacher_values: Tensor | None = None
    ) -> Tensor:
        if teacher_values is None:
            raise ValueError(
                "shd needs the Teacher's value vectors: call loss(teacher, student, mask, teacher_values=V)"
            )
        return shd(teacher, student, teacher_values, mask=mask, **self.options)

    def check_inputs(self, teacher: AttentionInputs, student: AttentionInputs) -> None:
        """The Teacher's values are taken from ``teacher.value``: they must have been recorded."""
        if teacher.value is None:
            raise ValueError(
                "shd needs the Teacher's value vectors, but the recorded Teacher inputs have value=None "
                f"(query {tuple(teacher.query.shape)}); record the values of this layer"
            )

    def materialised_loss(self, teacher: AttentionInputs, student: AttentionInputs) -> Tensor:
        mask = combined_mask(teacher, student)
        return shd(teacher.probs(), student.probs(), teacher.value, mask=mask, **self.options)
