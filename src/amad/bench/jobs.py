"""The units of work of the demo, each runnable in a worker process: prepare a task's data, train a
Teacher, pre-train a Student, or train and evaluate one Student (a *cell*).

Everything a later job needs is cached under ``OUT/cache`` (keyed by task, budget and seed), so jobs
only exchange names and numbers. Every method gets the same Student initialisation for a given seed,
the same data order, steps and hyper-parameters; a cell's method names its alpha (:mod:`amad.bench.fair`:
``kd+<loss>@x<factor>`` = factor x alpha "auto", ``@paper`` = the paper's). A cell is scored on the test
rows and on the validation rows (``val_<metric>``), which the alpha grid is chosen on.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .alpha import alpha_path, cached_auto_alpha, cell_alpha, measure_auto_alpha
from .fair import Variant, parse_variant, with_validation
from .tasks import Budget, TaskData, get_setting

CACHE_VERSION = 2  # 2: a validation split carved out of the training images
# The methods of the benchmark, in table order. "kd+<loss>" = logit KD + that attention loss.
METHODS: tuple[str, ...] = (
    "gt", "kd", "kd+one-to-one", "kd+amad-mse", "kd+amad-kl", "kd+amad-token", "kd+amad-projected",
    "kd+head-mean", "kd+shd", "kd+minilm-relations",
)
EXTRA_METHODS: tuple[str, ...] = ("kd+rkd-d", "kd+amad-s2t")
# Options a loss needs that its registry entry has no default for (same for every task).
LOSS_OPTIONS: dict[str, dict[str, Any]] = {"minilm-relations": {"num_relation_heads": 8}}


@dataclass(frozen=True)
class Method:
    """How one Student is trained: ``gt`` = ground truth only; ``kd`` (+ an attention loss) = logit KD
    without ground truth, as in the paper."""

    name: str
    attention_loss: str | None
    kd_weight: float
    gt_weight: float


def parse_method(name: str) -> Method:
    """``"gt"``, ``"kd"`` or ``"kd+<registered attention loss>"`` (a bare loss name means ``kd+`` it)."""
    from .. import losses

    if name == "gt":
        return Method("gt", None, 0.0, 1.0)
    if name == "kd":
        return Method("kd", None, 1.0, 0.0)
    loss = name[3:] if name.startswith("kd+") else name
    if loss not in losses.available():
        raise ValueError(f"unknown method {name!r}: use gt, kd or kd+<loss> with a loss of {losses.available()}")
    return Method(f"kd+{loss}", loss, 1.0, 0.0)


@dataclass(frozen=True)
class Job:
    """One unit of work. ``kind``: "teacher", "pretrain" or "cell"."""

    kind: str
    setting: str
    scale: str
    out: str
    seed: int = 0
    method: str = ""


# -- process setup -------------------------------------------------------------------
def quiet(threads: int) -> None:
    """Silence per-run progress bars and library chatter; fix the number of torch threads."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("amad").setLevel(logging.WARNING)
    # Shapes texts are word-tokenised (" ." ends a sentence) on both sides of BLEU: sacrebleu's warning is moot.
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, threads))


# -- caching -----------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _atomic_dir(directory: Path, write: Callable[[Path], None]) -> None:
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=directory.name + ".tmp"))
    write(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def teacher_dir(out: Path, task: str, budget: Budget) -> Path:
    return out / "cache" / f"teacher-{task}-{fingerprint(task, budget.key('teacher'))}"


def pretrained_dir(out: Path, task: str, budget: Budget, seed: int) -> Path:
    return out / "cache" / f"pretrained-{task}-seed{seed}-{fingerprint(task, seed, budget.key('pretrain'))}"


def save_model(model: nn.Module, directory: Path, scores: dict[str, float]) -> None:
    from safetensors.torch import save_model as save

    def write(tmp: Path) -> None:
        save(model, str(tmp / "model.safetensors"))
        (tmp / "scores.json").write_text(json.dumps(scores))

    _atomic_dir(directory, write)


def load_model(model: nn.Module, directory: Path) -> dict[str, float]:
    from safetensors.torch import load_model as load

    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{directory} holds no trained model (its job has not run)")
    load(model, str(directory / "model.safetensors"))
    return json.loads((directory / "scores.json").read_text())


_DATA: dict[tuple[str, str], tuple[Budget, TaskData]] = {}  # per process


def task_data(task_name: str, scale: str, out: Path) -> tuple[Budget, TaskData]:
    """The task's prepared data: from this process's memory, from ``OUT/cache``, or generated."""
    from .tasks import TASKS

    key = (task_name, scale)
    if key not in _DATA:
        task = TASKS[task_name]
        budget = task.budget(scale)
        path = out / "cache" / f"data-{task_name}-{fingerprint(task_name, budget.key('data'))}.pkl"
        if path.is_file():
            data = pickle.loads(path.read_bytes())
        else:
            data = task.prepare(budget)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(pickle.dumps(data))
            os.replace(tmp, path)
        _DATA[key] = (budget, data)
        gc.collect()
        gc.freeze()  # the rows live as long as the process: keep them out of every later (per-run) collection
    return _DATA[key]


# -- training ------------------------------------------------------------------------------
def training_arguments(output_dir: str, budget: Budget, steps: int, seed: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate, weight_decay=0.01, warmup_steps=max(1, steps // 10),
        lr_scheduler_type="linear", seed=seed, data_seed=seed, save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, remove_unused_columns=False, optim="adamw_torch", log_level="error",
    )


def fit(model: nn.Module, rows: Sequence[dict], collate: Callable, budget: Budget, steps: int, seed: int,
        callbacks: Sequence[Any] = ()) -> None:
    """Train for ``steps`` steps (or until a callback stops it): a Distiller with DistillationTrainer, any other
    model on its own loss."""
    from transformers import PrinterCallback, Trainer

    from ..distiller import Distiller
    from ..trainer import DistillationTrainer

    trainer_class = DistillationTrainer if isinstance(model, Distiller) else Trainer
    with tempfile.TemporaryDirectory(prefix="amad-demo-") as tmp:
        trainer = trainer_class(model=model, args=training_arguments(tmp, budget, steps, seed),
                                train_dataset=list(rows), data_collator=collate, callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)  # no per-run log lines; the runner prints one line per cell
        trainer.train()
    model.eval()


def build_distiller(teacher: nn.Module, student: nn.Module, method: Method, probe: dict,
                    alpha: float | str | Sequence[float] = "auto", options: dict | None = None,
                    alpha_batches: int = 8) -> nn.Module:
    """The Distiller of a method (KD or ground truth, plus the attention loss on the last layer of every
    shared stack); ``amad-projected`` gets a projection of the right size ``q*k`` for each layer pair.
    ``options``: loss options on top of :data:`LOSS_OPTIONS` (e.g. the paper's reduction)."""
    from ..distiller import Distiller
    from ..losses import ProjectedAMAD

    options = {**LOSS_OPTIONS.get(method.attention_loss or "", {}), **(options or {})}
    sizes = map_sizes(teacher, student, probe) if method.attention_loss == "amad-projected" else []
    if sizes:
        options["n"] = sizes[0]
    distiller = Distiller(teacher, student, attention_loss=method.attention_loss, alpha=alpha,
                          kd_weight=method.kd_weight, gt_weight=method.gt_weight,
                          attention_loss_options=options, alpha_batches=alpha_batches)
    for i, n in enumerate(sizes):
        if distiller.attention_losses[i].n != n:
            distiller.attention_losses[i] = ProjectedAMAD(n, **{k: v for k, v in options.items() if k != "n"})
    return distiller


def map_sizes(teacher: nn.Module, student: nn.Module, batch: dict) -> list[int]:
    """``q*k`` of every default ("last") layer pair's maps, measured on one batch."""
    from ..capture import AttentionRecorder
    from ..capture import resolve_layer_pairs

    names = [s for _, s in resolve_layer_pairs(teacher, student, "last")]
    with torch.no_grad(), AttentionRecorder(student, names) as rec:
        student(**batch)
        return [rec.inputs(n).q_len * rec.inputs(n).k_len for n in names]


# -- snapshots for the plots -----------------------------------------------------------
def snapshot_path(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "cache" / "snapshots" / f"{task}__{method.replace('+', '_')}__seed{seed}.npz"


def save_snapshot(path: Path, distiller: nn.Module, batch: dict) -> None:
    """Teacher and Student maps ``(H, q, k)`` of the first example at every distilled layer pair."""
    import numpy as np

    from ..capture import AttentionRecorder

    one = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    pairs = list(distiller.layer_pairs)
    arrays: dict[str, Any] = {"pairs": np.array([f"{t} -> {s}" for t, s in pairs])}
    distiller.eval()
    with torch.no_grad(), AttentionRecorder(distiller.teacher, [t for t, _ in pairs]) as t_rec, \
            AttentionRecorder(distiller.student, [s for _, s in pairs]) as s_rec:
        distiller.teacher(**one)
        distiller.student(**one)
        for i, (t_name, s_name) in enumerate(pairs):
            arrays[f"teacher_{i}"] = t_rec.maps(t_name)[0].float().numpy()
            arrays[f"student_{i}"] = s_rec.maps(s_name)[0].float().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


# -- the jobs -----------------------------------------------------------------------------
def run_job(job: Job) -> dict[str, Any]:
    """Run one job; returns ``{"scores": {...}, "seconds": wall s, "cpu": CPU s of this process, "cached": bool}``."""
    started, cpu = time.perf_counter(), time.process_time()
    setting = get_setting(job.setting)
    out = Path(job.out)
    budget, data = task_data(setting.task.name, job.scale, out)
    if job.kind == "teacher":
        scores, cached = _teacher_job(setting.task, data, budget, out)
    elif job.kind == "pretrain":
        scores, cached = _pretrain_job(setting.task, data, budget, out, job.seed)
    elif job.kind == "cell":
        scores, cached = _cell_job(setting, data, budget, out, job.seed, parse_variant(job.method)), False
    else:
        raise ValueError(f"unknown job kind {job.kind!r}")
    return {"scores": scores, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
            "cached": cached}


def seeded_teacher(task: Any, data: TaskData, budget: Budget) -> nn.Module:
    """The demo's untrained Teacher of ``task`` (seed 0, so every cell and process builds the same one)."""
    torch.manual_seed(0)
    return task.build_teacher(data, budget)


def _teacher_job(task: Any, data: TaskData, budget: Budget, out: Path) -> tuple[dict[str, float], bool]:
    """Train (or load) the Teacher; it is stored before it is evaluated, its scores after."""
    directory = teacher_dir(out, task.name, budget)
    model = seeded_teacher(task, data, budget)
    cached = (directory / "model.safetensors").is_file()
    if cached:
        scores = load_model(model, directory)
        if scores:
            return scores, True
    else:
        fit(model, data.train, data.collate, budget, budget.teacher_steps, seed=0)
        save_model(model, directory, {})
    scores = task.evaluate(model, data, budget)
    (directory / "scores.json").write_text(json.dumps(scores))
    return scores, cached


def _pretrain_job(task: Any, data: TaskData, budget: Budget, out: Path, seed: int) -> tuple[dict[str, float], bool]:
    from transformers import set_seed

    directory = pretrained_dir(out, task.name, budget, seed)
    if (directory / "model.safetensors").is_file():
        return {}, True
    set_seed(seed)
    model = task.build_pretraining_student(data, budget)
    fit(model, data.pretrain, data.pretrain_collate, budget, budget.pretrain_steps, seed)
    save_model(model, directory, {})
    return {}, False


def initial_student(setting: Any, data: TaskData, budget: Budget, out: Path, seed: int) -> nn.Module:
    """The Student every method of this seed starts from: random, or the cached pre-trained one."""
    from transformers import set_seed

    task = setting.task
    set_seed(seed)
    if not setting.pretrained:
        return task.build_student(data, budget)
    pretrained = task.build_pretraining_student(data, budget)
    load_model(pretrained, pretrained_dir(out, task.name, budget, seed))
    set_seed(seed)
    return task.student_from_pretrained(pretrained, data, budget)


def _cell_job(setting: Any, data: TaskData, budget: Budget, out: Path, seed: int, variant: Variant) -> dict[str, float]:
    """Train the seed's Student with the variant's method and alpha; its test and validation (``val_``) scores."""
    task = setting.task
    data.rows("validation")  # every cell is also scored on validation: refuse before training when there is none
    method = parse_method(variant.base)
    teacher = seeded_teacher(task, data, budget)
    load_model(teacher, teacher_dir(out, task.name, budget))
    teacher.eval()
    collate = data.fixed_collate if method.attention_loss == "amad-projected" else data.collate
    probe = collate(data.train[: budget.batch_size])

    def measure() -> list[float]:  # alpha "auto" on this cell's own first batches
        distiller = build_distiller(teacher, initial_student(setting, data, budget, out, seed), method, probe,
                                    alpha_batches=budget.alpha_batches)
        return measure_auto_alpha(distiller, lambda callbacks: fit(distiller, data.train, collate, budget,
                                                                   budget.student_steps, seed, callbacks))

    alpha, options = cell_alpha(variant, lambda: cached_auto_alpha(alpha_path(out, setting.name, method.name, seed),
                                                                   measure))
    student = initial_student(setting, data, budget, out, seed)
    distiller = build_distiller(teacher, student, method, probe, alpha, options, budget.alpha_batches)
    fit(distiller, data.train, collate, budget, budget.student_steps, seed)
    scores = with_validation(task.evaluate(distiller.student, data, budget),
                             task.evaluate(distiller.student, data, budget, "validation"))
    if method.attention_loss and method.attention_loss.startswith("amad"):
        save_snapshot(snapshot_path(out, setting.name, variant.name, seed), distiller, data.collate(data.test[:1]))
    return scores
