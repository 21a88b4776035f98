"""Figures of attention-map distillation (like the AMAD paper's Figures 2-9), with matplotlib's Agg canvas.

Pure functions: tensors in, a ``matplotlib.figure.Figure`` out (no pyplot, no
global state), and :func:`save_figure` to write a PNG.

The matrices drawn come from the library: ``amad.losses.head_similarity`` (``W``,
the cosine similarity of Teacher head i's and Student head j's flattened maps) and
``amad.losses.alignment_matrix`` (the soft alignment ``A`` the loss uses).
* :func:`similarity_figure`: heatmaps of ``W`` and ``A`` side by side.
* :func:`head_maps_figure`: every head's map of one input, Teacher row over Student row.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["similarity_figure", "head_maps_figure", "save_figure"]

#: Heatmaps with at most this many cells get their values written in.
ANNOTATE_MAX_CELLS = 144


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
    teacher: Tensor, student: Tensor, *, title: str = "", labels: tuple[str, str] = ("Teacher", "Student")
) -> Figure:
    """Every head's attention map of one input: ``teacher`` ``(H_t, q, k)`` over ``student`` ``(H_s, q, k)``."""
    if teacher.dim() != 3 or student.dim() != 3 or teacher.shape[1:] != student.shape[1:]:
        raise ValueError(
            f"per-head maps must be (H, q, k) with the same q, k; got {tuple(teacher.shape)} and {tuple(student.shape)}"
        )
    columns = max(teacher.shape[0], student.shape[0])
    fig = Figure(figsize=(1.6 * columns + 1.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, columns, squeeze=False)
    vmax = float(max(teacher.max(), student.max(), 1e-12))
    for row, (maps, label) in enumerate(zip((teacher, student), labels)):
        for h in range(columns):
            ax = axes[row][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= maps.shape[0]:
                ax.axis("off")
                continue
            image = ax.imshow(maps[h].detach().cpu().float().numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(f"{label} h{h}", fontsize=8)
    fig.colorbar(image, ax=axes, fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (parent directories created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
