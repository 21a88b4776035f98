"""Grouped-query attention end to end: a 9-query / 3-key-value-head Llama Teacher distilled into Students
with 3/1, 6/2 and 9/3 heads and fewer layers (SmolLM2-135M's head layout, tiny widths).

Checked for every map loss inside the Distiller: streaming == materialised (loss and Student gradients,
float64); left and right padding change nothing (a padded sample's mask-aware loss equals its unpadded
loss); the recorded maps are query-head maps with the key/value heads expanded, equal to eager
``output_attentions``. Models are built here from configs (no downloads), float64, eval mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as hf
from torch import Tensor, nn

from amad import AttentionRecorder, Distiller
from amad.attention import AttentionInputs
from amad.losses import minilm_relations

VOCAB = 40
HEAD_DIM = 4
HIDDEN = 36  # a multiple of 9, 6 and 3 heads (LlamaConfig checks it)
TEACHER = (3, 9, 3)  # layers, query heads, key/value heads
STUDENTS = {"3/1": (2, 3, 1), "6/2": (2, 6, 2), "9/3": (1, 9, 3)}
MAP_LOSSES = ["amad-mse", "amad-kl", "amad-token", "one-to-one", "head-mean", "shd"]
#: Mask-aware reduction of each loss (options given to the Distiller); head-mean and shd use it by default.
MEAN = {"amad-mse": {"reduction": "mean"}, "amad-kl": {"reduction": "mean"}, "amad-token": {"reduction": "mean"},
        "one-to-one": {"reduction": "mean"}, "head-mean": {}, "shd": {},
        "minilm-relations": {"num_relation_heads": 4}}  # 4 divides the widths 36, 24 and 12


def llama(layers: int, heads: int, kv_heads: int, *, seed: int, attn: str = "sdpa") -> nn.Module:
    config = hf.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=HEAD_DIM, intermediate_size=16, vocab_size=VOCAB,
                            max_position_embeddings=32, initializer_range=0.2, attn_implementation=attn)
    torch.manual_seed(seed)
    return hf.LlamaForCausalLM(config).double().eval()


def pair(student: str) -> tuple[nn.Module, nn.Module]:
    return llama(*TEACHER, seed=0), llama(*STUDENTS[student], seed=1)


def sample(length: int, seed: int) -> Tensor:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def batch_of(samples: list[Tensor], side: str = "right") -> dict[str, Tensor]:
    """Causal-LM batch padded to the longest sample on ``side``; padding ids 0, labels -100.

    Position ids count the real tokens (0, 1, ... from each sample's first real token), as ``generate``
    does for left padding: a sample then sees the very rotary phases it sees unpadded (they are computed
    in float32, so shifted positions would differ from the unpadded ones at 1e-7).
    """
    length = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        where = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[i, where], mask[i, where] = s, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
            "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0)}


LONG, SHORT = sample(7, seed=3), sample(4, seed=4)


def attention_names(model: nn.Module) -> list[str]:
    return [f"model.layers.{i}.self_attn" for i in range(model.config.num_hidden_layers)]


# -- recorded maps: query heads, kv heads expanded, equal to eager ------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("heads", [TEACHER, STUDENTS["3/1"], STUDENTS["6/2"]], ids=["9/3", "3/1", "6/2"])
def test_recorded_maps_are_query_head_maps_equal_to_eager(heads: tuple[int, int, int], side: str) -> None:
    """Each sample's recorded maps in a padded batch == eager ``output_attentions`` of the sample alone.

    (Eager on the padded batch itself is no reference for left padding in float64: its fully masked
    padding rows are NaN, which then reach the real rows of the next layer through the masked keys.)
    """
    model = llama(*heads, seed=0)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    batch = {k: v for k, v in batch_of([LONG, SHORT], side).items() if k != "labels"}
    names = attention_names(model)
    with torch.no_grad(), AttentionRecorder(model, names) as rec:
        model(**batch)
        alone = [eager(input_ids=s[None], output_attentions=True).attentions for s in (LONG, SHORT)]
    real = batch["attention_mask"].bool()
    group = heads[1] // heads[2]
    for i, name in enumerate(names):
        inputs = rec.inputs(name)
        assert inputs.num_heads == heads[1] and inputs.key.shape[1] == heads[1]
        assert torch.equal(inputs.key[:, ::group].repeat_interleave(group, dim=1), inputs.key)  # kv groups expanded
        assert torch.equal(inputs.query_mask, real), f"{name}: query_mask {inputs.query_mask} != {real}"
        maps = rec.maps(name)
        assert maps.shape == (2, heads[1], 7, 7)
        for b, reference in enumerate(alone):
            keep = real[b]
            got = maps[b][:, keep][:, :, keep]
            assert got.shape == reference[i][0].shape
            diff = (got - reference[i][0]).abs().max()
            assert diff < 1e-6, f"{name} sample {b}: max abs diff {diff:.3g}"  # Llama's eager softmax is float32
            assert not maps[b][:, keep][:, :, ~keep].any(), f"{name}: real rows attend padding"


# -- streaming == materialised ------------------------------------------------------------------------------------


def step(distiller: Distiller, batch: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    distiller.student.zero_grad()
    out = distiller(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in distiller.student.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.losses.items()}, grads


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("student", list(STUDENTS))
@pytest.mark.parametrize("loss", MAP_LOSSES)
def test_streaming_equals_materialised_across_gqa_pairs(loss: str, student: str, side: str) -> None:
    teacher, model = pair(student)
    batch = batch_of([LONG, SHORT], side)
    found = []
    for streaming in (True, False):
        distiller = Distiller(teacher, model, attention_loss=loss, layers="uniform", alpha=0.7, streaming=streaming,
                              block_size=2)
        found.append(step(distiller, batch))
    (streamed, streamed_grads), (materialised, materialised_grads) = found
    assert len(materialised) == 1 + STUDENTS[student][0]  # kd + one term per Student layer
    for name, value in materialised.items():
        assert torch.isfinite(value), name
        torch.testing.assert_close(streamed[name], value, rtol=1e-10, atol=1e-13)
    assert streamed_grads.keys() == materialised_grads.keys()
    assert any("self_attn.q_proj" in n for n in streamed_grads)
    for name, grad in materialised_grads.items():
        torch.testing.assert_close(streamed_grads[name], grad, rtol=1e-8, atol=1e-13)


# -- padding changes nothing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("loss", MAP_LOSSES + ["minilm-relations"])
def test_a_padded_sample_has_its_unpadded_loss(loss: str, side: str) -> None:
    """Mask-aware reductions: loss of [long, short padded] == mean of the losses of [long] and [short]."""
    teacher, student = pair("3/1")
    distiller = Distiller(teacher, student, attention_loss=loss, layers="uniform", alpha=1.0,
                          attention_loss_options=MEAN[loss])
    with torch.no_grad():
        padded = distiller(**batch_of([LONG, SHORT], side)).losses
        alone = [distiller(**batch_of([s])).losses for s in (LONG, SHORT)]
    assert padded.keys() == alone[0].keys() and len(padded) == 3
    for name, value in padded.items():
        want = (alone[0][name] + alone[1][name]) / 2
        assert want > 0, name
        torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")


# -- MiniLMv2 relations with grouped key/value heads ----------------------------------------------------------------


@pytest.mark.parametrize("student", list(STUDENTS))
def test_minilm_relations_train_every_projection_across_gqa(student: str) -> None:
    teacher, model = pair(student)
    distiller = Distiller(teacher, model, attention_loss="minilm-relations", alpha=1.0,
                          attention_loss_options=MEAN["minilm-relations"])
    out = distiller(**batch_of([LONG, SHORT], "left"))
    term = out.losses[next(k for k in out.losses if k.startswith("attn["))]
    attention = model.model.layers[-1].self_attn
    grads = torch.autograd.grad(term, [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.isfinite(term) and term > 0
    assert all(g.abs().sum() > 0 for g in grads)


def test_expanded_kv_relation_is_the_grouped_relation_with_sharper_logits() -> None:
    """With kv heads expanded g-fold and relation heads aligned to kv heads, the K-K relation is the one of the
    un-expanded K with logits scaled by sqrt(g) (so models of equal group size are compared consistently)."""
    teacher = llama(*TEACHER, seed=0)
    with torch.no_grad(), AttentionRecorder(teacher, "model.layers.0.self_attn") as rec:
        teacher(input_ids=LONG[None])
    inputs: AttentionInputs = rec.inputs("model.layers.0.self_attn")
    group = 3
    grouped = inputs.key[:, ::group]  # (1, 3, 7, 4): the kv heads themselves
    relations = 3  # one relation head per kv head: d_r = 12 expanded, 4 grouped
    expanded_as_student = (inputs.query, inputs.key, inputs.value)
    # Same Teacher both sides: the expanded relation vs the grouped relation at temperature 1/sqrt(g).
    scaled = (None, grouped * group**0.25, None)
    expanded_kk = minilm_relations(expanded_as_student, (None, grouped, None), num_relation_heads=relations,
                                   relations=("kk",))
    matching = minilm_relations(expanded_as_student, scaled, num_relation_heads=relations, relations=("kk",))
    assert expanded_kk > 1e-6  # unscaled logits differ
    assert matching < 1e-12  # sqrt(g) on the logits = g**(1/4) on both sides of the product
