"""Streaming forms of the map losses: they never hold a whole ``(B, H, q, k)`` attention map.

Each function takes the recorded :class:`~amad.attention.AttentionInputs` of a
Teacher layer (detached) and a Student layer (with its autograd graph) and
returns the same scalar, with the same gradients, as the materialised loss on
``teacher.probs()`` / ``student.probs()`` with mask ``combined_mask(teacher, student)``.
The probabilities are recomputed from Q/K (+ bias, mask, causality) one block of
``block_size`` query rows at a time, in the forward pass and again in the
backward pass (see ``_blockwise``), so memory is ``O(B * H * block_size * k)``.

How each loss becomes a sum over blocks:

* AMAD ``"mse"`` / ``"s2t"`` through the Gram identity (spec section 2): with
  ``G_ts = T S^T``, ``G_ss = S S^T`` and the row norms ``|t_i|``, ``W = G_ts / (|t_i| |s_j|)``,
  ``G^ss = G_ss / (|s_j| |s_k|)``, ``A = softmax_j(W / temperature)``:
  ``||T^_i - M^_i||^2 = 2 - 2 (sum_j A_ij W_ij) / sqrt(a_i^T G^ss a_i)``.
  One pass accumulates the Grams; the loss is a small function of them, and the
  backward forms ``dL/dS_b = dG_ts^T T_b + (dG_ss + dG_ss^T) S_b`` block by block.
* AMAD ``"kl"``: a first pass accumulates ``T S^T`` and the row sums (and norms
  for the cosine alignment) to build ``A``; a second pass sums the per-row KL
  terms of ``T`` against ``M = A S``, with gradients through both ``A`` and ``S``.
* AMAD ``"token"``, one-to-one / head-mean ``kind="kl"``: per query row, so one
  pass summing the map loss's row terms.
* One-to-one ``kind="mse"``: per matched head, ``|t_j|^2``, ``|s_j|^2`` and ``<t_j, s_j>``.
* Head mean ``kind="mse"``: per element, one pass.
* SHD: the merge weight of each pair needs the whole-map inner products
  ``<D X_p, D Y>`` and ``||D Y||^2``: one Teacher-only pass per merge round
  accumulates them; a final pass sums the per-row KL terms against the Student.

Half-precision inputs are computed in float32 (like the AMAD map losses; the
one-to-one, head-mean and SHD map forms compute in the input precision, so in
half precision the two forms agree to that precision). The Teacher never
receives a gradient. Accuracy in float32: the Gram identity
computes each head's loss as ``2 - 2c``, so its absolute error is that of ``c``
(about ``1e-7`` on small maps); relative to float64 it is worse than the
materialised loss only when a head's loss is far below 1e-2 (nearly uniform
maps), and better on large maps (q = k = 2048: 1e-6 against 2e-4, because the
materialised loss sums millions of float32 squares).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import AttentionInputs
from ._blockwise import StatsFn, blockwise_sum, check_finite_inputs, resolve_block_size, teacher_blocks, valid_counts
from ._common import (
    apply_mask,
    check_reduction,
    check_temperature,
    kl_elements,
    reduce_per_sample,
    rownorm1,
    safe_normalize,
)
from .base import check_pair

__all__ = ["amad", "one_to_one", "head_mean", "shd", "explained_rows_loss"]

_HALF = (torch.float16, torch.bfloat16)


# -- shared set-up -------------------------------------------------------------
def _prepare(
    teacher: AttentionInputs, student: AttentionInputs, block_size: int | None, name: str
) -> tuple[int, torch.dtype, torch.dtype]:
    """Validate the pair; return (rows per block, working dtype, output dtype)."""
    for label, x in (("teacher", teacher), ("student", student)):
        if not isinstance(x, AttentionInputs):
            raise TypeError(f"{name}: {label} must be AttentionInputs, got {type(x).__name__}")
        if not x.query.is_floating_point() or not x.key.is_floating_point():
            raise TypeError(f"{name}: {label} query/key must be floating point; got {x.query.dtype}/{x.key.dtype}")
    check_pair(teacher, student, name=name)
    check_finite_inputs(teacher, "Teacher", name)
    check_finite_inputs(student, "Student", name)
    out_dtype = torch.promote_types(teacher.query.dtype, student.query.dtype)
    work = torch.float32 if out_dtype in _HALF else out_dtype
    return resolve_block_size(block_size, teacher, student), work, out_dtype


def _reduce(per_sample: Tensor, heads: int, teacher: AttentionInputs, student: AttentionInputs,
            block: int, reduction: str, out_dtype: torch.dtype) -> Tensor:
    """The map losses' reduction of per-sample sums (``_common.reduce_per_sample``)."""
    n = student.q_len * student.k_len
    counts = per_sample.new_full((student.batch_size,), float(n))
    if reduction == "mean":
        counts = valid_counts(teacher, student, block, per_sample.dtype)
    return reduce_per_sample(per_sample, heads, n, counts, reduction).to(out_dtype)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x > 0``, else 0, with finite gradients everywhere."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _outer(a: Tensor, b: Tensor) -> Tensor:
    return a[..., :, None] * b[..., None, :]


def _flat(x: Tensor) -> Tensor:
    return x.flatten(2)


# -- AMAD variant 1 and S2T: the Gram identity ---------------------------------
def explained_rows_loss(g_xy: Tensor, g_yy: Tensor, x_sq: Tensor, temperature: float) -> Tensor:
    """Per sample ``sum_i ||X^_i - rownorm2(softmax_j(X^_i . Y^_j / temperature) Y^)||^2`` from Grams.

    ``g_xy = X Y^T`` ``(B, H_x, H_y)``, ``g_yy = Y Y^T`` ``(B, H_y, H_y)``,
    ``x_sq = |x_i|^2`` ``(B, H_x)``; returns ``(B,)``. All-zero rows behave as
    ``rownorm2`` makes them: they normalise to zero.
    """
    x_norm, y_norm = _safe_sqrt(x_sq), _safe_sqrt(torch.diagonal(g_yy, dim1=-2, dim2=-1))
    cosine = safe_normalize(g_xy, _outer(x_norm, y_norm))
    weights = torch.softmax(cosine / temperature, dim=-1)
    g_hat = safe_normalize(g_yy, _outer(y_norm, y_norm))
    cross = (weights * cosine).sum(dim=-1)
    mixed_sq = torch.einsum("bij,bjk,bik->bi", weights, g_hat, weights)
    unit_x, unit_m = (x_norm > 0).to(cross.dtype), (mixed_sq > 0).to(cross.dtype)
    return (unit_x + unit_m - 2 * safe_normalize(cross, _safe_sqrt(mixed_sq))).sum(dim=-1)


def _grams(explained: Tensor, explaining: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``X Y^T``, ``Y Y^T`` and ``|x_i|^2`` of one block (X explained by a mixture of Y's rows)."""
    x, y = _flat(explained), _flat(explaining)
    return x @ y.mT, y @ y.mT, (x * x).sum(dim=-1)


def _mse_grams(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return _grams(t, s)


def _mse_student_grad(t: Tensor, s: Tensor, d_ts: Tensor, d_ss: Tensor, _d_t_sq: Tensor) -> Tensor:
    """``dL/dS_b`` from ``dL/dG_ts`` and ``dL/dG_ss``: ``dG_ts^T T_b + (dG_ss + dG_ss^T) S_b``."""
    return torch.einsum("bij,birk->bjrk", d_ts, t).add_(torch.einsum("bjl,blrk->bjrk", d_ss + d_ss.mT, s))


def _s2t_grams(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return _grams(s, t)


def _s2t_student_grad(t: Tensor, s: Tensor, d_st: Tensor, _d_tt: Tensor, d_s_sq: Tensor) -> Tensor:
    """``dL/dS_b`` from ``dL/dG_st`` and ``dL/d|s_j|^2``: ``dG_st T_b + 2 d|s|^2 S_b``."""
    return torch.einsum("bji,birk->bjrk", d_st, t).add_(s * (2 * d_s_sq[..., None, None]))


# -- AMAD variant 2: alignment pass, then KL pass ------------------------------
def _kl_alignment_stats(cosine: bool) -> StatsFn:
    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor, ...]:
        ft, fs = _flat(t), _flat(s)
        sums = (ft @ fs.mT, ft.sum(dim=-1), fs.sum(dim=-1))
        return sums + ((ft * ft).sum(dim=-1), (fs * fs).sum(dim=-1)) if cosine else sums

    return stats


def _kl_terms(eps: float) -> StatsFn:
    def stats(
        t: Tensor, s: Tensor, valid: Tensor | None, weights: Tensor, t_sum: Tensor, s_sum: Tensor
    ) -> tuple[Tensor]:
        t_l1 = safe_normalize(t, t_sum[..., None, None])
        mixed = torch.einsum("bij,bjrk->birk", weights, safe_normalize(s, s_sum[..., None, None]))
        return (_masked_sum(kl_elements(rownorm1(t_l1), rownorm1(mixed), eps), valid),)

    return stats


def _masked_sum(elements: Tensor, valid: Tensor | None) -> Tensor:
    """Per-sample sum of ``(B, H, rows, k)`` element losses over valid entries."""
    if valid is not None:
        elements = torch.where(valid, elements, torch.zeros((), dtype=elements.dtype, device=elements.device))
    return elements.sum(dim=(1, 2, 3))


def _kl_per_sample(teacher: AttentionInputs, student: AttentionInputs, block: int, work: torch.dtype,
                   alignment: str, temperature: float, eps: float) -> Tensor:
    cosine = alignment == "cosine"
    first = blockwise_sum(teacher, student, _kl_alignment_stats(cosine), block_size=block, dtype=work)
    g_ts, t_sum, s_sum = first[:3]
    scale = _outer(_safe_sqrt(first[3]), _safe_sqrt(first[4])) if cosine else _outer(t_sum, s_sum)
    weights = torch.softmax(safe_normalize(g_ts, scale) / temperature, dim=-1)
    (per_sample,) = blockwise_sum(
        teacher, student, _kl_terms(eps), weights, t_sum, s_sum, block_size=block, dtype=work
    )
    return per_sample


# -- AMAD variant 4: per query row ---------------------------------------------
def _token_terms(alignment: str, temperature: float, eps: float) -> StatsFn:
    from .alignment import _token_elements  # the map loss's own row terms (lazy: alignment imports us)

    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor]:
        elements, _ = _token_elements(t, s, alignment, temperature, eps)
        return (_masked_sum(elements.transpose(1, 2), valid),)

    return stats


def amad(
    teacher: AttentionInputs,
    student: AttentionInputs,
    *,
    variant: str = "mse",
    block_size: int | None = None,
    reduction: str = "paper",
    alignment: str | None = None,
    temperature: float = 1.0,
    eps: float = 1e-7,
    kernel: str = "auto",
) -> Tensor:
    """Streaming :func:`amad.losses.amad` on recorded inputs; same value and gradients.

    ``block_size``: query rows per block (None: as many as fit ``2**22`` map
    entries per block). Variant 3 (``ProjectedAMAD``) has no streaming form: its
    ``n x n`` projection is itself larger than a map. ``kernel``: ``"auto"`` uses the
    fused Triton kernels (``_triton_amad``) for supported CUDA inputs, ``"triton"``
    requires them, ``"torch"`` never uses them.
    """
    from ._triton_amad import fused_per_sample, use_fused
    from .alignment import check_options

    name = f"streaming amad({variant})"
    alignment = check_options(variant, reduction=reduction, alignment=alignment, temperature=temperature, eps=eps,
                              name=name)
    block, work, out_dtype = _prepare(teacher, student, block_size, name)
    heads = student.num_heads if variant == "s2t" else teacher.num_heads
    if use_fused(kernel, teacher, student, variant, name):
        per_sample = fused_per_sample(teacher, student, variant=variant, alignment=alignment, temperature=temperature,
                                      eps=eps)
    elif variant in ("mse", "s2t"):
        grams, grad = (_mse_grams, _mse_student_grad) if variant == "mse" else (_s2t_grams, _s2t_student_grad)
        g_xy, g_yy, x_sq = blockwise_sum(teacher, student, grams, block_size=block, dtype=work, student_grad_fn=grad)
        per_sample = explained_rows_loss(g_xy, g_yy, x_sq, temperature)
    elif variant == "kl":
        per_sample = _kl_per_sample(teacher, student, block, work, alignment, temperature, eps)
    else:
        terms = _token_terms(alignment, temperature, eps)
        (per_sample,) = blockwise_sum(teacher, student, terms, block_size=block, dtype=work)
    return _reduce(per_sample, heads, teacher, student, block, reduction, out_dtype)


# -- one-to-one and head mean ----------------------------------------------------
def _row_kl(t: Tensor, s: Tensor, valid: Tensor | None) -> Tensor:
    """Per-sample sum of ``KL(t_row || s_row)`` terms (``eps = 1e-7``) of masked ``(B, H, rows, k)`` maps."""
    return _masked_sum(kl_elements(rownorm1(t), rownorm1(s)), valid)


def _matched_stats(heads: int, kind: str) -> StatsFn:
    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor, ...]:
        t, s = t[:, :heads], s[:, :heads]
        if kind == "kl":
            return (_row_kl(t, s, valid),)
        ft, fs = _flat(t), _flat(s)
        return (ft * fs).sum(dim=-1), (ft * ft).sum(dim=-1), (fs * fs).sum(dim=-1)

    return stats


def one_to_one(
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
    from .one_to_one import check_kind

    check_kind(kind, name="streaming one_to_one")
    check_reduction(reduction, name="streaming one_to_one")
    block, work, out_dtype = _prepare(teacher, student, block_size, "streaming one_to_one")
    heads = min(teacher.num_heads, student.num_heads)
    sums = blockwise_sum(teacher, student, _matched_stats(heads, kind), block_size=block, dtype=work)
    if kind == "kl":
        per_sample = sums[0]
    else:
        inner, t_sq, s_sq = sums
        cosine = safe_normalize(inner, _safe_sqrt(t_sq) * _safe_sqrt(s_sq))
        per_sample = ((t_sq > 0).to(inner.dtype) + (s_sq > 0).to(inner.dtype) - 2 * cosine).sum(dim=-1)
    return _reduce(per_sample, heads, teacher, student, block, reduction, out_dtype)


def _head_mean_stats(kind: str) -> StatsFn:
    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor]:
        t_mean, s_mean = t.mean(dim=1, keepdim=True), s.mean(dim=1, keepdim=True)
        if kind == "kl":
            return (_row_kl(t_mean, s_mean, valid),)
        return (_masked_sum((t_mean - s_mean) ** 2, valid),)

    return stats


def head_mean(
    teacher: AttentionInputs,
    student: AttentionInputs,
    *,
    block_size: int | None = None,
    kind: str = "mse",
    reduction: str = "mean",
) -> Tensor:
    """Streaming :func:`amad.losses.head_mean`: mean Teacher map vs mean Student map, per element or per row."""
    from .one_to_one import check_kind

    check_kind(kind, name="streaming head_mean")
    check_reduction(reduction, name="streaming head_mean")
    block, work, out_dtype = _prepare(teacher, student, block_size, "streaming head_mean")
    (per_sample,) = blockwise_sum(teacher, student, _head_mean_stats(kind), block_size=block, dtype=work)
    return _reduce(per_sample, 1, teacher, student, block, reduction, out_dtype)


# -- SHD -------------------------------------------------------------------------
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
        raise ValueError(f"streaming shd: Teacher values {tuple(values.shape)} contain NaN or infinite values")
    return values.detach().to(dtype)


@torch.no_grad()
def squeeze_coefficients(teacher: AttentionInputs, student: AttentionInputs, block_size: int,
                         dtype: torch.dtype) -> Tensor:
    """``C`` ``(B, H_s, H_t)`` with squeezed Teacher head ``h = sum_g C[b, h, g] T_g`` (SHD's merge rounds).

    Each round's merged heads are mixtures of the original heads, so the pair
    weights ``alpha = <D X_p, D Y> / ||D Y||^2`` (clipped to [0, 1], 0.5 when
    ``D Y = 0``) need one Teacher pass accumulating both inner products over blocks.
    """
    from .shd import squeeze_plan

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
    from .shd import soften

    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor]:
        merged = t if coeffs is None else torch.einsum("bhg,bgrk->bhrk", coeffs, t)
        target = apply_mask(soften(merged[:, :heads], temperature), valid)
        return (_row_kl(target, s[:, :heads], valid),)

    return stats


def shd(
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
    block, work, out_dtype = _prepare(teacher, student, block_size, "streaming shd")
    coeffs = None
    if student.num_heads < teacher.num_heads:
        coeffs = squeeze_coefficients(teacher, student, block, work)
    else:
        _teacher_values(teacher, work)  # the same error as the map form when values are missing
    heads = min(teacher.num_heads, student.num_heads)
    stats = _shd_stats(temperature, heads, coeffs)
    (per_sample,) = blockwise_sum(teacher, student, stats, block_size=block, dtype=work)
    return _reduce(per_sample, heads, teacher, student, block, reduction, out_dtype)
