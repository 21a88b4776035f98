"""The module form of a loss, as the Distiller and configs use it.

Each loss family has a pure function at the top of its file (on maps, or on
Q/K/V) and a thin :class:`AttentionLoss` subclass registered by name below it.
The Distiller hands every loss the recorded :class:`~amad.attention.AttentionInputs`
of the Teacher and the Student layer through :meth:`AttentionLoss.from_inputs`;
map losses then either materialise the maps or stream over query blocks.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ..attention import AttentionInputs, check_map_shapes


def combined_mask(teacher: AttentionInputs, student: AttentionInputs) -> Tensor | None:
    """Entries valid for both models, ``(B, 1, q, k)`` boolean, or None if all are."""
    t, s = teacher.loss_mask(), student.loss_mask()
    if t is None:
        return s
    if s is None:
        return t
    return t & s


class AttentionLoss(nn.Module):
    """A distillation loss between one Teacher and one Student attention layer.

    ``needs`` says what it consumes: ``"maps"`` (probabilities), ``"values"``
    (maps and the value vectors, SHD) or ``"qkv"`` (MiniLMv2 relations).
    """

    needs: str = "maps"
    #: Function on maps: fn(teacher, student, *, mask=..., **options) -> scalar.
    map_fn: Callable[..., Tensor] | None = None
    #: Blockwise function on inputs: fn(teacher_inputs, student_inputs, *, block_size=..., **options) -> scalar.
    streaming_fn: Callable[..., Tensor] | None = None
    #: Why a loss without ``streaming_fn`` has no streaming form (required then; see :attr:`streams`).
    no_streaming_reason: str | None = None
    #: For each required option: how to choose its value, with an example (shown when it is missing).
    option_help: dict[str, str] = {}

    @property
    def streams(self) -> bool:
        """Whether :meth:`from_inputs` with ``streaming=True`` avoids whole maps (else it materialises them)."""
        return type(self).streaming_fn is not None

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = dict(options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def forward(self, teacher: Tensor, student: Tensor, mask: Tensor | None = None) -> Tensor:
        """The loss on materialised maps ``(B, H_t, q, k)`` and ``(B, H_s, q, k)``."""
        if self.map_fn is None:
            raise NotImplementedError(f"{type(self).__name__} is not defined on attention maps")
        return type(self).map_fn(teacher, student, mask=mask, **self.options)

    def from_inputs(
        self,
        teacher: AttentionInputs,
        student: AttentionInputs,
        *,
        streaming: bool = False,
        block_size: int | None = None,
    ) -> Tensor:
        """The loss from recorded layer inputs (Teacher side already detached).

        ``streaming=False`` materialises both maps; ``streaming=True`` uses
        :meth:`streaming_loss`, which never holds a whole map, when the loss
        :attr:`streams`, and materialises them otherwise (``no_streaming_reason`` says why).
        """
        check_map_shapes(teacher, student, name=type(self).__name__)
        self.check_inputs(teacher, student)
        if streaming and self.streams:
            return self.streaming_loss(teacher, student, block_size=block_size)
        return self.materialised_loss(teacher, student)

    def check_inputs(self, teacher: AttentionInputs, student: AttentionInputs) -> None:
        """Raise a clear error when the recorded inputs lack what this loss needs (nothing to check here)."""

    def materialised_loss(self, teacher: AttentionInputs, student: AttentionInputs) -> Tensor:
        """The loss on both materialised maps, masked where either side is padding."""
        return self(teacher.probs(), student.probs(), mask=combined_mask(teacher, student))

    def streaming_loss(
        self, teacher: AttentionInputs, student: AttentionInputs, *, block_size: int | None = None
    ) -> Tensor:
        """Blockwise form of the loss (see ``amad.losses.streaming``); never holds a whole map."""
        if self.streaming_fn is None:
            raise NotImplementedError(f"{type(self).__name__} has no streaming form: {self.no_streaming_reason}")
        return type(self).streaming_fn(teacher, student, block_size=block_size, **self.options)
