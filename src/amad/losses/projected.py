"""AMAD variant 3: a learnable projection of the Student's maps before variant 2.

It has no streaming form: its ``n x n`` projection (``n = q*k``) is itself larger
than a map, so streaming the map would save nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._common import apply_mask
from .alignment import _prepare, _reduce, _variant_elements, check_options
from .base import AttentionLoss
from .registry import register

__all__ = ["ProjectedAMAD"]


@register("amad-projected")
class ProjectedAMAD(AttentionLoss):
    """AMAD variant 3: ``ReLU(S W^T + b)`` on the Student's flattened maps, then variant 2.

    ``n = q*k`` is fixed at construction (``W`` is ``n x n``); maps with another
    ``q*k`` are an error. ``W`` and ``b`` are ordinary parameters: they belong in
    the Student's optimizer and checkpoint. Initialised to ``W = I``, ``b = 0``,
    so that at the start (maps are non-negative, ReLU is then the identity) the
    loss equals plain variant 2 and training moves it away only if that helps.
    Masked entries are zeroed before and after the projection.
    """

    no_streaming_reason = "its n x n projection (n = q*k) is itself larger than a map"
    option_help = {
        "n": "n = q*k, the entries of one attention map (q query rows times k keys), the same in every batch: "
             "e.g. ViT on 224x224 images in 16x16 patches has q = k = 196 + 1 ([CLS]), n = 197*197 = 38809, "
             "so attention_loss_options: {n: 38809}; text needs every row padded to one length L, n = L*L",
    }

    def __init__(
        self,
        n: int,
        *,
        reduction: str = "paper",
        alignment: str | None = None,
        temperature: float = 1.0,
        eps: float = 1e-7,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"ProjectedAMAD: n (= q*k of the maps) must be a positive int; got {n!r}")
        options = {"reduction": reduction, "alignment": alignment, "temperature": temperature, "eps": eps}
        check_options("kl", name="ProjectedAMAD", **options)
        super().__init__(**options)
        self.n = n
        self.projection = nn.Linear(n, n)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``W = I``, ``b = 0``: the loss starts as plain variant 2."""
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(self.n))
            self.projection.bias.zero_()

    def extra_repr(self) -> str:
        return f"n={self.n}, " + super().extra_repr()

    def forward(self, teacher: Tensor, student: Tensor, mask: Tensor | None = None) -> Tensor:
        options: dict[str, Any] = self.options
        alignment = check_options("kl", name="ProjectedAMAD", **options)
        t, s, full_mask, out_dtype = _prepare(teacher, student, mask, name="ProjectedAMAD")
        batch, h_s, q, k = s.shape
        if q * k != self.n:
            raise ValueError(
                f"ProjectedAMAD was built for n = q*k = {self.n}; got maps with q={q}, k={k} "
                f"(n={q * k}), Teacher {tuple(teacher.shape)}, Student {tuple(student.shape)}"
            )
        weight, bias = self.projection.weight.to(s.dtype), self.projection.bias.to(s.dtype)
        projected = torch.relu(nn.functional.linear(s.reshape(batch, h_s, self.n), weight, bias))
        s = apply_mask(projected.reshape(s.shape), full_mask)
        elements, _ = _variant_elements(t, s, "kl", alignment, options["temperature"], options["eps"])
        return _reduce(elements, full_mask, options["reduction"]).to(out_dtype)
