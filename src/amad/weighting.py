"""The weight alpha_l of each attention term in the Distiller's objective, and a check of the balance.

The objective is ``L = R + sum_l alpha_l * L_l`` with ``R = kd_weight * L_KD + gt_weight * L_GT`` (the
output-level terms) and ``L_l`` the attention loss of layer pair l. Rules for alpha_l:

* ``"auto"``, gradient-norm balance: over measuring batches b = 1..N,

      alpha_l = r * sum_b ||dR_b / d theta_l|| / sum_b ||dL_l,b / d theta_l||

  where theta_l are the trainable Student parameters that both R and L_l reach (what the two terms compete
  for: the classifier or LM head, which only R reaches, is left out) and r the target ratio (1: the weighted
  attention term pulls on the Student as hard as R, on average). The gradient norm of ``alpha * c * L + k`` is
  that of ``alpha * c * L``, so a constant factor c of a loss (per-element vs per-head means, a sum instead of
  a mean) is cancelled exactly, and an additive constant k (the Teacher's entropy inside a cross-entropy KD)
  does not count at all. The ratio of sums is the ratio of the mean norms: a batch where one term's gradient
  happens to be tiny cannot blow it up, and sums reduce exactly over processes and accumulation micro-batches.
* ``"loss-ratio"`` (the former rule): ``alpha_l = r * sum_b R_b / sum_b L_l,b``. It does depend on additive
  constants, and loss values of long sequences are systematically smaller.
* ``"paper"``: the paper's hand-set weights, 0.2 for MSE-type AMAD variants and 100 for KL-type ones, tuned
  for ``reduction="paper"``.

Under ``torch.distributed`` the gradients are averaged over processes before their norm is taken: the norm of
the gradient that DDP applies, so N processes measure what one process does on their concatenated batches.

:func:`imbalance_message` turns the measured norms and the alphas into a warning when one weighted term's
gradient norm exceeds another's by more than :data:`DOMINANCE_LIMIT`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "ALPHA_RULES", "DOMINANCE_LIMIT", "PAPER_ALPHA", "VANISHING_GRADIENT", "AlphaImbalanceWarning", "balanced_alpha", "gradient_ratios",
    "imbalance_message", "measure_batch", "paper_alpha",
]

#: Measured rules (a number, a list of numbers or "paper" are fixed weights).
ALPHA_RULES = ("auto", "loss-ratio")
#: The paper's hand-set alpha of each AMAD variant, for ``reduction="paper"``.
PAPER_ALPHA = {"amad-mse": 0.2, "amad-s2t": 0.2, "amad-kl": 100.0, "amad-token": 100.0, "amad-projected": 100.0}
#: A weighted term whose Student-gradient norm is this many times another's is reported.
DOMINANCE_LIMIT = 100.0
#: A term whose Student-gradient norm is below this fraction of the output terms' (float32's relative precision,
#: 2**-23: below the rounding noise of R's own gradient) cannot be balanced by its gradient.
VANISHING_GRADIENT = 2.0**-23
#: Rows of the (4, n) measurement: gradient norms of R and L_l over theta_l, loss values of R and L_l.
REF_GRAD, TERM_GRAD, REF_VALUE, TERM_VALUE = range(4)


class AlphaImbalanceWarning(UserWarning):
    """One weighted term of the distillation objective dominates the Student's gradient."""


def paper_alpha(loss_name: str | None, options: dict) -> float:
    """The paper's alpha for an AMAD variant; warns when the loss does not use the paper's reduction."""
    if loss_name not in PAPER_ALPHA:
        known = ", ".join(f"{k}: {v:g}" for k, v in PAPER_ALPHA.items())
        raise ValueError(
            f"alpha='paper' is defined only for the paper's AMAD variants ({known}); attention_loss={loss_name!r} "
            "has no paper weight: use alpha='auto' or a number"
        )
    reduction = options.get("reduction", "paper")
    if reduction != "paper":
        warnings.warn(
            f"alpha='paper' ({PAPER_ALPHA[loss_name]:g} for {loss_name}) was tuned for reduction='paper'; this loss "
            f"uses reduction={reduction!r}, whose values differ in scale: consider alpha='auto'",
            AlphaImbalanceWarning,
            stacklevel=3,
        )
    return PAPER_ALPHA[loss_name]


def _process_mean(flat: Tensor) -> Tensor:
    """Mean over the processes of ``torch.distributed`` (the tensor itself when there is none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            torch.distributed.all_reduce(flat)
            flat = flat / world
    return flat


def _squared_norms(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    """``||d loss / d p||^2`` of each parameter, float64 on the CPU (None where ``loss`` does not reach ``p``).

    The graph is kept for the training step's own backward; ``.grad`` is not touched.
    """
    if not loss.requires_grad:
        return [None] * len(params)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    norms: list[Tensor | None] = [None] * len(params)
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        if g is not None:
            by_device.setdefault(g.device, []).append(i)
    for indices in by_device.values():  # one all-reduce and one copy to the CPU per device
        flat = _process_mean(torch.cat([grads[i].detach().reshape(-1).to(torch.float64) for i in indices]))
        pieces = flat.split([grads[i].numel() for i in indices])
        for i, value in zip(indices, torch.stack([piece.square().sum() for piece in pieces]).cpu()):
            norms[i] = value
    return norms


def measure_batch(reference: Tensor, terms: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """One batch's measurement, ``(4, n)`` float64 (rows: see :data:`REF_GRAD` ...).

    Column l: ``||dR/d theta_l||``, ``||dL_l/d theta_l||`` with theta_l the parameters both reach, then the
    values of R and L_l (averaged over processes). A term that shares no parameter with R is an error.
    """
    reference_norms = _squared_norms(reference, params)
    columns = []
    for l, term in enumerate(terms):
        term_norms = _squared_norms(term, params)
        shared = [i for i, (r, t) in enumerate(zip(reference_norms, term_norms)) if r is not None and t is not None]
        if not shared and term.requires_grad:
            raise ValueError(
                f"attention term {l} and the output-level terms (KD / ground truth) reach no common Student "
                "parameter, so their gradients cannot be balanced: give alpha as numbers"
            )
        ref_sq = sum((reference_norms[i] for i in shared), torch.zeros((), dtype=torch.float64))
        term_sq = sum((term_norms[i] for i in shared), torch.zeros((), dtype=torch.float64))
        columns.append(torch.stack([ref_sq.sqrt(), term_sq.sqrt()]).cpu())
    device = reference.device
    values = torch.stack([reference.detach().double()] + [t.detach().double().to(device) for t in terms])
    values = _process_mean(values).cpu()
    grads = torch.stack(columns, dim=1) if columns else torch.zeros(2, 0, dtype=torch.float64)
    return torch.cat([grads, values[:1].expand(1, len(terms)), values[None, 1:]])


def balanced_alpha(sums: Tensor, rule: str, ratio: float = 1.0) -> tuple[Tensor, list[int], list[int]]:
    """alpha of each pair from the summed measurements ``(4, n)`` by ``rule``; the pairs left at 1; the pairs
    whose gradient vanished.

    ``"auto"``: ``r * sum ||dR|| / sum ||dL_l||``; ``"loss-ratio"``: ``r * sum R / sum L_l``. A pair whose
    numerator or denominator is 0 (a term with no gradient, e.g. a Student already equal to the Teacher)
    cannot be balanced: its alpha is 1 and its index is in the second list. With ``"auto"``, a pair whose
    gradient norm is below :data:`VANISHING_GRADIENT` times R's (the Student sits where the term's gradient
    vanishes, e.g. uniform maps from BLIP's vision initialisation of std 1e-10) would get an alpha that explodes
    as soon as training leaves that point: it takes the loss-ratio alpha instead (1 if that is undefined too)
    and its index is in the third list.
    """
    if rule not in ALPHA_RULES:
        raise ValueError(f"alpha rule must be one of {ALPHA_RULES}; got {rule!r}")
    num, den = (sums[REF_GRAD], sums[TERM_GRAD]) if rule == "auto" else (sums[REF_VALUE], sums[TERM_VALUE])
    valid = (num > 0) & (den > 0) & torch.isfinite(num) & torch.isfinite(den)
    alpha = torch.where(valid, ratio * num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(den))
    vanishing = torch.zeros_like(valid)
    if rule == "auto":
        vanishing = valid & (den < VANISHING_GRADIENT * num)
        alpha = torch.where(vanishing, balanced_alpha(sums, "loss-ratio", ratio)[0], alpha)
    return alpha, [i for i, ok in enumerate(valid.tolist()) if not ok], torch.nonzero(vanishing).flatten().tolist()


def gradient_ratios(alpha: Tensor, sums: Tensor) -> Tensor:
    """``rho_l = alpha_l * sum ||dL_l|| / sum ||dR||``: each weighted term's pull relative to R (NaN if R's is 0)."""
    ref = sums[REF_GRAD]
    rho = alpha.to(sums.dtype) * sums[TERM_GRAD] / ref.clamp_min(torch.finfo(ref.dtype).tiny)
    return torch.where(ref > 0, rho, torch.full_like(rho, float("nan")))


def imbalance_message(
    names: Sequence[str], ratios: Tensor, *, batches: int, reference: str = "kd", limit: float = DOMINANCE_LIMIT
) -> str | None:
    """A warning text when the largest and the smallest weighted gradient norm differ by more than ``limit``.

    ``ratios`` are :func:`gradient_ratios` (the reference term itself counts as 1); None when balanced.
    """
    pulls = {reference: 1.0} | {n: float(r) for n, r in zip(names, ratios.tolist()) if r == r}
    strong, weak = max(pulls, key=pulls.__getitem__), min(pulls, key=pulls.__getitem__)
    if pulls[weak] > 0 and pulls[strong] / pulls[weak] <= limit:
        return None
    if pulls[weak] == 0:
        head = f"the weighted term {weak} has no Student gradient at all, {strong} has"
    else:
        head = f"the weighted term {strong} has {pulls[strong] / pulls[weak]:.3g}x the Student-gradient norm of {weak}"
    listing = ", ".join(f"{n}: {v:.3g}" for n, v in pulls.items())
    return (
        f"loss weights out of balance: {head} (limit {limit:g}x) over the first {batches} measured batch(es), so "
        f"{weak} barely takes part in training. Gradient norm of each weighted term relative to {reference}: "
        f"{listing}. Use alpha='auto' (balances each term to alpha_ratio) or rescale alpha."
    )
