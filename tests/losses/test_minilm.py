"""MiniLMv2 relations against a per-sample, per-relation-head loop on the unpadded tokens."""

from __future__ import annotations

import math

import pytest
import torch
from rival_helpers import F64

from amad.attention import AttentionInputs
from amad.losses import get, minilm_relations
from amad.losses.minilm import relation_heads

SLOT = {"q": 0, "k": 1, "v": 2}


def qkv(b: int, heads: int, dim: int, q_len: int, kv_len: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, heads, n, dim, generator=gen, dtype=F64) for n in (q_len, kv_len, kv_len))


def reference(teacher, student, num_relation_heads, relations, lengths, q_lengths=None):
    """lengths[i]: real K/V tokens of sample i (a prefix); q_lengths[i]: real query tokens (default lengths)."""
    q_lengths = lengths if q_lengths is None else q_lengths
    total = torch.zeros((), dtype=F64)
    for relation in relations:
        per_sample = []
        for i in range(len(lengths)):
            n_rows = q_lengths[i] if relation[0] == "q" else lengths[i]
            n_cols = q_lengths[i] if relation[1] == "q" else lengths[i]

            def relation_rows(model, r):
                x, y = model[SLOT[relation[0]]][i], model[SLOT[relation[1]]][i]
                hidden_x = torch.cat([x[h] for h in range(x.shape[0])], dim=1)[:n_rows]  # (L, H*d)
                hidden_y = torch.cat([y[h] for h in range(y.shape[0])], dim=1)[:n_cols]
                size = hidden_x.shape[1] // num_relation_heads
                xr, yr = hidden_x[:, r * size : (r + 1) * size], hidden_y[:, r * size : (r + 1) * size]
                scores = xr @ yr.T / math.sqrt(size)
                probs = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
                return probs / probs.sum(dim=1, keepdim=True)

            kl = torch.zeros((), dtype=F64)
            for r in range(num_relation_heads):
                t, s = relation_rows(teacher, r), relation_rows(student, r)
                for row in range(n_rows):
                    kl = kl + (t[row] * (torch.log(t[row]) - torch.log(s[row]))).sum()
            per_sample.append(kl / (num_relation_heads * n_rows))
        total = total + sum(per_sample) / len(per_sample)
    return total


def prefix_mask(lengths: list[int], size: int) -> torch.Tensor:
    return torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("num_relation_heads", [1, 2, 4, 8])
def test_relation_heads_differ_from_attention_heads(num_relation_heads):
    # Teacher 4 heads x 8 dims, Student 2 heads x 8 dims: hidden 32 vs 16, re-split into the same A_r heads.
    teacher, student = qkv(2, 4, 8, 5, 5, 0), qkv(2, 2, 8, 5, 5, 1)
    lengths = [5, 3]
    got = minilm_relations(teacher, student, num_relation_heads=num_relation_heads, mask=prefix_mask(lengths, 5))
    expected = reference(teacher, student, num_relation_heads, ("qq", "kk", "vv"), lengths)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_relation_heads_resplit_the_concatenated_hidden_size():
    x = torch.arange(2 * 3 * 4, dtype=F64).reshape(1, 2, 3, 4)  # 2 heads of size 4
    split = relation_heads(x, 4)  # 4 relation heads of size 2
    assert split.shape == (1, 4, 3, 2)
    torch.testing.assert_close(split[0, 0], x[0, 0, :, :2])
    torch.testing.assert_close(split[0, 3], x[0, 1, :, 2:])
    torch.testing.assert_close(relation_heads(x, 1)[0, 0], torch.cat([x[0, 0], x[0, 1]], dim=1))


def test_cross_attention_lengths_and_mixed_relations():
    teacher, student = qkv(2, 2, 6, 3, 5, 0), qkv(2, 3, 2, 3, 5, 1)  # hidden 12 and 6, A_r = 3
    lengths, q_lengths = [5, 4], [2, 3]
    relations = ("qq", "kk", "vv", "qk", "kv")
    got = minilm_relations(
        teacher,
        student,
        num_relation_heads=3,
        mask=prefix_mask(lengths, 5),
        query_mask=prefix_mask(q_lengths, 3),
        relations=relations,
    )
    torch.testing.assert_close(
        got, reference(teacher, student, 3, relations, lengths, q_lengths), rtol=1e-10, atol=1e-12
    )


def test_padding_invariance():
    teacher, student = qkv(2, 4, 4, 6, 6, 0), qkv(2, 2, 4, 6, 6, 1)
    lengths = [6, 4]
    for i in (0, 1):  # garbage in the padded positions must not matter
        for t in teacher + student:
            t[i, :, lengths[i] :] = 1e3
    batch = minilm_relations(teacher, student, num_relation_heads=4, mask=prefix_mask(lengths, 6))
    alone = [
        minilm_relations(
            tuple(t[i : i + 1, :, : lengths[i]] for t in teacher),
            tuple(s[i : i + 1, :, : lengths[i]] for s in student),
            num_relation_heads=4,
        )
        for i in (0, 1)
    ]
    torch.testing.assert_close(batch, sum(alone) / 2, rtol=1e-10, atol=1e-12)


def test_gradcheck_wrt_student():
    teacher, student = qkv(2, 2, 4, 3, 3, 0), qkv(2, 2, 2, 3, 3, 1)
    student = tuple(s.requires_grad_(True) for s in student)
    mask = prefix_mask([3, 2], 3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: minilm_relations(teacher, (q, k, v), num_relation_heads=2, mask=mask), student
    )


def test_registered_module_reads_attention_inputs():
    teacher_q, teacher_k, teacher_v = qkv(2, 4, 4, 5, 5, 0)
    student_q, student_k, student_v = qkv(2, 2, 4, 5, 5, 1)
    key_mask = prefix_mask([5, 3], 5)
    teacher = AttentionInputs(
        query=teacher_q, key=teacher_k, value=teacher_v, scaling=0.5, mask=key_mask[:, None, None, :]
    )
    student = AttentionInputs(
        query=student_q, key=student_k, value=student_v, scaling=0.5, mask=key_mask[:, None, None, :]
    )
    loss = get("minilm-relations", num_relation_heads=4)
    assert loss.needs == "qkv"
    expected = reference(
        (teacher_q, teacher_k, teacher_v), (student_q, student_k, student_v), 4, ("qq", "kk", "vv"), [5, 3]
    )
    torch.testing.assert_close(loss.from_inputs(teacher, student), expected, rtol=1e-10, atol=1e-12)
    only_vv = get("minilm-relations", num_relation_heads=2, relations=("vv",))
    teacher.query_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])  # unused by VV
    expected_vv = reference((None, None, teacher_v), (None, None, student_v), 2, ("vv",), [5, 3])
    torch.testing.assert_close(only_vv.from_inputs(teacher, student), expected_vv, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="num_relation_heads"):
        get("minilm-relations")
    with pytest.raises(NotImplementedError):
        loss(torch.rand(2, 4, 5, 5), torch.rand(2, 2, 5, 5))


def test_bad_inputs_raise_clear_errors():
    teacher, student = qkv(2, 4, 8, 5, 5, 0), qkv(2, 2, 8, 5, 5, 1)
    with pytest.raises(ValueError, match=r"3 relation heads.*4\*8 = 32"):
        minilm_relations(teacher, student, num_relation_heads=3)
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 8\).*\(2, 2, 4, 8\)"):
        minilm_relations(teacher, qkv(2, 2, 8, 4, 4, 1), num_relation_heads=2)
    with pytest.raises(TypeError, match="V"):
        minilm_relations(teacher, (student[0], student[1], None), num_relation_heads=2)
    with pytest.raises(ValueError, match="relations"):
        minilm_relations(teacher, student, num_relation_heads=2, relations=("qx",))
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        minilm_relations(teacher, student, num_relation_heads=2, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_relation_heads"):
        minilm_relations(teacher, student, num_relation_heads=0)
    with pytest.raises(ValueError, match="NaN"):
        minilm_relations(teacher, (student[0] * float("nan"), student[1], student[2]), num_relation_heads=2)


def test_half_precision_is_computed_in_float32():
    teacher, student = qkv(2, 4, 4, 5, 5, 0), qkv(2, 2, 4, 5, 5, 1)
    mask = prefix_mask([5, 3], 5)
    exact = minilm_relations(teacher, student, num_relation_heads=4, mask=mask)
    half = [tuple(x.to(torch.bfloat16) for x in model) for model in (teacher, student)]
    got = minilm_relations(*half, num_relation_heads=4, mask=mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=0.05, atol=0.02)
    with pytest.raises(TypeError, match="sequence of 3"):
        minilm_relations(teacher[0], student, num_relation_heads=4)
