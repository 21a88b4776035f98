"""Inputs and small reference pieces shared by the tests of the baseline/rival losses.

The references here are deliberately plain (one vector or one row at a time),
written from the spec's equations and independent of the library's code.
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def random_maps(b: int, h: int, q: int, k: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    """Row-stochastic maps ``(b, h, q, k)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(b, h, q, k, generator=gen, dtype=F64), dim=-1).to(dtype)


def random_mask(b: int, q: int, k: int, seed: int = 7) -> Tensor:
    """Random boolean ``(b, 1, q, k)`` mask with one fully masked query row."""
    mask = torch.rand(b, 1, q, k, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0, 0, 0, :] = False
    return mask


def padded_batch(lengths: list[int], heads: int, seed: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """A padded self-attention batch and its unpadded samples.

    Returns maps ``(B, heads, L, L)`` (``L = max(lengths)``) whose valid block
    ``[:l, :l]`` is a real attention map and whose padded rows and columns hold
    random garbage, the mask ``(B, 1, L, L)``, and the list of unpadded samples
    ``(1, heads, l, l)``.
    """
    gen = torch.Generator().manual_seed(seed)
    size = max(lengths)
    maps = torch.rand(len(lengths), heads, size, size, generator=gen, dtype=F64)
    mask = torch.zeros(len(lengths), 1, size, size, dtype=torch.bool)
    samples = []
    for i, length in enumerate(lengths):
        block = torch.softmax(2 * torch.randn(1, heads, length, length, generator=gen, dtype=F64), dim=-1)
        maps[i, :, :length, :length] = block[0]
        mask[i, 0, :length, :length] = True
        samples.append(block)
    return maps, mask, samples


def l2_normalised(v: Tensor) -> Tensor:
    norm = torch.sqrt((v * v).sum())
    return v / norm if norm > 0 else torch.zeros_like(v)


def l1_normalised(v: Tensor) -> Tensor:
    total = v.sum()
    return v / total if total > 0 else torch.zeros_like(v)


def kl_row(t: Tensor, m: Tensor, eps: float = 1e-7) -> Tensor:
    """``sum (t + eps) * (log(t + eps) - log(m + eps))`` of two rows."""
    return ((t + eps) * (torch.log(t + eps) - torch.log(m + eps))).sum()


def reduce_reference(per_sample: list[Tensor], valid: list[int], heads: int, n: int, reduction: str) -> Tensor:
    """The spec's reductions written out: "paper" = total / (B * heads * n); "mean" = mean over samples
    with a valid entry of sum / (heads * valid)."""
    if reduction == "paper":
        return sum(per_sample) / (len(per_sample) * heads * n)
    kept = [p / (heads * v) for p, v in zip(per_sample, valid) if v > 0]
    return sum(kept) / len(kept)


def assert_matches_reference(loss_fn, reference, shape, kind: str, reduction: str, masked: bool) -> None:
    """``loss_fn(teacher, student, kind=, mask=, reduction=)`` equals ``reference(teacher, student, kind, mask,
    reduction)`` in float64 on random maps of ``shape = (b, h_t, h_s, q, k)``."""
    b, h_t, h_s, q, k = shape
    teacher, student = random_maps(b, h_t, q, k, 0), random_maps(b, h_s, q, k, 1)
    mask = random_mask(b, q, k) if masked else None
    got = loss_fn(teacher, student, kind=kind, mask=mask, reduction=reduction)
    torch.testing.assert_close(got, reference(teacher, student, kind, mask, reduction), rtol=1e-10, atol=1e-12)
