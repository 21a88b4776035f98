"""One-to-one (KD-ATT) against a per-sample, per-head, per-row loop of the spec's equations."""

from __future__ import annotations

import pytest
import torch
from rival_helpers import (
    F64,
    assert_matches_reference,
    kl_row,
    l1_normalised,
    l2_normalised,
    padded_batch,
    random_maps,
    random_mask,
    reduce_reference,
)

from amad.losses import get, one_to_one

# (B, H_t, H_s, q, k): H_s < H_t, H_s == H_t, H_s > H_t
SHAPES = [(2, 4, 3, 3, 4), (2, 2, 2, 3, 3), (2, 2, 3, 4, 3)]


def reference(teacher, student, kind, mask, reduction):
    b, _, q, k = teacher.shape
    heads = min(teacher.shape[1], student.shape[1])
    mask = torch.ones(b, 1, q, k, dtype=torch.bool) if mask is None else mask.expand(b, 1, q, k)
    per_sample, valid = [], []
    for i in range(b):
        m = mask[i, 0].to(F64)
        total = torch.zeros((), dtype=F64)
        for j in range(heads):
            t, s = teacher[i, j] * m, student[i, j] * m
            if kind == "mse":
                total = total + ((l2_normalised(t.flatten()) - l2_normalised(s.flatten())) ** 2).sum()
            else:
                for r in range(q):
                    total = total + kl_row(l1_normalised(t[r]), l1_normalised(s[r]))
        per_sample.append(total)
        valid.append(int(mask[i].sum()))
    return reduce_reference(per_sample, valid, heads, q * k, reduction)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize("reduction", ["paper", "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_loop_reference(shape, kind, reduction, masked):
    assert_matches_reference(one_to_one, reference, shape, kind, reduction, masked)


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_identical_heads_give_zero_and_extra_teacher_heads_are_ignored(kind):
    student = random_maps(2, 3, 3, 4, 0)
    teacher = torch.cat([student, random_maps(2, 2, 3, 4, 5)], dim=1)  # 5 Teacher heads, first 3 = Student's
    assert one_to_one(teacher, student, kind=kind).abs() < 1e-12


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_extra_student_heads_get_no_gradient(kind):
    teacher = random_maps(2, 2, 3, 4, 0)
    student = random_maps(2, 4, 3, 4, 1).requires_grad_(True)
    one_to_one(teacher, student, kind=kind).backward()
    assert student.grad[:, :2].abs().sum() > 0
    assert torch.equal(student.grad[:, 2:], torch.zeros_like(student.grad[:, 2:]))


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_gradcheck_wrt_student(kind):
    teacher = random_maps(2, 3, 2, 3, 0)
    student = random_maps(2, 2, 2, 3, 1).requires_grad_(True)
    mask = random_mask(2, 2, 3)
    assert torch.autograd.gradcheck(
        lambda s: one_to_one(teacher, s, kind=kind, mask=mask, reduction="mean"), (student,)
    )


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_mean_reduction_is_padding_invariant(kind):
    teacher, mask, teacher_samples = padded_batch([3, 5], heads=3, seed=0)
    student, _, student_samples = padded_batch([3, 5], heads=2, seed=1)
    batch = one_to_one(teacher, student, kind=kind, mask=mask, reduction="mean")
    alone = [one_to_one(t, s, kind=kind, reduction="mean") for t, s in zip(teacher_samples, student_samples)]
    torch.testing.assert_close(batch, sum(alone) / 2, rtol=1e-10, atol=1e-12)


def test_registered_module_matches_function():
    teacher, student, mask = random_maps(2, 4, 3, 4, 0), random_maps(2, 3, 3, 4, 1), random_mask(2, 3, 4)
    loss = get("one-to-one", kind="kl", reduction="mean")
    torch.testing.assert_close(
        loss(teacher, student, mask), one_to_one(teacher, student, kind="kl", mask=mask, reduction="mean")
    )
    assert loss.needs == "maps"
    with pytest.raises(ValueError, match="kind"):
        get("one-to-one", kind="cosine")


def test_bad_inputs_raise_clear_errors():
    teacher, student = random_maps(2, 4, 3, 4, 0), random_maps(2, 3, 3, 5, 1)
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 4\).*\(2, 3, 3, 5\)"):
        one_to_one(teacher, student)
    student = random_maps(2, 3, 3, 4, 1)
    with pytest.raises(ValueError, match="kind"):
        one_to_one(teacher, student, kind="l1")
    with pytest.raises(ValueError, match="reduction"):
        one_to_one(teacher, student, reduction="sum")
    with pytest.raises(ValueError, match="NaN"):
        one_to_one(teacher, student * float("nan"))
    with pytest.raises(ValueError, match="broadcastable"):
        one_to_one(teacher, student, mask=torch.ones(2, 1, 3, 5, dtype=torch.bool))
