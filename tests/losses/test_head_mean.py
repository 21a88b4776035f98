"""Head mean against a per-sample, per-row loop of the spec's equations."""

from __future__ import annotations

import pytest
import torch
from rival_helpers import F64, assert_matches_reference, kl_row, l1_normalised, padded_batch, random_maps, random_mask, reduce_reference

from amad.losses import get, head_mean

SHAPES = [(2, 4, 3, 3, 4), (2, 2, 2, 3, 3), (2, 2, 3, 4, 3)]


def reference(teacher, student, kind, mask, reduction):
    b, _, q, k = teacher.shape
    mask = torch.ones(b, 1, q, k, dtype=torch.bool) if mask is None else mask.expand(b, 1, q, k)
    per_sample, valid = [], []
    for i in range(b):
        m = mask[i, 0].to(F64)
        t = sum(teacher[i, h] for h in range(teacher.shape[1])) / teacher.shape[1] * m
        s = sum(student[i, h] for h in range(student.shape[1])) / student.shape[1] * m
        if kind == "mse":
            total = ((t - s) ** 2).sum()
        else:
            total = sum(kl_row(l1_normalised(t[r]), l1_normalised(s[r])) for r in range(q))
        per_sample.append(total)
        valid.append(int(mask[i].sum()))
    return reduce_reference(per_sample, valid, 1, q * k, reduction)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize("reduction", ["paper", "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_loop_reference(shape, kind, reduction, masked):
    assert_matches_reference(head_mean, reference, shape, kind, reduction, masked)


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_zero_when_head_means_agree(kind):
    student = random_maps(2, 2, 3, 4, 0)
    teacher = torch.cat([student, student], dim=1)[:, [0, 2, 1, 3]]  # 4 heads, same mean
    assert head_mean(teacher, student, kind=kind).abs() < 1e-12


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_gradcheck_wrt_student(kind):
    teacher = random_maps(2, 3, 2, 3, 0)
    student = random_maps(2, 2, 2, 3, 1).requires_grad_(True)
    mask = random_mask(2, 2, 3)
    assert torch.autograd.gradcheck(lambda s: head_mean(teacher, s, kind=kind, mask=mask), (student,))


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_mean_reduction_is_padding_invariant(kind):
    teacher, mask, teacher_samples = padded_batch([2, 4], heads=3, seed=0)
    student, _, student_samples = padded_batch([2, 4], heads=2, seed=1)
    batch = head_mean(teacher, student, kind=kind, mask=mask)
    alone = [head_mean(t, s, kind=kind) for t, s in zip(teacher_samples, student_samples)]
    torch.testing.assert_close(batch, sum(alone) / 2, rtol=1e-10, atol=1e-12)


def test_registered_module_and_errors():
    teacher, student, mask = random_maps(2, 4, 3, 4, 0), random_maps(2, 3, 3, 4, 1), random_mask(2, 3, 4)
    torch.testing.assert_close(
        get("head-mean", kind="kl")(teacher, student, mask), head_mean(teacher, student, kind="kl", mask=mask)
    )
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 4\).*\(2, 3, 4, 4\)"):
        head_mean(teacher, random_maps(2, 3, 4, 4, 1))
    with pytest.raises(ValueError, match="kind"):
        head_mean(teacher, student, kind="js")
    with pytest.raises(ValueError, match="reduction"):
        get("head-mean", reduction="total")
    with pytest.raises(TypeError, match="boolean"):
        head_mean(teacher, student, mask=torch.ones(2, 1, 3, 4))
