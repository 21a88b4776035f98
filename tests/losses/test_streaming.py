"""Streaming losses (never a whole map) against the materialised losses and a loop reference.

* exactness: the streaming loss and its Student gradients (query, key, bias)
  equal the materialised ones (float64 to 1e-10, float32 to 1e-5), for every map
  loss and option, both reductions, H_s <, ==, > H_t, padding, causal (q != k),
  query masks, biases and block sizes that do and do not divide q;
* an independent per-sample/per-head/per-row loop of the spec's equations,
  with its own softmax of the inputs (not ``AttentionInputs.probs``);
* gradcheck on small float64 cases;
* a dispatch-mode monitor proving no tensor the size of a whole map is ever created.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amad.attention import AttentionInputs
from amad.losses import get, streaming
from amad.losses._blockwise import resolve_block_size

F64 = torch.float64
#: (registered name, options): every map loss with a streaming form, every option that changes the maths.
LOSSES = [
    ("amad-mse", {}),
    ("amad-mse", {"temperature": 0.5}),
    ("amad-s2t", {}),
    ("amad-kl", {}),
    ("amad-kl", {"alignment": "cosine", "temperature": 2.0}),
    ("amad-token", {}),
    ("amad-token", {"alignment": "cosine", "temperature": 0.7}),
    ("one-to-one", {"kind": "mse"}),
    ("one-to-one", {"kind": "kl"}),
    ("head-mean", {"kind": "mse"}),
    ("head-mean", {"kind": "kl"}),
    ("shd", {"temperature": 1.0}),
    ("shd", {"temperature": 2.0}),
]
IDS = [name + "".join(f"-{v}" for v in opts.values()) for name, opts in LOSSES]
#: (masking situation, H_t, H_s): H_s < H_t, ==, >, and (5, 2) for two SHD merge rounds.
CASES = [("padded", 3, 2), ("padded", 2, 2), ("padded", 2, 3), ("padded", 5, 2), ("causal", 3, 2),
         ("causal", 2, 3), ("cross", 5, 2), ("cross", 2, 2), ("plain", 3, 2)]


# ---- inputs ------------------------------------------------------------------------------------------
def scenario(kind: str, heads: int, seed: int, dtype=F64, grad: bool = False) -> AttentionInputs:
    """Random recorded inputs of one layer; ``kind`` picks the masking situation."""
    gen = torch.Generator().manual_seed(seed)
    b, q, k, d = {"plain": (2, 6, 6, 3), "padded": (2, 7, 7, 3), "causal": (2, 5, 7, 3), "cross": (2, 5, 8, 3),
                  "small": (2, 4, 4, 2)}[kind]

    def rand(*shape, scale=1.0):
        x = (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype)
        return x.requires_grad_(grad)

    mask = query_mask = bias = None
    if kind in ("padded", "small"):  # sample 1 is padded by 2 tokens (keys and queries); full per-row bias
        mask = torch.ones(b, 1, 1, k, dtype=torch.bool)
        mask[1, ..., k - 2 :] = False
        query_mask = mask[:, 0, 0, :].clone()
        bias = rand(1, heads, q, k)
    if kind == "causal":  # cached decoding: q < k, causal offset k - q; bias shared by all rows
        bias = rand(1, heads, 1, k)
    if kind == "cross":  # cross-attention with a per-row key mask and one fully masked row
        mask = torch.rand(b, 1, q, k, generator=gen) > 0.3
        mask[0, 0, 1, :] = False
    return AttentionInputs(
        rand(b, heads, q, d, scale=1.5), rand(b, heads, k, d, scale=1.5), d**-0.5,
        value=rand(b, heads, k, 4).detach(), bias=bias, mask=mask, causal=kind == "causal", query_mask=query_mask,
    )


def layer_pair(kind: str, h_t: int, h_s: int, dtype=F64, seed: int = 0):
    return scenario(kind, h_t, seed, dtype).detach(), scenario(kind, h_s, seed + 1, dtype, grad=True)


def student_leaves(student: AttentionInputs) -> list[torch.Tensor]:
    return [x for x in (student.query, student.key, student.bias) if x is not None]


def loss_and_grads(loss, teacher, student, **kwargs):
    value = loss.from_inputs(teacher, student, **kwargs)
    return value, torch.autograd.grad(value, student_leaves(student))


# ---- exactness against the materialised losses ---------------------------------------------------------
@pytest.mark.parametrize("name,options", LOSSES, ids=IDS)
@pytest.mark.parametrize("kind,h_t,h_s", CASES)
def test_streaming_equals_materialised_float64(name, options, kind, h_t, h_s):
    teacher, student = layer_pair(kind, h_t, h_s)
    for reduction in ("paper", "mean"):
        loss = get(name, reduction=reduction, **options)
        want, want_grads = loss_and_grads(loss, teacher, student, streaming=False)
        for block_size in (1, 4, student.q_len, None):  # 4 divides none of q = 5, 6, 7
            got, grads = loss_and_grads(loss, teacher, student, streaming=True, block_size=block_size)
            assert got.dtype == F64 and got.shape == ()
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * w.abs().max().item())


@pytest.mark.parametrize("name,options", LOSSES, ids=IDS)
def test_streaming_equals_materialised_float32(name, options):
    teacher, student = layer_pair("padded", 3, 2, dtype=torch.float32)
    loss = get(name, reduction="mean", **options)
    want, want_grads = loss_and_grads(loss, teacher, student, streaming=False)
    got, grads = loss_and_grads(loss, teacher, student, streaming=True, block_size=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


@pytest.mark.parametrize("name", ["amad-mse", "amad-s2t", "amad-kl", "one-to-one"])
def test_recorded_layout_and_masks_that_mask_nothing(name):
    """Q/K strided as a layer records them ((B, q, H, d) transposed), masks all True: same as no masks."""
    def recorded(x: AttentionInputs, grad: bool, masks: bool) -> AttentionInputs:
        def strided(t):
            return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(grad)

        b, q, k = x.batch_size, x.q_len, x.k_len
        return AttentionInputs(strided(x.query), strided(x.key), x.scaling,
                               mask=torch.ones(b, 1, 1, k, dtype=torch.bool) if masks else None,
                               query_mask=torch.ones(b, q, dtype=torch.bool) if masks else None)

    teacher, student = layer_pair("plain", 3, 2)
    loss = get(name)
    t_plain, s_plain = recorded(teacher, False, False), recorded(student, True, False)
    t_masked, s_masked = recorded(teacher, False, True), recorded(student, True, True)
    assert not s_masked.key.is_contiguous()
    want, want_grads = loss_and_grads(loss, t_plain, s_plain, streaming=False)
    plain, plain_grads = loss_and_grads(loss, t_plain, s_plain, streaming=True, block_size=4)
    got, grads = loss_and_grads(loss, t_masked, s_masked, streaming=True, block_size=4)
    assert torch.equal(got, plain) and all(torch.equal(g, p) for g, p in zip(grads, plain_grads))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * w.abs().max().item())


def test_half_precision_is_computed_in_float32_and_returned_in_half():
    teacher, student = layer_pair("padded", 3, 2, dtype=torch.bfloat16)
    loss = get("amad-mse", reduction="mean")
    got = loss.from_inputs(teacher, student, streaming=True, block_size=3)
    want = loss.from_inputs(teacher, student, streaming=False)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=0.0)


def test_fully_masked_sample_is_finite_and_matches():
    """A sample whose query rows are all padding: zero maps, zero Grams, finite gradients."""
    teacher, student = layer_pair("padded", 3, 2)
    for inputs in (teacher, student):
        inputs.query_mask[1] = False
    for name, options in LOSSES:
        for reduction in ("paper", "mean"):
            loss = get(name, reduction=reduction, **options)
            want, want_grads = loss_and_grads(loss, teacher, student, streaming=False)
            got, grads = loss_and_grads(loss, teacher, student, streaming=True, block_size=2)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
            for g, w in zip(grads, want_grads):
                assert torch.isfinite(g).all()
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ---- independent loop reference of the spec's equations ------------------------------------------------
def ref_probs(x: AttentionInputs) -> torch.Tensor:
    """Softmax over the attendable keys of every row, written out per sample, head and row."""
    b, h, q, _ = x.query.shape
    k = x.key.shape[2]
    bias = None if x.bias is None else x.bias.detach().expand(b, h, q, k)
    mask = None if x.mask is None else x.mask.expand(b, 1, q, k)
    out = torch.zeros(b, h, q, k, dtype=F64)
    for s in range(b):
        for head in range(h):
            for i in range(q):
                logits = x.query[s, head, i].detach() @ x.key[s, head].detach().T * x.scaling
                if bias is not None:
                    logits = logits + bias[s, head, i]
                allowed = torch.ones(k, dtype=torch.bool) if mask is None else mask[s, 0, i].clone()
                if x.causal:
                    allowed &= torch.arange(k) <= i + (k - q)
                if allowed.any():
                    e = torch.exp(logits[allowed] - logits[allowed].max())
                    out[s, head, i, allowed] = e / e.sum()
    return out


def ref_valid(x: AttentionInputs) -> torch.Tensor:
    b, _, q, _ = x.query.shape
    k = x.key.shape[2]
    valid = torch.ones(b, q, k, dtype=torch.bool) if x.mask is None else x.mask[:, 0].expand(b, q, k).clone()
    if x.causal:
        valid &= torch.ones(q, k, dtype=torch.bool).tril(k - q)
    if x.query_mask is not None:
        valid &= x.query_mask[:, :, None]
    return valid


def l2(v):
    n = torch.sqrt((v * v).sum())
    return v / n if n > 0 else torch.zeros_like(v)


def l1(v):
    total = v.sum()
    return v / total if total > 0 else torch.zeros_like(v)


def softmax_list(w):
    e = torch.exp(w - w.max())
    return e / e.sum()


def kl_sum(t, m, eps=1e-7):
    return ((t + eps) * (torch.log(t + eps) - torch.log(m + eps))).sum()


def ref_explained(x_maps, y_maps, temperature):
    """sum_i ||X^_i - l2(sum_j a_ij Y^_j)||^2 with a_i = softmax_j(<X^_i, Y^_j> / temperature)."""
    xs, ys = [l2(m.flatten()) for m in x_maps], [l2(m.flatten()) for m in y_maps]
    total = 0.0
    for x in xs:
        a = softmax_list(torch.stack([x @ y for y in ys]) / temperature)
        total = total + ((x - l2(sum(a[j] * ys[j] for j in range(len(ys))))) ** 2).sum()
    return total


def ref_rows_kl(t_rows, m_rows, valid):
    return sum(kl_sum(l1(t_rows[r])[valid[r]], l1(m_rows[r])[valid[r]]) for r in range(valid.shape[0]))


def ref_kl(t_maps, s_maps, valid, alignment, temperature):
    t1, s1 = [l1(m.flatten()) for m in t_maps], [l1(m.flatten()) for m in s_maps]
    sim_t = t1 if alignment == "l1" else [l2(m.flatten()) for m in t_maps]
    sim_s = s1 if alignment == "l1" else [l2(m.flatten()) for m in s_maps]
    total = 0.0
    for i in range(len(t_maps)):
        a = softmax_list(torch.stack([sim_t[i] @ y for y in sim_s]) / temperature)
        m = sum(a[j] * s1[j] for j in range(len(s1))).reshape(valid.shape)
        total = total + ref_rows_kl(t1[i].reshape(valid.shape), m, valid)
    return total


def ref_token(t_maps, s_maps, valid, alignment, temperature):
    total = 0.0
    for r in range(valid.shape[0]):
        t1, s1 = [l1(m[r]) for m in t_maps], [l1(m[r]) for m in s_maps]
        sim_t = t1 if alignment == "l1" else [l2(m[r]) for m in t_maps]
        sim_s = s1 if alignment == "l1" else [l2(m[r]) for m in s_maps]
        for i in range(len(t_maps)):
            a = softmax_list(torch.stack([sim_t[i] @ y for y in sim_s]) / temperature)
            m = l1(sum(a[j] * s1[j] for j in range(len(s1))))
            total = total + kl_sum(t1[i][valid[r]], m[valid[r]])
    return total


def ref_squeeze(maps, values, h_s):
    """SHD rounds: merge pairs (0,1),(2,3),... min(H//2, H-H_s) of them, alpha = <DX_p, DY>/||DY||^2."""
    heads = [(maps[h], values[h]) for h in range(len(maps))]
    while len(heads) > h_s:
        pairs = min(len(heads) // 2, len(heads) - h_s)
        merged = []
        for i in range(pairs):
            (a_p, x_p), (a_q, x_q) = heads[2 * i], heads[2 * i + 1]
            d, y = a_p - a_q, x_p + x_q
            num, den = ((d @ x_p) * (d @ y)).sum(), ((d @ y) ** 2).sum()
            alpha = min(max((num / den).item(), 0.0), 1.0) if den > 0 else 0.5
            merged.append((alpha * a_p + (1 - alpha) * a_q, y))
        heads = merged + heads[2 * pairs :]
    return [a for a, _ in heads]


def ref_soften(rows, temperature):
    out = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        pos = rows[r] > 0
        if pos.any():
            out[r, pos] = softmax_list(torch.log(rows[r, pos]) / temperature)
    return out


def ref_sample(name, options, t, s, valid):
    """(sum of element losses of one sample, number of heads the reduction counts)."""
    h = min(len(t), len(s))
    temperature = options.get("temperature", 1.0)
    if name == "amad-mse":
        return ref_explained(t, s, temperature), len(t)
    if name == "amad-s2t":
        return ref_explained(s, t, temperature), len(s)
    if name == "amad-kl":
        return ref_kl(t, s, valid, options.get("alignment", "l1"), temperature), len(t)
    if name == "amad-token":
        return ref_token(t, s, valid, options.get("alignment", "l1"), temperature), len(t)
    if name == "one-to-one" and options["kind"] == "mse":
        return sum(((l2(t[j].flatten()) - l2(s[j].flatten())) ** 2).sum() for j in range(h)), h
    if name == "one-to-one":
        return sum(ref_rows_kl(t[j], s[j], valid) for j in range(h)), h
    if name == "head-mean" and options["kind"] == "mse":
        return ((t.mean(0) - s.mean(0)) ** 2).sum(), 1
    if name == "head-mean":
        return ref_rows_kl(t.mean(0), s.mean(0), valid), 1
    raise AssertionError(name)


def reference(name, options, teacher, student, reduction):
    t_all, s_all = ref_probs(teacher), ref_probs(student)
    valid = ref_valid(teacher) & ref_valid(student)
    totals, counts = [], []
    for b in range(t_all.shape[0]):
        t, s = t_all[b] * valid[b], s_all[b] * valid[b]
        if name == "shd":
            if len(s) < len(t):
                t = torch.stack(ref_squeeze(t, teacher.value[b], len(s)))
            t = torch.stack([ref_soften(m, options["temperature"]) for m in t])
            h = min(len(t), len(s))
            total, heads = sum(ref_rows_kl(t[j], s[j], valid[b]) for j in range(h)), h
        else:
            total, heads = ref_sample(name, options, t, s, valid[b])
        totals.append(total)
        counts.append(int(valid[b].sum()))
    q, k = valid.shape[1:]
    if reduction == "paper":
        return sum(totals) / (len(totals) * heads * q * k)
    per = [total / (heads * c) for total, c in zip(totals, counts) if c > 0]
    return sum(per) / len(per)


@pytest.mark.parametrize("name,options", LOSSES, ids=IDS)
@pytest.mark.parametrize("kind,h_t,h_s", [("padded", 3, 2), ("causal", 2, 3), ("cross", 5, 2)])
def test_streaming_matches_loop_reference(name, options, kind, h_t, h_s):
    teacher, student = layer_pair(kind, h_t, h_s, seed=3)
    for reduction in ("paper", "mean"):
        got = get(name, reduction=reduction, **options).from_inputs(teacher, student, streaming=True, block_size=2)
        want = reference(name, options, teacher, student, reduction)
        torch.testing.assert_close(got, torch.as_tensor(want, dtype=F64), rtol=1e-10, atol=1e-14)


# ---- gradcheck ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", LOSSES, ids=IDS)
def test_gradcheck(name, options):
    teacher = scenario("small", 3, 11).detach()
    student = scenario("small", 2, 12, grad=True)
    loss = get(name, reduction="mean", **options)

    def fn(query, key, bias):
        inputs = AttentionInputs(query, key, student.scaling, bias=bias, mask=student.mask,
                                 query_mask=student.query_mask)
        return loss.from_inputs(teacher, inputs, streaming=True, block_size=3)

    assert torch.autograd.gradcheck(fn, tuple(student_leaves(student)), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---- no whole map is ever created -----------------------------------------------------------------------
class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) any operator returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def long_layer_pair(h_t: int = 4, h_s: int = 3, q: int = 64, d: int = 4):
    gen = torch.Generator().manual_seed(5)

    def inputs(heads, grad):
        mask = torch.ones(1, 1, 1, q, dtype=torch.bool)
        mask[..., -3:] = False
        return AttentionInputs(
            torch.randn(1, heads, q, d, generator=gen, dtype=F64).requires_grad_(grad),
            torch.randn(1, heads, q, d, generator=gen, dtype=F64).requires_grad_(grad),
            d**-0.5, value=torch.randn(1, heads, q, d, generator=gen, dtype=F64),
            bias=torch.randn(1, heads, 1, q, generator=gen, dtype=F64).requires_grad_(grad), mask=mask, causal=True,
        )

    return inputs(h_t, False), inputs(h_s, True)


@pytest.mark.parametrize("name,options", LOSSES, ids=IDS)
def test_no_whole_map_is_materialised(name, options):
    teacher, student = long_layer_pair()
    block = 8
    full_student_map = student.batch_size * student.num_heads * student.q_len * student.k_len * 8
    one_block = student.batch_size * teacher.num_heads * block * student.k_len * 8
    loss = get(name, reduction="mean", **options)
    with LargestAllocation() as monitor:
        loss.from_inputs(teacher, student, streaming=True, block_size=block).backward()
    assert 0 < monitor.largest <= one_block < full_student_map / 4
    with LargestAllocation() as materialised:  # the monitor does see whole maps when they exist
        loss.from_inputs(teacher, student, streaming=False).backward()
    assert materialised.largest >= full_student_map


# ---- errors and block sizes --------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [0, -2, 2.5, True, "8"])
def test_bad_block_size_is_a_clear_error(block_size):
    teacher, student = layer_pair("plain", 3, 2)
    with pytest.raises(ValueError, match="block_size"):
        streaming.amad(teacher, student, block_size=block_size)


def test_default_block_size_fits_the_entry_budget():
    teacher, student = layer_pair("plain", 3, 2)
    assert resolve_block_size(None, teacher, student) >= student.q_len  # tiny maps: one block
    big_t = AttentionInputs(torch.zeros(1, 12, 1, 8), torch.zeros(1, 12, 16384, 8), 1.0)
    big_s = AttentionInputs(torch.zeros(1, 8, 1, 8), torch.zeros(1, 8, 16384, 8), 1.0)
    rows = resolve_block_size(None, big_t, big_s)
    assert rows >= 1 and rows * 12 * 16384 <= 2**22


def test_mismatched_pairs_and_bad_inputs_are_clear_errors():
    teacher, student = layer_pair("plain", 3, 2)
    short = AttentionInputs(student.query[:, :, :4], student.key, student.scaling)
    with pytest.raises(ValueError, match=r"\(2, 3, 6, 6\).*\(2, 2, 4, 6\)"):
        streaming.amad(teacher, short)
    with pytest.raises(TypeError, match="AttentionInputs"):
        streaming.one_to_one(teacher, student.probs())
    with pytest.raises(ValueError, match="variant"):
        streaming.amad(teacher, student, variant="projected")
    with pytest.raises(ValueError, match="kind"):
        streaming.head_mean(teacher, student, kind="l2")
    nan_student = AttentionInputs(student.query.detach() * math.nan, student.key, student.scaling)
    with pytest.raises(ValueError, match=r"Student query \(2, 2, 6, 3\) contains NaN"):
        streaming.amad(teacher, nan_student)
    huge = AttentionInputs(student.query.detach().half() * 1e3, student.key.half() * 1e3, 1.0)  # logits overflow
    with pytest.raises(ValueError, match="logits overflow"):
        streaming.amad(teacher.to(torch.float16), huge)
    with pytest.raises(ValueError, match="value=None"):
        streaming.shd(AttentionInputs(teacher.query, teacher.key, teacher.scaling), student)
    with pytest.raises(ValueError, match=r"Teacher values .*\(2, 3, 5, 4\)"):
        streaming.shd(AttentionInputs(teacher.query, teacher.key, 1.0, value=teacher.value[:, :, :5]), student)
