"""What one attention layer computed, kept as its inputs rather than its map.

`AttentionInputs` is the contract between capture (which records it) and the
losses (which either materialise the probabilities with :meth:`probs` or stream
over blocks of query rows with :meth:`block`). Everything is in the
multi-head layout ``(B, H, q, d)``; grouped key/value heads are already
expanded to ``H``.

    P = softmax(Q K^T * scaling + bias, masked where ``valid`` is False)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class AttentionInputs:
    """Recorded Q/K (and optionally V) of one attention layer for one batch.

    query: ``(B, H, q, d)``; key: ``(B, H, k, d)``; value: ``(B, H, k, d_v)``.
    scaling: the factor applied to ``Q K^T`` (usually ``d ** -0.5``).
    bias: additive float logits bias broadcastable to ``(B, H, q, k)``
        (T5 position bias, ALiBi, ...), or None.
    mask: boolean, broadcastable to ``(B, 1, q, k)``, True where a key may be
        attended (padding of keys), or None.
    causal: whether query ``i`` may only attend keys ``j <= i + (k - q)``.
    query_mask: boolean ``(B, q)``, True for real (unpadded) query rows; rows
        that are False are excluded from the losses (their maps still exist).
    """

    query: Tensor
    key: Tensor
    scaling: float
    value: Tensor | None = None
    bias: Tensor | None = None
    mask: Tensor | None = None
    causal: bool = False
    query_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.query.dim() != 4 or self.key.dim() != 4:
            raise ValueError(
                "AttentionInputs needs query (B, H, q, d) and key (B, H, k, d); got "
                f"query {tuple(self.query.shape)} and key {tuple(self.key.shape)}"
            )
        qb, qh, _, qd = self.query.shape
        kb, kh, _, kd = self.key.shape
        if (qb, qh, qd) != (kb, kh, kd):
            raise ValueError(
                f"query {tuple(self.query.shape)} and key {tuple(self.key.shape)} "
                "must agree in batch, heads and head dimension"
            )

    # -- shapes -----------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        return self.key.shape[2]

    @property
    def map_shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, self.num_heads, self.q_len, self.k_len)

    # -- masks ------------------------------------------------------------
    def _rows(self, t: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a tensor broadcastable to ``(B, *, q, k)``."""
        return t[..., start:stop, :] if t.shape[-2] != 1 else t

    def valid(self, start: int = 0, stop: int | None = None) -> Tensor | None:
        """Boolean ``(B, 1, r, k)`` of the entries a loss may look at, or None if all are.

        Combines the key mask, causality and the query mask for rows ``start:stop``.
        """
        stop = self.q_len if stop is None else stop
        out: Tensor | None = None
        if self.mask is not None:
            out = self._rows(self.mask, start, stop)
        if self.causal:
            rows = torch.arange(start, stop, device=self.query.device)[:, None]
            cols = torch.arange(self.k_len, device=self.query.device)[None, :]
            causal = (cols <= rows + (self.k_len - self.q_len))[None, None]
            out = causal if out is None else out & causal
        if self.query_mask is not None:
            qm = self.query_mask[:, None, start:stop, None]
            out = qm if out is None else out & qm
        if out is None:
            return None
        return out.expand(self.batch_size, 1, stop - start, self.k_len)

    def loss_mask(self) -> Tensor | None:
        """Boolean ``(B, 1, q, k)`` to pass to the map losses as ``mask``."""
        return self.valid()

    # -- probabilities ----------------------------------------------------
    def logits(self, start: int = 0, stop: int | None = None) -> Tensor:
        """``Q K^T * scaling + bias`` for query rows ``start:stop``: ``(B, H, r, k)``.

        The scaling multiplies the query rows before the product (``(Q s) K^T``: ``r x d`` entries
        instead of a pass over the ``r x k`` scores, forward and backward; the same as
        ``(Q K^T) s`` up to float rounding, exactly the same for a power-of-two ``s`` such as ``64 ** -0.5``).
        """
        stop = self.q_len if stop is None else stop
        scores = torch.matmul(self.query[:, :, start:stop] * self.scaling, self.key.transpose(-1, -2))
        if self.bias is not None:
            scores = scores + self._rows(self.bias, start, stop).to(scores.dtype)
        return scores

    def probs(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Attention probabilities of rows ``start:stop``, ``(B, H, r, k)``.

        Masked entries are exactly 0; a row with no valid key is all zeros
        (never NaN).
        """
        stop = self.q_len if stop is None else stop
        scores = self.logits(start, stop)
        attendable = self._attendable(start, stop)
        if attendable is not None:
            scores = scores.masked_fill(~attendable, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            return torch.where(attendable, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
        return torch.softmax(scores, dim=-1)

    def _attendable(self, start: int, stop: int) -> Tensor | None:
        """Key mask and causality only: what the model itself could attend."""
        return replace(self, query_mask=None).valid(start, stop)

    def detach(self) -> "AttentionInputs":
        """A copy cut from the autograd graph (the Teacher's side)."""
        def d(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return replace(self, query=d(self.query), key=d(self.key), value=d(self.value), bias=d(self.bias))

    def to(self, dtype: torch.dtype) -> "AttentionInputs":
        """A copy with floating tensors cast to ``dtype`` (masks unchanged)."""
        def c(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        return replace(self, query=c(self.query), key=c(self.key), value=c(self.value), bias=c(self.bias))


def check_map_shapes(teacher: AttentionInputs, student: AttentionInputs, *, name: str) -> None:
    """Teacher and Student maps must share ``B, q, k``."""
    t, s = teacher.map_shape, student.map_shape
    if (t[0], t[2], t[3]) != (s[0], s[2], s[3]):
        raise ValueError(
            f"{name}: Teacher maps {t} and Student maps {s} must have the same batch size, "
            "query length q and key length k"
        )
