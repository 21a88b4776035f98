"""AMAD: attention-map alignment distillation (docs/method.md, sections 3-7).

Each Teacher head is matched to a soft mixture of *all* Student heads, so the
loss works for any pair of head counts ``H_t``, ``H_s``. Per sample, with ``T``
(``H_t x n``) and ``S`` (``H_s x n``) the flattened maps, ``n = q*k``:

* ``"mse"`` (variant 1): ``T^ = rownorm2(T)``, ``S^ = rownorm2(S)``,
  ``A = softmax_j(T^ S^^T / temperature)``, ``M^ = rownorm2(A S^)``,
  element loss ``(T^ - M^)^2``.
* ``"kl"`` (variant 2): rows L1-normalised, ``A = softmax_j(T S^T / temperature)``
  (``alignment="l1"``, the paper) or the cosine ``W`` of variant 1
  (``alignment="cosine"``), ``M = A S``; ``T`` and ``M`` are then read as
  ``H_t*q`` distributions over the ``k`` keys, each L1-normalised, and compared
  by ``(t+eps) * (log(t+eps) - log(m+eps))``.
* ``"token"`` (variant 4): for every query row ``l`` separately, the rows
  ``T_l`` (``H_t x k``) and ``S_l`` (``H_s x k``) are L1-normalised (a no-op for
  unmasked probability rows), ``A_l = softmax_j(T_l S_l^T / temperature)``,
  ``M_l = A_l S_l``, L1-normalised, KL elements as in variant 2.
* ``"s2t"``: variant 1 with the roles swapped (each Student head is explained
  by a mixture of Teacher heads); its elements span ``H_s`` heads.
* ``ProjectedAMAD`` (variant 3): a learnable ``ReLU(S W^T + b)`` on the
  Student's flattened maps, then variant 2.

Half-precision inputs are computed in float32 and returned in their dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..attention import AttentionInputs
from . import _gram
from ._triton_amad import fused_per_sample, use_fused
from ._blockwise import StatsFn, blockwise_sum, flat, masked_sum, outer, prepare_streaming, reduce_streaming, safe_sqrt
from ._common import (
    HALF_DTYPES,
    apply_mask,
    check_maps,
    check_reduction,
    check_temperature,
    kl_elements,
    reduce_per_sample,
    rownorm1,
    rownorm2,
    safe_normalize,
    valid_counts,
)
from .base import AttentionLoss
from .registry import register

__all__ = ["amad", "streaming_amad", "alignment_matrix", "head_similarity", "AMADMSELoss", "AMADKLLoss", "AMADTokenLoss", "AMADS2TLoss"]

#: Alignment similarities each variant accepts; the first one is its default.
ALIGNMENTS: dict[str, tuple[str, ...]] = {
    "mse": ("cosine",),
    "kl": ("l1", "cosine"),
    "token": ("l1", "cosine"),
    "s2t": ("cosine",),
}
VARIANTS = tuple(ALIGNMENTS)


def check_options(
    variant: str, *, reduction: str, alignment: str | None, temperature: float, eps: float, name: str = "amad"
) -> str:
    """Validate the options of an AMAD variant; return the alignment to use."""
    if variant not in ALIGNMENTS:
        raise ValueError(f"{name}: unknown variant {variant!r}; choose one of {VARIANTS} (variant 3 is ProjectedAMAD)")
    check_reduction(reduction, name=name)
    choices = ALIGNMENTS[variant]
    alignment = choices[0] if alignment is None else alignment
    if alignment not in choices:
        raise ValueError(
            f"{name}: alignment {alignment!r} is not available for variant {variant!r}; choose one of {choices}"
        )
    check_temperature(temperature, name=name)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"{name}: eps must be a finite number > 0; got {eps!r}")
    return alignment


def _prepare(
    teacher: Tensor, student: Tensor, mask: Tensor | None, name: str
) -> tuple[Tensor, Tensor, Tensor | None, torch.dtype]:
    """Validate, cast half precision to float32 and zero the masked entries of both maps."""
    full_mask = check_maps(teacher, student, mask, name=name)
    out_dtype = torch.promote_types(teacher.dtype, student.dtype)
    work = torch.float32 if out_dtype in HALF_DTYPES else out_dtype
    t = apply_mask(teacher.to(work), full_mask)
    s = apply_mask(student.to(work), full_mask)
    return t, s, full_mask, out_dtype


def _mixture(rows_s: Tensor, sim_t: Tensor, sim_s: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``A = softmax_j(sim_t sim_s^T / temperature)`` and the aligned rows ``A rows_s``."""
    weights = torch.softmax(sim_t @ sim_s.transpose(-1, -2) / temperature, dim=-1)
    return weights, weights @ rows_s


def _mse_elements(t: Tensor, s: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Variant 1 on ``(..., H_t, n)`` and ``(..., H_s, n)``: ``(T^ - rownorm2(A S^))^2`` and ``A``."""
    t_hat, s_hat = rownorm2(t), rownorm2(s)
    weights, mixed = _mixture(s_hat, t_hat, s_hat, temperature)
    return (t_hat - rownorm2(mixed)) ** 2, weights


def _similarity_rows(x: Tensor, x_l1: Tensor, alignment: str) -> Tensor:
    return x_l1 if alignment == "l1" else rownorm2(x)


def _kl_elements(
    t: Tensor, s: Tensor, q: int, k: int, alignment: str, temperature: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Variant 2 on flattened ``(B, H_t, n)``, ``(B, H_s, n)``: KL elements ``(B, H_t, q, k)`` and ``A``."""
    t_l1, s_l1 = rownorm1(t), rownorm1(s)
    sim_t, sim_s = _similarity_rows(t, t_l1, alignment), _similarity_rows(s, s_l1, alignment)
    weights, mixed = _mixture(s_l1, sim_t, sim_s, temperature)
    shape = (t.shape[0], t.shape[1], q, k)
    return kl_elements(rownorm1(t_l1.reshape(shape)), rownorm1(mixed.reshape(shape)), eps), weights


def _token_elements(t: Tensor, s: Tensor, alignment: str, temperature: float, eps: float) -> tuple[Tensor, Tensor]:
    """Variant 4 on ``(B, H, q, k)`` maps: KL elements ``(B, q, H_t, k)`` and ``A`` ``(B, q, H_t, H_s)``."""
    t_rows, s_rows = t.transpose(1, 2), s.transpose(1, 2)
    t_l1, s_l1 = rownorm1(t_rows), rownorm1(s_rows)
    sim_t, sim_s = _similarity_rows(t_rows, t_l1, alignment), _similarity_rows(s_rows, s_l1, alignment)
    weights, mixed = _mixture(s_l1, sim_t, sim_s, temperature)
    return kl_elements(t_l1, rownorm1(mixed), eps), weights


def _variant_elements(
    t: Tensor, s: Tensor, variant: str, alignment: str, temperature: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Element losses laid out as ``(B, H, q, k)`` (H = H_s for s2t, else H_t) and the alignment matrix."""
    batch, h_t, q, k = t.shape
    h_s = s.shape[1]
    flat_t, flat_s = t.reshape(batch, h_t, q * k), s.reshape(batch, h_s, q * k)
    if variant == "mse":
        elements, weights = _mse_elements(flat_t, flat_s, temperature)
        return elements.reshape(t.shape), weights
    if variant == "s2t":
        elements, weights = _mse_elements(flat_s, flat_t, temperature)
        return elements.reshape(s.shape), weights
    if variant == "kl":
        return _kl_elements(flat_t, flat_s, q, k, alignment, temperature, eps)
    elements, weights = _token_elements(t, s, alignment, temperature, eps)
    return elements.transpose(1, 2), weights


def _reduce(elements: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Sum the ``(B, H, q, k)`` element losses over valid entries and apply the reduction."""
    batch, heads, q, k = elements.shape
    if mask is not None:
        elements = torch.where(mask, elements, torch.zeros((), dtype=elements.dtype, device=elements.device))
    counts = valid_counts(mask, batch, q * k, elements.device)
    return reduce_per_sample(elements.sum(dim=(1, 2, 3)), heads, q * k, counts, reduction)


def amad(
    teacher: Tensor,
    student: Tensor,
    *,
    variant: str = "mse",
    mask: Tensor | None = None,
    reduction: str = "paper",
    alignment: str | None = None,
    temperature: float = 1.0,
    eps: float = 1e-7,
) -> Tensor:
    """AMAD loss between Teacher maps ``(B, H_t, q, k)`` and Student maps ``(B, H_s, q, k)``.

    ``variant``: ``"mse"`` (``sum_i ||T^_i - rownorm2(softmax_j(T^ S^^T) S^)_i||^2``),
    ``"kl"``, ``"token"`` or ``"s2t"`` (see the module docstring).
    ``alignment``: similarity inside the softmax, ``"l1"`` (default of kl/token)
    or ``"cosine"`` (default and only choice of mse/s2t); ``temperature`` divides it.
    ``mask`` (bool, broadcastable to ``(B, 1, q, k)``, True = valid) zeroes
    entries of both maps first. ``reduction="paper"``: sum / ``(B * H * n)``;
    ``"mean"``: per sample sum / ``(H * n_valid)``, averaged over samples.
    """
    alignment = check_options(variant, reduction=reduction, alignment=alignment, temperature=temperature, eps=eps)
    t, s, full_mask, out_dtype = _prepare(teacher, student, mask, name=f"amad({variant})")
    elements, _ = _variant_elements(t, s, variant, alignment, temperature, eps)
    return _reduce(elements, full_mask, reduction).to(out_dtype)


@torch.no_grad()
def head_similarity(teacher: Tensor, student: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """``W = T^ S^^T`` ``(B, H_t, H_s)``: the cosine similarity of flattened maps (rows L2-normalised), float32+.

    An all-zero map has similarity 0 to everything.
    """
    t, s, _, _ = _prepare(teacher, student, mask, name="head_similarity")
    return rownorm2(t.flatten(2)) @ rownorm2(s.flatten(2)).transpose(1, 2)


@torch.no_grad()
def alignment_matrix(
    teacher: Tensor,
    student: Tensor,
    *,
    variant: str = "mse",
    mask: Tensor | None = None,
    alignment: str | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """The soft alignment ``A`` the loss uses (for inspection and plots), in float32 or wider.

    ``(B, H_t, H_s)`` for mse/kl, ``(B, H_s, H_t)`` for s2t, ``(B, q, H_t, H_s)`` for token.
    """
    eps = 1e-7  # unused by the alignment itself
    alignment = check_options(variant, reduction="paper", alignment=alignment, temperature=temperature, eps=eps)
    t, s, _, _ = _prepare(teacher, student, mask, name="alignment_matrix")
    return _variant_elements(t, s, variant, alignment, temperature, eps)[1]


# -- streaming forms (never hold a whole map) --------------------------------------
def _kl_alignment_stats(cosine: bool) -> StatsFn:
    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor, ...]:
        ft, fs = flat(t), flat(s)
        sums = (ft @ fs.mT, ft.sum(dim=-1), fs.sum(dim=-1))
        return sums + ((ft * ft).sum(dim=-1), (fs * fs).sum(dim=-1)) if cosine else sums

    return stats


def _kl_terms(eps: float) -> StatsFn:
    def stats(
        t: Tensor, s: Tensor, valid: Tensor | None, weights: Tensor, t_sum: Tensor, s_sum: Tensor
    ) -> tuple[Tensor]:
        t_l1 = safe_normalize(t, t_sum[..., None, None])
        mixed = torch.einsum("bij,bjrk->birk", weights, safe_normalize(s, s_sum[..., None, None]))
        return (masked_sum(kl_elements(rownorm1(t_l1), rownorm1(mixed), eps), valid),)

    return stats


def _kl_per_sample(teacher: AttentionInputs, student: AttentionInputs, block: int, work: torch.dtype,
                   alignment: str, temperature: float, eps: float, name: str) -> Tensor:
    cosine = alignment == "cosine"
    first = blockwise_sum(teacher, student, _kl_alignment_stats(cosine), block_size=block, dtype=work, name=name)
    g_ts, t_sum, s_sum = first[:3]
    scale = outer(safe_sqrt(first[3]), safe_sqrt(first[4])) if cosine else outer(t_sum, s_sum)
    weights = torch.softmax(safe_normalize(g_ts, scale) / temperature, dim=-1)
    (per_sample,) = blockwise_sum(
        teacher, student, _kl_terms(eps), weights, t_sum, s_sum, block_size=block, dtype=work, name=name
    )
    return per_sample


# -- AMAD variant 4: per query row ---------------------------------------------
def _token_terms(alignment: str, temperature: float, eps: float) -> StatsFn:
    def stats(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor]:
        elements, _ = _token_elements(t, s, alignment, temperature, eps)
        return (masked_sum(elements.transpose(1, 2), valid),)

    return stats


def streaming_amad(
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
    fused Triton kernels (``_triton_amad``) for supported CUDA inputs (never on CPU),
    ``"triton"`` requires them, ``"torch"`` never uses them.
    """
    name = f"streaming amad({variant})"
    alignment = check_options(variant, reduction=reduction, alignment=alignment, temperature=temperature, eps=eps,
                              name=name)
    block, work, out_dtype = prepare_streaming(teacher, student, block_size, name)
    heads = student.num_heads if variant == "s2t" else teacher.num_heads
    if use_fused(kernel, teacher, student, variant, name):
        per_sample = fused_per_sample(teacher, student, variant=variant, alignment=alignment,
                                      temperature=temperature, eps=eps)
    elif variant in ("mse", "s2t"):
        grams, grad = (_gram.mse_grams, _gram.mse_student_grad) if variant == "mse" else (_gram.s2t_grams, _gram.s2t_student_grad)
        g_xy, g_yy, x_sq = blockwise_sum(teacher, student, grams, block_size=block, dtype=work, student_grad_fn=grad,
                                         name=name)
        per_sample = _gram.explained_rows_loss(g_xy, g_yy, x_sq, temperature)
    elif variant == "kl":
        per_sample = _kl_per_sample(teacher, student, block, work, alignment, temperature, eps, name)
    else:
        terms = _token_terms(alignment, temperature, eps)
        (per_sample,) = blockwise_sum(teacher, student, terms, block_size=block, dtype=work, name=name)
    return reduce_streaming(per_sample, heads, teacher, student, block, reduction, out_dtype)


class _PresetAMAD(AttentionLoss):
    """AMAD with a fixed variant; options are checked when the loss is built."""

    variant: str = "mse"

    def __init__(
        self, *, reduction: str = "paper", alignment: str | None = None, temperature: float = 1.0, eps: float = 1e-7
    ) -> None:
        options = {"reduction": reduction, "alignment": alignment, "temperature": temperature, "eps": eps}
        check_options(self.variant, name=type(self).__name__, **options)
        super().__init__(**options)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each preset's map and streaming functions are :func:`amad` with its ``variant``."""
        super().__init_subclass__(**kwargs)
        cls.map_fn = staticmethod(partial(amad, variant=cls.variant))
        cls.streaming_fn = staticmethod(partial(streaming_amad, variant=cls.variant))


@register("amad-mse")
class AMADMSELoss(_PresetAMAD):
    """AMAD variant 1 (MSE on L2-normalised maps), the flagship."""

    variant = "mse"


@register("amad-kl")
class AMADKLLoss(_PresetAMAD):
    """AMAD variant 2 (KL on L1-normalised maps)."""

    variant = "kl"


@register("amad-token")
class AMADTokenLoss(_PresetAMAD):
    """AMAD variant 4 (alignment per query row, KL)."""

    variant = "token"


@register("amad-s2t")
class AMADS2TLoss(_PresetAMAD):
    """AMAD Student-to-Teacher (variant 1 with the roles swapped); may collapse, not a default."""

    variant = "s2t"
