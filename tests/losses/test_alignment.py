"""AMAD (docs/method.md, sections 3-7) against straightforward per-sample/per-head/per-row loops of the equations."""

from __future__ import annotations

import math

import pytest
import torch

from amad.losses import get
from amad.losses.alignment import alignment_matrix, amad
from amad.losses.projected import ProjectedAMAD

F64 = torch.float64
VARIANTS = ("mse", "kl", "token", "s2t")
# (B, H_t, H_s, q, k): H_s < H_t, H_s == H_t, H_s > H_t
SHAPES = [(2, 3, 2, 3, 4), (2, 2, 2, 3, 3), (1, 2, 3, 4, 3)]


def maps(b: int, h: int, q: int, k: int, seed: int, dtype=F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(b, h, q, k, generator=gen, dtype=F64), dim=-1).to(dtype)


def pair(shape, seed=0):
    b, h_t, h_s, q, k = shape
    return maps(b, h_t, q, k, seed), maps(b, h_s, q, k, seed + 1)


def random_mask(b: int, q: int, k: int, seed: int = 7) -> torch.Tensor:
    mask = torch.rand(b, 1, q, k, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0, 0, 0, :] = False  # a fully masked query row
    return mask


def causal_mask(q: int, k: int) -> torch.Tensor:
    return torch.ones(q, k, dtype=torch.bool).tril(diagonal=k - q)[None, None]


# ---- independent reference: loops over samples, heads and rows, spec equations literally ----
def _l2(v):
    norm = torch.sqrt((v * v).sum())
    return v / norm if norm > 0 else torch.zeros_like(v)


def _l1(v):
    total = v.sum()
    return v / total if total > 0 else torch.zeros_like(v)


def _mix(rows_s, sim_t_i, sims_s, temperature):
    """a_j = softmax_j(<sim_t_i, sims_s[j]> / temperature); returns sum_j a_j rows_s[j] and a."""
    w = torch.stack([torch.dot(sim_t_i, sj) for sj in sims_s]) / temperature
    a = torch.exp(w - w.max())
    a = a / a.sum()
    return sum(a[j] * rows_s[j] for j in range(len(rows_s))), a


def _kl(t, m, eps):
    return ((t + eps) * (torch.log(t + eps) - torch.log(m + eps))).sum()


def ref_mse_sample(teacher, student, temperature):
    t_hat = [_l2(r.flatten()) for r in teacher]
    s_hat = [_l2(r.flatten()) for r in student]
    return sum(((ti - _l2(_mix(s_hat, ti, s_hat, temperature)[0])) ** 2).sum() for ti in t_hat)


def ref_kl_sample(teacher, student, valid, alignment, temperature, eps):
    q, k = valid.shape
    t1 = [_l1(r.flatten()) for r in teacher]
    s1 = [_l1(r.flatten()) for r in student]
    sim_t = t1 if alignment == "l1" else [_l2(r.flatten()) for r in teacher]
    sim_s = s1 if alignment == "l1" else [_l2(r.flatten()) for r in student]
    total = 0.0
    for i in range(len(teacher)):
        m = _mix(s1, sim_t[i], sim_s, temperature)[0].reshape(q, k)
        ti = t1[i].reshape(q, k)
        for row in range(q):
            keep = valid[row]
            total = total + _kl(_l1(ti[row])[keep], _l1(m[row])[keep], eps)
    return total


def ref_token_sample(teacher, student, valid, alignment, temperature, eps):
    total = 0.0
    for row in range(valid.shape[0]):
        t_l = [_l1(h[row]) for h in teacher]
        s_l = [_l1(h[row]) for h in student]
        sim_t = t_l if alignment == "l1" else [_l2(h[row]) for h in teacher]
        sim_s = s_l if alignment == "l1" else [_l2(h[row]) for h in student]
        for i in range(len(teacher)):
            m = _l1(_mix(s_l, sim_t[i], sim_s, temperature)[0])
            total = total + _kl(t_l[i][valid[row]], m[valid[row]], eps)
    return total


def reference(teacher, student, variant, mask=None, reduction="paper", alignment=None, temperature=1.0, eps=1e-7):
    b, h_t, q, k = teacher.shape
    heads = student.shape[1] if variant == "s2t" else h_t
    alignment = alignment or ("cosine" if variant in ("mse", "s2t") else "l1")
    totals, counts = [], []
    for s in range(b):
        valid = torch.ones(q, k, dtype=torch.bool) if mask is None else mask[s % mask.shape[0], 0].expand(q, k)
        t = torch.where(valid, teacher[s], 0.0)
        st = torch.where(valid, student[s], 0.0)
        if variant == "mse":
            totals.append(ref_mse_sample(t, st, temperature))
        elif variant == "s2t":
            totals.append(ref_mse_sample(st, t, temperature))
        elif variant == "kl":
            totals.append(ref_kl_sample(t, st, valid, alignment, temperature, eps))
        else:
            totals.append(ref_token_sample(t, st, valid, alignment, temperature, eps))
        counts.append(int(valid.sum()))
    if reduction == "paper":
        return sum(totals) / (b * heads * q * k)
    per = [total / (heads * c) for total, c in zip(totals, counts) if c > 0]
    return sum(per) / len(per)


CASES = [
    ({}, None),
    ({"temperature": 0.5}, None),
    ({"alignment": "cosine", "temperature": 2.0}, None),
    ({"reduction": "mean"}, "random"),
    ({"reduction": "paper"}, "random"),
    ({"reduction": "mean", "temperature": 0.7}, "causal"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options,mask_kind", CASES)
def test_matches_reference(variant, shape, options, mask_kind):
    if options.get("alignment") == "cosine" and variant in ("mse", "s2t"):
        options = {k: v for k, v in options.items() if k != "alignment"}
    teacher, student = pair(shape)
    b, _, _, q, k = shape
    mask = {None: None, "random": random_mask(b, q, k), "causal": causal_mask(q, k)}[mask_kind]
    got = amad(teacher, student, variant=variant, mask=mask, **options)
    want = reference(teacher, student, variant, mask=mask, **options)
    assert got.dtype == F64 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("alignment", [None, "cosine"])
def test_all_zero_rows_match_reference(variant, alignment):
    """Unmasked all-zero rows and heads (not probability rows) stay finite and follow the reference."""
    teacher, student = pair((2, 3, 2, 3, 4))
    student[:, 0, 1, :] = 0.0
    student[1, 1] = 0.0
    teacher[0, 2, 0, :] = 0.0
    got = amad(teacher, student, variant=variant, alignment=alignment)
    torch.testing.assert_close(got, reference(teacher, student, variant, alignment=alignment), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reductions_agree_without_mask(variant):
    teacher, student = pair(SHAPES[0])
    paper, mean = (amad(teacher, student, variant=variant, reduction=r) for r in ("paper", "mean"))
    torch.testing.assert_close(paper, mean)


def test_figure1_toy_alignment():
    """3 Teacher heads (0 and 1 alike), 2 Student heads: Student 0 ~ Teacher 0 and 1, Student 1 ~ Teacher 2."""
    diagonal = torch.eye(4, dtype=F64)
    near_diagonal = 0.7 * diagonal + 0.3 * torch.roll(diagonal, shifts=-1, dims=1)
    first = torch.zeros(4, 4, dtype=F64)
    first[:, 0] = 1

    def heads(*patterns):  # smoothed row-stochastic maps, shape (1, H, 4, 4)
        return torch.stack([0.9 * p + 0.1 / 4 for p in patterns])[None]

    teacher = heads(diagonal, near_diagonal, first)
    student = heads((diagonal + near_diagonal) / 2, first)
    wrong = heads((diagonal + first) / 2, near_diagonal)  # merges unlike heads
    a = alignment_matrix(teacher, student)[0]
    assert a.shape == (3, 2)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(3, dtype=F64))
    assert a.argmax(dim=1).tolist() == [0, 0, 1]
    assert (a[[0, 1, 2], [0, 0, 1]] > 0.6).all()
    sharp = alignment_matrix(teacher, student, temperature=0.1)[0]  # a low temperature sharpens A
    assert (sharp[[0, 1, 2], [0, 0, 1]] > 0.95).all()
    for options in ({"variant": "mse"}, {"variant": "token"}, {"variant": "kl", "alignment": "cosine"}):
        assert amad(teacher, student, **options) < 0.8 * amad(teacher, wrong, **options)


def test_kl_paper_alignment_is_almost_uniform():
    """With L1-normalised rows, similarities are at most 1/q, so A_ij / A_ij' <= exp(1/q)."""
    teacher, student = pair((2, 3, 2, 3, 4))
    a = alignment_matrix(teacher, student, variant="kl")
    assert (a.max(dim=-1).values / a.min(dim=-1).values <= math.exp(1 / 3) + 1e-12).all()


def one_to_one_mse(teacher, student):
    """KD-ATT: Student head j learns Teacher head j (j < H_s), on L2-normalised flattened maps."""
    total = 0.0
    for s in range(teacher.shape[0]):
        for j in range(student.shape[1]):
            total = total + ((_l2(teacher[s, j].flatten()) - _l2(student[s, j].flatten())) ** 2).sum()
    return total


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_permutation_invariance(variant):
    teacher, student = pair((2, 3, 3, 3, 4))
    base = amad(teacher, student, variant=variant)
    torch.testing.assert_close(amad(teacher, student[:, [2, 0, 1]], variant=variant), base)
    torch.testing.assert_close(amad(teacher[:, [1, 2, 0]], student, variant=variant), base)


def test_one_to_one_is_not_student_permutation_invariant():
    teacher, student = pair((2, 3, 3, 3, 4))
    permuted = student[:, [2, 0, 1]]
    assert abs(one_to_one_mse(teacher, student) - one_to_one_mse(teacher, permuted)) > 1e-2
    torch.testing.assert_close(amad(teacher, permuted), amad(teacher, student))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gram_identity(shape, temperature):
    teacher, student = pair(shape)
    b, h_t, h_s, q, k = shape
    total = 0.0
    for s in range(b):
        t, st = teacher[s].reshape(h_t, -1), student[s].reshape(h_s, -1)
        g_ts, g_ss = t @ st.T, st @ st.T
        t_norm, s_norm = t.norm(dim=1), g_ss.diagonal().sqrt()
        w = g_ts / (t_norm[:, None] * s_norm[None, :])
        g_hat = g_ss / (s_norm[:, None] * s_norm[None, :])
        a = torch.softmax(w / temperature, dim=1)
        for i in range(h_t):
            head = 2 - 2 * (a[i] * w[i]).sum() / torch.sqrt(a[i] @ g_hat @ a[i])
            torch.testing.assert_close(head, ref_mse_sample(teacher[s, i : i + 1], student[s], temperature))
            total = total + head
    torch.testing.assert_close(amad(teacher, student, temperature=temperature), total / (b * h_t * q * k))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(variant, masked):
    teacher, student = pair((2, 3, 2, 2, 3))
    mask = random_mask(2, 2, 3) if masked else None
    student = student.clone().requires_grad_(True)
    reduction = "mean" if masked else "paper"
    assert torch.autograd.gradcheck(
        lambda s: amad(teacher, s, variant=variant, mask=mask, reduction=reduction, temperature=0.8), (student,)
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(2, 3, 2, 3, 4), (2, 2, 3, 3, 4)])
def test_gradient_reaches_every_student_head(variant, shape):
    teacher, student = pair(shape)
    student.requires_grad_(True)
    amad(teacher, student, variant=variant).backward()
    assert (student.grad.abs().sum(dim=(0, 2, 3)) > 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_mean_equals_unpadded_samples(variant):
    small_t, small_s = maps(1, 3, 3, 4, 10), maps(1, 2, 3, 4, 11)
    big_t, big_s = maps(1, 3, 5, 6, 12), maps(1, 2, 5, 6, 13)
    garbage_t, garbage_s = maps(1, 3, 5, 6, 14), maps(1, 2, 5, 6, 15)
    garbage_t[..., :3, :4], garbage_s[..., :3, :4] = small_t, small_s  # pad query rows and keys with junk
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[0, :, 3:, :] = False
    mask[0, :, :, 4:] = False
    batch_t, batch_s = torch.cat([garbage_t, big_t]), torch.cat([garbage_s, big_s]).requires_grad_(True)
    loss = amad(batch_t, batch_s, variant=variant, mask=mask, reduction="mean")
    alone = [amad(small_t, small_s, variant=variant), amad(big_t, big_s, variant=variant)]
    torch.testing.assert_close(loss, (alone[0] + alone[1]) / 2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        amad(garbage_t, garbage_s, variant=variant, mask=mask[:1], reduction="mean"), alone[0], rtol=1e-12, atol=1e-15
    )
    loss.backward()
    assert (batch_s.grad[0][:, ~mask[0, 0]] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", ["paper", "mean"])
def test_fully_masked_rows_and_samples_give_no_nan(variant, reduction):
    teacher, student = pair((3, 3, 2, 3, 4))
    mask = torch.ones(3, 1, 3, 4, dtype=torch.bool)
    mask[0, :, 1, :] = False  # one query row
    mask[1] = False  # a whole sample
    mask[2, :, :, 0] = False
    student.requires_grad_(True)
    loss = amad(teacher, student, variant=variant, mask=mask, reduction=reduction)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert (student.grad[1] == 0).all()
    if reduction == "mean":  # the empty sample is left out of the average
        kept = [0, 2]
        alone = amad(teacher[kept], student[kept], variant=variant, mask=mask[kept], reduction="mean")
        torch.testing.assert_close(loss, alone)
    student.grad = None
    nothing_valid = torch.zeros(1, 1, 1, 1, dtype=torch.bool)
    nothing = amad(teacher, student, variant=variant, mask=nothing_valid, reduction=reduction)
    nothing.backward()
    assert nothing.item() == 0.0 and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_close_to_float64(variant, dtype, rtol):
    """Half precision is computed in float32 inside; measured errors: fp32 ~1e-7, bf16 ~3e-3, fp16 ~4e-4."""
    teacher, student = maps(2, 4, 16, 16, 20), maps(2, 3, 16, 16, 21)
    low = student.to(dtype).requires_grad_(True)
    got = amad(teacher.to(dtype), low, variant=variant, mask=causal_mask(16, 16))
    assert got.dtype == dtype and torch.isfinite(got)
    torch.testing.assert_close(got.to(F64), amad(teacher, student, variant=variant, mask=causal_mask(16, 16)),
                               rtol=rtol, atol=0.0)
    got.backward()
    assert low.grad.dtype == dtype and torch.isfinite(low.grad).all()


BAD_INPUTS = [
    (dict(teacher=(1, 2, 3, 4), student=(1, 2, 4, 4)), ValueError, r"\(1, 2, 3, 4\).*\(1, 2, 4, 4\)"),
    (dict(teacher=(1, 2, 3, 4), student=(1, 2, 3, 5)), ValueError, r"\(1, 2, 3, 4\).*\(1, 2, 3, 5\)"),
    (dict(teacher=(2, 3, 4), student=(2, 3, 4)), ValueError, r"\(B, H, q, k\); got \(2, 3, 4\)"),
    (dict(nan=True), ValueError, r"student maps \(1, 2, 3, 4\) contain NaN or infinite"),
    (dict(mask=torch.ones(1, 1, 5, 4, dtype=torch.bool)), ValueError, r"mask of shape \(1, 1, 5, 4\).*\(1, 1, 3, 4\)"),
    (dict(mask=torch.ones(1, 1, 3, 4)), TypeError, r"boolean.*torch.float32"),
    (dict(teacher=(0, 2, 3, 4), student=(0, 2, 3, 4)), ValueError, r"empty: shape \(0, 2, 3, 4\)"),
    (dict(variant="cka"), ValueError, r"'cka'.*'mse', 'kl', 'token', 's2t'"),
    (dict(variant="mse", alignment="l1"), ValueError, r"'l1'.*\('cosine',\)"),
    (dict(variant="kl", alignment="dot"), ValueError, r"'dot'.*\('l1', 'cosine'\)"),
    (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0; got 0.0"),
    (dict(temperature=-1.0), ValueError, r"temperature.*-1.0"),
    (dict(eps=0.0), ValueError, r"eps must be a finite number > 0; got 0.0"),
    (dict(reduction="sum"), ValueError, r"reduction must be one of \('paper', 'mean'\); got 'sum'"),
]


@pytest.mark.parametrize("bad,error,message", BAD_INPUTS)
def test_bad_input(bad, error, message):
    bad = dict(bad)
    t_shape, s_shape = bad.pop("teacher", (1, 2, 3, 4)), bad.pop("student", (1, 2, 3, 4))
    teacher, student = torch.rand(*t_shape, dtype=F64), torch.rand(*s_shape, dtype=F64)
    if bad.pop("nan", False):
        student[0, 1, 2, 3] = float("nan")
    with pytest.raises(error, match=message):
        amad(teacher, student, **bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_registry_modules_match_function(variant):
    teacher, student = pair((2, 3, 2, 3, 4))
    mask = random_mask(2, 3, 4)
    options = {"reduction": "mean", "temperature": 0.6, "alignment": "cosine" if variant in ("kl", "token") else None}
    loss = get(f"amad-{variant}", **options)
    assert loss.options == options | {"eps": 1e-7}
    want = amad(teacher, student, variant=variant, mask=mask, **options)
    torch.testing.assert_close(loss(teacher, student, mask), want)
    with pytest.raises(ValueError, match="temperature"):
        get(f"amad-{variant}", temperature=0)
    with pytest.raises(ValueError, match="'bogus'"):
        get(f"amad-{variant}", alignment="bogus")


def test_projected_starts_as_variant_2_and_is_learnable():
    teacher, student = pair((2, 3, 2, 3, 4))
    mask = random_mask(2, 3, 4)
    loss = get("amad-projected", n=12, reduction="mean").double()
    assert isinstance(loss, ProjectedAMAD)
    plain = amad(teacher, student, variant="kl", mask=mask, reduction="mean")
    torch.testing.assert_close(loss(teacher, student, mask), plain)
    names = {name for name, p in loss.named_parameters() if isinstance(p, torch.nn.Parameter)}
    assert names == {"projection.weight", "projection.bias"} and set(loss.state_dict()) == names
    loss(teacher, student, mask).backward()
    assert loss.projection.weight.grad.abs().sum() > 0
    with torch.no_grad():
        loss.projection.weight.add_(0.05 * torch.rand(12, 12, dtype=F64))
    assert not torch.allclose(loss(teacher, student, mask), plain)


def test_projected_matches_reference_and_gradcheck():
    teacher, student = pair((2, 3, 2, 2, 3))
    mask = random_mask(2, 2, 3)
    loss = ProjectedAMAD(6, temperature=0.8, reduction="mean").double()
    gen = torch.Generator().manual_seed(3)
    weight = (torch.eye(6, dtype=F64) + 0.1 * torch.rand(6, 6, generator=gen, dtype=F64)).requires_grad_(True)
    bias = (0.01 * torch.rand(6, generator=gen, dtype=F64)).requires_grad_(True)
    masked = torch.where(mask, student, 0.0).reshape(2, 2, 6)
    projected = torch.relu(masked @ weight.T + bias).reshape(student.shape).detach()  # masked again by reference
    params = lambda w, b: {"projection.weight": w, "projection.bias": b}  # noqa: E731
    got = torch.func.functional_call(loss, params(weight, bias), (teacher, student, mask))
    torch.testing.assert_close(got, reference(teacher, projected, "kl", mask=mask, reduction="mean", temperature=0.8))
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s, w, b: torch.func.functional_call(loss, params(w, b), (teacher, s, mask)), (student, weight, bias)
    )


def test_projected_rejects_other_n():
    loss = ProjectedAMAD(12)
    teacher, student = maps(1, 3, 3, 5, 0), maps(1, 2, 3, 5, 1)
    with pytest.raises(ValueError, match=r"n = q\*k = 12; got maps with q=3, k=5 \(n=15\)"):
        loss(teacher, student)
    with pytest.raises(ValueError, match="positive int; got 0"):
        ProjectedAMAD(0)
    with pytest.raises(ValueError, match="alignment 'bogus'"):
        ProjectedAMAD(12, alignment="bogus")
