"""The fused Triton AMAD kernels against the torch streaming form, on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` is set by tests/conftest.py, before anything imports ``triton.language``
(torch and transformers may import it while other test files are collected), so the
``@triton.jit`` kernels run on CPU tensors. Every case compares the
fused float32 loss and the Student's query/key gradients with the torch streaming form evaluated
in float64 on the same inputs (itself checked against the materialised loss in
``test_streaming.py``) to 1e-5 relative. Tiles of 16 x 16 on q, k of 12 to 21 make every case
span several row and key blocks that do not divide the lengths. The interpreter is slow
(seconds per case), so only two cases run by default; the others are marked ``slow``.
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it before triton.language loads
    raise RuntimeError("run these tests with TRITON_INTERPRET=1 set before triton is imported (tests/conftest.py)")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'amad[kernels]', x86_64 Linux)")

from amad.attention import AttentionInputs  # noqa: E402
from amad.losses import _triton_amad, streaming  # noqa: E402

F64 = torch.float64


# ---- inputs ------------------------------------------------------------------------------------------
def layer(kind: str, heads: int, dim: int, seed: int, *, q: int, k: int, batch: int, grad: bool,
          causal: bool = False) -> tuple[AttentionInputs, list[torch.Tensor]]:
    """Recorded inputs of one layer (float32) and the leaves a gradient is taken for.

    ``kind``: "padded" (sample 1 padded by 3 tokens, keys and queries, per-row bias), "decoding"
    (row-shared bias), "cross" (per-row key mask, one fully masked row; GQA: one key head
    expanded to all query heads), "plain".
    """
    gen = torch.Generator().manual_seed(seed)
    query = (1.5 * torch.randn(batch, heads, q, dim, generator=gen)).requires_grad_(grad)
    kv_heads = 1 if kind == "cross" else heads
    key_leaf = (1.5 * torch.randn(batch, kv_heads, k, dim, generator=gen)).requires_grad_(grad)
    key = key_leaf.expand(batch, heads, k, dim)  # GQA as capture records it: expanded, not copied
    mask = query_mask = bias = None
    if kind == "padded":
        mask = torch.ones(batch, 1, 1, k, dtype=torch.bool)
        mask[-1, ..., k - 3:] = False
        query_mask = mask[:, 0, 0, :q].clone()
        bias = torch.randn(1, heads, q, k, generator=gen)
    if kind == "decoding":
        bias = torch.randn(1, heads, 1, k, generator=gen)
    if kind == "cross":
        mask = torch.rand(batch, 1, q, k, generator=gen) > 0.3
        mask[0, 0, 1, :] = False
    if kind == "plain" and not causal:
        mask = torch.ones(batch, 1, 1, k, dtype=torch.bool)
        mask[0, ..., :2] = False
    inputs = AttentionInputs(query, key, dim**-0.5, bias=bias, mask=mask, causal=causal, query_mask=query_mask)
    return inputs, [query, key_leaf]


#: name -> (kind, batch, q, k, (H_t, d_t, causal_t), (H_s, d_s, causal_s))
CASES = {
    "padded-Ht>Hs": ("padded", 2, 20, 20, (3, 5, False), (2, 3, False)),
    "decoding-causal-Ht<Hs": ("decoding", 1, 12, 21, (2, 4, True), (3, 4, True)),
    "cross-gqa": ("cross", 1, 18, 20, (4, 3, False), (3, 3, False)),
    "teacher-causal-only": ("plain", 1, 20, 20, (2, 3, True), (3, 3, False)),
    "student-causal-only": ("plain", 1, 20, 20, (3, 3, False), (2, 3, True)),
}


def make_pair(case: str):
    kind, batch, q, k, (h_t, d_t, c_t), (h_s, d_s, c_s) = CASES[case]
    teacher, _ = layer(kind, h_t, d_t, 0, q=q, k=k, batch=batch, grad=False, causal=c_t)
    student, leaves = layer(kind, h_s, d_s, 1, q=q, k=k, batch=batch, grad=True, causal=c_s)
    return teacher, student, leaves


def as_float64(inputs: AttentionInputs, leaves: list[torch.Tensor]):
    """The same inputs in float64, with float64 leaves standing in for ``leaves``."""
    leaves64 = [x.detach().to(F64).requires_grad_(x.requires_grad) for x in leaves]
    heads = inputs.num_heads
    key = leaves64[1].expand(-1, heads, -1, -1) if len(leaves64) > 1 else inputs.key.detach().to(F64)
    bias = None if inputs.bias is None else inputs.bias.to(F64)
    return AttentionInputs(leaves64[0], key, inputs.scaling, bias=bias, mask=inputs.mask, causal=inputs.causal,
                           query_mask=inputs.query_mask), leaves64


@pytest.fixture
def tiles_16(monkeypatch):
    monkeypatch.setattr(_triton_amad, "TILES", (16, 16, 8, 1))


def check_against_torch(case: str, variant: str, reduction: str = "mean", **options) -> None:
    teacher, student, leaves = make_pair(case)
    got = streaming.amad(teacher, student, variant=variant, reduction=reduction, kernel="triton", **options)
    grads = torch.autograd.grad(got, leaves)
    teacher64, _ = as_float64(teacher, [teacher.query, teacher.key])
    student64, leaves64 = as_float64(student, leaves)
    want = streaming.amad(teacher64, student64, variant=variant, reduction=reduction, kernel="torch", **options)
    want_grads = torch.autograd.grad(want, leaves64)
    assert got.dtype == torch.float32 and got.shape == ()
    errors = [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(grads, want_grads)]
    print(f"\n{case} {variant} {options}: loss {got.item():.7g} vs float64 {want.item():.7g} "
          f"(rel. {abs(got.item() / want.item() - 1):.1e}), max|grad - ref| / max|ref|: "
          f"query {errors[0]:.1e}, key {errors[1]:.1e}")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.0)
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


# ---- exactness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,options", [("mse", {}), ("kl", {})], ids=["mse", "kl"])
def test_fused_equals_torch_streaming_padded(tiles_16, variant, options):
    check_against_torch("padded-Ht>Hs", variant, **options)


SLOW_CASES = [
    ("decoding-causal-Ht<Hs", "mse", {"temperature": 0.5}),
    ("decoding-causal-Ht<Hs", "kl", {"alignment": "cosine", "temperature": 2.0}),
    ("cross-gqa", "mse", {}),
    ("cross-gqa", "kl", {}),
    ("teacher-causal-only", "kl", {}),
    ("student-causal-only", "mse", {}),
    ("padded-Ht>Hs", "s2t", {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,variant,options", SLOW_CASES, ids=[f"{c}-{v}-{len(o)}" for c, v, o in SLOW_CASES])
def test_fused_equals_torch_streaming(tiles_16, case, variant, options):
    check_against_torch(case, variant, reduction="paper" if variant == "mse" else "mean", **options)


@pytest.mark.slow
def test_unequal_tiles(monkeypatch):
    """32-row by 16-key tiles (one row block, two key blocks per sample)."""
    monkeypatch.setattr(_triton_amad, "TILES", (32, 16, 8, 1))
    check_against_torch("padded-Ht>Hs", "mse")


@pytest.mark.slow
def test_query_gradient_only(tiles_16):
    """A key without gradient: only dL/dQ is computed, and it is right."""
    teacher, student, leaves = make_pair("cross-gqa")
    leaves[1].requires_grad_(False)
    got = streaming.amad(teacher, student, variant="kl", kernel="triton")
    (grad,) = torch.autograd.grad(got, leaves[:1])
    want = streaming.amad(teacher, student, variant="kl", kernel="torch")
    (want_grad,) = torch.autograd.grad(want, leaves[:1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.slow
def test_bfloat16_inputs_agree_to_half_precision(tiles_16):
    teacher, student, leaves = make_pair("padded-Ht>Hs")
    half = [x.detach().bfloat16().requires_grad_() for x in leaves]
    student = AttentionInputs(half[0], half[1], student.scaling, bias=student.bias, mask=student.mask,
                              query_mask=student.query_mask)
    teacher = teacher.to(torch.bfloat16)
    got = streaming.amad(teacher, student, variant="kl", kernel="triton")
    grads = torch.autograd.grad(got, half)
    want = streaming.amad(teacher, student, variant="kl", kernel="torch")
    want_grads = torch.autograd.grad(want, half)
    assert got.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=0.0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), rtol=5e-2, atol=5e-2 * w.float().abs().max().item())


# ---- dispatch ----------------------------------------------------------------------------------------
def test_auto_never_uses_the_kernels_on_cpu(monkeypatch):
    teacher, student, _ = make_pair("padded-Ht>Hs")

    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernels were selected for CPU tensors")

    monkeypatch.setattr(_triton_amad, "fused_per_sample", refuse)
    assert not _triton_amad.triton_available(teacher, student, "mse")
    auto = streaming.amad(teacher, student, variant="mse")
    torch.testing.assert_close(auto, streaming.amad(teacher, student, variant="mse", kernel="torch"), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"kernel": "cuda"}, "kernel must be one of"),
        ({"variant": "token"}, "variant 'token' has no fused kernel"),
        ({"float64": True}, "dtype torch.float64"),
        ({"bias_grad": True}, "bias requires a gradient"),
        ({"heads": 65}, "65 heads"),
    ],
)
def test_forced_kernel_refuses_what_it_cannot_do(change, match):
    teacher, student, _ = make_pair("padded-Ht>Hs")
    if change.get("float64"):
        student = student.to(F64)
    if change.get("heads"):
        shape = (2, change["heads"], 20, 3)
        student = AttentionInputs(torch.randn(shape), torch.randn(shape), 1.0)
    if change.get("bias_grad"):
        student.bias = student.bias.clone().requires_grad_()
    kernel = change.get("kernel", "triton")
    with pytest.raises(ValueError, match=match):
        streaming.amad(teacher, student, variant=change.get("variant", "mse"), kernel=kernel)


def test_forced_kernel_on_cpu_needs_the_interpreter(monkeypatch):
    teacher, student, _ = make_pair("padded-Ht>Hs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        streaming.amad(teacher, student, variant="kl", kernel="triton")


def test_amad_fused_is_the_forced_streaming_form(tiles_16):
    teacher, student, _ = make_pair("decoding-causal-Ht<Hs")
    got = streaming.amad(teacher, student, variant="mse", reduction="paper", kernel="triton")
    want = streaming.amad(teacher, student, variant="mse", reduction="paper", kernel="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
