"""alpha="auto" (gradient-norm balance), alpha="loss-ratio", alpha="paper" and the balance warning.

Reference values are computed here independently: gradients with plain ``torch.autograd.grad`` over the
Student's parameters in float64 arithmetic, not read back from :mod:`amad.weighting`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import TrainingArguments

import amad.weighting as weighting
from amad import DistillationTrainer, Distiller
from amad.losses import get as get_loss
from amad.losses.base import AttentionLoss
from amad.weighting import AlphaImbalanceWarning
from model_factories import VOCAB, seq2seq_batch, teacher_and_student

LENGTHS = (3, 16, 5, 12, 8, 14, 4, 10)  # one batch per length: long and short batches


def classification_batch(length: int, seed: int, size: int = 4) -> dict:
    """``size`` sequences padded to ``length`` (the first one full length, the others random lengths >= 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, length), generator=g)
    lengths = torch.randint(2, length + 1, (size,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.arange(size) % 3}


def bert_batches() -> list[dict]:
    return [classification_batch(length, seed=i) for i, length in enumerate(LENGTHS)]


def by_length(batches: list[dict]) -> list[dict]:
    """Longest first, as a length-grouped sampler serves them."""
    return sorted(batches, key=lambda b: -int(b["attention_mask"].sum()))


def shared_norms(reference: Tensor, term: Tensor, params: list[nn.Parameter]) -> tuple[float, float]:
    """||dR/d theta|| and ||dL/d theta|| over the parameters both reach (reference computation)."""
    g_ref = torch.autograd.grad(reference, params, retain_graph=True, allow_unused=True)
    g_term = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    both = [(a.double(), b.double()) for a, b in zip(g_ref, g_term) if a is not None and b is not None]
    return (float(sum((a * a).sum() for a, _ in both).sqrt()), float(sum((b * b).sum() for _, b in both).sqrt()))


def measured_alpha(batches: list[dict], *, learning_rate: float = 0.0, **options: Any) -> Tensor:
    """alpha of a fresh Distiller (the same tiny BERT pair each time) measured on ``batches``.

    ``learning_rate`` 0: :meth:`Distiller.calibrate_alpha` (no training, as the DistillationTrainer does);
    otherwise measured while training with SGD steps in between (a Distiller used without the Trainer).
    """
    teacher, student = teacher_and_student("bert")
    distiller = Distiller(teacher, student, alpha_batches=len(batches), **options).train()
    if not learning_rate:
        distiller.calibrate_alpha(batches)
    optimizer = torch.optim.SGD(student.parameters(), lr=learning_rate or 1.0)
    for batch in batches if learning_rate else []:
        distiller(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert distiller.alpha_frozen
    return distiller.alpha.clone()


# -- the rule ------------------------------------------------------------------------------------------------------


def test_auto_alpha_is_the_ratio_of_mean_shared_gradient_norms() -> None:
    """T5: three pairs, each reaching other Student parameters; r = 0.5; two batches."""
    teacher, student = teacher_and_student("t5", dtype=torch.float64)
    batches = [seq2seq_batch(), seq2seq_batch(padded=False, target_length=4)]
    reference = Distiller(teacher, copy.deepcopy(student), alpha=1.0)
    params = [p for p in reference.student.parameters() if p.requires_grad]
    sums = torch.zeros(2, 3, dtype=torch.float64)
    for batch in batches:
        out = reference(**batch)
        for l, pair in enumerate(reference.layer_pairs):
            term = out.losses[f"attn[{pair[0]}->{pair[1]}]"]
            sums[:, l] += torch.tensor(shared_norms(out.losses["kd"], term, params), dtype=torch.float64)
    distiller = Distiller(teacher, student, alpha_batches=2, alpha_ratio=0.5).train()
    for batch in batches:
        distiller(**batch)
    assert distiller.alpha_frozen and int(distiller._alpha_seen) == 2
    torch.testing.assert_close(distiller.alpha, 0.5 * sums[0] / sums[1], rtol=1e-10, atol=0)
    balance = distiller.alpha_balance()
    assert list(balance.values()) == pytest.approx([0.5] * 3, rel=1e-10)


def test_one_measuring_batch_leaves_grad_untouched_and_uses_the_estimate_so_far() -> None:
    teacher, student = teacher_and_student("bert")
    batch = classification_batch(6, seed=0)
    distiller = Distiller(teacher, student, alpha_batches=3).train()
    out = distiller(**batch)
    assert all(p.grad is None for p in student.parameters())
    assert not distiller.alpha_frozen and (distiller.alpha > 0).all()
    name = distiller._term_name(0)
    with torch.no_grad():
        raw = Distiller(teacher, student, alpha=1.0).eval()(**batch).losses[name]
    torch.testing.assert_close(out.losses[name].detach(), distiller.alpha[0].float() * raw)


def test_calibration_runs_without_autocast_and_keeps_the_random_state() -> None:
    batches = bert_batches()[:2]
    plain = measured_alpha(batches)
    teacher, student = teacher_and_student("bert")
    for module in student.modules():  # dropout draws random numbers during the measuring forward
        if isinstance(module, nn.Dropout):
            module.p = 0.1
    distiller = Distiller(teacher, student, alpha_batches=2)
    state = torch.random.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distiller.calibrate_alpha(batches)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = measured_alpha(batches)
    torch.testing.assert_close(in_autocast, plain, rtol=1e-6, atol=0)


# -- (a) batch order -----------------------------------------------------------------------------------------------


def test_auto_alpha_does_not_depend_on_batch_order_but_the_first_batch_rule_does() -> None:
    batches = bert_batches()
    orders = {"given": batches, "longest first": by_length(batches), "reversed": batches[::-1]}
    calibrated = {name: measured_alpha(order) for name, order in orders.items()}
    training = {name: measured_alpha(order, learning_rate=0.01) for name, order in orders.items()}
    first = {name: measured_alpha(order[:1], alpha="loss-ratio") for name, order in orders.items()}
    for name in orders:
        # the same 8 batches in another order: the same alpha (up to the order of a float sum) ...
        torch.testing.assert_close(calibrated[name], calibrated["given"], rtol=1e-9, atol=0)
        # ... and within 5 % when the Student takes an SGD step after each measured batch
        torch.testing.assert_close(training[name], training["given"], rtol=0.05, atol=0)
    spread = max(float(a) for a in first.values()) / min(float(a) for a in first.values())
    assert spread > 3, f"the former rule (loss ratio on the first batch) should depend on the order: {first}"


# -- (b) constant scale and offset of a loss -----------------------------------------------------------------------


class Affine(AttentionLoss):
    """``scale * L + offset`` of a wrapped loss (streaming when it streams)."""

    def __init__(self, inner: AttentionLoss, scale: float, offset: float = 0.0) -> None:
        super().__init__()
        self.inner, self.scale, self.offset = inner, scale, offset
        self.streaming_fn = inner.streaming_fn

    def from_inputs(self, teacher: Any, student: Any, **kwargs: Any) -> Tensor:
        return self.scale * self.inner.from_inputs(teacher, student, **kwargs) + self.offset


def alpha_with(loss: AttentionLoss | None, rule: str) -> Tensor:
    teacher, student = teacher_and_student("bert", dtype=torch.float64)
    distiller = Distiller(teacher, student, alpha=rule, alpha_batches=3).train()
    if loss is not None:
        distiller.attention_losses[0] = loss
    for batch in bert_batches()[:3]:
        distiller(**batch)
    return distiller.alpha.clone()


def test_auto_alpha_cancels_a_constant_factor_and_ignores_an_offset_of_the_loss() -> None:
    plain = alpha_with(None, "auto")
    torch.testing.assert_close(alpha_with(Affine(get_loss("amad-mse"), 1000.0), "auto"), plain / 1000, rtol=1e-9,
                               atol=0)
    torch.testing.assert_close(alpha_with(Affine(get_loss("amad-mse"), 1.0, offset=0.5), "auto"), plain, rtol=1e-9,
                               atol=0)
    # the loss ratio cancels the factor too, but an offset (a loss whose minimum is not 0) moves it
    ratio = alpha_with(None, "loss-ratio")
    torch.testing.assert_close(alpha_with(Affine(get_loss("amad-mse"), 1000.0), "loss-ratio"), ratio / 1000,
                               rtol=1e-9, atol=0)
    assert float(alpha_with(Affine(get_loss("amad-mse"), 1.0, offset=0.5), "loss-ratio") / ratio) < 1e-3


# -- (c) the balance warning ---------------------------------------------------------------------------------------


def first_batch_alpha(alpha: Any, **options: Any) -> tuple[Distiller, list[warnings.WarningMessage]]:
    teacher, student = teacher_and_student("bert")
    distiller = Distiller(teacher, student, alpha=alpha, alpha_batches=1, **options).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distiller(**bert_batches()[0])
    return distiller, [w for w in caught if issubclass(w.category, AlphaImbalanceWarning)]


def test_a_dominating_fixed_alpha_is_reported_and_auto_is_not() -> None:
    auto, caught = first_batch_alpha("auto")
    assert not caught and auto.alpha_balance() == {auto._term_name(0): pytest.approx(1.0)}
    name, alpha = auto._term_name(0), float(auto.alpha[0])

    for factor, strong, weak in ((300.0, name, "kd"), (1 / 300, "kd", name)):
        fixed, caught = first_batch_alpha(factor * alpha)
        # measured on the first batch only: the weighted attention pull is factor x the KD's
        assert fixed.alpha_balance()[name] == pytest.approx(factor, rel=1e-5)
        assert len(caught) == 1, [str(w.message) for w in caught]
        text = str(caught[0].message)
        assert f"the weighted term {strong} has 300x the Student-gradient norm of {weak}" in text, text
        assert "first 1 measured batch" in text

    fine, caught = first_batch_alpha(50 * alpha)  # within the limit of 100
    assert not caught and fine.alpha_balance()[name] == pytest.approx(50, rel=1e-5)


def test_paper_alpha_values_and_errors() -> None:
    teacher, student = teacher_and_student("bert")
    for loss, value in (("amad-mse", 0.2), ("amad-s2t", 0.2), ("amad-kl", 100.0), ("amad-token", 100.0)):
        assert Distiller(teacher, student, attention_loss=loss, alpha="paper").alpha.tolist() == [value]
    projected = Distiller(teacher, student, attention_loss="amad-projected", alpha="paper",
                          attention_loss_options={"n": 49})
    assert projected.alpha.tolist() == [100.0]
    with pytest.raises(ValueError, match=r"alpha='paper' is defined only for .*'one-to-one' has no paper weight"):
        Distiller(teacher, student, attention_loss="one-to-one", alpha="paper")
    with pytest.warns(AlphaImbalanceWarning, match=r"tuned for reduction='paper'; this loss uses reduction='mean'"):
        Distiller(teacher, student, alpha="paper", attention_loss_options={"reduction": "mean"})


def test_paper_alpha_is_checked_on_the_first_batch() -> None:
    distiller, caught = first_batch_alpha("paper")
    ratio = distiller.alpha_balance()[distiller._term_name(0)]
    assert distiller.alpha.tolist() == [0.2] and ratio > 0
    assert bool(caught) == (max(ratio, 1 / ratio) > weighting.DOMINANCE_LIMIT), (ratio, caught)


def test_balance_of_degenerate_measurements() -> None:
    """A term without gradient cannot be balanced: alpha 1 and its index; the message names the silent term."""
    sums = torch.tensor([[2.0, 3.0], [4.0, 0.0], [1.0, 1.0], [0.5, 0.0]], dtype=torch.float64)
    alpha, unbalanced, vanishing = weighting.balanced_alpha(sums, "auto", ratio=2.0)
    assert alpha.tolist() == [1.0, 1.0] and unbalanced == [1] and vanishing == []
    alpha, unbalanced, vanishing = weighting.balanced_alpha(sums, "loss-ratio")
    assert alpha.tolist() == [2.0, 1.0] and unbalanced == [1] and vanishing == []
    ratios = weighting.gradient_ratios(torch.tensor([1.0, 1.0]), sums)
    assert ratios.tolist() == [2.0, 0.0]
    message = weighting.imbalance_message(["a", "b"], ratios, batches=3)
    assert message and "the weighted term b has no Student gradient at all, a has" in message
    assert weighting.imbalance_message(["a"], torch.tensor([99.0]), batches=1) is None
    assert "a has 101x the Student-gradient norm of kd" in weighting.imbalance_message(["a"], torch.tensor([101.0]),
                                                                                       batches=1)
    with pytest.raises(ValueError, match="alpha rule must be one of"):
        weighting.balanced_alpha(sums, "paper")


def test_a_vanishing_gradient_takes_the_loss_ratio_alpha() -> None:
    """Gradient ratio below float32's precision (1e-20 here, as BLIP's 1e-10 vision initialisation gave: alpha
    1.6e20, every Student collapsed): the loss-ratio alpha instead, the pair named; just above it: balanced."""
    eps = weighting.VANISHING_GRADIENT
    sums = torch.tensor([[2.0, 2.0, 2.0], [2e-20, 2 * eps * 1.01, 0.5], [3.0, 3.0, 3.0], [0.5, 0.25, 1.0]],
                        dtype=torch.float64)
    alpha, unbalanced, vanishing = weighting.balanced_alpha(sums, "auto")
    assert unbalanced == [] and vanishing == [0]
    assert alpha.tolist() == pytest.approx([6.0, 1 / (eps * 1.01), 4.0])

    teacher, student = teacher_and_student("bert")
    with torch.no_grad():  # the last Student layer's maps uniform and flat in Q, K: their gradient vanishes
        attention = student.bert.encoder.layer[-1].attention.self
        for linear in (attention.query, attention.key):
            linear.weight.mul_(1e-12)
            linear.bias.zero_()
    distiller = Distiller(teacher, student, alpha="auto", alpha_batches=1).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = distiller(**bert_batches()[0])
    messages = [str(w.message) for w in caught if issubclass(w.category, AlphaImbalanceWarning)]
    assert any("vanishes where it was measured" in m and "loss-ratio alpha" in m for m in messages), messages
    sums = distiller._alpha_sums
    assert float(sums[1, 0]) < weighting.VANISHING_GRADIENT * float(sums[0, 0])
    assert distiller.alpha.tolist() == pytest.approx([float(sums[2, 0] / sums[3, 0])])  # r * sum R / sum L
    assert torch.isfinite(outputs.loss)


# -- (d) state dict ------------------------------------------------------------------------------------------------


def test_measured_alpha_survives_a_state_dict_round_trip_and_is_not_measured_again(monkeypatch) -> None:
    batches = bert_batches()
    teacher, student = teacher_and_student("bert")
    distiller = Distiller(teacher, student, alpha_batches=2).train()
    for batch in batches[:2]:
        distiller(**batch)
    assert distiller.alpha_frozen
    state = {k: v.clone() for k, v in distiller.state_dict().items()}

    _, other_student = teacher_and_student("bert", seed=5)
    restored = Distiller(teacher, other_student, alpha_batches=2).train()
    assert not restored.alpha_frozen
    restored.load_state_dict(state)
    assert restored.alpha_frozen and not restored.measuring_alpha
    torch.testing.assert_close(restored.alpha, distiller.alpha, rtol=0, atol=0)

    def no_measurement(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("alpha was measured again after loading")

    monkeypatch.setattr(weighting, "measure_batch", no_measurement)
    restored(**batches[5]).loss.backward()
    assert restored.calibrate_alpha(batches) == distiller.alpha_report()
    torch.testing.assert_close(restored.alpha, distiller.alpha, rtol=0, atol=0)


def test_loading_a_state_measured_less_far_measures_again() -> None:
    """The Distiller remembers a finished measurement without reading its buffer again, until a state is loaded."""
    batches = bert_batches()
    teacher, student = teacher_and_student("bert")
    distiller = Distiller(teacher, student, alpha_batches=2).train()
    early = {k: v.clone() for k, v in distiller.state_dict().items()}
    for batch in batches[:2]:
        distiller(**batch)
    assert distiller.alpha_frozen and not distiller.measuring_alpha
    distiller.load_state_dict(early)
    assert distiller.measuring_alpha and not distiller.alpha_frozen
    distiller(**batches[2])
    assert distiller.measuring_alpha
    distiller(**batches[3])
    assert distiller.alpha_frozen


# -- (e) gradient accumulation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
def test_measuring_micro_batches_give_the_gradients_of_plain_steps_with_the_same_alphas(streaming: bool) -> None:
    """Two accumulated micro-batches, both measured: .grad equals plain steps with the alphas then in use."""
    teacher, student = teacher_and_student("t5", dtype=torch.float64)
    plain_student = copy.deepcopy(student)
    batches = [seq2seq_batch(), seq2seq_batch(padded=False, target_length=4)]

    measuring = Distiller(teacher, student, alpha_batches=2, streaming=streaming).train()
    used = []
    for batch in batches:
        (measuring(**batch).loss / 2).backward()
        used.append(measuring.alpha.clone())
    assert measuring.alpha_frozen and not torch.equal(used[0], used[1])

    plain = Distiller(teacher, plain_student, alpha=used[0].tolist(), streaming=streaming).train()
    for batch, alpha in zip(batches, used):
        plain.alpha.copy_(alpha)
        (plain(**batch).loss / 2).backward()
    for (name, p), q in zip(student.named_parameters(), plain_student.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=name)


# -- the Trainer: random calibration batches, whatever the sampler -------------------------------------------------


def rows(count: int = 24) -> list[dict]:
    """Unpadded rows of varied lengths (3 to 16 tokens)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(count):
        length = int(torch.randint(3, 17, (1,), generator=g))
        out.append({"input_ids": torch.randint(1, VOCAB, (length,), generator=g), "labels": torch.tensor(i % 3)})
    return out


def pad(features: list[dict]) -> dict:
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = f["input_ids"]
    labels = torch.stack([f["labels"] for f in features])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def trainer_alpha(tmp_path: Path, sampling: str, alpha: str = "auto", **options: Any) -> Tensor:
    teacher, student = teacher_and_student("bert")
    distiller = Distiller(teacher, student, alpha=alpha, alpha_batches=4, **options)
    args = TrainingArguments(
        output_dir=str(tmp_path / sampling), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-3,
        train_sampling_strategy=sampling, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=7, dataloader_num_workers=0, logging_steps=1,
    )
    trainer = DistillationTrainer(model=distiller, args=args, train_dataset=rows(), data_collator=pad)
    trainer.train()
    assert distiller.alpha_frozen and int(distiller._alpha_seen) == 4
    logged = [e for e in trainer.state.log_history if any(k.startswith("grad_ratio/") for k in e)]
    assert len(logged) == 1 and logged[0][f"grad_ratio/{distiller._term_name(0)}"] == pytest.approx(1.0)
    return distiller.alpha.clone()


def test_trainer_measures_alpha_on_random_batches_whatever_the_sampler(tmp_path: Path) -> None:
    grouped = trainer_alpha(tmp_path, "group_by_length")
    assert torch.equal(trainer_alpha(tmp_path, "random"), grouped)
    # the batches are those of a permutation seeded by the training seed
    teacher, student = teacher_and_student("bert")
    order = torch.randperm(24, generator=torch.Generator().manual_seed(7)).tolist()
    distiller = Distiller(teacher, student, alpha_batches=4)
    data = rows()
    distiller.calibrate_alpha(pad([data[i] for i in order[4 * b : 4 * b + 4]]) for b in range(4))
    torch.testing.assert_close(distiller.alpha, grouped, rtol=1e-6, atol=0)
