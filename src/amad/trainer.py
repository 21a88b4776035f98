"""`DistillationTrainer`: the Hugging Face `Trainer`, training a `Distiller`.

Everything the `Trainer` offers keeps working (TrainingArguments, mixed
precision, gradient accumulation, checkpoints and resuming, logging and
progress bars, evaluation with ``compute_metrics``, DDP through accelerate or
torchrun). What changes:

- the loss is the Distiller's total; each weighted term is logged separately as
  ``loss/<term>`` (averaged over the logging interval like ``loss``), the frozen
  alpha values once as ``alpha/<term>``, and evaluation adds
  ``eval_loss/<term>``;
- ``save_model(dir)`` and every checkpoint write the Student exactly as
  ``student.save_pretrained(dir)`` would (so ``from_pretrained(dir)`` loads it),
  plus ``distiller_state.safetensors``: the Distiller's own state (alpha
  buffers, learnable loss parameters), restored on ``resume_from_checkpoint``
  and when loading the best model. The Teacher is never saved or optimised;
- evaluation runs the Distiller: ``eval_loss`` is the distillation loss, and the
  predictions handed to ``compute_metrics`` are the Student's outputs (e.g.
  logits) with the batch's labels, as a plain ``Trainer`` on the Student gives.
  With ``alpha="auto"``, an evaluation before the first training batch weighs
  the attention terms by 0 (alpha is measured on training batches only);
- at the first training step, alpha is measured (or given weights checked) by
  :meth:`~amad.Distiller.calibrate_alpha` on ``alpha_batches`` batches drawn at
  random from the training set (seeded by ``data_seed`` or ``seed``), whatever
  the sampler (``group_by_length`` puts the longest batches first); an
  iterable dataset falls back to the first training batches. Logged once as
  ``alpha/<term>`` and ``grad_ratio/<term>``.

Sharding (FSDP2, both models; docs/distributed.md): under torchrun, pass
``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})`` or a Distiller
already sharded by :func:`amad.distributed.shard_for_fsdp`. The Teacher and the
Student are then sharded over the ranks (accelerate's own FSDP would shard the
Student only), ``save_model`` gathers the full Student, and checkpoints need
``save_only_model=True``; resuming and ``load_best_model_at_end`` under FSDP are
refused. DeepSpeed (``TrainingArguments(deepspeed=...)``): at ZeRO stage 3 the Teacher
gets its own partitioned engine as well (:mod:`amad.zero`). FSDP1, an FSDP
``accelerate config`` and SageMaker model parallelism are not supported.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Any, Callable, Iterator

import safetensors.torch
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_pt_utils import nested_detach
from transformers.utils import find_labels

from . import zero
from .checkpoints import AtomicCheckpoints
from .distiller import Distiller
from .distiller_state import (  # noqa: F401  (DISTILLER_STATE_NAME, STUDENT_PREFIX: public here too)
    DISTILLER_STATE_NAME,
    STUDENT_PREFIX,
    load_distiller_state,
    save_distiller_state,
    split_distiller_state,
)
from .distributed import full_state_dict, fsdp_options, is_sharded, shard_for_fsdp, unwrapped_class
from .losses import NonFiniteError

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"


class TermAverages:
    """Weighted running sums of named loss terms, averaged across steps and processes on demand."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.weight = 0.0

    def add(self, terms: dict[str, Tensor], weight: float) -> None:
        for name, value in terms.items():
            value = value.detach().float().mean() * weight  # .mean(): DataParallel returns one value per device
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.weight += weight

    def pop_means(self, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Each term's weighted mean (sums and weights added over processes by ``reduce``), then reset."""
        if not self.sums:
            return {}
        names = list(self.sums)
        device = self.sums[names[0]].device
        packed = torch.stack([self.sums[n].to(device) for n in names] + [torch.tensor(self.weight, device=device)])
        packed = reduce(packed)
        self.sums, self.weight = {}, 0.0
        return {name: (packed[i] / packed[-1]).item() for i, name in enumerate(names)}


def _student_predictions(student_outputs: Any, ignore_keys: list[str]) -> Any:
    """What a plain Trainer would hand to ``compute_metrics`` from the Student's outputs."""
    if isinstance(student_outputs, dict):
        predictions = tuple(v for k, v in student_outputs.items() if k not in ignore_keys + ["loss"])
    elif isinstance(student_outputs, (tuple, list)):
        predictions = tuple(student_outputs)
    else:
        predictions = (student_outputs,)
    predictions = nested_detach(predictions)
    return predictions[0] if len(predictions) == 1 else predictions


class DistillationTrainer(AtomicCheckpoints, Trainer):
    """A `transformers.Trainer` whose ``model`` is a :class:`~amad.Distiller`.

    Construct it exactly like a ``Trainer``. Checkpoints hold the Student (in
    its own ``save_pretrained`` format) and ``distiller_state.safetensors``,
    never the Teacher; only Student and learnable loss parameters reach the
    optimizer. Checkpoints are crash-safe (:mod:`amad.checkpoints`): ``resume_from_checkpoint=True`` resumes
    from the newest complete one.
    """

    # The Distiller's loss is a mean over its batch: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False
    # Checkpoints are written aside and renamed into place (amad.checkpoints); these files make one complete.
    checkpoint_files = (DISTILLER_STATE_NAME,)

    def __init__(self, model: Distiller | None = None, args: Any = None, *pargs: Any, **kwargs: Any) -> None:
        if model is not None:
            _require_distiller(model)
            _shard_if_requested(model, args)
        super().__init__(model, args, *pargs, **kwargs)
        if self.compute_loss_func is not None:
            raise ValueError(
                "DistillationTrainer optimises the Distiller's loss; configure it on the Distiller "
                "(gt_weight, output_loss, attention_loss) instead of compute_loss_func"
            )
        if self.args.label_smoothing_factor != 0:
            raise ValueError("label_smoothing_factor is not supported: the loss is the Distiller's (use gt_weight)")
        if self.is_fsdp_enabled:
            raise ValueError(
                "DistillationTrainer supports single-device, DDP, its own FSDP2 (TrainingArguments(fsdp=True) or "
                "amad.distributed.shard_for_fsdp) and DeepSpeed, not an FSDP accelerate config (it would shard the "
                "Student only): launch with torchrun or a plain multi-GPU accelerate config; see docs/distributed.md"
            )
        self._teacher_engine = None
        if self.is_deepspeed_enabled:
            if is_sharded(self.distiller):
                raise ValueError("a Distiller sharded with FSDP2 cannot also run under DeepSpeed: choose one")
            plugin = self.accelerator.state.deepspeed_plugin
            zero.fill_student_options(plugin.deepspeed_config, self.args, self.distiller.student)
            if zero.zero_stage(self.accelerator) == 3:  # the Trainer's engine partitions the Student; the Teacher:
                self._teacher_engine = zero.partition_teacher(self.distiller, self.accelerator, self.args)
        if is_sharded(self.distiller) and not getattr(self, "is_distributed_loading_by_transformers", False):
            raise RuntimeError(
                "this transformers' Trainer cannot run a model sharded before it (it would wrap it in DDP); FSDP "
                "with DistillationTrainer needs a newer transformers (5.23 is tested)"
            )
        if is_sharded(self.distiller) and self.args.load_best_model_at_end:
            raise ValueError("load_best_model_at_end is not supported under FSDP (checkpoints cannot be reloaded yet)")
        if self.args.activation_checkpointing:
            raise ValueError(
                "activation_checkpointing is not supported by DistillationTrainer (the Distiller is not a "
                "PreTrainedModel, and recording attention under recomputation is untested)"
            )
        # The Distiller's loss is a per-batch mean: skip the Trainer's token counting (an all-gather per step).
        self.model_accepts_loss_kwargs = False
        if self.args.label_names is None:
            self.label_names = find_labels(unwrapped_class(self.distiller.student))
        self._train_terms = TermAverages()
        self._eval_terms = TermAverages()
        self._alpha_logged = False
        self._alpha_calibrated = False

    def create_accelerator_and_postprocess(self) -> None:
        # FSDP is done by shard_for_fsdp (both models): accelerate's FSDP plugin, which would shard only the
        # Student, is not created from TrainingArguments(fsdp=...).
        plugin_args, self.args.fsdp_plugin_args = self.args.fsdp_plugin_args, None
        try:
            super().create_accelerator_and_postprocess()
        finally:
            self.args.fsdp_plugin_args = plugin_args

    @property
    def distiller(self) -> Distiller:
        """The (unwrapped) Distiller being trained."""
        return self.accelerator.unwrap_model(self.model)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        model = super().call_model_init(trial)
        _require_distiller(model)
        return model

    # -- columns, optimizer --------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        # The Distiller takes **batch; the columns worth keeping are the ones the Student's forward accepts.
        if self._signature_columns is None:
            student = self.distiller.student
            if hasattr(student, "get_base_model"):
                student = student.get_base_model()
            self._signature_columns = list(inspect.signature(student.forward).parameters)
            self._signature_columns += list({"label", "label_ids", *self.label_names})

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        teacher_ids = {id(p) for p in self.distiller.teacher.parameters()}
        leaked = sum(id(p) in teacher_ids for group in optimizer.param_groups for p in group["params"])
        if leaked:
            raise ValueError(f"the optimizer holds {leaked} Teacher parameter(s); the Teacher must stay frozen")
        return optimizer

    def floating_point_ops(self, inputs: dict[str, Tensor | Any]) -> int:
        """The Student's forward + backward estimate (the Teacher's forward is not counted)."""
        student = self.distiller.student
        return int(student.floating_point_ops(inputs)) if hasattr(student, "floating_point_ops") else 0

    # -- loss and logging ----------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        if model.training and self.distiller.measuring_alpha and not self._alpha_calibrated:
            self._alpha_calibrated = True
            self.calibrate_alpha()
        try:
            outputs = model(**inputs)
        except NonFiniteError as exc:
            raise _not_finite(exc, self.state, self.args, model.training) from exc
        if model.training:
            steps = getattr(self, "current_gradient_accumulation_steps", 1)
            self._train_terms.add(outputs.losses, weight=1.0 / steps)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def calibrate_alpha(self) -> None:
        """Measure the Distiller's alpha on random training batches (see the module doc)."""
        batches = _calibration_batches(self, self.distiller.alpha_batches_wanted)
        if batches is None:
            return  # the Distiller measures on the first training batches instead
        self.distiller.calibrate_alpha(self._prepare_inputs(batch) for batch in batches)

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation logs carry eval_loss, the final one train_loss)
            logs.update({f"loss/{k}": v for k, v in self._train_terms.pop_means(self._reduce_sum).items()})
            distiller = self.distiller
            if not self._alpha_logged and distiller.layer_pairs and distiller.alpha_frozen:
                logs.update({f"alpha/{k}": v for k, v in distiller.alpha_report().items()})
                logs.update({f"grad_ratio/{k}": v for k, v in distiller.alpha_balance().items()})
                self._alpha_logged = True
        super().log(logs, start_time)

    # -- evaluation ----------------------------------------------------------
    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Any, Any]:
        """Distillation loss on the batch; predictions are the Student's outputs, labels the batch's."""
        inputs = self._prepare_inputs(inputs)
        if ignore_keys is None:
            config = getattr(self.distiller.student, "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", ["past_key_values"]))
        labels = None
        if self.label_names and all(inputs.get(name) is not None for name in self.label_names):
            labels = nested_detach(tuple(inputs[name] for name in self.label_names))
            labels = labels[0] if len(labels) == 1 else labels
        with torch.no_grad(), self.compute_loss_context_manager():
            try:
                outputs = model(**inputs)
            except NonFiniteError as exc:
                raise _not_finite(exc, self.state, self.args, training=False) from exc
        loss = outputs.loss.detach().mean()
        batch_size = _batch_size(inputs)
        self._eval_terms.add(outputs.losses, weight=float(batch_size))
        if prediction_loss_only:
            return loss, None, None
        return loss, _student_predictions(outputs.student_outputs, ignore_keys), labels

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(Trainer.evaluation_loop).bind(self, *args, **kwargs)
        prefix = bound.arguments.get("metric_key_prefix", "eval")
        self._eval_terms = TermAverages()
        output = super().evaluation_loop(*args, **kwargs)
        terms = self._eval_terms.pop_means(self._reduce_sum)
        output.metrics.update({f"{prefix}_loss/{k}": v for k, v in terms.items()})
        return output

    # -- saving and loading --------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the Student as ``save_pretrained`` does, plus the Distiller's extras; never the Teacher."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        distiller = self.distiller
        if state_dict is None and is_sharded(distiller):
            state_dict = full_state_dict(distiller)  # a collective: every rank gathers, rank 0 gets it
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving the Student and distiller state to %s", output_dir)
        student_state, extras = split_distiller_state(distiller.state_dict() if state_dict is None else state_dict)
        student = distiller.student
        if isinstance(student, PreTrainedModel) or hasattr(student, "save_pretrained"):
            student.save_pretrained(output_dir, state_dict=student_state, is_main_process=True)
        else:
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in student_state.items()}
            weights_path = os.path.join(output_dir, "model.safetensors")
            safetensors.torch.save_file(tensors, weights_path, metadata={"format": "pt"})
        save_distiller_state(distiller, extras, output_dir)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        path = super().resolve_checkpoint(resume_from_checkpoint)
        if path is not None and self.is_deepspeed_enabled:
            raise ValueError("resuming from a checkpoint is not supported under DeepSpeed yet (the Distiller's own "
                             "state is not restored by its engine); train without resuming, or resume without DeepSpeed")
        return path

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if is_sharded(self.distiller):
            raise ValueError("resuming from a checkpoint is not supported under FSDP yet; train without resuming")
        # The checkpoint's weights are the Student's own: load them into the Student, then the extras.
        super()._load_from_checkpoint(resume_from_checkpoint, model=self.distiller.student)
        load_distiller_state(self.distiller, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # As the base class, but tied weights are the Student's (the base class asks self.model, the Distiller).
        student = self.distiller.student
        missing, unexpected = list(load_result.missing_keys), list(load_result.unexpected_keys)
        tied = getattr(student, "_keys_to_ignore_on_save", None)
        if missing and tied and set(missing) == set(tied):
            student.tie_weights()
        elif missing:
            logger.warning("There were missing keys in the checkpoint model loaded: %s.", missing)
        if unexpected:
            logger.warning("There were unexpected keys in the checkpoint model loaded: %s.", unexpected)


def _shard_if_requested(distiller: Distiller, args: Any) -> None:
    """Shard with FSDP2 when ``args.fsdp`` asks for it; mark a sharded Distiller for the Trainer."""
    if getattr(args, "fsdp", None) and not is_sharded(distiller):
        _ = args.device  # under torchrun, this initialises torch.distributed
        shard_for_fsdp(distiller, **fsdp_options(args.fsdp_config))
    if is_sharded(distiller):
        # The Trainer's flag for a model that owns its placement and gradient reduction (FSDP2 applied before
        # the Trainer): it is neither wrapped in DDP nor prepared by accelerate's FSDP.
        distiller.is_distributed_loading_by_transformers = True
def _calibration_batches(trainer: Trainer, count: int) -> Iterator[dict] | None:
    """Up to ``count`` batches of training rows drawn at random (seeded), each process taking its share.

    Batch b holds rows ``order[b*G : (b+1)*G]`` of a seeded permutation, ``G`` the per-process batch size
    times the number of processes, so N processes measure the batches one process would. None (measure on
    the first training batches instead) for a dataset without a length or smaller than one batch.
    """
    dataset = trainer.train_dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        logger.info("alpha: the training set has no length; it is measured on the first training batches")
        return None
    args = trainer.args
    per_process = getattr(trainer, "_train_batch_size", args.per_device_train_batch_size)
    size = per_process * args.world_size
    count = min(count, len(dataset) // size)
    if count == 0:
        logger.info("alpha: fewer than %d training rows; it is measured on the first training batches", size)
        return None
    seed = args.data_seed if args.data_seed is not None else args.seed
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    collate = trainer.data_collator
    if _is_arrow_dataset(dataset):  # as Trainer._get_dataloader: drop unused columns from the dataset or the batch
        dataset = trainer._remove_unused_columns(dataset, description="alpha calibration")
    else:
        collate = trainer._get_collator_with_removed_columns(collate, description="alpha calibration")
    offset = args.process_index * per_process
    shares = [order[b * size + offset : b * size + offset + per_process] for b in range(count)]
    return (collate([dataset[i] for i in share]) for share in shares)


def _is_arrow_dataset(dataset: Any) -> bool:
    datasets = sys.modules.get("datasets")  # an Arrow dataset means the package is already imported
    return datasets is not None and isinstance(dataset, datasets.Dataset)


def _not_finite(exc: NonFiniteError, state: Any, args: Any, training: bool) -> NonFiniteError:
    """``exc`` with the step it happened at and what to do: a Student that diverged needs a lower learning rate."""
    step = state.global_step + 1 if training else state.global_step
    where = f"at {'training' if training else 'the evaluation after'} step {step} (epoch {state.epoch or 0:.2f})"
    if exc.model == "teacher":
        hint = "the Teacher's outputs are not finite: check its weights (load it in float32 if it was saved in float16)"
    elif state.global_step == 0:
        hint = "the Student's outputs are not finite before any update: check its weights and config"
    else:
        hint = (f"training diverged: lower the learning rate (learning_rate = {args.learning_rate:g}), e.g. 10 times, "
                f"or keep gradient clipping on (max_grad_norm = {args.max_grad_norm:g})")
    return NonFiniteError(f"{where}: {exc}; {hint}", exc.model)


def _require_distiller(model: Any) -> None:
    if not isinstance(model, Distiller):
        raise TypeError(
            f"DistillationTrainer needs model= an amad.Distiller (Teacher + Student); got {type(model).__name__}"
        )


def _batch_size(inputs: dict[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1
