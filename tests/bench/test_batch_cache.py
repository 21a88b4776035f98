"""The benchmark's per-batch Teacher cache (amad.bench.batch_cache): a Distiller on the cached Teacher gives the
very losses and gradients of one on the live Teacher, while the Teacher runs once per batch."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as hf

from amad import Distiller
from amad.bench.batch_cache import BatchCachedTeacher
from amad.bench.minilm_text import EmbeddingLoss

from model_factories import NO_DROPOUT, token_ids


def _bert(layers: int, heads: int) -> torch.nn.Module:
    config = hf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=24, max_position_embeddings=16, **NO_DROPOUT)
    config._attn_implementation = "sdpa"
    return hf.BertModel(config).eval()


def _batch(seed: int) -> dict:
    ids, mask = token_ids(3, 7, pad_from=4, seed=seed)
    return {"input_ids": ids, "attention_mask": mask}


def _step(distiller: Distiller, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The attention terms (the KD term last) and the Student's gradients of one step."""
    distiller.student.zero_grad()
    out = distiller(**batch)
    out.loss.backward()
    terms = [v.detach() for k, v in sorted(out.losses.items()) if k != "kd"] + [out.losses["kd"].detach()]
    assert len(terms) == 1 + (len(distiller.layer_pairs) if distiller.attention_loss_name else 0)
    return torch.stack(terms), [p.grad.clone() for p in distiller.student.parameters() if p.grad is not None]


def _distiller(teacher: torch.nn.Module, student: torch.nn.Module, loss: str | None, layers: str) -> Distiller:
    return Distiller(teacher, student, attention_loss=loss, layers=layers, alpha=1.0,
                     output_loss=EmbeddingLoss("cosine"), attention_loss_options={"reduction": "mean"} if loss else {})


pytestmark = pytest.mark.filterwarnings("ignore::amad.weighting.AlphaImbalanceWarning")  # alpha 1: the terms' sizes do not matter


@pytest.mark.parametrize("layers", ["last", "uniform"])
def test_cached_teacher_gives_the_live_teachers_losses_and_gradients(layers: str) -> None:
    torch.manual_seed(0)
    teacher, student = _bert(3, 4), _bert(2, 2)
    cache = BatchCachedTeacher(teacher)
    live = _distiller(teacher, copy.deepcopy(student), "amad-kl", layers)
    cached = _distiller(cache, copy.deepcopy(student), "amad-kl", layers)
    first, second = _batch(1), _batch(2)
    for batch in (first, first, second, first):  # miss, hit, miss, hit
        want_loss, want_grads = _step(live, batch)
        got_loss, got_grads = _step(cached, batch)
        assert torch.equal(got_loss, want_loss)
        assert len(got_grads) == len(want_grads) and all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    assert (cache.teacher_passes, cache.replays) == (2, 2)


def test_an_entry_without_the_recorded_layer_runs_the_teacher_again() -> None:
    """A batch first seen by logit KD alone (nothing recorded), then by an attention loss: the Teacher runs again
    and the entry gains the layer; a third call replays it."""
    torch.manual_seed(0)
    teacher, student = _bert(3, 4), _bert(2, 2)
    cache = BatchCachedTeacher(teacher, max_batches=1)
    batch = _batch(3)
    _step(_distiller(cache, copy.deepcopy(student), None, "last"), batch)
    assert (cache.teacher_passes, cache.replays) == (1, 0)
    cached = _distiller(cache, copy.deepcopy(student), "shd", "last")
    live = _distiller(teacher, copy.deepcopy(student), "shd", "last")
    for passes, replays in ((2, 0), (2, 1)):
        got, want = _step(cached, batch), _step(live, batch)
        assert torch.equal(got[0], want[0]) and all(torch.equal(g, w) for g, w in zip(got[1], want[1]))
        assert (cache.teacher_passes, cache.replays) == (passes, replays)
    _step(cached, _batch(4))  # max_batches=1: the new batch is computed, not stored; the stored one stays
    _step(cached, batch)
    assert len(cache.store) == 1 and (cache.teacher_passes, cache.replays) == (3, 2)
    with pytest.raises(ValueError, match="max_batches"):
        BatchCachedTeacher(teacher, max_batches=0)
