"""Figures of attention-map distillation (like the AMAD paper's Figures 2-9), with matplotlib's Agg canvas.

Pure functions: tensors in, a ``matplotlib.figure.Figure`` out (no pyplot, no
global state), and :func:`save_figure` to write a PNG.

The matrices drawn come from the library: ``amad.losses.head_similarity`` (``W``,
the cosine similarity of Teacher head i's and Student head j's flattened maps) and
``amad.losses.alignment_matrix`` (the soft alignment ``A`` the loss uses).
* :func:`similarity_figure`: heatmaps of ``W`` and ``A`` side by side.
* :func:`head_maps_figure`: every head's map of one input, Teacher row over Student row, queries on
  the y axis and keys on the x axis, with the tokens as tick labels for short sequences
  (:func:`axis_tokens` finds them in a batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["similarity_figure", "head_maps_figure", "axis_tokens", "save_figure"]

#: Heatmaps with at most this many cells get their values written in.
ANNOTATE_MAX_CELLS = 144
#: Per-head maps of sequences up to this long get their tokens as tick labels.
TOKEN_TICKS_MAX = 40


def _heatmap(fig: Figure, ax: object, matrix: Tensor, title: str, vmin: float, vmax: float) -> None:
    data = matrix.detach().cpu().float().numpy()
    image = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("Student head")
    ax.set_ylabel("Teacher head")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    if data.size <= ANNOTATE_MAX_CELLS:
        middle = (vmin + vmax) / 2
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                colour = "black" if data[i, j] > middle else "white"
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def similarity_figure(similarity: Tensor, alignment: Tensor | None = None, *, title: str = "") -> Figure:
    """Heatmap of the ``(H_t, H_s)`` similarity matrix, and of the alignment ``A`` next to it if given."""
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be (H_t, H_s); got {tuple(similarity.shape)}")
    if alignment is not None and alignment.shape != similarity.shape:
        raise ValueError(f"alignment {tuple(alignment.shape)} must match similarity {tuple(similarity.shape)}")
    h_t, h_s = similarity.shape
    panels = 1 if alignment is None else 2
    width = max(4.0, 0.45 * h_s + 2.5)
    fig = Figure(figsize=(width * panels, max(3.5, 0.4 * h_t + 1.8)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _heatmap(fig, axes[0], similarity, "cosine similarity W", float(min(0.0, similarity.min())), 1.0)
    if alignment is not None:
        _heatmap(fig, axes[1], alignment, "AMAD alignment softmax_j(W)", 0.0, float(alignment.max()))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def head_maps_figure(
    teacher: Tensor, student: Tensor, *, title: str = "", labels: tuple[str, str] = ("Teacher", "Student"),
    query_tokens: Sequence[str] | None = None, key_tokens: Sequence[str] | None = None,
) -> Figure:
    """Every head's attention map of one input: ``teacher`` ``(H_t, q, k)`` over ``student`` ``(H_s, q, k)``.

    Rows of a map are queries (y axis), columns keys (x axis). ``query_tokens`` /
    ``key_tokens`` (``q`` / ``k`` strings) label the axes when the sequence has
    at most :data:`TOKEN_TICKS_MAX` positions; otherwise the axes show positions.
    """
    if teacher.dim() != 3 or student.dim() != 3 or teacher.shape[1:] != student.shape[1:]:
        raise ValueError(
            f"per-head maps must be (H, q, k) with the same q, k; got {tuple(teacher.shape)} and {tuple(student.shape)}"
        )
    q, k = teacher.shape[1:]
    for name, tokens, size in (("query_tokens", query_tokens, q), ("key_tokens", key_tokens, k)):
        if tokens is not None and len(tokens) != size:
            raise ValueError(f"{name}: {len(tokens)} tokens for {size} positions")
    query_ticks = list(query_tokens) if query_tokens is not None and q <= TOKEN_TICKS_MAX else None
    key_ticks = list(key_tokens) if key_tokens is not None and k <= TOKEN_TICKS_MAX else None
    columns = max(teacher.shape[0], student.shape[0])
    side = min(4.0, max(1.6, 0.13 * max(q, k))) if (query_ticks or key_ticks) else 1.6
    fig = Figure(figsize=(side * columns + 1.6, 2 * side + 1.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, columns, squeeze=False)
    vmax = float(max(teacher.max(), student.max(), 1e-12))
    for row, (maps, label) in enumerate(zip((teacher, student), labels)):
        for h in range(columns):
            ax = axes[row][h]
            if h >= maps.shape[0]:
                ax.axis("off")
                continue
            image = ax.imshow(maps[h].detach().cpu().float().numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(f"{label} h{h}", fontsize=8)
            _map_axes(ax, query_ticks, key_ticks, left=h == 0, bottom=row == 1)
    fig.colorbar(image, ax=axes, fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _map_axes(ax: object, query_ticks: list[str] | None, key_ticks: list[str] | None, *, left: bool,
              bottom: bool) -> None:
    """Queries on the y axis, keys on the x axis: labelled on the outer panels, tokens as ticks when given."""
    ax.tick_params(labelsize=5, length=2, labelbottom=bottom, labelleft=left)
    if key_ticks is not None:
        ax.set_xticks(range(len(key_ticks)), key_ticks, rotation=90)
    if query_ticks is not None:
        ax.set_yticks(range(len(query_ticks)), query_ticks)
    if bottom:
        ax.set_xlabel("key", fontsize=7)
    if left:
        ax.set_ylabel("query", fontsize=7)


#: Module-name parts of cross-attention layers (their keys are the encoder's tokens).
CROSS_ATTENTION_PARTS = ("EncDecAttention", "crossattention", "encoder_attn", "cross_attn", "cross_attention")


def axis_tokens(batch: dict, tokenizer: Any, layer: str, q: int, k: int) -> tuple[list[str] | None, list[str] | None]:
    """The tokens along the query and key axes of ``layer``'s map for the first input of ``batch`` (None: unknown).

    Encoder layers read ``input_ids``; decoder layers read the decoder's inputs
    (``decoder_input_ids``, or the start token and ``labels`` shifted right);
    a cross-attention layer's keys are the encoder's tokens. Tokens are kept only
    where their number matches the map's side.
    """
    if tokenizer is None:
        return None, None

    def tokens(ids: Any) -> list[str]:
        return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]

    encoder = tokens(batch["input_ids"][0]) if isinstance(batch.get("input_ids"), Tensor) else None
    decoder, labels = None, batch.get("labels")
    if isinstance(batch.get("decoder_input_ids"), Tensor):
        decoder = tokens(batch["decoder_input_ids"][0])
    elif isinstance(labels, Tensor) and labels.dim() == 2 and not labels.is_floating_point():  # token labels
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        decoder = ["<start>"] + tokens(labels[0, :-1].masked_fill(labels[0, :-1] < 0, pad))
    parts = layer.split(".")
    in_decoder = "decoder" in parts
    cross = any(part in CROSS_ATTENTION_PARTS for part in parts)
    query = decoder if in_decoder else encoder
    key = encoder if cross else query
    return (query if query is not None and len(query) == q else None,
            key if key is not None and len(key) == k else None)


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (parent directories created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
