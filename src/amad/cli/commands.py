"""What ``amad distill``, ``amad evaluate`` and ``amad plot`` do (imported by :mod:`amad.cli` when a command runs).

Order of work in every command: parse and validate the config, read the data
and the model configs and check them (all :class:`~amad.cli.typed.ConfigError`,
exit code 2), and only then load weights and run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .building import (
    check_model_pair, check_processors, load_image_processor, load_model, load_tokenizer, model_config, model_configs,
    run_tokenizer,
)
from .causal_lm import CausalLMCollator, causal_lm_rows
from .config import ModelSpec, RunConfig, check_distill, config_to_dict, load_config, training_arguments
from .data import TaskCollator, check_labels, expand_references, label_names, load_splits
from .run_dir import check_run_dir, remove_previous_run, resume_hint
from .typed import ConfigError

logger = logging.getLogger("amad.cli")

__all__ = [
    "Prepared", "prepare", "Distilled", "run_distillation", "distill", "evaluate", "plot", "PLOT_INPUTS", "SUMMARY",
    "EVAL_RESULTS",
]

PLOT_INPUTS = "plot_inputs.pt"
SUMMARY = "summary.json"
EVAL_RESULTS = "eval_results.json"
#: How many single-input batches ``amad distill`` keeps for ``amad plot``.
PLOT_SAMPLES = 8


@dataclass
class Prepared:
    """Everything a run needs except the weights."""

    cfg: RunConfig
    train: Any
    eval: Any
    teacher_config: Any
    student_config: Any
    tokenizer: Any
    image_processor: Any
    collator: TaskCollator


def prepare(cfg: RunConfig, *, need_eval: bool = False) -> Prepared:
    """Read the data, build and check the model configs and processors; no weights are loaded."""
    train, evaluation = load_splits(cfg, need_eval=need_eval)
    teacher_config, student_config = model_configs(cfg, label_names=lambda t: label_names(cfg, t, train))
    check_labels(train, cfg, teacher_config, cfg.data.train)
    if evaluation is not None:
        check_labels(evaluation, cfg, teacher_config, cfg.data.eval or cfg.data.train)
    tokenizer = run_tokenizer(cfg)
    image_processor = load_image_processor(cfg.image_processor) if cfg.image_processor else None
    check_processors(tokenizer, image_processor, teacher_config)
    if cfg.task == "seq2seq":
        train = expand_references(train, cfg.data)
    if cfg.task == "causal-lm":
        train = causal_lm_rows(train, cfg.data, tokenizer, cfg.data.train)
        if evaluation is not None:
            evaluation = causal_lm_rows(evaluation, cfg.data, tokenizer, cfg.data.eval or cfg.data.train)
        collator = CausalLMCollator(tokenizer)
        return Prepared(cfg, train, evaluation, teacher_config, student_config, tokenizer, image_processor, collator)
    collator = TaskCollator(
        cfg.task, cfg.data, tokenizer=tokenizer, image_processor=image_processor, config=teacher_config,
        output_config=student_config,  # labels in the Student's order (matched by name to the Teacher's)
    )
    return Prepared(cfg, train, evaluation, teacher_config, student_config, tokenizer, image_processor, collator)


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# -- distill ------------------------------------------------------------------------------------
def _distiller(cfg: RunConfig, teacher: Any, student: Any) -> Any:
    """The library's Distiller from the ``distill:`` section; its errors become config errors."""
    from ..distiller import Distiller

    try:
        return Distiller.from_options(teacher, student, cfg.distill)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"distill.{exc}") from None


def _plot_inputs(run: Prepared, pairs: list) -> dict:
    rows = run.eval if run.eval is not None else run.train
    samples = [run.collator([rows[i]]) for i in range(min(PLOT_SAMPLES, len(rows)))]
    return {"task": run.cfg.task, "layer_pairs": [list(p) for p in pairs], "samples": samples}


@dataclass
class Distilled:
    """What :func:`run_distillation` leaves: the summary written to ``summary.json``, the data and the models."""

    summary: dict
    run: Prepared
    distiller: Any


def run_distillation(cfg: RunConfig, run_dir: str | Path, *, args: Any = None) -> Distilled:
    """One ``amad distill`` run of ``cfg`` into ``run_dir`` (Student, config.yaml, plot inputs, summary.json).

    ``args``: the command line's ``--resume`` / ``--overwrite`` / ``--set`` (None: a fresh run, as tune's trials).
    """
    from transformers import set_seed

    from ..trainer import DistillationTrainer

    check_distill(cfg)
    run_dir = Path(run_dir).resolve()
    training = {"seed": cfg.seed, "dataloader_pin_memory": torch.cuda.is_available(), **cfg.training}
    training_args = training_arguments(training, training.get("output_dir", run_dir))
    checkpoint_dir, need_optimizer = Path(training_args.output_dir).resolve(), not training_args.save_only_model
    if args is not None:
        check_run_dir(args, run_dir, checkpoint_dir, need_optimizer)
    run = prepare(cfg)
    if args is not None and args.overwrite:
        remove_previous_run(run_dir, checkpoint_dir, keep=Path(args.config))

    started = time.time()
    set_seed(cfg.seed)
    teacher = load_model(cfg.task, cfg.teacher, run.teacher_config, "teacher")
    student = load_model(cfg.task, cfg.student, run.student_config, "student")
    distiller = _distiller(cfg, teacher, student)
    logger.info("distilling %s -> %s, pairs %s", type(teacher).__name__, type(student).__name__, distiller.layer_pairs)
    trainer = DistillationTrainer(
        model=distiller, args=training_args, train_dataset=run.train, eval_dataset=run.eval,
        data_collator=run.collator, processing_class=run.tokenizer or run.image_processor,
    )
    try:
        result = trainer.train(resume_from_checkpoint=None if args is None else args.resume)
    except KeyboardInterrupt:
        if args is None:
            raise
        raise KeyboardInterrupt(resume_hint(args, run_dir, checkpoint_dir, need_optimizer)) from None

    run_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(run_dir))
    for processor in (run.tokenizer, run.image_processor):
        if processor is not None:
            processor.save_pretrained(str(run_dir))
    if cfg.teacher.path is None:  # an untrained Teacher built from a config: keep it so the run can be re-read
        teacher.save_pretrained(str(run_dir / "teacher"))
        cfg.teacher = ModelSpec(path=str(run_dir / "teacher"), model_class=cfg.teacher.model_class)
        logger.warning("the Teacher was built from a config (untrained); saved to %s", run_dir / "teacher")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    pairs = distiller.layer_pairs
    torch.save(_plot_inputs(run, pairs), run_dir / PLOT_INPUTS)
    summary = {
        "task": cfg.task,
        "attention_loss": cfg.distill.attention_loss,
        "layer_pairs": [list(p) for p in pairs],
        "alpha": distiller.alpha_report(),
        "train_metrics": result.metrics,
        "log_history": trainer.state.log_history,
        "seconds": round(time.time() - started, 2),
    }
    _write_json(run_dir / SUMMARY, summary)
    logger.info("Student, config.yaml and %s written to %s", PLOT_INPUTS, run_dir)
    return Distilled(summary, run, distiller)


def distill(args: Any, cfg: RunConfig) -> int:
    run_dir = args.out or cfg.training.get("output_dir")
    if not run_dir:
        raise ConfigError("--out: give a run directory (or set training.output_dir)")
    run_distillation(cfg, run_dir, args=args)
    return 0


# -- evaluate -----------------------------------------------------------------------------------
def _student_from(run: Prepared, checkpoint: str, key: str) -> Any:
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: no config.json in {checkpoint!r} (expected a Student saved by amad distill)")
    config = model_config(ModelSpec(path=str(path)), key)
    check_model_pair(run.cfg, run.teacher_config, config)
    return load_model(run.cfg.task, run.cfg.student, config, "student", path=str(path))


def evaluate(args: Any, cfg: RunConfig) -> int:
    from .causal_lm import evaluate_causal_lm
    from .evaluation import evaluate_model, format_table

    run = prepare(cfg, need_eval=True)
    student = _student_from(run, args.checkpoint, "--checkpoint")
    teacher = load_model(cfg.task, cfg.teacher, run.teacher_config, "teacher")
    options = {"batch_size": cfg.evaluation.batch_size, "max_new_tokens": cfg.evaluation.max_new_tokens,
               "num_beams": cfg.evaluation.num_beams, "device": _device(args.device)}
    results, extra = {}, {}
    if cfg.task == "causal-lm":  # both models at once: the Student's metrics compare it with the Teacher
        results, extra["num_tokens"] = evaluate_causal_lm(
            teacher, student, run.eval, run.collator, batch_size=options["batch_size"], device=options["device"],
            progress="evaluating the teacher and the student")
    else:
        for name, model in (("teacher", teacher), ("student", student)):
            results[name] = evaluate_model(model, run.eval, run.collator, progress=f"evaluating the {name}", **options)
    print(format_table(results))
    output = Path(args.output) if args.output else Path(args.checkpoint) / EVAL_RESULTS
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_json(output, {"task": cfg.task, "checkpoint": str(Path(args.checkpoint).resolve()),
                         "num_examples": len(run.eval), **extra, "metrics": results})
    logger.info("wrote %s", output)
    return 0


# -- plot ---------------------------------------------------------------------------------------
def _recorded_maps(model: Any, names: list[str], batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    from ..capture import AttentionRecorder

    with torch.no_grad(), AttentionRecorder(model, names) as recorder:
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return {name: recorder.maps(name).float().cpu() for name in names}


def _plotted_alignment(cfg: RunConfig) -> tuple[str, dict]:
    """The alignment the run's AMAD variant computes (with its options), or variant 1's for other losses."""
    name = cfg.distill.attention_loss or ""
    variant = name.removeprefix("amad-") if name in ("amad-mse", "amad-kl", "amad-token", "amad-s2t") else "mse"
    if variant == "mse" and name != "amad-mse":
        return variant, {}
    opts = cfg.distill.attention_loss_options
    return variant, {k: opts[k] for k in ("alignment", "temperature") if k in opts}


def _teacher_by_student(alignment: torch.Tensor, variant: str) -> torch.Tensor:
    """``(B, H_t, H_s)`` whatever the variant (token-level: mean over query rows; s2t: transposed)."""
    if variant == "token":
        return alignment.mean(dim=1)
    return alignment.transpose(1, 2) if variant == "s2t" else alignment


def plot(args: Any) -> int:
    from ..capture import resolve_layer_pairs
    from ..losses import alignment_matrix, head_similarity
    from .plotting import axis_tokens, head_maps_figure, save_figure, similarity_figure

    run_dir = Path(args.run_dir)
    for name in ("config.yaml", PLOT_INPUTS, "config.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"run_dir: no {name} in {str(run_dir)!r} (expected a directory written by amad distill)")
    if args.samples < 1 or args.heads_samples < 0:
        raise ConfigError(f"--samples must be >= 1 and --heads-samples >= 0; got {args.samples}, {args.heads_samples}")
    cfg = load_config(run_dir / "config.yaml")
    payload = torch.load(run_dir / PLOT_INPUTS, weights_only=True)
    device = _device(args.device)
    teacher = load_model(cfg.task, cfg.teacher, model_config(cfg.teacher, "teacher"), "teacher").to(device).eval()
    student_config = model_config(ModelSpec(path=str(run_dir)), "run_dir")
    student = load_model(cfg.task, cfg.student, student_config, "student", path=str(run_dir)).to(device).eval()
    pairs = [tuple(p) for p in payload["layer_pairs"]] or resolve_layer_pairs(teacher, student, "last")
    samples = payload["samples"][: args.samples]
    has_tokenizer = (run_dir / "tokenizer_config.json").is_file()  # distill saved it; tokens on the maps' axes
    tokenizer = load_tokenizer(str(run_dir) if has_tokenizer else cfg.tokenizer) if cfg.tokenizer else None
    out_dir = Path(args.out) if args.out else run_dir / "plots"
    written, matrices = [], {}
    t_names, s_names = [t for t, _ in pairs], [s for _, s in pairs]
    per_sample = [
        (_recorded_maps(teacher, t_names, b, device), _recorded_maps(student, s_names, b, device)) for b in samples
    ]
    variant, options = _plotted_alignment(cfg)
    for index, (t_name, s_name) in enumerate(pairs):
        similarity = torch.cat([head_similarity(t[t_name], s[s_name]) for t, s in per_sample])
        alignment = torch.cat([_teacher_by_student(alignment_matrix(t[t_name], s[s_name], variant=variant, **options),
                                                   variant) for t, s in per_sample])
        mean_w, mean_a = similarity.mean(0), alignment.mean(0)
        title = f"Teacher {t_name}  vs  Student {s_name}  (mean of {len(per_sample)} inputs)"
        fig = similarity_figure(mean_w, mean_a, title=title)
        written.append(save_figure(fig, out_dir / f"pair{index}_similarity.png"))
        matrices[f"{t_name}->{s_name}"] = {"similarity": mean_w.tolist(), "alignment": mean_a.tolist()}
        for j, (t, s) in enumerate(per_sample[: args.heads_samples]):
            tokens = axis_tokens(samples[j], tokenizer, t_name, *t[t_name].shape[-2:])
            fig = head_maps_figure(t[t_name][0], s[s_name][0], title=f"input {j}: {t_name} / {s_name}",
                                   query_tokens=tokens[0], key_tokens=tokens[1])
            written.append(save_figure(fig, out_dir / f"pair{index}_heads_input{j}.png"))
    _write_json(out_dir / "similarity.json", matrices)
    for path in written:
        print(path)
    return 0
