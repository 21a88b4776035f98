"""Distiller: one distillation step on every family, the frozen Teacher, alpha, streaming, layers, loss options.

Tiny models from ``model_factories`` (no downloads, dropout off): the Teacher has
4 heads, the Student 2, unless a test says otherwise. Reference values are
computed here independently (recorded inputs + the loss's own function, or the
KD formula written out), not read back from the Distiller.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import amad.distiller as distiller_module
from amad import AttentionRecorder, Distiller
from amad.attention import AttentionInputs
from amad.capture.layers import attention_layers
from amad.losses import get as get_loss
from model_factories import (
    FAMILIES,
    causal_lm_batch,
    seq2seq_batch,
    teacher_and_student,
    text_classification_batch,
    token_ids,
    vit,
)

#: First component of the parameter names of query/key projections (fused ones count as both).
QUERY_KEY_PROJECTIONS = {"query", "key", "q_proj", "k_proj", "q", "k", "qkv", "c_attn"}
STREAMING_LOSSES = ["amad-mse", "amad-kl", "amad-token", "one-to-one", "head-mean", "shd"]


def term_name(pair: tuple[str, str]) -> str:
    return f"attn[{pair[0]}->{pair[1]}]"


def layer(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def query_key_parameters(attention: nn.Module) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in attention.named_parameters() if n.split(".")[0] in QUERY_KEY_PROJECTIONS}
    firsts = {n.split(".")[0] for n in params}
    assert firsts & {"qkv", "c_attn"} or len(firsts) == 2, f"no query and key projections among {list(params)}"
    return params


def assert_finite(value: Tensor, what: str) -> None:
    assert value.dim() == 0 and torch.isfinite(value), f"{what}: {value}"


def recorded_inputs(model: nn.Module, name: str, batch: dict, *, grad: bool) -> AttentionInputs:
    with AttentionRecorder(model, name) as rec, torch.set_grad_enabled(grad):
        model(**batch)
    return rec.inputs(name)


# -- one step on every family --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_step_trains_every_distilled_layer_and_never_the_teacher(family: str) -> None:
    teacher, student = teacher_and_student(family)
    teacher.train()  # the Distiller must put it in eval mode anyway
    distiller = Distiller(teacher, student).train()
    assert not any(m.training for m in teacher.modules()) and student.training

    t_stacks, s_stacks = attention_layers(teacher), attention_layers(student)
    stacks = FAMILIES[family].stacks
    assert distiller.layer_pairs == [(t_stacks[key][-1], s_stacks[key][-1]) for key in stacks]

    out = distiller(**FAMILIES[family].batch())
    assert set(out.losses) == {"kd"} | {term_name(pair) for pair in distiller.layer_pairs}
    assert_finite(out.loss, "total loss")
    torch.testing.assert_close(out.loss, torch.stack(list(out.losses.values())).sum())
    for name, value in out.losses.items():
        assert_finite(value, name)
        assert value > 0, f"{family} {name} = {value}: a trivial term"

    for pair in distiller.layer_pairs:  # each attention term alone reaches its Student layer's queries and keys
        params = query_key_parameters(layer(student, pair[1]))
        grads = torch.autograd.grad(out.losses[term_name(pair)], list(params.values()), retain_graph=True)
        for (name, _), grad in zip(params.items(), grads):
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{family} {pair[1]}.{name}: no gradient"

    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for pair in distiller.layer_pairs
               for p in query_key_parameters(layer(student, pair[1])).values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_teacher_identical_to_student_gives_zero_one_to_one_terms(family: str) -> None:
    """Both models are fed the same batch the same way (ViLT: the same random order of image patches)."""
    _, student = teacher_and_student(family, student_heads=4, dtype=torch.float64)
    distiller = Distiller(copy.deepcopy(student), student, attention_loss="one-to-one", alpha=1.0).train()
    out = distiller(**FAMILIES[family].batch())
    for pair in distiller.layer_pairs:  # (misaligned ViLT patches give ~4e-7 here)
        assert abs(out.losses[term_name(pair)].item()) < 1e-12, f"{family} {pair}: {out.losses[term_name(pair)]}"


# -- the frozen Teacher --------------------------------------------------------------------------------------------


def test_teacher_is_not_a_parameter_or_state_and_moves_with_to() -> None:
    teacher, student = teacher_and_student("bert")
    distiller = Distiller(teacher, student, attention_loss="amad-projected", attention_loss_options={"n": 49})
    teacher_params = {id(p) for p in teacher.parameters()}
    params = {id(p) for p in distiller.parameters()}
    projection = distiller.attention_losses[0].projection
    assert params == {id(p) for p in student.parameters()} | {id(projection.weight), id(projection.bias)}
    assert not params & teacher_params
    state = distiller.state_dict()
    assert all(k.startswith(("student.", "attention_losses.", "alpha", "_alpha")) for k in state), list(state)
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    assert not {v.data_ptr() for v in state.values()} & teacher_storage

    assert distiller.to(torch.float64) is distiller
    for model in (teacher, student):
        assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert projection.weight.dtype == torch.float64
    distiller.eval().train()
    assert not teacher.training and student.training
    out = distiller(**text_classification_batch())
    assert out.loss.dtype == torch.float64 and all(v.dtype == torch.float64 for v in out.losses.values())


# -- alpha ---------------------------------------------------------------------------------------------------------


def raw_terms(teacher: nn.Module, student: nn.Module, batch: dict) -> dict[str, Tensor]:
    """The unweighted attention terms and KD of a batch (alpha = 1 Distiller on the same models)."""
    with torch.no_grad():
        return Distiller(teacher, student, alpha=1.0)(**batch).losses


def test_loss_ratio_alpha_matches_kd_on_the_first_batch_then_stays_frozen() -> None:
    """The former rule, kept as alpha="loss-ratio" (alpha="auto" is tested in test_weighting.py)."""
    teacher, student = teacher_and_student("t5")
    distiller = Distiller(teacher, student, alpha="loss-ratio", alpha_batches=1)
    first, second = seq2seq_batch(), seq2seq_batch(target_length=4)
    second["input_ids"] = second["input_ids"].flip(1)

    distiller.eval()
    distiller(**first)  # not measured outside training
    assert not distiller.alpha_frozen and torch.equal(distiller.alpha, torch.zeros(3, dtype=torch.float64))

    distiller.train()
    out = distiller(**first)
    assert distiller.alpha_frozen
    for pair in distiller.layer_pairs:
        torch.testing.assert_close(out.losses[term_name(pair)], out.losses["kd"], rtol=1e-5, atol=0)
    frozen = distiller.alpha.clone()
    assert (frozen > 0).all()
    assert distiller.alpha_report() == {term_name(p): float(a) for p, a in zip(distiller.layer_pairs, frozen)}
    out.loss.backward()
    torch.optim.SGD(student.parameters(), lr=0.5).step()

    out = distiller(**second)
    assert torch.equal(distiller.alpha, frozen)
    raw = raw_terms(teacher, student, second)
    for pair, alpha in zip(distiller.layer_pairs, frozen):
        torch.testing.assert_close(out.losses[term_name(pair)].detach(), alpha.float() * raw[term_name(pair)])
        assert not torch.isclose(out.losses[term_name(pair)], out.losses["kd"], rtol=1e-3)


def test_numeric_and_list_alpha_weigh_the_terms() -> None:
    teacher, student = teacher_and_student("t5")
    batch = seq2seq_batch()
    raw = raw_terms(teacher, student, batch)
    for alpha in (0.25, [0.5, 2.0, 3.0]):
        distiller = Distiller(teacher, student, alpha=alpha)
        weights = [alpha] * 3 if isinstance(alpha, float) else alpha
        assert distiller.alpha.tolist() == weights
        out = distiller(**batch)
        for pair, weight in zip(distiller.layer_pairs, weights):
            torch.testing.assert_close(out.losses[term_name(pair)].detach(), weight * raw[term_name(pair)])
        torch.testing.assert_close(out.losses["kd"].detach(), raw["kd"])


def test_bad_alpha_is_a_clear_error() -> None:
    teacher, student = teacher_and_student("t5")
    with pytest.raises(ValueError, match=r"alpha: 2 values for 3 layer pairs"):
        Distiller(teacher, student, alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"'automatic'"):
        Distiller(teacher, student, alpha="automatic")
    with pytest.raises(ValueError, match="alpha_batches"):
        Distiller(teacher, student, alpha_batches=0)


def test_loss_ratio_alpha_over_two_batches_is_the_ratio_of_their_sums() -> None:
    teacher, student = teacher_and_student("bert")
    batches = [text_classification_batch(), text_classification_batch(padded=False)]
    raws = [raw_terms(teacher, student, b) for b in batches]
    distiller = Distiller(teacher, student, alpha="loss-ratio", alpha_batches=2).train()
    name = term_name(distiller.layer_pairs[0])

    distiller(**batches[0])
    assert not distiller.alpha_frozen  # estimate so far: the first batch alone
    torch.testing.assert_close(distiller.alpha[0].float(), raws[0]["kd"] / raws[0][name])
    distiller(**batches[1])
    assert distiller.alpha_frozen
    want = (raws[0]["kd"] + raws[1]["kd"]) / (raws[0][name] + raws[1][name])
    torch.testing.assert_close(distiller.alpha[0].float(), want)
    distiller(**batches[0])
    torch.testing.assert_close(distiller.alpha[0].float(), want)


# -- streaming == materialised -------------------------------------------------------------------------------------


def rows_per_probs_call(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on AttentionInputs.probs: how many query rows each call materialised."""
    calls: list[int] = []
    real = AttentionInputs.probs

    def spy(self: AttentionInputs, start: int = 0, stop: int | None = None) -> Tensor:
        calls.append((self.q_len if stop is None else stop) - start)
        return real(self, start, stop)

    monkeypatch.setattr(AttentionInputs, "probs", spy)
    return calls


@pytest.mark.parametrize("family", ["bert", "t5"])
@pytest.mark.parametrize("loss", STREAMING_LOSSES)
def test_streaming_and_materialised_give_the_same_loss_and_gradients(
    loss: str, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, student = teacher_and_student(family, dtype=torch.float64)
    batch = FAMILIES[family].batch(padded=True)
    calls = rows_per_probs_call(monkeypatch)
    found = []
    for streaming in (True, False):
        calls.clear()
        student.zero_grad()
        distiller = Distiller(teacher, student, attention_loss=loss, alpha=0.7, streaming=streaming, block_size=2)
        out = distiller(**batch)
        out.loss.backward()
        # streaming: never more than a block of 2 query rows at once; materialised: whole maps (q >= 5)
        assert (max(calls) <= 2) if streaming else (max(calls) >= 5), f"query rows per probs() call: {calls}"
        found.append((out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (streamed, streamed_grads), (materialised, materialised_grads) = found
    assert streamed.loss.dtype == torch.float64
    for name in materialised.losses:
        torch.testing.assert_close(streamed.losses[name], materialised.losses[name], rtol=1e-10, atol=1e-12)
    assert streamed_grads.keys() == materialised_grads.keys()
    for pair in streamed_grads:
        torch.testing.assert_close(streamed_grads[pair], materialised_grads[pair], rtol=1e-8, atol=1e-12)


def test_cross_attention_rows_do_not_take_the_key_padding_when_q_equals_k() -> None:
    """T5 with source and target of equal length: decoder rows are real even where the source is padding."""
    teacher, student = teacher_and_student("t5", dtype=torch.float64)
    source, source_mask = token_ids(2, 5, pad_from=3)
    target, _ = token_ids(2, 5, seed=2)
    batch = {"input_ids": source, "attention_mask": source_mask, "labels": target}
    distiller = Distiller(teacher, student, alpha=1.0)
    cross = next(pair for pair in distiller.layer_pairs if "EncDecAttention" in pair[0])
    got = distiller(**batch).losses[term_name(cross)]
    t_in = recorded_inputs(teacher, cross[0], batch, grad=False)
    s_in = recorded_inputs(student, cross[1], batch, grad=True)
    assert t_in.query_mask is None and s_in.query_mask is None  # every decoder row is real here
    torch.testing.assert_close(got, get_loss("amad-mse").from_inputs(t_in, s_in), rtol=1e-12, atol=0)


# -- layers --------------------------------------------------------------------------------------------------------


def test_uniform_layers_pair_every_student_layer() -> None:
    teacher, student = teacher_and_student("bert", teacher_layers=4, student_layers=2)
    distiller = Distiller(teacher, student, layers="uniform", alpha=1.0)
    name = "bert.encoder.layer.{}.attention.self".format
    assert distiller.layer_pairs == [(name(1), name(0)), (name(3), name(1))]
    out = distiller(**text_classification_batch())
    assert set(out.losses) == {"kd", f"attn[{name(1)}->{name(0)}]", f"attn[{name(3)}->{name(1)}]"}
    for pair in distiller.layer_pairs:
        params = list(query_key_parameters(layer(student, pair[1])).values())
        grads = torch.autograd.grad(out.losses[term_name(pair)], params, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), pair


def test_explicit_pairs_are_used_as_given() -> None:
    teacher, student = teacher_and_student("bert", teacher_layers=3)
    pairs = [("bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"),
             ("bert.encoder.layer.2.attention.self", "bert.encoder.layer.0.attention.self")]
    distiller = Distiller(teacher, student, layers=pairs, alpha=1.0)
    assert distiller.layer_pairs == pairs
    batch = text_classification_batch()
    out = distiller(**batch)
    for t_name, s_name in pairs:
        t_in = recorded_inputs(teacher, t_name, batch, grad=False)
        s_in = recorded_inputs(student, s_name, batch, grad=True)
        want = get_loss("amad-mse").from_inputs(t_in, s_in, streaming=False)
        torch.testing.assert_close(out.losses[term_name((t_name, s_name))].detach(), want.detach())


def test_bad_layer_names_are_clear_errors() -> None:
    teacher, student = teacher_and_student("bert")
    good = "bert.encoder.layer.1.attention.self"
    with pytest.raises(ValueError, match=r"Teacher \(BertForSequenceClassification\) has no module named "
                                         r"'bert.encoder.layer.7.attention.self'"):
        Distiller(teacher, student, layers=[("bert.encoder.layer.7.attention.self", good)])
    with pytest.raises(ValueError, match=r"Student \(BertForSequenceClassification\) has no module named 'nope'"):
        Distiller(teacher, student, layers=[(good, "nope")])
    with pytest.raises(ValueError, match=r"Student module 'bert.encoder.layer.1.attention' .*not a recordable"):
        Distiller(teacher, student, layers=[(good, "bert.encoder.layer.1.attention")])
    with pytest.raises(ValueError, match="'last', 'uniform'"):
        Distiller(teacher, student, layers="every")


def test_maps_of_different_shapes_are_a_clear_error_naming_both_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    teacher, student = vit(2, 4, patch_size=4), vit(2, 2, patch_size=2)  # 1 + 4 vs 1 + 16 tokens
    with pytest.raises(ValueError, match="patch_size is 4 in the teacher but 2 in the student"):
        Distiller(teacher, student)  # the configs already say it
    monkeypatch.setattr(distiller_module, "_checked_pair", lambda t, s: None)  # models whose configs do not say it
    distiller = Distiller(teacher, student)
    pattern = (r"Teacher layer 'vit.layers.1.attention' vs Student layer 'vit.layers.1.attention'.*"
               r"\(2, 4, 5, 5\).*\(2, 2, 17, 17\)")
    with pytest.raises(ValueError, match=pattern):
        distiller(**FAMILIES["vit"].batch())


# -- the objective's other parts -----------------------------------------------------------------------------------


def reference_classification_kd(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over samples of CE(softmax(z_T), log_softmax(z_S)), tau = 1."""
    values = [-(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum() for s, t in zip(student_logits, teacher_logits)]
    return torch.stack(values).mean()


def test_without_attention_loss_it_is_kd_only_and_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_recorder(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("attention_loss=None must not record attention")

    monkeypatch.setattr(distiller_module, "AttentionRecorder", no_recorder)
    teacher, student = teacher_and_student("bert")
    distiller = Distiller(teacher, student, attention_loss=None, alpha=0.3)
    assert distiller.layer_pairs == [] and len(distiller.attention_losses) == 0
    batch = text_classification_batch()
    out = distiller(**batch)
    assert set(out.losses) == {"kd"}
    with torch.no_grad():
        want = reference_classification_kd(student(**batch).logits, teacher(**batch).logits)
    torch.testing.assert_close(out.loss.detach(), want)
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_ground_truth_term_adds_the_students_own_loss() -> None:
    teacher, student = teacher_and_student("bert")
    batch = text_classification_batch()
    distiller = Distiller(teacher, student, alpha=0.5, gt_weight=0.25)
    out = distiller(**batch)
    with torch.no_grad():
        own = student(**batch).loss
    torch.testing.assert_close(out.losses["gt"].detach(), 0.25 * own)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    assert set(out.losses) == {"kd", "gt", term_name(distiller.layer_pairs[0])}
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="gt_weight > 0 needs a Student that returns `.loss`"):
        distiller(**unlabeled)


def test_output_loss_override_replaces_logit_kd() -> None:
    teacher, student = teacher_and_student("bert")
    calls = []

    def embedding_loss(student_outputs: Any, teacher_outputs: Any, batch: dict) -> Tensor:
        calls.append((student_outputs, teacher_outputs, batch))
        return ((student_outputs.logits - teacher_outputs.logits) ** 2).mean()

    distiller = Distiller(teacher, student, attention_loss=None, output_loss=embedding_loss, kd_weight=2.0)
    batch = text_classification_batch()
    out = distiller(**batch)
    assert len(calls) == 1 and calls[0][0] is out.student_outputs and calls[0][1] is out.teacher_outputs
    assert calls[0][2].keys() == batch.keys()
    want = 2.0 * ((out.student_outputs.logits - out.teacher_outputs.logits) ** 2).mean()
    torch.testing.assert_close(out.losses["kd"], want)


def reference_sequence_kd(student_logits: Tensor, teacher_logits: Tensor, valid: Tensor) -> Tensor:
    """Per sample, the CE of every valid token summed; mean over samples."""
    per_sample = []
    for s_seq, t_seq, v_seq in zip(student_logits, teacher_logits, valid):
        ce = [-(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum() for s, t, v in zip(s_seq, t_seq, v_seq) if v]
        per_sample.append(torch.stack(ce).sum())
    return torch.stack(per_sample).mean()


def padded_and_trimmed(case: str) -> tuple[dict, dict, int]:
    """A one-sample batch padded to 7 (target 5 for T5), the same sample without padding, its real length."""
    if case == "t5-labels":
        one = {k: v[-1:] for k, v in seq2seq_batch(padded=True).items()}
        source, target = int(one["attention_mask"].sum()), int((one["labels"] != -100).sum())
        lengths = {"input_ids": source, "attention_mask": source, "labels": target, "decoder_attention_mask": target}
        return one, {k: v[:, : lengths[k]] for k, v in one.items()}, target
    one = {k: v[-1:] for k, v in causal_lm_batch(padded=True).items()}
    if case == "gpt2-mask-only":
        del one["labels"]
    real = int(one["attention_mask"].sum())
    return one, {k: v[:, :real] for k, v in one.items()}, real


@pytest.mark.parametrize("case", ["gpt2-labels", "gpt2-mask-only", "t5-labels"])
def test_logit_kd_ignores_padding_tokens(case: str) -> None:
    teacher, student = teacher_and_student(case.split("-")[0], dtype=torch.float64)
    padded, trimmed, real = padded_and_trimmed(case)
    distiller = Distiller(teacher, student, attention_loss=None)
    kd_padded = distiller(**padded).losses["kd"]
    out = distiller(**trimmed)
    torch.testing.assert_close(kd_padded, out.losses["kd"], rtol=1e-10, atol=0)
    s_logits, t_logits = out.student_outputs.logits, out.teacher_outputs.logits
    assert s_logits.shape[1] == real < padded.get("labels", padded["input_ids"]).shape[1]
    want = reference_sequence_kd(s_logits, t_logits, torch.ones(s_logits.shape[:2], dtype=torch.bool))
    torch.testing.assert_close(out.losses["kd"], want)


# -- losses that need options or parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "options"), [("minilm-relations", {"num_relation_heads": 2}),
                                               ("amad-projected", {"n": 49})])
def test_losses_with_options_work_inside_the_distiller(loss: str, options: dict) -> None:
    teacher, student = teacher_and_student("bert")  # hidden 16 vs 8: 2 relation heads divide both
    distiller = Distiller(teacher, student, attention_loss=loss, attention_loss_options=options, alpha=1.0)
    assert distiller.attention_losses[0].options.items() >= {k: v for k, v in options.items() if k != "n"}.items()
    batch = text_classification_batch()
    out = distiller(**batch)
    pair = distiller.layer_pairs[0]
    term = out.losses[term_name(pair)]
    assert_finite(term, loss)
    t_in = recorded_inputs(teacher, pair[0], batch, grad=False)
    s_in = recorded_inputs(student, pair[1], batch, grad=True)
    torch.testing.assert_close(term.detach(), get_loss(loss, **options).from_inputs(t_in, s_in).detach())
    params = list(query_key_parameters(layer(student, pair[1])).values())
    extra = list(distiller.attention_losses.parameters())
    grads = torch.autograd.grad(term, params + extra)
    assert all(g.abs().sum() > 0 for g in grads)
    assert len(extra) == (2 if loss == "amad-projected" else 0)


def test_projected_amad_with_the_wrong_n_is_a_clear_error() -> None:
    teacher, student = teacher_and_student("bert")
    distiller = Distiller(teacher, student, attention_loss="amad-projected", attention_loss_options={"n": 50})
    with pytest.raises(ValueError, match=r"built for n = q\*k = 50.*q=7, k=7"):
        distiller(**text_classification_batch())
