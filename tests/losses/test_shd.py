"""SHD: merge plan, closed-form merge weight vs brute-force least squares, and the loss vs a per-sample loop."""

from __future__ import annotations

import pytest
import torch
from rival_helpers import F64, kl_row, l1_normalised, padded_batch, random_maps, random_mask, reduce_reference

from amad.attention import AttentionInputs
from amad.losses import get, pair_merge_alpha, shd, squeeze_heads, squeeze_plan
from amad.losses.shd import soften


def random_values(b: int, h: int, k: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(b, h, k, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- independent reference, one sample at a time ----
def reference_alpha(map_p, map_q, values_p, values_q):
    d = map_p - map_q
    dx, dy = (d @ values_p).flatten(), (d @ (values_p + values_q)).flatten()
    denominator = torch.dot(dy, dy)
    if denominator == 0:
        return 0.5
    return min(1.0, max(0.0, float(torch.dot(dx, dy) / denominator)))


def reference_squeeze(maps, values, num_heads):
    """maps (H, q, k), values (H, k, d) of one sample -> list of merged maps."""
    heads = [(maps[h], values[h]) for h in range(maps.shape[0])]
    while len(heads) > num_heads:
        pairs = min(len(heads) // 2, len(heads) - num_heads)
        merged = []
        for i in range(pairs):
            (a_p, x_p), (a_q, x_q) = heads[2 * i], heads[2 * i + 1]
            alpha = reference_alpha(a_p, a_q, x_p, x_q)
            merged.append((alpha * a_p + (1 - alpha) * a_q, x_p + x_q))
        heads = merged + heads[2 * pairs :]
    return [a for a, _ in heads]


def reference_soften(row, tau):
    powered = torch.where(row > 0, row.clamp(min=1e-300) ** (1.0 / tau), torch.zeros_like(row))
    return l1_normalised(powered)


def reference(teacher, student, values, tau, mask, reduction):
    b, _, q, k = teacher.shape
    heads = min(teacher.shape[1], student.shape[1])
    mask = torch.ones(b, 1, q, k, dtype=torch.bool) if mask is None else mask.expand(b, 1, q, k)
    per_sample, valid = [], []
    for i in range(b):
        m = mask[i, 0].to(F64)
        merged = reference_squeeze(teacher[i] * m, values[i], student.shape[1])
        total = torch.zeros((), dtype=F64)
        for j in range(heads):
            for r in range(q):
                total = total + kl_row(reference_soften(merged[j][r], tau), l1_normalised(student[i, j, r] * m[r]))
        per_sample.append(total)
        valid.append(int(mask[i].sum()))
    return reduce_reference(per_sample, valid, heads, q * k, reduction)


# ---- merge plan ----
def test_plan_12_to_8_is_one_round_of_four_pairs():
    assert squeeze_plan(12, 8) == [[(0, 1), (2, 3), (4, 5), (6, 7), (8,), (9,), (10,), (11,)]]


def test_plan_12_to_5_16_to_12_6_to_4_3_to_2():
    assert squeeze_plan(12, 5) == [
        [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)],
        [(0, 1), (2,), (3,), (4,), (5,)],
    ]
    assert squeeze_plan(16, 12) == [[(0, 1), (2, 3), (4, 5), (6, 7)] + [(h,) for h in range(8, 16)]]
    assert squeeze_plan(6, 4) == [[(0, 1), (2, 3), (4,), (5,)]]
    assert squeeze_plan(3, 2) == [[(0, 1), (2,)]]
    assert [len(r) for r in squeeze_plan(12, 1)] == [6, 3, 2, 1]
    assert squeeze_plan(4, 4) == [] and squeeze_plan(2, 3) == []


@pytest.mark.parametrize("h_t", range(1, 17))
def test_plan_reaches_every_student_head_count(h_t):
    for h_s in range(1, h_t + 1):
        heads = h_t
        for groups in squeeze_plan(h_t, h_s):
            pairs = sum(len(g) == 2 for g in groups)
            assert pairs == min(heads // 2, heads - h_s)
            assert [i for g in groups for i in g] == list(range(heads))
            heads = len(groups)
        assert heads == h_s


# ---- merge weight ----
@pytest.mark.parametrize("seed", range(4))
def test_alpha_equals_brute_force_least_squares(seed):
    a_p, a_q = random_maps(2, 1, 3, 5, seed)[:, 0], random_maps(2, 1, 3, 5, seed + 10)[:, 0]
    x_p, x_q = random_values(2, 1, 5, 2, seed)[:, 0], random_values(2, 1, 5, 2, seed + 10)[:, 0]
    x_q[1] = -2.5 * x_p[1]  # unconstrained optimum 1 / (1 - 2.5) < 0: clipped to 0
    alpha = pair_merge_alpha(a_p, a_q, x_p, x_q)
    grid = torch.linspace(0, 1, 20001, dtype=F64)
    for i in range(2):
        target = a_p[i] @ x_p[i] + a_q[i] @ x_q[i]
        y = x_p[i] + x_q[i]

        def residual(a):  # a: (G,) -> ||(a A_p + (1 - a) A_q) Y - target||^2 for each a
            merged = a[:, None, None] * a_p[i] + (1 - a[:, None, None]) * a_q[i]
            return ((merged @ y - target) ** 2).sum(dim=(1, 2))

        errors = residual(grid)
        assert abs(float(alpha[i]) - float(grid[errors.argmin()])) <= 1e-4
        assert residual(alpha[i : i + 1]) <= errors.min() + 1e-12
        assert abs(float(alpha[i]) - reference_alpha(a_p[i], a_q[i], x_p[i], x_q[i])) < 1e-12
    assert float(alpha[1]) == 0.0


@pytest.mark.parametrize(("scale", "expected"), [(1.0, 0.5), (3.0, 0.25), (-0.5, 1.0), (-3.0, 0.0), (-1.0, 0.5)])
def test_alpha_closed_form_cases(scale, expected):
    # X_q = c X_p gives Y = (1 + c) X_p and alpha = 1 / (1 + c), clipped; c = -1 gives D Y = 0, hence 0.5.
    a_p, a_q = random_maps(1, 2, 3, 4, 0)[:, 0], random_maps(1, 2, 3, 4, 0)[:, 1]
    x_p = random_values(1, 1, 4, 3, 0)[:, 0]
    alpha = pair_merge_alpha(a_p, a_q, x_p, scale * x_p)
    torch.testing.assert_close(alpha, torch.tensor([expected], dtype=F64))


def test_alpha_is_half_when_maps_are_equal_and_has_no_gradient():
    a = random_maps(2, 1, 3, 4, 0)[:, 0].requires_grad_(True)
    alpha = pair_merge_alpha(
        a, a.detach().clone(), random_values(2, 1, 4, 3, 0)[:, 0], random_values(2, 1, 4, 3, 1)[:, 0]
    )
    assert torch.equal(alpha, torch.full((2,), 0.5, dtype=F64))
    assert not alpha.requires_grad


# ---- squeezed maps ----
@pytest.mark.parametrize(("h_t", "h_s"), [(12, 8), (12, 5), (16, 12), (6, 4), (3, 2), (5, 1)])
def test_squeezed_maps_are_row_stochastic_and_match_reference(h_t, h_s):
    maps, values = random_maps(2, h_t, 3, 4, 0), random_values(2, h_t, 4, 2, 1)
    merged = squeeze_heads(maps, values, h_s)
    assert merged.shape == (2, h_s, 3, 4)
    torch.testing.assert_close(merged.sum(-1), torch.ones(2, h_s, 3, dtype=F64))
    assert (merged >= 0).all()
    for i in range(2):
        torch.testing.assert_close(merged[i], torch.stack(reference_squeeze(maps[i], values[i], h_s)))


def test_squeeze_heads_rejects_bad_inputs():
    maps = random_maps(2, 4, 3, 4, 0)
    with pytest.raises(ValueError, match=r"1\.\.4, got 5"):
        squeeze_heads(maps, random_values(2, 4, 4, 2, 0), 5)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 2\).*\(2, 4, 3, 4\)"):
        squeeze_heads(maps, random_values(2, 3, 4, 2, 0), 2)


def test_soften_keeps_zeros_and_never_gives_nan():
    maps = random_maps(1, 1, 3, 4, 0)
    maps[0, 0, 0, 1] = 0.0
    maps[0, 0, 2] = 0.0  # an all-zero (padded) row
    for tau in (1.0, 0.5, 0.05, 4.0):
        soft = soften(maps, tau)
        assert torch.isfinite(soft).all() and soft[0, 0, 0, 1] == 0 and (soft[0, 0, 2] == 0).all()
        torch.testing.assert_close(soft[0, 0, :2].sum(-1), torch.ones(2, dtype=F64))
        for r in range(2):
            torch.testing.assert_close(soft[0, 0, r], reference_soften(maps[0, 0, r], tau))
    assert soften(maps, 0.5)[0, 0, 0].max() > maps[0, 0, 0].max()  # tau < 1 sharpens
    maps.requires_grad_(True)
    (soften(maps, 0.5) * torch.arange(4.0, dtype=F64)).sum().backward()
    assert torch.isfinite(maps.grad).all()


# ---- the loss ----
@pytest.mark.parametrize(("h_t", "h_s"), [(5, 2), (3, 2), (4, 3), (2, 2), (2, 3)])
@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "paper"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_loop_reference(h_t, h_s, tau, reduction, masked):
    teacher, student, values = (
        random_maps(2, h_t, 3, 4, 0),
        random_maps(2, h_s, 3, 4, 1),
        random_values(2, h_t, 4, 2, 2),
    )
    mask = random_mask(2, 3, 4) if masked else None
    got = shd(teacher, student, values, temperature=tau, mask=mask, reduction=reduction)
    torch.testing.assert_close(got, reference(teacher, student, values, tau, mask, reduction), rtol=1e-10, atol=1e-12)


def test_extra_student_heads_get_no_gradient_when_student_is_larger():
    teacher, values = random_maps(2, 2, 3, 4, 0), random_values(2, 2, 4, 2, 2)
    student = random_maps(2, 3, 3, 4, 1).requires_grad_(True)
    shd(teacher, student, values).backward()
    assert student.grad[:, :2].abs().sum() > 0 and (student.grad[:, 2] == 0).all()


def test_gradcheck_wrt_student():
    teacher, values = random_maps(2, 5, 2, 3, 0), random_values(2, 5, 3, 2, 2)
    student = random_maps(2, 2, 2, 3, 1).requires_grad_(True)
    mask = random_mask(2, 2, 3)
    assert torch.autograd.gradcheck(lambda s: shd(teacher, s, values, temperature=0.7, mask=mask), (student,))


def test_mean_reduction_is_padding_invariant():
    teacher, mask, teacher_samples = padded_batch([3, 5], heads=5, seed=0)
    student, _, student_samples = padded_batch([3, 5], heads=2, seed=1)
    values = random_values(2, 5, 5, 3, 2)
    batch = shd(teacher, student, values, temperature=0.5, mask=mask)
    alone = [
        shd(t, s, values[i : i + 1, :, : t.shape[-1]], temperature=0.5)
        for i, (t, s) in enumerate(zip(teacher_samples, student_samples))
    ]
    torch.testing.assert_close(batch, sum(alone) / 2, rtol=1e-10, atol=1e-12)


def test_registered_module_uses_recorded_teacher_values():
    gen = torch.Generator().manual_seed(0)

    def inputs(heads, with_value):
        q = torch.randn(2, heads, 3, 4, generator=gen, dtype=F64)
        k = torch.randn(2, heads, 3, 4, generator=gen, dtype=F64)
        v = torch.randn(2, heads, 3, 4, generator=gen, dtype=F64) if with_value else None
        key_mask = torch.tensor([[True, True, True], [True, True, False]])[:, None, None, :]
        return AttentionInputs(query=q, key=k, value=v, scaling=0.5, mask=key_mask)

    teacher, student = inputs(4, True), inputs(3, False)
    loss = get("shd", temperature=0.5)
    assert loss.needs == "values"
    expected = shd(teacher.probs(), student.probs(), teacher.value, temperature=0.5, mask=teacher.loss_mask())
    torch.testing.assert_close(loss.from_inputs(teacher, student), expected)
    torch.testing.assert_close(
        loss(teacher.probs(), student.probs(), teacher.loss_mask(), teacher_values=teacher.value), expected
    )
    with pytest.raises(ValueError, match="value"):
        loss.from_inputs(inputs(4, False), student)
    with pytest.raises(ValueError, match="teacher_values"):
        loss(teacher.probs(), student.probs())


def test_bad_inputs_raise_clear_errors():
    teacher, student, values = random_maps(2, 4, 3, 4, 0), random_maps(2, 2, 3, 4, 1), random_values(2, 4, 4, 2, 2)
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 2\).*\(2, 4, 3, 4\)"):
        shd(teacher, student, random_values(2, 4, 5, 2, 2))
    with pytest.raises(ValueError, match="temperature"):
        shd(teacher, student, values, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        get("shd", temperature=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        shd(teacher, student, values * float("inf"))
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 4\).*\(2, 2, 3, 3\)"):
        shd(teacher, random_maps(2, 2, 3, 3, 1), values)
