"""MiniLMv2 multi-head self-attention relations (Wang et al., 2021), on Q/K/V rather than maps.

For each of Q, K and V, given per model in the head layout ``(B, H, L, d)``:
concatenate the heads to ``(B, L, H*d)`` and re-split the hidden size into
``A_r`` relation heads of size ``d_r = H*d / A_r`` (the same ``A_r`` for both
models; it must divide both hidden sizes). For relation ``"xy"`` (default
``"qq"``, ``"kk"``, ``"vv"``; any pair of ``q``, ``k``, ``v`` works) and relation
head ``r``:

    R_r = softmax(X_r Y_r^T / sqrt(d_r))     over the last dim, padded keys masked
    loss_xy = mean over valid rows and relation heads of KL(R^T_r || R^S_r)

(KL of a row summed over its keys). The loss is the sum over the relations,
as in MiniLMv2. Per relation, a sample's row KLs are averaged over its valid
rows and the ``A_r`` heads, then over the samples with a valid row, so
padding a batch does not change a sample's loss.

Masks: ``mask`` ``(B, L_k)`` marks the real tokens of the key/value sequence;
``query_mask`` ``(B, L_q)`` those of the query sequence. When ``query_mask``
is None, the query rows are masked by ``mask`` if Q has the length of K/V
(self-attention) and are all valid otherwise (cross-attention). Causality is
not applied: a relation looks at every real token. With grouped-query
attention the recorded K/V heads are already expanded to ``H`` (the expanded
hidden size is re-split). When the relation heads line up with whole kv
heads, a K-K or V-V relation is then that of the un-expanded K/V with logits
scaled by ``sqrt(g)``, ``g`` the query heads per kv head: a Teacher and a
Student with the same ``g`` (SmolLM2's 9/3 and Students 3/1, 6/2) are compared
at the same scale; with different ``g`` their K/V relations differ in sharpness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..attention import AttentionInputs
from ._common import NonFiniteError, reduce_per_sample
from .base import AttentionLoss
from .registry import register

__all__ = ["minilm_relations", "MiniLMRelationsLoss"]

_SLOTS = {"q": 0, "k": 1, "v": 2}
_NAME = "minilm_relations"


def relation_heads(x: Tensor, num_relation_heads: int) -> Tensor:
    """``(B, H, L, d)`` -> ``(B, A_r, L, H*d / A_r)``: concatenate the heads, re-split the hidden size."""
    batch, heads, length, dim = x.shape
    hidden = heads * dim
    if hidden % num_relation_heads:
        raise ValueError(
            f"{_NAME}: {num_relation_heads} relation heads do not divide the hidden size {heads}*{dim} = {hidden} "
            f"of a tensor {tuple(x.shape)}; A_r must divide both models' hidden sizes"
        )
    size = hidden // num_relation_heads
    return x.transpose(1, 2).reshape(batch, length, num_relation_heads, size).transpose(1, 2)


def _working(x: Tensor) -> Tensor:
    """Half precision is computed in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _relation_log_probs(rows: Tensor, cols: Tensor, col_mask: Tensor | None) -> Tensor:
    """``log softmax(X Y^T / sqrt(d_r))`` ``(B, A_r, L_x, L_y)``; masked columns get the lowest finite logit."""
    scores = rows @ cols.transpose(-1, -2) / math.sqrt(rows.shape[-1])
    if col_mask is not None:
        scores = scores.masked_fill(~col_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def _check_relations(relations: Sequence[str]) -> tuple[str, ...]:
    relations = tuple(relations) if not isinstance(relations, str) else (relations,)
    bad = [r for r in relations if len(r) != 2 or any(c not in _SLOTS for c in r)]
    if not relations or bad or len(set(relations)) != len(relations):
        raise ValueError(
            f"{_NAME}: relations must be distinct pairs of q/k/v such as ('qq', 'kk', 'vv'); got {relations!r}"
        )
    return relations


def _check_num_relation_heads(num_relation_heads: int) -> None:
    if isinstance(num_relation_heads, bool) or not isinstance(num_relation_heads, int) or num_relation_heads < 1:
        raise ValueError(f"{_NAME}: num_relation_heads must be a positive int; got {num_relation_heads!r}")


def _check_qkv(teacher_qkv: Sequence[Tensor | None], student_qkv: Sequence[Tensor | None], used: set[str]) -> None:
    for label, qkv in (("teacher", teacher_qkv), ("student", student_qkv)):
        if not isinstance(qkv, (tuple, list)) or len(qkv) != 3:
            raise TypeError(f"{_NAME}: {label}_qkv must be a (query, key, value) sequence of 3 tensors")
    for slot in sorted(used, key=_SLOTS.get):
        t, s = teacher_qkv[_SLOTS[slot]], student_qkv[_SLOTS[slot]]
        for label, x in (("teacher", t), ("student", s)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{_NAME}: the relations need the {label}'s {slot.upper()}; got {type(x).__name__}")
            if x.dim() != 4 or not x.is_floating_point():
                raise ValueError(
                    f"{_NAME}: {label} {slot.upper()} must be floating (B, H, L, d); got {x.dtype} {tuple(x.shape)}"
                )
            if not torch.isfinite(x.detach()).all():
                raise NonFiniteError(
                    f"{_NAME}: {label} {slot.upper()} {tuple(x.shape)} contains NaN or infinite values", label.lower()
                )
        if (t.shape[0], t.shape[2]) != (s.shape[0], s.shape[2]):
            raise ValueError(
                f"{_NAME}: Teacher {slot.upper()} {tuple(t.shape)} and Student {slot.upper()} {tuple(s.shape)} "
                "must have the same batch size and sequence length"
            )


def _sequence_masks(
    qkv: Sequence[Tensor | None], used: set[str], mask: Tensor | None, query_mask: Tensor | None
) -> dict[str, Tensor | None]:
    """Row/column validity ``(B, L)`` of each used slot."""
    present = {slot: qkv[_SLOTS[slot]] for slot in used}
    batch = next(iter(present.values())).shape[0]
    kv_lengths = {x.shape[2] for slot, x in present.items() if slot != "q"}
    if len(kv_lengths) > 1:
        raise ValueError(f"{_NAME}: K and V must have the same sequence length; got {sorted(kv_lengths)}")
    q_length = present["q"].shape[2] if "q" in present else None
    kv_length = kv_lengths.pop() if kv_lengths else None

    def checked(m: Tensor | None, length: int, label: str) -> Tensor | None:
        if m is None:
            return None
        if not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != (batch, length):
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            dtype = m.dtype if isinstance(m, Tensor) else ""
            raise ValueError(
                f"{_NAME}: {label} must be a boolean (B, L) = ({batch}, {length}) tensor; got {dtype} {got}"
            )
        return m

    key_mask = checked(mask, kv_length if kv_length is not None else q_length, "mask")
    if query_mask is None and (kv_length is None or kv_length == q_length):
        query_mask = key_mask
    rows = checked(query_mask, q_length, "query_mask") if q_length is not None else None
    return {"q": rows, "k": key_mask, "v": key_mask}


def minilm_relations(
    teacher_qkv: Sequence[Tensor | None],
    student_qkv: Sequence[Tensor | None],
    *,
    num_relation_heads: int,
    mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    relations: Sequence[str] = ("qq", "kk", "vv"),
) -> Tensor:
    """``sum_xy mean_{rows, r} KL(softmax(X^T_r Y^T_r^T / sqrt(d^T_r)) || same for the Student)``.

    teacher_qkv, student_qkv: ``(query, key, value)``, each ``(B, H, L, d)``
    (heads and head sizes may differ between the models; entries no relation
    uses may be None). mask: boolean ``(B, L_k)``, True for real key tokens;
    query_mask: boolean ``(B, L_q)`` (see the module doc).
    """
    _check_num_relation_heads(num_relation_heads)
    relations = _check_relations(relations)
    used = {c for r in relations for c in r}
    _check_qkv(teacher_qkv, student_qkv, used)
    masks = _sequence_masks(teacher_qkv, used, mask, query_mask)
    split = {
        slot: tuple(relation_heads(_working(qkv[i]), num_relation_heads) for qkv in (teacher_qkv, student_qkv))
        for slot, i in _SLOTS.items()
        if slot in used
    }
    total = None
    for relation in relations:
        x, y = relation
        row_mask, col_mask = masks[x], masks[y]
        teacher_log = _relation_log_probs(split[x][0], split[y][0], col_mask)
        student_log = _relation_log_probs(split[x][1], split[y][1], col_mask)
        row_kl = teacher_log.exp() * (teacher_log - student_log)
        if col_mask is not None:
            row_kl = torch.where(col_mask[:, None, None, :], row_kl, torch.zeros_like(row_kl))
        row_kl = row_kl.sum(dim=-1)  # (B, A_r, L_x)
        batch, _, length = row_kl.shape
        if row_mask is not None:
            row_kl = torch.where(row_mask[:, None, :], row_kl, torch.zeros_like(row_kl))
            rows = row_mask.sum(dim=1)
        else:
            rows = torch.full((batch,), length, device=row_kl.device)
        loss = reduce_per_sample(row_kl.sum(dim=(1, 2)), num_relation_heads, length, rows, "mean")
        total = loss if total is None else total + loss
    return total


def _key_mask(inputs: AttentionInputs) -> Tensor | None:
    """``(B, k)``: keys that some query row of the layer may attend (from ``inputs.mask``)."""
    if inputs.mask is None:
        return None
    full = inputs.mask.expand(inputs.batch_size, 1, inputs.q_len, inputs.k_len)
    return full.any(dim=2)[:, 0]


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


@register("minilm-relations")
class MiniLMRelationsLoss(AttentionLoss):
    """Module form of :func:`minilm_relations`; options ``num_relation_heads`` (required) and ``relations``.

    Works on recorded Q/K/V only (:meth:`from_inputs`), not on maps.
    """

    needs = "qkv"
    no_streaming_reason = (
        "it needs no attention map: its relations come from Q/K/V directly, one (B, A_r, L, L) relation at a time"
    )

    option_help = {
        "num_relation_heads": "the number of heads the relations split Q, K and V into, the same for both models: "
                              "it must divide both models' hidden sizes, e.g. attention_loss_options: "
                              "{num_relation_heads: 4}",
    }

    def __init__(self, *, num_relation_heads: int, relations: Sequence[str] = ("qq", "kk", "vv")) -> None:
        _check_num_relation_heads(num_relation_heads)
        super().__init__(num_relation_heads=num_relation_heads, relations=_check_relations(relations))

    def materialised_loss(self, teacher: AttentionInputs, student: AttentionInputs) -> Tensor:
        """The loss from recorded Q/K/V: relations only, no attention map is ever built."""
        return minilm_relations(
            (teacher.query, teacher.key, teacher.value),
            (student.query, student.key, student.value),
            mask=_both(_key_mask(teacher), _key_mask(student)),
            query_mask=_both(teacher.query_mask, student.query_mask),
            **self.options,
        )
