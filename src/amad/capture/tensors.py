"""Turn what an attention layer received into :class:`~amad.attention.AttentionInputs`.

Shared by both recording paths of :mod:`amad.capture` (the attention-interface
dispatch and the forward hooks). Hugging Face hands attention layers masks in
several forms; all are converted to the two pieces ``AttentionInputs`` keeps:

* ``None``: nothing is masked;
* boolean ``(B|1, 1|H, q, k)``: True where a key may be attended (SDPA masks);
* float ``(B|1, 1|H, q, k)``: added to the logits (eager masks). Entries at or
  below half the dtype's minimum (``finfo.min`` or ``-inf``) are masked; any
  other non-zero value is a bias and is kept as one.
* integer/boolean ``(B, k)``: a key padding mask (1 = attend).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import AttentionInputs


def split_mask(mask: object, *, where: str) -> tuple[Tensor | None, Tensor | None]:
    """An HF attention mask -> (boolean key mask ``(B|1, 1, q|1, k)``, additive float bias or None)."""
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{where}: cannot record an attention mask of type {type(mask).__name__} "
            "(e.g. flex_attention's BlockMask); load the model with attn_implementation='sdpa' or 'eager'"
        )
    if mask.dim() == 2:
        if mask.is_floating_point():
            raise ValueError(f"{where}: a 2-D attention mask must be a 0/1 key padding mask; got dtype {mask.dtype}")
        return mask[:, None, None, :].bool(), None
    if mask.dim() != 4:
        raise ValueError(f"{where}: attention mask must be (B, k) or (B, H, q, k); got shape {tuple(mask.shape)}")
    bias = None
    if mask.dtype == torch.bool:
        valid = mask
    elif mask.is_floating_point():
        valid = mask > torch.finfo(mask.dtype).min / 2
        rest = torch.where(valid, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
        bias = rest if bool(rest.any()) else None
    else:
        raise TypeError(f"{where}: attention mask must be boolean or floating point; got {mask.dtype}")
    if valid.shape[1] != 1:
        merged = valid.all(dim=1, keepdim=True)
        if not torch.equal(merged, valid.any(dim=1, keepdim=True)):
            raise ValueError(
                f"{where}: the attention mask {tuple(mask.shape)} masks different keys in different heads; "
                "AttentionInputs keeps one key mask shared by all heads"
            )
        valid = merged
    return valid, bias


def expand_kv_heads(states: Tensor, num_heads: int, *, where: str) -> Tensor:
    """Repeat grouped key/value heads ``(B, H_kv, k, d)`` to ``(B, H, k, d)`` (head h uses group h // (H / H_kv))."""
    groups = states.shape[1]
    if groups == num_heads:
        return states
    if num_heads % groups:
        raise ValueError(f"{where}: {num_heads} query heads cannot share {groups} key/value heads evenly")
    b, _, k, d = states.shape
    return states[:, :, None].expand(b, groups, num_heads // groups, k, d).reshape(b, num_heads, k, d)


def real_query_rows(valid: Tensor | None, batch_size: int, q_len: int) -> Tensor | None:
    """For self-attention: ``(B, q)`` True for real tokens, i.e. positions some query may attend as a key.

    A padding token is masked as a key in every row; a real token is at least
    attendable by itself (the diagonal), with or without causality.
    """
    if valid is None or valid.shape[-1] != q_len:
        return None
    return valid.any(dim=-2)[:, 0].expand(batch_size, q_len)


def make_inputs(
    *,
    query: Tensor,
    key: Tensor,
    value: Tensor | None,
    scaling: float,
    mask: object,
    bias: Tensor | None,
    causal: bool,
    self_attention: bool,
    where: str,
) -> AttentionInputs:
    """Assemble the recorded tensors (``(B, H, q, d)`` layout) into ``AttentionInputs``.

    Key/value heads are expanded for grouped-query attention; the mask is split
    into a boolean key mask and an additive bias, added to ``bias`` (T5's
    position bias); for self-attention the real query rows are derived from the
    key mask (padding rows are excluded from the losses).
    """
    num_heads = query.shape[1]
    key = expand_kv_heads(key, num_heads, where=where)
    value = None if value is None else expand_kv_heads(value, num_heads, where=where)
    valid, mask_bias = split_mask(mask, where=where)
    if mask_bias is not None:
        bias = mask_bias if bias is None else bias + mask_bias
    query_mask = None
    if self_attention and query.shape[2] == key.shape[2]:
        query_mask = real_query_rows(valid, query.shape[0], query.shape[2])
    return AttentionInputs(
        query=query,
        key=key,
        value=value,
        scaling=float(scaling),
        bias=bias,
        mask=valid,
        causal=causal,
        query_mask=query_mask,
    )
