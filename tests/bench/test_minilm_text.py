"""The real-Teacher benchmark (``amad demo --real``): sentences, pooling, the Students, the retrieval metric,
and (with the optional all-MiniLM-L6-v2 package) the Teacher and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from amad.bench.minilm_text import (
    STUDENT_SHAPES, EmbeddingLoss, SentenceEmbeddingOutput, SentenceStudent, build_student, doc_sentences,
    embedding_basis, embedding_scores, encode, mean_pool, neighbour_agreement, split_sentences,
)

TOPICS = {
    "b-topic": (
        "The \"while\" statement\n"
        "*********************\n"
        "\n"
        "The while statement is used for repeated execution as long as an\n"
        "expression is true. Too short here. It repeatedly tests the expression and, if it is true,\n"
        "executes the first suite.\n"
        "\n"
        "   while_stmt ::= \"while\" assignment_expression \":\" suite\n"
        "\n"
        "   >>> while False: print(\"this line is an example only\")\n"
        "\n"
        "* A list item is one sentence of the manual like any other.\n"
    ),
    "a-topic": "The while statement is used for repeated execution as long as an expression is true.\n",
}


def test_doc_sentences_keeps_prose_only_deduplicated_and_sorted() -> None:
    assert doc_sentences(topics=TOPICS) == [
        "A list item is one sentence of the manual like any other.",
        "It repeatedly tests the expression and, if it is true, executes the first suite.",
        "The while statement is used for repeated execution as long as an expression is true.",
    ]


def test_python_documentation_gives_many_unique_sentences() -> None:
    sentences = doc_sentences()
    assert len(sentences) > 500
    assert len(set(sentences)) == len(sentences) and sentences == sorted(sentences)
    assert all(s[-1] in ".!?" and 6 <= len(s.split()) <= 40 for s in sentences)
    assert not any("::=" in s or ">>>" in s for s in sentences)


def test_split_is_determined_by_the_seed_and_disjoint() -> None:
    sentences = [f"sentence number {i}." for i in range(50)]
    train, held = split_sentences(sentences, 10, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert sorted(train + held) == sorted(sentences)
    assert split_sentences(sentences, 10, seed=3) == (train, held)
    assert split_sentences(sentences, 10, seed=4)[1] != held
    with pytest.raises(ValueError, match="unique"):
        split_sentences(sentences + sentences[:1], 10, seed=0)
    with pytest.raises(ValueError, match="held_out"):
        split_sentences(sentences, 50, seed=0)


def test_mean_pool_averages_real_tokens_only() -> None:
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    expected = torch.stack([hidden[b, : int(mask[b].sum())].mean(dim=0) for b in range(3)])
    torch.testing.assert_close(mean_pool(hidden, mask), expected)
    with pytest.raises(ValueError, match="no real token"):
        mean_pool(hidden, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        mean_pool(hidden, mask[:, :4])


def _on_circle(degrees: list[float]) -> torch.Tensor:
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_neighbour_agreement_on_a_hand_made_example() -> None:
    # Unit vectors at these angles: cosine similarity falls with the angle between two of them.
    # Teacher nearest neighbours: 0->1, 1->0, 2->1, 3->4, 4->3, 5->4.
    teacher = _on_circle([0, 10, 30, 100, 115, 205])
    assert neighbour_agreement(teacher, teacher, k=1) == (1.0, 1.0)
    assert neighbour_agreement(3.0 * teacher, teacher, k=5) == (1.0, 1.0)  # cosine: the scale does not matter
    # The Student swaps sentences 0 and 5. Its neighbour orders: 0: 4,3,5,1,2; 1: 5,2,3,4,0; 2: 1,...; 3: 4,...;
    # 4: 3,...; 5: 1,2,3,4,0. Top-1 agrees for 2, 3, 4; the Teacher's neighbour is 4th for 0 and 5, last for 1.
    student = teacher[[5, 1, 2, 3, 4, 0]]
    assert neighbour_agreement(student, teacher, k=3) == (0.5, 0.5)
    assert neighbour_agreement(student, teacher, k=4) == (0.5, pytest.approx(5 / 6))
    assert neighbour_agreement(student, teacher, k=5) == (0.5, 1.0)


def test_neighbour_agreement_matches_a_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(20, 8, generator=generator), torch.randn(20, 5, generator=generator)

    def neighbours(x: torch.Tensor, i: int) -> list[int]:
        others = [j for j in range(len(x)) if j != i]
        return sorted(others, key=lambda j: -float(torch.cosine_similarity(x[i], x[j], dim=0)))

    top1 = sum(neighbours(student, i)[0] == neighbours(teacher, i)[0] for i in range(20)) / 20
    top3 = sum(neighbours(teacher, i)[0] in neighbours(student, i)[:3] for i in range(20)) / 20
    assert neighbour_agreement(student, teacher, k=3) == (pytest.approx(top1), pytest.approx(top3))
    with pytest.raises(ValueError, match=r"\(20, 5\) and \(19, 8\)"):
        neighbour_agreement(student, teacher[:19])
    with pytest.raises(ValueError, match="k must be"):
        neighbour_agreement(student, teacher, k=20)


def test_settings_parse() -> None:
    from amad.bench.minilm_experiment import FULL_SETTINGS, parse_setting

    setting = parse_setting("h4-d384-l3-from-teacher-uniform")
    assert (setting.shape.name, setting.init, setting.layers) == ("h4-d384-l3", "teacher", "uniform")
    assert all(parse_setting(name).name == name for name in FULL_SETTINGS)
    assert parse_setting("h4-d256-l3").init == "random" and parse_setting("h4-d256-l3").layers == "last"
    with pytest.raises(ValueError, match="-from-teacher and then -uniform"):
        parse_setting("h4-d256-l3-uniform-from-teacher")


def test_other_domain_sentences_are_docstrings_not_training_text() -> None:
    from amad.bench.stdlib_text import docstring_sentences

    sentences = docstring_sentences(("json", "textwrap"))
    assert sentences == sorted(set(sentences)) and len(sentences) > 10
    assert not set(sentences) & set(doc_sentences())
    assert "Serialize ``obj`` to a JSON formatted ``str``." in sentences  # json.dumps: first paragraph only
    assert not any("skipkeys" in s for s in sentences)  # (its second paragraph)


def test_embedding_scores_and_loss() -> None:
    teacher = torch.randn(10, 6, dtype=torch.float64)
    assert embedding_scores(teacher.clone(), teacher) == pytest.approx(
        {"cosine_pct": 100.0, "top1_pct": 100.0, "top5_pct": 100.0})
    assert embedding_scores(-teacher, teacher)["cosine_pct"] == pytest.approx(-100.0)

    class Output:
        last_hidden_state = teacher[:, None, :].expand(10, 2, 6)

    batch = {"attention_mask": torch.ones(10, 2)}
    student = SentenceEmbeddingOutput(embedding=2 * teacher)
    assert float(EmbeddingLoss("cosine")(student, Output(), batch)) == pytest.approx(0.0, abs=1e-12)
    assert float(EmbeddingLoss("mse")(student, Output(), batch)) == pytest.approx(float((teacher ** 2).mean()))
    with pytest.raises(ValueError, match="cosine"):
        EmbeddingLoss("l1")


# -- with the real weights ---------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("all_minilm_l6_v2")
    from amad.bench.models.minilm import load_minilm

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load_minilm(tmp_path_factory.mktemp("minilm"))


@pytest.mark.minilm
def test_teacher_loads_offline_and_embeds_meaning(minilm) -> None:
    teacher, tokenizer = minilm
    config = teacher.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (6, 12, 384)
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today.",
                 "A list is a mutable sequence of items.", "Lists are sequences that can be changed."]
    embeddings = torch.nn.functional.normalize(encode(teacher, tokenizer, sentences, max_length=32), dim=-1)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.6 and similarity[3, 4] > 0.6
    assert similarity[0, 1] > similarity[0, 2] + 0.3 and similarity[3, 4] > similarity[3, 2] + 0.3
    assert similarity[0, 1] > similarity[0, 3] and similarity[3, 4] > similarity[1, 4]


@pytest.mark.minilm
def test_students_share_the_teachers_embeddings(minilm) -> None:
    teacher, _ = minilm
    narrow = STUDENT_SHAPES["h4-d256-l3"]
    basis = embedding_basis(teacher, narrow.hidden)
    torch.testing.assert_close(basis.T @ basis, torch.eye(narrow.hidden), atol=1e-5, rtol=0)
    student = build_student(teacher, narrow, seed=1, basis=basis)
    assert isinstance(student, SentenceStudent) and student.projection.out_features == 384
    config = student.bert.config
    assert (config.num_attention_heads, config.hidden_size, config.num_hidden_layers) == (4, 256, 3)
    words = student.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(words, teacher.embeddings.word_embeddings.weight @ basis)
    assert not words.requires_grad
    again = build_student(teacher, narrow, seed=1, basis=basis)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))
    wide = build_student(teacher, STUDENT_SHAPES["h6-d384-l6"], seed=1)
    assert isinstance(wide.projection, torch.nn.Identity)
    torch.testing.assert_close(wide.bert.embeddings.position_embeddings.weight,
                               teacher.embeddings.position_embeddings.weight)


@pytest.mark.minilm
def test_student_from_teacher_resplits_heads_without_dropout(minilm) -> None:
    from amad.bench.minilm_experiment import BUDGETS, TextExperiment, parse_setting

    experiment = TextExperiment(BUDGETS["tiny"])
    student = experiment.student(parse_setting("h4-d384-l3-from-teacher"), seed=0)
    config = student.bert.config
    assert (config.num_attention_heads, config.hidden_size, config.num_hidden_layers) == (4, 384, 3)
    assert isinstance(student.projection, torch.nn.Identity)
    assert not student.bert.embeddings.word_embeddings.weight.requires_grad
    assert all(m.p == 0.0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
    teacher = experiment.teacher
    words = student.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(words, teacher.embeddings.word_embeddings.weight)
    # the kept layers are the Teacher's (uniform map 6 -> 3: layers 2, 4, 6); their MLPs are copied unchanged
    torch.testing.assert_close(student.bert.encoder.layer[0].intermediate.dense.weight,
                               teacher.encoder.layer[1].intermediate.dense.weight)
    with pytest.raises(ValueError, match="keeps its width 384"):
        experiment.student(parse_setting("h4-d256-l3-from-teacher"), seed=0)


@pytest.mark.minilm
def test_tiny_real_run_writes_records_and_resumes(minilm, tmp_path: Path) -> None:
    from amad.bench import main

    out = tmp_path / "real"
    argv = ["--real", "--scale", "tiny", "--out", str(out), "--methods", "kd", "amad-mse", "--alpha-grid", "1",
            "--no-paper-alpha", "--jobs", "1", "--students", "h4-d384-l3-from-teacher"]
    assert main(argv) == 0
    records = json.loads((out / "results.json").read_text())
    metrics = ("cosine_pct", "top1_pct", "top5_pct")
    every = [*metrics, *(f"val_{m}" for m in metrics), *(f"stdlib_{m}" for m in metrics)]
    task = "minilm-text-h4-d384-l3-from-teacher"
    assert sorted((r["task"], r["method"], r["seed"], r["metric"]) for r in records) == sorted(
        (task, method, 0, metric) for method in ("init", "kd", "kd+amad-mse@x1") for metric in every)
    assert all(-100.0 <= r["value"] <= 100.0 for r in records)
    assert all(0.0 <= r["value"] for r in records if "cosine" not in r["metric"])
    table = (out / "results.md").read_text()
    assert f"## {task}" in table and "initialised from the Teacher" in table
    assert "| kd+amad-mse | " in table and "| x1 | " in table and "### stdlib docstrings" in table
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {f"{task}-cosine_pct.png", f"{task}-top1_pct.png", f"{task}-stdlib_top1_pct.png",
            f"{task}-stdlib_cosine_pct.png", f"{task}-stdlib_top5_pct.png"} <= plots
    assert any(name.endswith("-similarity.png") for name in plots)

    lines: list[str] = []
    from amad.bench.minilm_run import TextDemoSettings, run_text_demo

    summary = run_text_demo(TextDemoSettings(out=out, scale="tiny", methods=["kd", "kd+amad-mse"], echo=lines.append,
                                             students=[task[len("minilm-text-"):]], alpha_grid=(1.0,),
                                             paper_alpha=False))
    assert summary.trained == [] and len(summary.skipped) == 3
    assert json.loads((out / "results.json").read_text()) == records
    with pytest.raises(ValueError, match="another configuration"):
        run_text_demo(TextDemoSettings(out=out, scale="quick", methods=["kd"], echo=lines.append))


@pytest.mark.minilm
def test_tiny_real_run_with_grid_seeds(minilm, tmp_path: Path) -> None:
    """--grid-seeds 1: seed 0 runs every factor, seed 1 only the one chosen on seed 0's validation scores; a later
    seed alone on an empty directory is refused before any training."""
    from amad.bench import main
    from amad.bench.fair import choose_factors

    out = tmp_path / "real"
    common = ["--real", "--scale", "tiny", "--out", str(out), "--methods", "amad-kl", "--alpha-grid", "0.5,2",
              "--no-paper-alpha", "--jobs", "1", "--no-plots", "--students", "h4-d256-l3"]
    with pytest.raises(ValueError, match=r"seeds 0\.\.0 is not finished.*kd\+amad-kl@x0\.5 seed 0"):
        main([*common, "--first-seed", "1", "--seeds", "1", "--grid-seeds", "1"])
    assert not (out / "results.json").exists()
    with pytest.raises(SystemExit):  # a command starting inside the grid seeds but not at 0
        main([*common, "--first-seed", "1", "--seeds", "2", "--grid-seeds", "2"])

    assert main([*common, "--seeds", "2", "--grid-seeds", "1"]) == 0
    records = json.loads((out / "results.json").read_text())
    task = "minilm-text-h4-d256-l3"
    choice = choose_factors(records)[(task, "kd+amad-kl")]
    cells = {(r["method"], r["seed"]) for r in records}
    assert cells == {("init", 0), ("kd+amad-kl@x0.5", 0), ("kd+amad-kl@x2", 0), ("init", 1), (choice.name, 1)}
    assert choice.compared == (0,) and choice.complete
    assert "Grid seeds: only seeds 0 ran every factor" in (out / "results.md").read_text()
