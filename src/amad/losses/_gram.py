"""The Gram identity of AMAD variant 1 and S2T: the loss from three small Gram matrices.

With ``X`` the explained maps and ``Y`` the explaining ones (Teacher and Student
for variant 1, swapped for S2T), flattened to rows: ``G_xy = X Y^T``,
``G_yy = Y Y^T`` and ``|x_i|^2``. With ``W = G_xy / (|x_i| |y_j|)``,
``G^yy = G_yy / (|y_j| |y_k|)`` and ``A = softmax_j(W / temperature)``:

    ||X^_i - rownorm2(A Y^)_i||^2 = 2 - 2 (sum_j A_ij W_ij) / sqrt(a_i^T G^yy a_i)

so a streaming pass only accumulates the Grams block by block, and the Student's
block gradient follows from ``dL/dG`` in closed form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._blockwise import flat, outer, safe_sqrt
from ._common import safe_normalize

def explained_rows_loss(g_xy: Tensor, g_yy: Tensor, x_sq: Tensor, temperature: float) -> Tensor:
    """Per sample ``sum_i ||X^_i - rownorm2(softmax_j(X^_i . Y^_j / temperature) Y^)||^2`` from Grams.

    ``g_xy = X Y^T`` ``(B, H_x, H_y)``, ``g_yy = Y Y^T`` ``(B, H_y, H_y)``,
    ``x_sq = |x_i|^2`` ``(B, H_x)``; returns ``(B,)``. All-zero rows behave as
    ``rownorm2`` makes them: they normalise to zero.
    """
    x_norm, y_norm = safe_sqrt(x_sq), safe_sqrt(torch.diagonal(g_yy, dim1=-2, dim2=-1))
    cosine = safe_normalize(g_xy, outer(x_norm, y_norm))
    weights = torch.softmax(cosine / temperature, dim=-1)
    g_hat = safe_normalize(g_yy, outer(y_norm, y_norm))
    cross = (weights * cosine).sum(dim=-1)
    mixed_sq = torch.einsum("bij,bjk,bik->bi", weights, g_hat, weights)
    unit_x, unit_m = (x_norm > 0).to(cross.dtype), (mixed_sq > 0).to(cross.dtype)
    return (unit_x + unit_m - 2 * safe_normalize(cross, safe_sqrt(mixed_sq))).sum(dim=-1)


def grams(explained: Tensor, explaining: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``X Y^T``, ``Y Y^T`` and ``|x_i|^2`` of one block (X explained by a mixture of Y's rows)."""
    x, y = flat(explained), flat(explaining)
    return x @ y.mT, y @ y.mT, torch.linalg.vector_norm(x, dim=-1).square()


def mse_grams(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return grams(t, s)


def mse_student_grad(t: Tensor, s: Tensor, d_ts: Tensor, d_ss: Tensor, _d_t_sq: Tensor) -> Tensor:
    """``dL/dS_b`` from ``dL/dG_ts`` and ``dL/dG_ss``: ``dG_ts^T T_b + (dG_ss + dG_ss^T) S_b``."""
    return ((d_ss + d_ss.mT) @ flat(s)).baddbmm_(d_ts.mT, flat(t)).view(s.shape)


def s2t_grams(t: Tensor, s: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return grams(s, t)


def s2t_student_grad(t: Tensor, s: Tensor, d_st: Tensor, _d_tt: Tensor, d_s_sq: Tensor) -> Tensor:
    """``dL/dS_b`` from ``dL/dG_st`` and ``dL/d|s_j|^2``: ``dG_st T_b + 2 d|s|^2 S_b``."""
    return (d_st @ flat(t)).addcmul_(flat(s), 2 * d_s_sq[..., None]).view(s.shape)
