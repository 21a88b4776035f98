"""`Distiller`: one object that owns the frozen Teacher and computes the distillation loss.

    L = kd_weight * L_KD + sum_l alpha_l * L_attn(l) + gt_weight * L_GT

L_KD is the logit KD of docs/method.md (or any ``output_loss`` the user gives,
e.g. an embedding loss), L_attn(l) the chosen attention loss on the l-th
(Teacher layer, Student layer) pair, L_GT the Student's own ground-truth loss.
``alpha="auto"`` balances gradient norms (:mod:`amad.weighting`): measured on
``alpha_batches`` batches (:meth:`Distiller.calibrate_alpha`, which the
DistillationTrainer runs on random training batches, or else the first training
batches), then frozen and kept in the state dict, so a resumed run does not
measure it again.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from . import losses as loss_lib
from . import weighting
from .attention import AttentionInputs
from .capture import AttentionRecorder, check_layer_shapes, resolve_layer_pairs
from .compat import check_pair
from .losses.logits import OutputLoss, default_output_loss, token_mask
from .options import DistillOptions

logger = logging.getLogger(__name__)

@dataclass
class DistillationOutput(ModelOutput):
    """What one distillation step computed.

    loss: the total scalar; losses: each weighted term (for logging);
    student_outputs / teacher_outputs: the two models' own outputs.
    """

    loss: Tensor | None = None
    losses: dict[str, Tensor] | None = None
    student_outputs: Any = None
    teacher_outputs: Any = None


def query_mask_for(inputs: AttentionInputs, batch: dict) -> Tensor | None:
    """Real query rows of a recorded layer, ``(B, q)`` bool, or None.

    Self-attention with a key mask: the recorder's ``query_mask`` (a row is
    real iff its token is a key some row may attend). Otherwise (cross-attention,
    or no mask): the batch mask of length q (decoder labels / masks). The key
    mask of a cross-attention layer says nothing about its query rows, even
    when q == k by coincidence.
    """
    if inputs.query_mask is not None:
        return inputs.query_mask
    return token_mask(batch, inputs.q_len)


def _forget_alpha_done(distiller: "Distiller", _incompatible_keys: Any) -> None:
    distiller._alpha_done_known = False


def _checked_pair(teacher: nn.Module, student: nn.Module) -> list[int] | None:
    """Refuse a pair of Hugging Face models that cannot be matched; the Teacher's label index per Student label."""
    t_config, s_config = getattr(teacher, "config", None), getattr(student, "config", None)
    if not (hasattr(t_config, "to_dict") and hasattr(s_config, "to_dict")):
        return None
    return check_pair(t_config, s_config, teacher_class=type(teacher).__name__, student_class=type(student).__name__)


class Distiller(nn.Module):
    """Frozen Teacher + trainable Student + the distillation objective.

    Only the Student and learnable parts of the losses are submodules: the
    Teacher is never in ``parameters()``, ``state_dict()`` or an optimizer, and
    stays in eval mode with gradients off.

    Models with Hugging Face configs are checked to form a pair
    (:func:`amad.compat.check_pair`); classifiers whose ``id2label`` name the
    same labels in another order are matched by name: the Teacher's logits are
    put in the Student's label order before any output loss sees them (labels
    in the batch are the Student's).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        attention_loss: str | None = "amad-mse",
        layers: str | Sequence[tuple[str, str]] = "last",
        alpha: float | str | Sequence[float] = "auto",
        kd_temperature: float = 1.0,
        kd_top_k: int | None = None,
        gt_weight: float = 0.0,
        streaming: bool = True,
        kd_weight: float = 1.0,
        attention_loss_options: dict | None = None,
        output_loss: OutputLoss | None = None,
        alpha_batches: int = 8,
        block_size: int | None = None,
        alpha_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        if teacher is student:
            raise ValueError("teacher and student must be different modules")
        self.teacher_label_order = _checked_pair(teacher, student)
        self.options = options = DistillOptions(
            attention_loss=attention_loss,
            attention_loss_options=dict(attention_loss_options or {}),
            layers=layers if isinstance(layers, str) else [list(pair) for pair in layers],
            alpha=alpha if isinstance(alpha, (str, int, float)) else [float(a) for a in alpha],
            alpha_batches=alpha_batches,
            kd_temperature=kd_temperature,
            kd_top_k=kd_top_k,
            kd_weight=kd_weight,
            gt_weight=gt_weight,
            streaming=streaming,
            block_size=block_size,
            alpha_ratio=alpha_ratio,
        )
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never saved or optimised
        teacher.eval().requires_grad_(False)
        self.student = student
        self.kd_weight = float(kd_weight)
        self.gt_weight = float(gt_weight)
        self.kd_temperature = float(kd_temperature)
        self.streaming = bool(streaming)
        self.block_size = block_size
        self.alpha_batches = int(alpha_batches)
        self.alpha_ratio = float(alpha_ratio)
        self.output_loss = output_loss or default_output_loss(self.kd_temperature, kd_top_k)
        self.attention_loss_name = attention_loss

        options.check_attention_loss()
        if attention_loss is None:
            self.layer_pairs: list[tuple[str, str]] = []
        else:
            try:
                self.layer_pairs = resolve_layer_pairs(teacher, student, options.layer_spec())
            except (TypeError, ValueError) as exc:
                raise ValueError(f"layers: {exc}") from None
        self.attention_losses = nn.ModuleList(
            [loss_lib.get(attention_loss, **options.attention_loss_options) for _ in self.layer_pairs]
        )
        self._init_alpha(alpha, options.attention_loss_options)
        self._shapes_checked = False

    @classmethod
    def from_options(
        cls, teacher: nn.Module, student: nn.Module, options: DistillOptions, *, output_loss: OutputLoss | None = None
    ) -> "Distiller":
        """A Distiller with the options of a :class:`~amad.options.DistillOptions` (e.g. a config's)."""
        kwargs = {name: getattr(options, name) for name in DistillOptions.names()}
        return cls(teacher, student, output_loss=output_loss, **kwargs)

    # -- alpha --------------------------------------------------------------
    def _init_alpha(self, alpha: float | str | Sequence[float], options: dict) -> None:
        n = len(self.layer_pairs)
        self.alpha_rule = alpha if isinstance(alpha, str) and alpha in weighting.ALPHA_RULES else "fixed"
        if self.alpha_rule != "fixed":
            values = torch.zeros(n, dtype=torch.float64)
        elif alpha == "paper":
            values = torch.full((n,), weighting.paper_alpha(self.attention_loss_name, options) if n else 0.0,
                                dtype=torch.float64)
        elif isinstance(alpha, (int, float)):
            values = torch.full((n,), float(alpha), dtype=torch.float64)
        else:  # a list (its form was checked by DistillOptions)
            values = torch.tensor([float(a) for a in alpha], dtype=torch.float64)
            if values.numel() != n:
                raise ValueError(f"alpha: {values.numel()} values for {n} layer pairs {self.layer_pairs}")
        self.register_buffer("alpha", values)
        # Measurement (weighting.measure_batch rows, summed over batches); done once enough batches were seen.
        # Fixed weights are measured on one batch, only to check the balance.
        self.register_buffer("_alpha_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("_alpha_sums", torch.zeros(4, n, dtype=torch.float64))
        self.register_buffer("_alpha_done", torch.tensor(n == 0))
        # True once _alpha_done was read True: later steps need no host read (a GPU synchronisation) of it.
        # Loading a state may set it back, so loading forgets it.
        self._alpha_done_known = False
        self.register_load_state_dict_post_hook(_forget_alpha_done)

    @property
    def auto_alpha(self) -> bool:
        """Whether alpha is measured (``"auto"`` or ``"loss-ratio"``) rather than given."""
        return self.alpha_rule != "fixed"

    def _alpha_is_done(self) -> bool:
        """``bool(self._alpha_done)``, read from the buffer until it is True (then remembered)."""
        if not self._alpha_done_known:
            self._alpha_done_known = bool(self._alpha_done)
        return self._alpha_done_known

    @property
    def alpha_frozen(self) -> bool:
        """Whether alpha has its final value (always, for given weights)."""
        return not self.auto_alpha or self._alpha_is_done()

    @property
    def measuring_alpha(self) -> bool:
        """Whether the next training batch is measured (for a measured alpha, or the check of a given one)."""
        return not self._alpha_is_done()

    @property
    def alpha_batches_wanted(self) -> int:
        """How many batches the measurement takes: ``alpha_batches``, or 1 to check given weights."""
        return self.alpha_batches if self.auto_alpha else 1

    def _reference_term(self, losses: dict[str, Tensor]) -> Tensor | None:
        """R: the output-level weighted terms (KD and ground truth) the attention terms are balanced against."""
        parts = [losses[k] for k in ("kd", "gt") if k in losses]
        return sum(parts[1:], parts[0]) if parts else None

    def _measure_alpha(self, losses: dict[str, Tensor], raw_terms: list[Tensor]) -> None:
        reference = self._reference_term(losses)
        if reference is None:
            if self.auto_alpha:
                raise ValueError(
                    f"alpha={self.alpha_rule!r} balances the attention terms against the KD or ground-truth term, "
                    "and both weights are 0; give alpha numbers"
                )
            self._alpha_done.fill_(True)  # nothing to check given weights against
            return
        params = [p for p in self.student.parameters() if p.requires_grad]
        self._alpha_sums += weighting.measure_batch(reference, raw_terms, params).to(self._alpha_sums.device)
        self._alpha_seen += 1
        if self.auto_alpha:  # the estimate so far weighs the terms of the measuring batches too
            self.alpha.copy_(weighting.balanced_alpha(self._alpha_sums, self.alpha_rule, self.alpha_ratio)[0])
        if int(self._alpha_seen) >= self.alpha_batches_wanted:
            self._finish_alpha()

    def _finish_alpha(self) -> None:
        """Freeze alpha, log it and warn if the weighted terms are far out of balance."""
        self._alpha_done.fill_(True)
        seen, names = int(self._alpha_seen), [self._term_name(i) for i in range(len(self.layer_pairs))]
        if self.auto_alpha:
            _, unbalanced, vanishing = weighting.balanced_alpha(self._alpha_sums, self.alpha_rule, self.alpha_ratio)
            for i in unbalanced:
                warnings.warn(
                    f"alpha={self.alpha_rule!r}: {names[i]} cannot be balanced, its measure or the KD term's was 0 "
                    f"over {seen} batch(es) (no gradient on their shared Student parameters, or a zero loss); "
                    "its alpha is set to 1",
                    weighting.AlphaImbalanceWarning, stacklevel=3,
                )
            for i in vanishing:
                warnings.warn(
                    f"alpha='auto': the Student gradient of {names[i]} vanishes where it was measured (its norm is "
                    f"{float(self._alpha_sums[1, i] / self._alpha_sums[0, i]):.3g} of the output terms', e.g. "
                    "uniform maps from a near-zero initialisation), so balancing it would give an alpha that "
                    f"explodes once training moves; it takes the loss-ratio alpha {float(self.alpha[i]):.4g} "
                    "instead. Give alpha as numbers to choose it yourself",
                    weighting.AlphaImbalanceWarning, stacklevel=3,
                )
            logger.info("alpha=%r (alpha_ratio %g) frozen after %d batch(es): %s", self.alpha_rule,
                        self.alpha_ratio, seen, self.alpha_report())
        logger.info("Student-gradient norm of each weighted attention term / that of the output terms (KD, "
                    "ground truth), over %d batch(es): %s", seen, self.alpha_balance())
        message = weighting.imbalance_message(names, weighting.gradient_ratios(self.alpha, self._alpha_sums),
                                              batches=seen, reference="+".join(self._reference_names()))
        if message:
            warnings.warn(message, weighting.AlphaImbalanceWarning, stacklevel=3)

    def _reference_names(self) -> list[str]:
        return [name for name, weight in (("kd", self.kd_weight), ("gt", self.gt_weight)) if weight] or ["kd"]

    def calibrate_alpha(self, batches: Iterable[dict]) -> dict[str, float]:
        """Measure alpha (or check given weights) on ``batches``, without training; returns :meth:`alpha_report`.

        Runs the training forward (train mode, gradients on) on each batch until ``alpha_batches`` were
        measured, then freezes alpha, even if fewer batches came. Nothing is written to ``.grad``, the
        random state is left as it was, and autocast is off (measured in the weights' precision). Give
        batches drawn at random from the training data: the first batches of a length-sorted sampler
        (``group_by_length``) are the longest, which biases any rule. Does nothing once alpha is frozen
        (e.g. restored from a checkpoint).
        """
        if not self.measuring_alpha:
            return self.alpha_report()
        was_training = self.training
        params = (*self.teacher.parameters(), *self.parameters())
        devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        self.train()
        try:
            with ExitStack() as stack:
                stack.enter_context(torch.random.fork_rng(devices=devices))
                stack.enter_context(torch.enable_grad())
                for device_type in {p.device.type for p in params} & {"cpu", "cuda"}:
                    # measured in the weights' precision: float16 autocast could flush small gradients to 0
                    stack.enter_context(torch.autocast(device_type, enabled=False))
                for batch in batches:
                    self(**batch)
                    if not self.measuring_alpha:
                        break
        finally:
            self.train(was_training)
        if self.measuring_alpha:
            if int(self._alpha_seen) == 0:
                raise ValueError("calibrate_alpha: no batch to measure alpha on")
            self._finish_alpha()
        return self.alpha_report()

    def alpha_report(self) -> dict[str, float]:
        """The alpha of each layer pair, keyed like ``.losses``."""
        return {self._term_name(i): float(a) for i, a in enumerate(self.alpha)}

    def alpha_balance(self) -> dict[str, float]:
        """Measured ``alpha_l * mean ||dL_l|| / mean ||dR||`` of each pair (empty before any measurement)."""
        if int(self._alpha_seen) == 0:
            return {}
        ratios = weighting.gradient_ratios(self.alpha, self._alpha_sums)
        return {self._term_name(i): float(r) for i, r in enumerate(ratios)}

    # -- modes / devices ----------------------------------------------------
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "Distiller":
        self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    # -- forward ------------------------------------------------------------
    def _cuda_devices(self) -> list[int]:
        return sorted({p.device.index or 0 for p in self.teacher.parameters() if p.device.type == "cuda"})

    def _term_name(self, i: int) -> str:
        t, s = self.layer_pairs[i]
        return f"attn[{t}->{s}]"

    def forward(self, **batch: Any) -> DistillationOutput:
        t_names = [t for t, _ in self.layer_pairs]
        s_names = [s for _, s in self.layer_pairs]
        with ExitStack() as stack:
            t_rec = stack.enter_context(AttentionRecorder(self.teacher, t_names)) if t_names else None
            # Both models start from the same random state: random input sampling (ViLT draws a random
            # order of image patches) then agrees when nothing random runs before it (no dropout).
            with torch.no_grad(), torch.random.fork_rng(devices=self._cuda_devices()):
                teacher_outputs = self.teacher(**batch)
                if self.teacher_label_order is not None and getattr(teacher_outputs, "logits", None) is not None:
                    # the Teacher's logits in the Student's label order
                    teacher_outputs["logits"] = teacher_outputs["logits"][..., self.teacher_label_order]
            s_rec = stack.enter_context(AttentionRecorder(self.student, s_names)) if s_names else None
            student_outputs = self.student(**batch)
            raw_terms = self._attention_terms(t_rec, s_rec, batch) if self.layer_pairs else []

        losses: dict[str, Tensor] = {}
        total = student_outputs_loss = None
        kd = self.output_loss(student_outputs, teacher_outputs, batch) if self.kd_weight else None
        if kd is not None:
            losses["kd"] = self.kd_weight * kd
        if self.gt_weight:
            student_outputs_loss = getattr(student_outputs, "loss", None)
            if student_outputs_loss is None:
                raise ValueError("gt_weight > 0 needs a Student that returns `.loss` (pass labels in the batch)")
            losses["gt"] = self.gt_weight * student_outputs_loss
        if raw_terms and self.measuring_alpha and self.training and torch.is_grad_enabled():
            self._measure_alpha(losses, raw_terms)
        for i, term in enumerate(raw_terms):
            losses[self._term_name(i)] = self.alpha[i].to(term.dtype) * term
        if not losses:
            raise ValueError("nothing to optimise: kd_weight=0, gt_weight=0 and no attention loss")
        dtype = torch.float32  # half-precision terms are summed in float32; float64 stays float64
        for value in losses.values():
            dtype = torch.promote_types(dtype, value.dtype)
        total = torch.stack([v.to(dtype) for v in losses.values()]).sum()
        return DistillationOutput(
            loss=total, losses=losses, student_outputs=student_outputs, teacher_outputs=teacher_outputs
        )

    def _attention_terms(
        self, t_rec: AttentionRecorder | None, s_rec: AttentionRecorder | None, batch: dict
    ) -> list[Tensor]:
        terms = []
        for (t_name, s_name), loss in zip(self.layer_pairs, self.attention_losses):
            t_in = t_rec.inputs(t_name).detach()
            s_in = s_rec.inputs(s_name)
            if not self._shapes_checked:
                check_layer_shapes(t_name, t_in, s_name, s_in)
            t_in = replace(t_in, query_mask=query_mask_for(t_in, batch))
            s_in = replace(s_in, query_mask=query_mask_for(s_in, batch))
            terms.append(loss.from_inputs(t_in, s_in, streaming=self.streaming, block_size=self.block_size))
        self._shapes_checked = True
        return terms

    def extra_repr(self) -> str:
        return (
            f"attention_loss={self.attention_loss_name!r}, pairs={self.layer_pairs}, "
            f"streaming={self.streaming}, kd_weight={self.kd_weight}, gt_weight={self.gt_weight}"
        )
