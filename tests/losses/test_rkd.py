"""RKD-D against a per-pair loop of Park et al.'s distance-wise loss."""

from __future__ import annotations

import pytest
import torch
from rival_helpers import F64, random_maps, random_mask

from amad.losses import get, rkd_distance


def reference(teacher, student, mask=None):
    b = teacher.shape[0]
    if mask is not None:
        teacher, student = teacher * mask, student * mask

    def normalised_distances(maps):
        vectors = [maps[i].flatten() for i in range(b)]
        d = torch.zeros(b, b, dtype=F64)
        for i in range(b):
            for j in range(b):
                if i != j:
                    d[i, j] = torch.sqrt(((vectors[i] - vectors[j]) ** 2).sum())
        positive = [d[i, j] for i in range(b) for j in range(b) if i != j and d[i, j] > 0]
        return d / (sum(positive) / len(positive))

    dt, ds = normalised_distances(teacher), normalised_distances(student)
    total = torch.zeros((), dtype=F64)
    for i in range(b):
        for j in range(b):
            x = abs(float(ds[i, j] - dt[i, j]))
            total = total + (0.5 * x * x if x < 1 else x - 0.5)
    return total / (b * b)


@pytest.mark.parametrize("heads", [(4, 3), (2, 2), (2, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_loop_reference(heads, masked):
    h_t, h_s = heads
    teacher, student = random_maps(4, h_t, 3, 4, 0), random_maps(4, h_s, 3, 4, 1)
    mask = random_mask(4, 3, 4) if masked else None
    torch.testing.assert_close(rkd_distance(teacher, student, mask=mask), reference(teacher, student, mask))


def test_huber_linear_branch_is_exercised():
    # Student: five near-identical samples and one outlier, so the outlier's normalised distances are about
    # B / 2 = 3 while the Teacher's are about 1: those entries differ by more than beta = 1.
    teacher = random_maps(6, 2, 3, 4, 0)
    student = random_maps(1, 2, 3, 4, 1).repeat(6, 1, 1, 1) + 1e-3 * random_maps(6, 2, 3, 4, 2)
    student[0] = 0.0
    student[0, :, :, 0] = 1.0
    got = rkd_distance(teacher, student)
    torch.testing.assert_close(got, reference(teacher, student))
    assert float(got) > 0.5


def test_scale_invariance_and_zero_for_same_geometry():
    teacher = random_maps(3, 2, 3, 4, 0)
    # A Student whose per-sample vectors are a scaled copy of the Teacher's has the same normalised distances.
    assert rkd_distance(teacher, 0.5 * teacher) < 1e-12


def test_gradcheck_wrt_student():
    teacher = random_maps(3, 2, 2, 3, 0)
    student = random_maps(3, 3, 2, 3, 1).requires_grad_(True)
    mask = random_mask(3, 2, 3)
    assert torch.autograd.gradcheck(lambda s: rkd_distance(teacher, s, mask=mask), (student,))


def test_identical_samples_give_finite_gradient():
    teacher = random_maps(3, 2, 3, 4, 0)
    student = random_maps(3, 2, 3, 4, 1)
    student[2] = student[0]  # a zero off-diagonal distance
    student.requires_grad_(True)
    loss = rkd_distance(teacher, student)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss.detach(), reference(teacher, student.detach()))


def test_registered_module_and_errors():
    teacher, student = random_maps(2, 3, 3, 4, 0), random_maps(2, 2, 3, 4, 1)
    torch.testing.assert_close(get("rkd-d")(teacher, student), rkd_distance(teacher, student))
    with pytest.raises(ValueError, match=r"at least 2.*\(1, 3, 3, 4\)"):
        rkd_distance(teacher[:1], student[:1])
    with pytest.raises(ValueError, match=r"\(2, 3, 3, 4\).*\(3, 2, 3, 4\)"):
        rkd_distance(teacher, random_maps(3, 2, 3, 4, 1))
