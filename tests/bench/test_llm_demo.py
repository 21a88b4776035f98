"""``amad demo --llm``: the text split, the Teacher cache (replayed outputs equal the live Teacher's) and the
whole pipeline end to end with a tiny Llama-with-GQA Teacher in place of SmolLM2 (seconds)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from amad import Distiller
from amad.bench import llm_run, main
from amad.bench.llm_alpha import ALPHA_SCALES, chosen_scales
from amad.bench.llm_report import paired_differences
from amad.bench.llm_text import SPLITS, corpus_documents, split_of, split_texts, text_blocks
from amad.bench.teacher_cache import CachedTeacher
from amad.cli.causal_lm import CausalLMCollator, evaluate_causal_lm
from amad.student_init import student_from_teacher
from model_factories import VOCAB, llama


class CharTokenizer:
    """Characters as token ids 2..VOCAB-1, EOS 1, pad 0: enough for token_blocks and CausalLMCollator."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {"input_ids": [[2 + ord(c) % (VOCAB - 2) for c in text] for text in texts]}


DOCUMENTS = {f"topic:t{i}": f"Paragraph {i} of the tiny manual, with words and more words. " * 3 for i in range(40)}


@pytest.fixture()
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return llama(4, 4).eval()  # 4 layers, 4 query heads sharing 2 kv heads


def blocks(n: int = 4, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# -- text ---------------------------------------------------------------------------------------------------------
def test_split_is_by_document_hash_and_blocks_are_full() -> None:
    texts = split_texts(DOCUMENTS)
    assert set(texts) == set(SPLITS) and sum(len(v) for v in texts.values()) == len(DOCUMENTS)
    for name, text in DOCUMENTS.items():  # each document is whole in the split its name hashes to
        assert text in texts[split_of(name)]
    assert split_of("topic:t3") == split_of("topic:t3")  # deterministic
    rows = text_blocks(DOCUMENTS, CharTokenizer(), 8)
    assert all(len(b) == 8 for split in SPLITS for b in rows[split])
    stream = [t for text in texts["test"] for t in CharTokenizer()([text])["input_ids"][0] + [1]]
    assert [t for b in rows["test"] for t in b] == stream[: 8 * (len(stream) // 8)]  # packed, nothing reordered


def test_real_corpus_has_prose_in_every_split() -> None:
    from pydoc_data.topics import topics

    documents = corpus_documents(modules=("json",), topics=dict(list(sorted(topics.items()))[:60]))
    assert "doc:json" in documents and all(">>>" not in text for text in documents.values())
    assert all(split_texts(documents)[split] for split in SPLITS)


# -- the Teacher cache ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [VOCAB, 7])
def test_cached_teacher_gives_the_live_teachers_losses_and_gradients(teacher, top_k: int) -> None:
    student = student_from_teacher(teacher, layers=2, num_heads=2, num_kv_heads=1).train()
    paired = [1, 3]  # uniform_layer_map(4, 2), 0-based
    cached = CachedTeacher(teacher, layers=paired, top_k=top_k)
    ids = blocks()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    results = []
    for model in (teacher, cached, cached):  # live, filled, then replayed from the store
        s = copy.deepcopy(student)
        distiller = Distiller(model, s, attention_loss="amad-kl", layers="uniform", alpha=[0.3, 0.7], kd_top_k=top_k)
        out = distiller(**batch)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in s.parameters() if p.grad is not None])
        results.append((list(out.losses.values()), grads))
    assert cached.teacher_passes == 4  # the second use ran no Teacher
    (live, live_grad), *replayed = results
    for losses, grad in replayed:
        assert len(losses) == 3
        for a, b in zip(live, losses):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(live_grad, grad, rtol=1e-4, atol=1e-6)


def test_cached_teacher_evaluation_equals_the_live_one(teacher) -> None:
    student = student_from_teacher(teacher, layers=2, num_heads=2)
    rows = [{"input_ids": b} for b in blocks(5).tolist()]
    collator = CausalLMCollator(CharTokenizer())
    cached = CachedTeacher(teacher)
    live, _ = evaluate_causal_lm(teacher, student, rows, collator, batch_size=2)
    for _ in range(2):
        again, _ = evaluate_causal_lm(cached, student, rows, collator, batch_size=2)
        for model in live:
            for key, value in live[model].items():
                assert again[model][key] == pytest.approx(value, rel=1e-6)
    assert cached.teacher_passes == 5


def test_cached_teacher_refuses_padding_and_bad_settings(teacher) -> None:
    ids = blocks(2)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with pytest.raises(ValueError, match="without padding"):
        CachedTeacher(teacher)(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="top_k"):
        CachedTeacher(teacher, top_k=VOCAB + 1)
    with pytest.raises(ValueError, match="layers"):
        CachedTeacher(teacher, layers=[4])


# -- statistics -----------------------------------------------------------------------------------------------------
def test_paired_differences_are_per_seed() -> None:
    values = {("kd", 0): 10.0, ("kd", 1): 20.0, ("kd", 2): 30.0, ("x", 0): 9.0, ("x", 1): 18.0, ("x", 2): 30.0}
    records = [{"task": "t", "method": m, "seed": s, "metric": "perplexity", "value": v} for (m, s), v in values.items()]
    interval = paired_differences(records, "t", "perplexity")["x"]
    diffs = [-1.0, -2.0, 0.0]
    sd = math.sqrt(sum((d + 1) ** 2 for d in diffs) / 2)
    half = 4.302652729749462 * sd / math.sqrt(3)  # t(0.975, 2 df)
    assert (interval.mean, interval.n) == (-1.0, 3)
    assert (interval.low, interval.high) == (pytest.approx(-1.0 - half), pytest.approx(-1.0 + half))


def test_alpha_is_chosen_on_seed_0_validation_kl_with_ties_to_the_factor_closest_to_one() -> None:
    def record(method: str, value: float, seed: int = 0, metric: str = "val_kl_to_teacher") -> dict:
        return {"task": "t", "method": method, "seed": seed, "metric": metric, "value": value}

    kl = {"kd+a": {0.0625: 3.0, 0.25: 2.0, 1.0: 2.5, 4.0: 9.0}, "kd+b": {0.0625: 1.0, 0.25: 1.5, 1.0: 1.0, 4.0: 1.0}}
    records = [record(f"{m}@alpha{f:g}x", v) for m, per in kl.items() for f, v in per.items()]
    records += [record("kd+a@alpha0.25x", 0.1, seed=1), record("kd+a@alpha4x", 0.1, metric="val_perplexity")]
    records += [record("kd+c@alpha1x", 0.5)]  # not every factor scored: no choice yet
    assert chosen_scales(records, "t", ["kd+a", "kd+b", "kd+c"]) == {"kd+a": 0.25, "kd+b": 1.0}
    settings = llm_run.LLMDemoSettings(out=Path("unused"), seeds=2, alpha_sensitivity=True)
    cells = llm_run.tuned_cells(records, {"t": None}, ["kd+a", "kd+b"], settings)
    assert [(c.method, c.seed, c.base, c.alpha_scale, c.splits) for c in cells] == [
        ("kd+a@x0.25", 0, "kd+a", 0.25, ("test",)), ("kd+a@x0.25", 1, "kd+a", 0.25, ("test",))]
    assert llm_run.tuned_cells(records, {"t": None}, ["kd+a"], replace(settings, alpha_sensitivity=False)) == []


# -- the pipeline ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_llm(monkeypatch, teacher) -> None:
    monkeypatch.setattr(llm_run, "load_teacher", lambda: (teacher, CharTokenizer()))
    monkeypatch.setattr(llm_run, "load_documents", lambda: DOCUMENTS)


def test_tiny_llm_demo_end_to_end_writes_outputs_and_resumes(tiny_llm, tmp_path: Path) -> None:
    out = tmp_path / "llm"
    methods = ["kd", "kd+amad-mse", "kd+minilm-relations"]
    assert main(["--llm", "--scale", "tiny", "--out", str(out), "--methods", *methods, "--alpha-sensitivity"]) == 0
    records = json.loads((out / "results.json").read_text())
    task = "smollm2-135m-l2-h2-kv1"
    cells = {(r["method"], r["seed"]) for r in records}
    sensitivity = {f"{m}@alpha{s:g}x" for m in methods[1:] for s in ALPHA_SCALES} | {"kd@validation"}
    kl = {r["method"]: r["value"] for r in records if r["metric"] == "val_kl_to_teacher"}
    tuned = set()  # the factor with the lowest validation KL, where it is not 1, trained again on the test split
    for method in methods[1:]:
        best = min(ALPHA_SCALES, key=lambda f: (kl[f"{method}@alpha{f:g}x"], abs(math.log(f))))
        tuned |= {f"{method}@x{best:g}"} if best != 1 else set()
    assert cells == {(m, 0) for m in ["teacher", "init", *methods, *sensitivity, *tuned]}
    assert tuned  # this tiny run chooses factors other than 1, so the tuned test cells are exercised
    for name in tuned:
        assert {(name, m) for m in llm_run.METRICS} <= {(r["method"], r["metric"]) for r in records}
        assert name in paired_differences(records, task, "kl_to_teacher")  # a tuned row is compared with KD too
    assert {r["task"] for r in records} == {task}
    metrics = {(r["method"], r["metric"]) for r in records}
    for method in methods:
        assert {(method, m) for m in llm_run.METRICS} <= metrics and (method, "val_perplexity") not in metrics
    assert ("kd+amad-mse@alpha4x", "perplexity") not in metrics  # sensitivity: validation only
    assert {("teacher", "perplexity"), ("teacher", "val_perplexity")} <= metrics  # the Teacher on both splits, once
    assert len([r for r in records if r["method"] == "teacher"]) == 4
    assert ("kd+amad-mse@alpha4x", "val_kl_to_teacher") in metrics and ("kd@validation", "val_perplexity") in metrics
    alpha = {r["method"]: r["value"] for r in records if r["metric"] == "alpha_mean"}
    assert alpha["kd+amad-mse@alpha4x"] == pytest.approx(64 * alpha["kd+amad-mse@alpha0.0625x"], rel=1e-6)
    assert alpha["kd+amad-mse@alpha1x"] == pytest.approx(16 * alpha["kd+amad-mse@alpha0.0625x"], rel=1e-6)
    assert set(alpha) == {m for m in cells_methods(records) if "amad" in m or "minilm" in m}
    table = (out / "results.md").read_text()
    assert "| kd+amad-mse |" in table and "Alpha on validation" in table and "no interval" in table
    assert (out / "plots" / f"{task}-perplexity.png").stat().st_size > 1000

    lines: list[str] = []
    settings = llm_run.LLMDemoSettings(out=out, scale="tiny", methods=methods, plots=False, alpha_sensitivity=True,
                                       echo=lines.append)
    summary = llm_run.run_llm_demo(settings)
    assert summary.trained == [] and len(summary.skipped) == len(cells) - 1  # all but the Teacher's own record
    assert json.loads((out / "results.json").read_text()) == records

    kept = [r for r in records if r["method"] != "kd+amad-mse"]
    (out / "results.json").write_text(json.dumps(kept))
    summary = llm_run.run_llm_demo(settings)
    assert summary.trained == [(task, "kd+amad-mse", 0)]  # an interrupted cell runs again, alone


def cells_methods(records: list[dict]) -> set[str]:
    return {r["method"] for r in records if r["method"] not in ("teacher", "init", "kd")}


def test_llm_demo_usage_errors(tiny_llm, tmp_path: Path, capsys) -> None:
    for argv, message in ((["--llm", "--students", "l2-h3"], "l<layers>-h<heads>-kv<kv heads>"),
                          (["--llm", "--methods", "gt"], "not gt"), (["--llm", "--real"], "--real"),
                          (["--alpha-sensitivity"], "belongs to --llm"),
                          (["--real", "--students", "l2-h3-kv1"], "h<heads>-d<width>-l<layers>"),
                          (["--llm", "--alpha-grid", "1,2"], "--alpha-grid and --paper-alpha belong to"),
                          (["--llm", "--first-seed", "1"], "--jobs and --first-seed belong to")):
        with pytest.raises(SystemExit):
            main(["--scale", "tiny", "--out", str(tmp_path), *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
