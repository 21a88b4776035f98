"""Which Teacher heads a Student keeps (selection) or merges (re-split), per layer: the head rules of
:func:`amad.student_init.student_from_teacher`.

Head rules (which Teacher heads are kept, or grouped, per layer):

* ``"first"``: the first heads: the first ``KV_s`` kv groups and the first
  ``g_s`` query heads of each (selection); consecutive groups (re-split; with
  ``H_s = H_t`` the Student is the Teacher).
* ``"amad"`` (needs ``calibration_batch``): the Teacher runs on the batch and,
  per kept layer, the similarity of heads i and j is the cosine of their
  attention maps (AMAD's similarity ``W``, Teacher against itself, maps of the
  whole batch flattened over its valid entries; :func:`self_similarity`).
  Selection keeps the heads that best *cover* the Teacher, i.e. maximise
  ``coverage = sum_i max_{j kept} W_ij`` (each Teacher head counts by its most
  similar kept head; a monotone submodular objective), greedily by kv group:
  ``KV_s`` times, add the kv group that most increases the coverage, together
  with its ``g_s`` best query heads (themselves added greedily). With one query
  head per kv head this is plain greedy facility location, within ``1 - 1/e``
  of the best subset. Re-split picks ``H_s`` group centres the same way, then
  fills each group with ``r - 1`` heads, most similar (head, centre) pairs first.
* ``"magnitude"`` (selection only, data-free): the heads with the largest
  ``||W_O^h W_V^{kv(h)}||_F`` (the norm of the head's value-output map), under
  the kv-group constraint.

Kept heads stay in the Teacher's order. Ties go to the lowest head index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .attention import AttentionInputs

__all__ = ["HEAD_RULES", "HeadPlan", "self_similarity", "coverage", "select_heads", "group_heads"]

HEAD_RULES = ("first", "amad", "magnitude")
_TIE = 1e-12


@dataclass(frozen=True)
class HeadPlan:
    """Which Teacher heads one Student layer's attention is built from.

    query_heads: Teacher query heads in Student order (selection: ``H_s`` of
    them; re-split: all ``H_t``, consecutive runs of ``r`` forming one Student
    head). kv_heads: Teacher key/value heads in Student order. query_scale:
    factor on the query rows (``r ** -0.5`` when re-splitting, else 1).
    """

    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    query_scale: float = 1.0


@torch.no_grad()
def self_similarity(inputs: AttentionInputs, *, block_size: int = 64) -> Tensor:
    """``W_ij = <A_i, A_j> / (|A_i| |A_j|)`` ``(H, H)`` float64, each head's maps flattened over the whole batch.

    Entries a loss ignores (padding, causality: ``inputs.valid()``) are zero.
    The Gram matrix is accumulated over blocks of query rows, never a whole map.
    A head whose maps are all zero has similarity 0 with every head.
    """
    heads = inputs.num_heads
    gram = torch.zeros(heads, heads, dtype=torch.float64, device=inputs.query.device)
    for start in range(0, inputs.q_len, block_size):
        stop = min(start + block_size, inputs.q_len)
        probs = inputs.probs(start, stop).double()
        valid = inputs.valid(start, stop)
        if valid is not None:
            probs = probs * valid
        flat = probs.transpose(0, 1).reshape(heads, -1)
        gram += flat @ flat.T
    norms = gram.diagonal().sqrt()
    outer = norms[:, None] * norms[None, :]
    return torch.where(outer > 0, gram / torch.where(outer > 0, outer, torch.ones_like(outer)), torch.zeros_like(gram))


def _best_addition(objective: Callable[[list[int]], float], chosen: list[int], candidates: Sequence[int]) -> int:
    """The candidate whose addition to ``chosen`` gives the largest ``objective`` (lowest index on ties)."""
    best, best_value = -1, -float("inf")
    for head in candidates:
        value = objective(chosen + [head])
        if value > best_value + _TIE:
            best, best_value = head, value
    return best


def _greedy(
    objective: Callable[[list[int]], float], group_of: Sequence[int], num_groups: int, per_group: int
) -> list[int]:
    """Greedy over groups: add the group (with ``per_group`` of its heads, themselves chosen greedily)
    that most increases ``objective``, ``num_groups`` times; returns the kept heads, sorted."""
    chosen: list[int] = []
    for _ in range(num_groups):
        best, best_value = [], -float("inf")
        for group in dict.fromkeys(g for g in group_of if g not in {group_of[c] for c in chosen}):
            members, picked = [h for h, g in enumerate(group_of) if g == group], []
            for _ in range(per_group):
                picked.append(_best_addition(objective, chosen + picked, [h for h in members if h not in picked]))
            value = objective(chosen + picked)
            if value > best_value + _TIE:
                best, best_value = picked, value
        chosen += best
    return sorted(chosen)


def coverage(similarity: Tensor, kept: Sequence[int]) -> float:
    """``sum_i max_{j in kept} W_ij``: how well the kept heads represent every head."""
    return float(similarity[:, list(kept)].amax(dim=1).sum())


def select_heads(
    num_heads: int,
    num_kv_heads: int,
    *,
    teacher_heads: int,
    teacher_kv_heads: int,
    rule: str = "first",
    similarity: Tensor | None = None,
    scores: Tensor | None = None,
) -> HeadPlan:
    """Selection plan: ``num_heads`` query heads in ``num_kv_heads`` whole kv groups of the Teacher.

    ``rule="first"``; ``"amad"`` maximises :func:`coverage` of ``similarity``
    ``(H_t, H_t)``; ``"magnitude"`` maximises the sum of ``scores`` ``(H_t,)``.
    """
    t_group, s_group = teacher_heads // teacher_kv_heads, num_heads // num_kv_heads
    group_of = [h // t_group for h in range(teacher_heads)]
    if rule == "first":
        kept = [g * t_group + i for g in range(num_kv_heads) for i in range(s_group)]
    elif rule == "amad":
        if similarity is None or tuple(similarity.shape) != (teacher_heads, teacher_heads):
            raise ValueError(f"head rule 'amad' needs a ({teacher_heads}, {teacher_heads}) head similarity")
        kept = _greedy(lambda s: coverage(similarity, s), group_of, num_kv_heads, s_group)
    elif rule == "magnitude":
        if scores is None or tuple(scores.shape) != (teacher_heads,):
            raise ValueError(f"head rule 'magnitude' needs ({teacher_heads},) head scores")
        kept = _greedy(lambda s: float(scores[s].sum()), group_of, num_kv_heads, s_group)
    else:
        raise ValueError(f"unknown head rule {rule!r}; choose one of {HEAD_RULES}")
    kv = sorted({group_of[h] for h in kept})
    return HeadPlan(tuple(kept), tuple(kv))


def group_heads(
    num_heads: int, *, teacher_heads: int, rule: str = "first", similarity: Tensor | None = None
) -> HeadPlan:
    """Re-split plan: the Teacher's heads in ``num_heads`` groups of ``r = H_t / H_s`` (rule "first" or "amad")."""
    size = teacher_heads // num_heads
    if rule == "first":
        groups = [list(range(j * size, (j + 1) * size)) for j in range(num_heads)]
    elif rule == "amad":
        if similarity is None or tuple(similarity.shape) != (teacher_heads, teacher_heads):
            raise ValueError(f"head rule 'amad' needs a ({teacher_heads}, {teacher_heads}) head similarity")
        centres = _greedy(lambda s: coverage(similarity, s), list(range(teacher_heads)), num_heads, 1)
        groups = [[c] for c in centres]
        rest = [h for h in range(teacher_heads) if h not in centres]
        # most similar (head, centre) pairs first; a head joins the first centre with room
        pairs = sorted(((-float(similarity[h, c]), h, j) for h in rest for j, c in enumerate(centres)))
        placed: set[int] = set()
        for _, head, j in pairs:
            if head not in placed and len(groups[j]) < size:
                groups[j].append(head)
                placed.add(head)
        groups = sorted(sorted(g) for g in groups)
    else:
        raise ValueError(f"head rule {rule!r} cannot re-split heads; choose 'first' or 'amad'")
    order = tuple(h for g in groups for h in g)
    return HeadPlan(order, order, size**-0.5)
