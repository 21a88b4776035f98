"""Logit KD against a per-sample, per-position loop of CE(softmax(z_T / tau), log_softmax(z_S / tau))."""

from __future__ import annotations

import math

import pytest
import torch
from rival_helpers import F64

from amad.losses import logit_kd


def logits(*shape: int, seed: int) -> torch.Tensor:
    return 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def position_ce(z_s, z_t, tau):
    """- sum_c p_T(c) log p_S(c) of one position, written out with exp/log."""
    p_t = [math.exp(float(v) / tau) for v in z_t]
    p_t = [v / sum(p_t) for v in p_t]
    log_norm = math.log(sum(math.exp(float(v) / tau) for v in z_s))
    return -sum(p * (float(v) / tau - log_norm) for p, v in zip(p_t, z_s))


def reference(student, teacher, tau, valid, reduction="sequence"):
    """valid: nested lists of booleans (B, L) for sequences; (B,) for classification."""
    per_sample, tokens = [], []
    for i in range(student.shape[0]):
        if student.dim() == 2:
            positions = [student[i]], [teacher[i]], [valid[i]]
        else:
            positions = student[i], teacher[i], valid[i]
        ces = [position_ce(s, t, tau) for s, t, ok in zip(*positions) if ok]
        if ces:
            per_sample.append(sum(ces))
            tokens.append(len(ces))
    if reduction == "token":
        return sum(per_sample) / sum(tokens)
    return sum(per_sample) / len(per_sample)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_classification_is_the_batch_mean(tau):
    student, teacher = logits(4, 6, seed=0), logits(4, 6, seed=1)
    expected = reference(student, teacher, tau, [True] * 4)
    assert math.isclose(float(logit_kd(student, teacher, temperature=tau)), expected, rel_tol=1e-10)
    scaled = logit_kd(student, teacher, temperature=tau, scale_by_temperature_squared=True)
    assert math.isclose(float(scaled), expected * tau * tau, rel_tol=1e-10)


def test_classification_ignores_labelled_samples():
    student, teacher = logits(4, 6, seed=0), logits(4, 6, seed=1)
    labels = torch.tensor([1, -100, 3, 0])
    expected = reference(student, teacher, 1.0, [True, False, True, True])
    assert math.isclose(float(logit_kd(student, teacher, labels=labels)), expected, rel_tol=1e-10)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sequence_sums_over_valid_tokens(reduction, tau):
    student, teacher = logits(3, 5, 7, seed=0), logits(3, 5, 7, seed=1)
    labels = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(2))
    labels[0, 3:] = -100
    labels[1, 1] = -100
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 4] = False
    valid = ((labels != -100) & mask).tolist()
    got = logit_kd(student, teacher, temperature=tau, labels=labels, mask=mask, reduction=reduction)
    assert math.isclose(float(got), reference(student, teacher, tau, valid, reduction), rel_tol=1e-10)


def test_custom_ignore_index_and_no_labels():
    student, teacher = logits(2, 4, 5, seed=0), logits(2, 4, 5, seed=1)
    labels = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
    got = logit_kd(student, teacher, labels=labels, ignore_index=0)
    expected = reference(student, teacher, 1.0, (labels != 0).tolist())
    assert math.isclose(float(got), expected, rel_tol=1e-10)
    everything = reference(student, teacher, 1.0, [[True] * 4] * 2)
    assert math.isclose(float(logit_kd(student, teacher)), everything, rel_tol=1e-10)


def test_sequence_padding_invariance():
    student, teacher = logits(2, 3, 6, seed=0), logits(2, 3, 6, seed=1)
    labels = torch.tensor([[1, 2, -100], [4, 5, 0]])
    padded_student = torch.cat([student, logits(2, 4, 6, seed=5)], dim=1)  # garbage in 4 padded positions
    padded_teacher = torch.cat([teacher, logits(2, 4, 6, seed=6)], dim=1)
    padded_labels = torch.cat([labels, torch.full((2, 4), -100)], dim=1)
    short = logit_kd(student, teacher, labels=labels)
    torch.testing.assert_close(logit_kd(padded_student, padded_teacher, labels=padded_labels), short)
    # and each sample's loss is the same alone as in the batch
    alone = [logit_kd(student[i : i + 1], teacher[i : i + 1], labels=labels[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(short, sum(alone) / 2)


def test_gradcheck_wrt_student():
    student = logits(2, 3, 4, seed=0).requires_grad_(True)
    teacher = logits(2, 3, 4, seed=1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.autograd.gradcheck(lambda s: logit_kd(s, teacher, temperature=2.0, mask=mask), (student,))


def test_float32_and_bfloat16_inputs_compute_in_float32():
    student, teacher = logits(2, 3, 4, seed=0), logits(2, 3, 4, seed=1)
    expected = logit_kd(student, teacher)
    got = logit_kd(student.to(torch.bfloat16), teacher.to(torch.bfloat16))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0.05, atol=0.05)


def test_bad_inputs_raise_clear_errors():
    student, teacher = logits(2, 3, 4, seed=0), logits(2, 3, 4, seed=1)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):
        logit_kd(student, logits(2, 3, 5, seed=1))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 1\)"):
        logit_kd(student[..., None], teacher[..., None])
    with pytest.raises(ValueError, match="NaN"):
        logit_kd(student, teacher * float("nan"))
    with pytest.raises(ValueError, match=r"labels.*\(2, 3\).*\(2, 4\)"):
        logit_kd(student, teacher, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        logit_kd(student, teacher, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        logit_kd(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        logit_kd(student, teacher, reduction="mean")
    with pytest.raises(TypeError, match="floating"):
        logit_kd(student.long(), teacher)


# -- top-k KD -------------------------------------------------------------------------------------
def position_ce_top_k(z_s, z_t, tau, k):
    """- sum_{c in top-k(z_T)} p~_T(c) log p_S(c): Teacher renormalised over its k largest, Student over all."""
    top = sorted(range(len(z_t)), key=lambda c: -float(z_t[c]))[:k]
    weights = [math.exp(float(z_t[c]) / tau) for c in top]
    log_norm = math.log(sum(math.exp(float(v) / tau) for v in z_s))
    return -sum(w / sum(weights) * (float(z_s[c]) / tau - log_norm) for w, c in zip(weights, top))


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize(("k", "tau"), [(1, 1.0), (3, 1.0), (3, 2.0), (6, 0.5)])
def test_top_k_against_a_float64_loop(k, tau, reduction):
    student, teacher = logits(3, 4, 7, seed=3), logits(3, 4, 7, seed=4)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True] * 4])
    per_sample = [sum(position_ce_top_k(student[i, j], teacher[i, j], tau, k) for j in range(4) if mask[i, j])
                  for i in range(3)]
    expected = sum(per_sample) / (int(mask.sum()) if reduction == "token" else 3)
    got = logit_kd(student, teacher, temperature=tau, mask=mask, top_k=k, reduction=reduction)
    assert math.isclose(float(got), expected, rel_tol=1e-10)


def test_top_k_of_every_class_is_the_full_kd_and_classification_works():
    student, teacher = logits(2, 3, 5, seed=0), logits(2, 3, 5, seed=1)
    torch.testing.assert_close(logit_kd(student, teacher, top_k=5), logit_kd(student, teacher))
    student, teacher = logits(4, 6, seed=0), logits(4, 6, seed=1)
    expected = sum(position_ce_top_k(student[i], teacher[i], 1.0, 2) for i in range(4)) / 4
    assert math.isclose(float(logit_kd(student, teacher, top_k=2)), expected, rel_tol=1e-10)


def test_top_k_differs_from_full_kd_when_the_teacher_spreads_its_mass():
    student, teacher = logits(2, 3, 9, seed=0), logits(2, 3, 9, seed=1)
    assert not torch.allclose(logit_kd(student, teacher, top_k=2), logit_kd(student, teacher))


def test_top_k_gradcheck_wrt_student_and_teacher_values():
    student = logits(2, 3, 6, seed=0).requires_grad_(True)
    teacher = logits(2, 3, 6, seed=1).requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.autograd.gradcheck(
        lambda s, t: logit_kd(s, t, temperature=2.0, mask=mask, top_k=3), (student, teacher)
    )


def test_top_k_bad_values():
    student, teacher = logits(2, 3, 4, seed=0), logits(2, 3, 4, seed=1)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="top_k"):
            logit_kd(student, teacher, top_k=bad)
    with pytest.raises(ValueError, match=r"top_k=5 is larger than the 4 classes"):
        logit_kd(student, teacher, top_k=5)
