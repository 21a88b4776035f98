"""Figure helpers: the similarity and alignment matrices against a plain loop, and the figures themselves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from amad.losses.alignment import alignment_matrix
from amad.cli.plotting import head_maps_figure, save_figure, similarity_figure
from amad.losses import alignment_matrix, head_similarity

PNG = b"\x89PNG\r\n\x1a\n"


def random_maps(batch: int, heads: int, q: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, heads, q, k, generator=generator, dtype=torch.float64) * 2, dim=-1)


def loop_similarity(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """cos(T_i, S_j) of the flattened maps, one pair at a time."""
    batch, h_t, h_s = teacher.shape[0], teacher.shape[1], student.shape[1]
    out = torch.zeros(batch, h_t, h_s, dtype=torch.float64)
    for b in range(batch):
        for i in range(h_t):
            for j in range(h_s):
                t = [float(v) for v in teacher[b, i].flatten()]
                s = [float(v) for v in student[b, j].flatten()]
                dot = sum(x * y for x, y in zip(t, s))
                out[b, i, j] = dot / (math.sqrt(sum(x * x for x in t)) * math.sqrt(sum(y * y for y in s)))
    return out


def loop_softmax(rows: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(rows)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in rows.shape[:-1]]).reshape(-1, rows.dim() - 1):
        row = [float(v) for v in rows[tuple(index)]]
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        out[tuple(index)] = torch.tensor([e / sum(exps) for e in exps], dtype=rows.dtype)
    return out


@pytest.mark.parametrize("h_t, h_s", [(3, 5), (4, 2), (2, 2)])
def test_head_similarity_matches_a_loop(h_t: int, h_s: int) -> None:
    teacher, student = random_maps(2, h_t, 3, 4, seed=0), random_maps(2, h_s, 3, 4, seed=1)
    similarity = head_similarity(teacher, student)
    assert similarity.shape == (2, h_t, h_s) and similarity.dtype == torch.float64
    assert torch.allclose(similarity, loop_similarity(teacher, student), atol=1e-12)


def test_plotted_alignment_is_the_softmax_of_the_similarity() -> None:
    teacher, student = random_maps(2, 4, 3, 3, seed=2), random_maps(2, 3, 3, 3, seed=3)
    similarity = head_similarity(teacher, student)
    alignment = alignment_matrix(teacher, student, variant="mse")
    assert torch.allclose(alignment, loop_softmax(similarity), atol=1e-12)
    assert torch.allclose(alignment.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    sharper = alignment_matrix(teacher, student, variant="mse", temperature=0.1)
    assert torch.allclose(sharper, loop_softmax(similarity / 0.1), atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        alignment_matrix(teacher, student, variant="mse", temperature=0.0)


def test_zero_map_has_zero_similarity_not_nan() -> None:
    teacher = random_maps(1, 2, 2, 2, seed=4)
    student = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    student[0, 1] = teacher[0, 0]
    similarity = head_similarity(teacher, student)
    assert torch.isfinite(similarity).all()
    assert similarity[0, :, 0].eq(0).all() and similarity[0, 0, 1] == pytest.approx(1.0)


def test_half_precision_maps_are_computed_in_float32() -> None:
    teacher, student = random_maps(1, 2, 3, 3, seed=5), random_maps(1, 2, 3, 3, seed=6)
    similarity = head_similarity(teacher.half(), student.bfloat16())
    assert similarity.dtype == torch.float32
    assert torch.allclose(similarity.double(), head_similarity(teacher, student), atol=1e-2)


def test_mismatched_maps_are_refused() -> None:
    with pytest.raises(ValueError, match=r"must have the same batch size, query length q and key length k"):
        head_similarity(random_maps(1, 2, 3, 3, 0), random_maps(1, 2, 3, 4, 1))
    with pytest.raises(ValueError, match=r"teacher maps must have shape \(B, H, q, k\); got \(2, 3, 3\)"):
        head_similarity(torch.zeros(2, 3, 3), torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"similarity must be \(H_t, H_s\)"):
        similarity_figure(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"alignment \(3, 2\) must match similarity \(2, 3\)"):
        similarity_figure(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"per-head maps must be \(H, q, k\)"):
        head_maps_figure(torch.zeros(2, 3, 3), torch.zeros(2, 4, 4))


def test_similarity_figure_draws_both_heatmaps(tmp_path: Path) -> None:
    similarity = head_similarity(random_maps(3, 4, 5, 5, 7), random_maps(3, 3, 5, 5, 8)).mean(0)
    fig = similarity_figure(similarity, similarity.softmax(-1), title="layer pair")
    assert isinstance(fig, Figure)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 2  # W and A (the other axes are their colour bars)
    assert torch.allclose(torch.as_tensor(images[0].data).double(), similarity, atol=1e-6)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert len(texts) == 2 * 12 and f"{float(similarity[0, 0]):.2f}" in texts  # small matrices are annotated
    path = save_figure(fig, tmp_path / "deep" / "sim.png")
    assert path.read_bytes()[:8] == PNG
    only_w = similarity_figure(torch.rand(16, 12))
    assert sum(1 for ax in only_w.axes if ax.images) == 1 and not any(ax.texts for ax in only_w.axes)


def test_head_maps_figure_has_one_panel_per_head(tmp_path: Path) -> None:
    teacher, student = random_maps(1, 4, 6, 6, 9)[0], random_maps(1, 2, 6, 6, 10)[0]
    fig = head_maps_figure(teacher, student, title="input 0")
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 6
    titles = sorted(ax.get_title() for ax in drawn)
    assert titles == sorted([f"Teacher h{h}" for h in range(4)] + [f"Student h{h}" for h in range(2)])
    student_h1 = next(ax for ax in drawn if ax.get_title() == "Student h1")
    assert torch.allclose(torch.as_tensor(student_h1.images[0].get_array().data).double(), student[1], atol=1e-6)
    assert save_figure(fig, tmp_path / "heads.png").read_bytes()[:8] == PNG


def test_per_head_maps_have_query_and_key_axes_with_tokens() -> None:
    teacher, student = random_maps(1, 2, 3, 4, 11)[0], random_maps(1, 3, 3, 4, 12)[0]
    fig = head_maps_figure(teacher, student, query_tokens=["a", "b", "c"], key_tokens=["w", "x", "y", "z"])
    corner = next(ax for ax in fig.axes if ax.get_title() == "Student h0")
    assert (corner.get_xlabel(), corner.get_ylabel()) == ("key", "query")
    assert [t.get_text() for t in corner.get_xticklabels()] == ["w", "x", "y", "z"]
    assert [t.get_text() for t in corner.get_yticklabels()] == ["a", "b", "c"]
    plain = head_maps_figure(teacher, student)  # no tokens: positions, still labelled
    assert next(ax for ax in plain.axes if ax.get_title() == "Teacher h0").get_ylabel() == "query"
    with pytest.raises(ValueError, match="key_tokens: 3 tokens for 4 positions"):
        head_maps_figure(teacher, student, key_tokens=["a", "b", "c"])


def test_axis_tokens_follow_encoder_decoder_and_cross_attention() -> None:
    from amad.cli.plotting import axis_tokens

    class Tokens:
        pad_token_id = 0

        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[8, 9, -100, -100]])}
    tok = Tokens()
    assert axis_tokens(batch, tok, "encoder.block.1.layer.0.SelfAttention", 3, 3) == (["t5", "t6", "t7"],) * 2
    decoder = ["<start>", "t8", "t9", "t0"]  # labels shifted right, padding shown as the pad token
    assert axis_tokens(batch, tok, "decoder.block.1.layer.0.SelfAttention", 4, 4) == (decoder, decoder)
    assert axis_tokens(batch, tok, "decoder.block.1.layer.1.EncDecAttention", 4, 3) == (decoder, ["t5", "t6", "t7"])
    assert axis_tokens(batch, tok, "vilt.encoder.layer.1.attention", 9, 9) == (None, None)  # text + patches
    assert axis_tokens(batch, None, "encoder.layer.0", 3, 3) == (None, None)
