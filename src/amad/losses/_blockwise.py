"""The engine under every streaming loss: sums over query blocks, checkpointed per block.

:func:`blockwise_sum` evaluates ``sum over blocks b of stats_fn(T_b, S_b, valid_b, *extras)``
where ``T_b``, ``S_b`` are the Teacher and Student probabilities of query rows
``b`` (masked entries zeroed, as the map losses do) recomputed from Q/K (+ bias,
mask, causality), and ``stats_fn`` returns small per-sample statistics. Its
backward recomputes each Student block with gradients enabled and backpropagates
the incoming gradient of the statistics through it (per-block checkpointing; a
pass may instead supply ``dL/dS_b`` in closed form, as the Gram passes do), so
neither pass ever holds a whole ``(B, H, q, k)`` map: the peak is a few block-sized
tensors, ``O(B * H * block_size * k)``, independent of ``q``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..attention import AttentionInputs, check_map_shapes
from ._common import HALF_DTYPES, NonFiniteError, apply_mask, kl_elements, reduce_per_sample, rownorm1

#: Largest number of map entries (``B * H * rows * k``) one block may hold when
#: ``block_size`` is None (16 MiB in float32). Measured (benchmarks/README.md):
#: smaller blocks pay per-block overhead; larger ones cost memory linearly without
#: being faster (in one measurement 2x slower at q = k = 8192: they leave the caches).
DEFAULT_BLOCK_ENTRIES = 2**22

StatsFn = Callable[..., Sequence[Tensor]]


def resolve_block_size(block_size: int | None, teacher: AttentionInputs, student: AttentionInputs) -> int:
    """Query rows per block: ``block_size`` if given, else the most rows within the entry budget."""
    if block_size is None:
        per_row = teacher.batch_size * max(teacher.num_heads, student.num_heads) * teacher.k_len
        return max(1, DEFAULT_BLOCK_ENTRIES // max(per_row, 1))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int (query rows per block); got {block_size!r}")
    return block_size


def _rows(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Rows ``start:stop`` of a tensor broadcastable to ``(..., q, k)`` (unchanged if its q is 1)."""
    if t is None or t.dim() < 2 or t.shape[-2] == 1:
        return t
    return t[..., start:stop, :]


def block_view(
    inputs: AttentionInputs, start: int, stop: int, *, query: Tensor | None = None, key: Tensor | None = None,
    bias: Tensor | None = None,
) -> AttentionInputs:
    """Query rows ``start:stop`` of ``inputs`` as inputs of their own.

    ``view.probs()`` equals ``inputs.probs(start, stop)`` and ``view.valid()``
    equals ``inputs.valid(start, stop)``; causality is folded into the view's
    mask. ``query`` (the rows), ``key`` and ``bias`` (the rows) replace the
    originals when given (leaves of a backward recomputation).
    """
    attendable = replace(inputs, query_mask=None).valid(start, stop)
    query_mask = None if inputs.query_mask is None else inputs.query_mask[:, start:stop]
    return replace(
        inputs,
        query=inputs.query[:, :, start:stop] if query is None else query,
        key=inputs.key if key is None else key,
        bias=_rows(inputs.bias, start, stop) if bias is None else bias,
        mask=attendable,
        causal=False,
        query_mask=query_mask,
    )


def check_finite_inputs(inputs: AttentionInputs, label: str, name: str) -> None:
    """Query, key and bias must be finite: then only an overflow of the logits can spoil the maps."""
    for part in ("query", "key", "bias"):
        tensor = getattr(inputs, part)
        if tensor is not None and not torch.isfinite(tensor.detach()).all():
            raise NonFiniteError(
                f"{name}: {label} {part} {tuple(tensor.shape)} contains NaN or infinite values", label.lower()
            )


def _check_finite_sums(totals: Sequence[Tensor], plan: "BlockPlan") -> None:
    """The summed statistics are finite unless an input or some block's probabilities were not.

    One check (one host-device synchronisation) per pass, on the small sums; only when it fails
    are the inputs examined, to name the one that is not finite.
    """
    if bool(torch.stack([torch.isfinite(t).all() for t in totals]).all()):
        return
    check_finite_inputs(plan.teacher, "Teacher", plan.name)
    check_finite_inputs(plan.student, "Student", plan.name)
    raise NonFiniteError(
        f"{plan.name}: the Teacher maps {plan.teacher.map_shape} or Student maps {plan.student.map_shape} "
        "contain NaN or infinite values (the attention logits overflow?)"
    )


def _drop_all_true_masks(inputs: AttentionInputs) -> AttentionInputs:
    """The same inputs without a key or query mask that masks nothing (saves passes over every block)."""
    mask = None if inputs.mask is None or bool(inputs.mask.all()) else inputs.mask
    query_mask = None if inputs.query_mask is None or bool(inputs.query_mask.all()) else inputs.query_mask
    if mask is inputs.mask and query_mask is inputs.query_mask:
        return inputs
    return replace(inputs, mask=mask, query_mask=query_mask)


@dataclass(frozen=True)
class BlockPlan:
    """What one streaming pass iterates over: the pair of inputs, the block size and the statistic."""

    teacher: AttentionInputs
    student: AttentionInputs
    block_size: int
    dtype: torch.dtype
    stats_fn: StatsFn
    #: Optional ``fn(T_b, S_b, *grad_outputs) -> dL/dS_b``: the backward uses it instead of re-running
    #: ``stats_fn`` under autograd (cheaper for the Gram statistics; not for passes with extras).
    student_grad_fn: Callable[..., Tensor] | None = None
    #: The loss's name, for error messages.
    name: str = "streaming loss"

    def blocks(self) -> range:
        return range(0, self.student.q_len, self.block_size)

    def pair(self, start: int, view: AttentionInputs, student_probs: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Teacher block (no gradient), Student block from ``view`` (or its ``student_probs``) and their common valid mask."""
        stop = min(start + self.block_size, self.student.q_len)
        with torch.no_grad():
            t_view = block_view(self.teacher, start, stop)
            teacher_block = t_view.probs().to(self.dtype)
        student_block = (view.probs() if student_probs is None else student_probs).to(self.dtype)
        valid = _both(t_view.valid(), view.valid())
        return apply_mask(teacher_block, valid), apply_mask(student_block, valid), valid


class _BlockwiseSum(torch.autograd.Function):
    """``sum_b stats_fn(T_b, S_b, valid_b, *extras)``; gradients for the Student's query/key/bias and extras."""

    @staticmethod
    def forward(ctx, plan: BlockPlan, query: Tensor, key: Tensor, bias: Tensor | None, *extras: Tensor):
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.save_for_backward(query, key, *((bias,) if bias is not None else ()), *extras)
        student = replace(plan.student, query=query, key=key, bias=bias)
        totals: list[Tensor] | None = None
        for start in plan.blocks():
            view = block_view(student, start, min(start + plan.block_size, student.q_len))
            out = plan.stats_fn(*plan.pair(start, view), *extras)
            totals = list(out) if totals is None else [a + b for a, b in zip(totals, out)]
        assert totals is not None
        _check_finite_sums(totals, plan)
        return tuple(totals)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor | None):
        plan: BlockPlan = ctx.plan
        saved = list(ctx.saved_tensors)
        query, key = saved[0], saved[1]
        bias = saved[2] if ctx.has_bias else None
        extras = saved[3:] if ctx.has_bias else saved[2:]
        need_q, need_k, need_b = ctx.needs_input_grad[1:4]
        need_extras = ctx.needs_input_grad[4:]
        grad_query = torch.zeros_like(query) if need_q else None
        grad_key = key.new_zeros(key.shape) if need_k else None  # contiguous: accumulated in place by products
        grad_bias = torch.zeros_like(bias) if need_b and bias is not None else None
        grad_extras = [torch.zeros_like(e) if n else None for e, n in zip(extras, need_extras)]
        bias_by_rows = bias is not None and _rows(bias, 0, 1) is not bias
        for start in plan.blocks():
            stop = min(start + plan.block_size, query.shape[2])
            if plan.student_grad_fn is not None:
                grad_bias_rows = grad_bias[..., start:stop, :] if bias_by_rows and need_b else grad_bias
                _closed_form_grads(plan, start, stop, query, key, bias, grad_outputs,
                                   None if grad_query is None else grad_query[:, :, start:stop], grad_key, grad_bias_rows)
                continue
            with torch.enable_grad():
                q_rows = query[:, :, start:stop].detach().requires_grad_(need_q)
                key_leaf = key.detach().requires_grad_(need_k)
                bias_leaf = None if bias is None else _rows(bias, start, stop).detach().requires_grad_(need_b)
                extra_leaves = [e.detach().requires_grad_(n) for e, n in zip(extras, need_extras)]
                view = block_view(plan.student, start, stop, query=q_rows, key=key_leaf, bias=bias_leaf)
                used = _block_outputs(plan, start, view, extra_leaves, grad_outputs)
                leaves = [x for x, n in ((q_rows, need_q), (key_leaf, need_k), (bias_leaf, need_b)) if n]
                leaves += [x for x, n in zip(extra_leaves, need_extras) if n]
                if not used or not leaves:
                    continue
                grads = list(torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used], allow_unused=True))
            if need_q:
                _add(grad_query[:, :, start:stop], grads.pop(0))
            if need_k:
                _add(grad_key, grads.pop(0))
            if need_b:
                _add(grad_bias[..., start:stop, :] if bias_by_rows else grad_bias, grads.pop(0))
            for acc in grad_extras:
                if acc is not None:
                    _add(acc, grads.pop(0))
        return (None, grad_query, grad_key, grad_bias, *grad_extras)


@torch.no_grad()
def _closed_form_grads(plan: BlockPlan, start: int, stop: int, query: Tensor, key: Tensor, bias: Tensor | None,
                       grad_outputs: Sequence[Tensor], grad_query: Tensor | None, grad_key: Tensor | None,
                       grad_bias: Tensor | None) -> None:
    """Add one block's gradients to the accumulators, from ``dL/dS_b = student_grad_fn(...)``, without autograd.

    With ``P = softmax(Z)`` the block's Student probabilities (0 where not attendable) and
    ``Z = (Q s) K^T + bias``: ``dZ = P * (dP - rowsum(dP * P))``, ``dQ = s dZ K``,
    ``dK += dZ^T (Q s)``, ``dbias += dZ`` (summed over bias's broadcast dimensions): what
    autograd through :meth:`AttentionInputs.probs` computes, with ``dK`` accumulated inside the product.
    """
    q_rows = query[:, :, start:stop]
    view = block_view(plan.student, start, stop, query=q_rows, key=key, bias=_rows(bias, start, stop))
    probs = view.probs()
    teacher_block, student_block, valid = plan.pair(start, view, student_probs=probs)
    # autograd materialises missing output gradients as zeros, so every grad_output is a tensor
    # mixed precision (autocast): do the small products in the gradients' dtype
    dtype = grad_outputs[0].dtype
    d_student = plan.student_grad_fn(teacher_block.to(dtype), student_block.to(dtype), *grad_outputs)
    d_probs = apply_mask(d_student, valid).to(probs.dtype)
    d_logits = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)
    scaling = plan.student.scaling
    if grad_query is not None:
        grad_query.copy_(torch.matmul(d_logits, key).mul_(scaling))
    if grad_key is not None:
        batch_heads = grad_key.shape[0] * grad_key.shape[1]
        grad_key.view(batch_heads, *grad_key.shape[2:]).baddbmm_(
            d_logits.reshape(batch_heads, *d_logits.shape[2:]).mT,
            (q_rows * scaling).reshape(batch_heads, *q_rows.shape[2:]),
        )
    if grad_bias is not None:
        grad_bias.add_(d_logits.sum_to_size(grad_bias.shape))


def _block_outputs(plan: BlockPlan, start: int, view: AttentionInputs, extra_leaves: list[Tensor],
                   grad_outputs: Sequence[Tensor | None]) -> list[tuple[Tensor, Tensor]]:
    """A block's differentiable outputs, recomputed under autograd, with their incoming gradients."""
    teacher_block, student_block, valid = plan.pair(start, view)
    outs = plan.stats_fn(teacher_block, student_block, valid, *extra_leaves)
    return [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]


def _add(accumulator: Tensor, grad: Tensor | None) -> None:
    if grad is not None:
        accumulator.add_(grad)


def blockwise_sum(
    teacher: AttentionInputs,
    student: AttentionInputs,
    stats_fn: StatsFn,
    *extras: Tensor,
    block_size: int,
    dtype: torch.dtype,
    student_grad_fn: Callable[..., Tensor] | None = None,
    name: str = "streaming loss",
) -> tuple[Tensor, ...]:
    """``sum over query blocks of stats_fn(T_b, S_b, valid_b, *extras)``, differentiable, one block at a time.

    ``stats_fn`` receives the masked Teacher and Student probabilities of a block
    (``(B, H, rows, k)`` in ``dtype``), their common valid mask ``(B, 1, rows, k)``
    (or None) and ``extras``, and returns a tuple of tensors whose shapes do not
    depend on the rows. Gradients reach the Student's query, key, bias and the extras.
    ``student_grad_fn(T_b, S_b, *grad_outputs)``, if given, returns ``dL/dS_b``
    directly (only without extras). Non-finite sums are a ValueError naming ``name`` and the
    non-finite input (or the maps, when the inputs are finite). Masks that mask nothing are dropped.
    """
    if student_grad_fn is not None and extras:
        raise ValueError("blockwise_sum: student_grad_fn cannot give the gradients of extras")
    teacher, student = _drop_all_true_masks(teacher.detach()), _drop_all_true_masks(student)
    plan = BlockPlan(teacher, student, block_size, dtype, stats_fn, student_grad_fn, name)
    return _BlockwiseSum.apply(plan, student.query, student.key, student.bias, *extras)


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a & b


def common_valid(teacher: AttentionInputs, student: AttentionInputs, start: int, stop: int) -> Tensor | None:
    """Entries of query rows ``start:stop`` valid for both models, ``(B, 1, rows, k)``, or None if all are."""
    return _both(teacher.valid(start, stop), student.valid(start, stop))


def valid_counts(teacher: AttentionInputs, student: AttentionInputs, block_size: int, dtype: torch.dtype) -> Tensor:
    """Entries ``(q, k)`` valid for both models, per sample ``(B,)`` (``q * k`` when nothing is masked)."""
    batch = student.batch_size
    counts = torch.zeros(batch, dtype=dtype, device=student.query.device)
    for start in range(0, student.q_len, block_size):
        stop = min(start + block_size, student.q_len)
        valid = common_valid(teacher, student, start, stop)
        if valid is None:
            counts += (stop - start) * student.k_len
        else:
            counts += valid.reshape(batch, -1).sum(dim=1).to(dtype)
    return counts


@torch.no_grad()
def teacher_blocks(
    teacher: AttentionInputs, student: AttentionInputs, block_size: int, dtype: torch.dtype
) -> Iterator[Tensor]:
    """The Teacher's probabilities block by block, ``(B, H_t, rows, k)``, zeroed where either model is masked."""
    for start in range(0, teacher.q_len, block_size):
        stop = min(start + block_size, teacher.q_len)
        block = block_view(teacher, start, stop).probs().to(dtype)
        yield apply_mask(block, common_valid(teacher, student, start, stop))


# -- shared by the families' streaming forms -------------------------------------
def prepare_streaming(
    teacher: AttentionInputs, student: AttentionInputs, block_size: int | None, name: str
) -> tuple[int, torch.dtype, torch.dtype]:
    """Validate the pair; return (rows per block, working dtype, output dtype)."""
    for label, x in (("teacher", teacher), ("student", student)):
        if not isinstance(x, AttentionInputs):
            raise TypeError(f"{name}: {label} must be AttentionInputs, got {type(x).__name__}")
        if not x.query.is_floating_point() or not x.key.is_floating_point():
            raise TypeError(f"{name}: {label} query/key must be floating point; got {x.query.dtype}/{x.key.dtype}")
    check_map_shapes(teacher, student, name=name)
    out_dtype = torch.promote_types(teacher.query.dtype, student.query.dtype)
    work = torch.float32 if out_dtype in HALF_DTYPES else out_dtype
    return resolve_block_size(block_size, teacher, student), work, out_dtype


def reduce_streaming(per_sample: Tensor, heads: int, teacher: AttentionInputs, student: AttentionInputs,
            block: int, reduction: str, out_dtype: torch.dtype) -> Tensor:
    """The map losses' reduction of per-sample sums (``_common.reduce_per_sample``), counts from the inputs' masks."""
    n = student.q_len * student.k_len
    counts = per_sample.new_full((student.batch_size,), float(n))
    if reduction == "mean":
        counts = valid_counts(teacher, student, block, per_sample.dtype)
    return reduce_per_sample(per_sample, heads, n, counts, reduction).to(out_dtype)


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x > 0``, else 0, with finite gradients everywhere."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def outer(a: Tensor, b: Tensor) -> Tensor:
    return a[..., :, None] * b[..., None, :]


def flat(x: Tensor) -> Tensor:
    return x.flatten(2)


def masked_sum(elements: Tensor, valid: Tensor | None) -> Tensor:
    """Per-sample sum of ``(B, H, rows, k)`` element losses over valid entries."""
    if valid is not None:
        elements = torch.where(valid, elements, torch.zeros((), dtype=elements.dtype, device=elements.device))
    return elements.sum(dim=(1, 2, 3))


def row_kl(t: Tensor, s: Tensor, valid: Tensor | None) -> Tensor:
    """Per-sample sum of ``KL(t_row || s_row)`` terms (``eps = 1e-7``) of masked ``(B, H, rows, k)`` maps."""
    return masked_sum(kl_elements(rownorm1(t), rownorm1(s)), valid)
