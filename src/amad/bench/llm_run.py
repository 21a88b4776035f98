"""``amad demo --llm``: SmolLM2-135M-Instruct (30 layers, 9 query / 3 key-value heads) distilled into Students with
fewer heads and layers, on English text Python ships (pieces: :mod:`amad.bench.llm_text`; tables:
:mod:`amad.bench.llm_report`).

For every seed, Student shape and method, one *cell*: the Student cut from the Teacher (the same weights for
every method and seed) is trained for the budget's steps with token-level logit KD (temperature 1, on the
Teacher's top-``kd_top_k`` logits per position: what :mod:`amad.bench.teacher_cache` stores) plus the method's attention loss on the uniformly paired layers (one pair per Student layer),
``alpha="auto"`` with ``alpha_ratio = 1 / pairs`` (the weighted attention terms together pull on the shared
Student parameters as hard as the KD term), then scored on the test blocks: perplexity, KL(Teacher || Student)
per token and top-1 next-token agreement. The seed draws the order of the training blocks and the batches
alpha is measured on. ``init`` is the Student before training (seed 0), ``teacher`` the Teacher.

Alpha (``--alpha-sensitivity``): every attention method on seed 0 at each factor of the fair protocol's grid,
scored on the validation blocks, chooses its factor; methods whose choice is not 1 are trained again at it on
every seed (:mod:`amad.bench.llm_alpha`).

Output as the other demos: ``results.json`` (appended after every cell; a rerun skips finished cells),
``results.md`` and ``plots/``.
"""

from __future__ import annotations

import gc
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..capture import uniform_layer_map

from . import report
from .jobs import fingerprint, parse_method, quiet, training_arguments
from .llm_alpha import ALPHA_SCALES, KD_VALIDATION, chosen_scales, tuned_name, variant_name
from .llm_text import STUDENT_SHAPES, StudentShape, build_student, corpus_documents, relation_heads, text_blocks
from .runner import DemoSummary, _check_run_file, _duration
from .teacher_cache import CachedTeacher

TASK_PREFIX = "smollm2-135m"
UNTRAINED = "init"
METHODS: tuple[str, ...] = (
    "kd", "kd+one-to-one", "kd+head-mean", "kd+amad-mse", "kd+amad-kl", "kd+amad-token", "kd+shd",
    "kd+minilm-relations",
)
METRICS = ("perplexity", "kl_to_teacher", "top1_agreement_pct", "next_token_accuracy_pct")
COST_METRICS = ("seconds_per_step", "alpha_mean")
_SHAPE = re.compile(r"^l(\d+)-h(\d+)-kv(\d+)$")


@dataclass(frozen=True)
class LLMBudget:
    """What a scale trains (the same for every method): Students, steps, batch, data sizes, alpha measurement."""

    students: tuple[str, ...]
    steps: int
    batch_size: int
    learning_rate: float = 5e-4
    block_length: int = 128
    train_blocks: int = 0  # 0: every training block
    test_blocks: int = 0  # 0: every test block
    validation_blocks: int = 0
    alpha_batches: int = 4
    eval_batch_size: int = 8
    kd_top_k: int = 128  # KD on the Teacher's top-k logits per position (what the cache stores)
    teacher_cache: bool = True  # False: the live Teacher in every step and evaluation (same objective)


BUDGETS: dict[str, LLMBudget] = {
    "tiny": LLMBudget(("l2-h2-kv1",), steps=2, batch_size=2, block_length=8, train_blocks=8, test_blocks=3,
                      validation_blocks=3, alpha_batches=1),
    # quick: one pass over 32 blocks of 64 tokens per method (docs/llm_demo.md: measured times).
    "quick": LLMBudget(("l2-h3-kv1",), steps=8, batch_size=4, block_length=64, train_blocks=32, test_blocks=16,
                       alpha_batches=1),
    # full: one pass over 160 blocks of 128 tokens per method; one command per Student and seed fits 2.5 h here.
    "full": LLMBudget(("l2-h3-kv1", "l4-h6-kv2"), steps=40, batch_size=4, train_blocks=160, test_blocks=32,
                      validation_blocks=16, alpha_batches=2),
}
DEFAULT_SEEDS = {"tiny": 1, "quick": 1, "full": 3}


@dataclass
class LLMDemoSettings:
    out: Path
    scale: str = "quick"
    seeds: int = 1
    methods: Sequence[str] = METHODS
    students: Sequence[str] | None = None  # None: the scale's
    threads: int = 0  # 0: torch's default
    plots: bool = True
    alpha_sensitivity: bool = False
    echo: Callable[[str], None] = field(default=print)


def parse_shape(name: str) -> StudentShape:
    """``l<layers>-h<heads>-kv<kv heads>`` (e.g. ``l2-h3-kv1``) as a :class:`StudentShape`."""
    match = _SHAPE.match(name)
    if not match:
        raise ValueError(f"Student shape {name!r}: write l<layers>-h<heads>-kv<kv heads>, e.g. "
                         f"{', '.join(STUDENT_SHAPES)}")
    return StudentShape(*(int(g) for g in match.groups()))


def task_name(shape: StudentShape) -> str:
    return f"{TASK_PREFIX}-{shape.name}"


def load_teacher() -> tuple[nn.Module, Any]:
    """The Teacher and its tokenizer (tests replace this with a tiny model)."""
    from .smollm2 import load_smollm2

    return load_smollm2()


def load_documents() -> dict[str, str]:
    """The text (tests replace this with a few documents)."""
    return corpus_documents()


class _Progress:
    """A TrainerCallback printing the step and the seconds per step every ``every`` steps."""

    def __init__(self, echo: Callable[[str], None], every: int, label: str) -> None:
        from transformers import TrainerCallback

        progress = self

        class Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                progress.steps = state.global_step
                if state.global_step % every == 0 and state.global_step < state.max_steps:
                    rate = (time.perf_counter() - progress.started) / state.global_step
                    echo(f"  {label}: step {state.global_step}/{state.max_steps} ({rate:.1f} s/step)")

        self.callback, self.started, self.steps = Callback(), time.perf_counter(), 0


class LLMExperiment:
    """The Teacher, its tokenizer and the token blocks, loaded once; :meth:`run_cell` trains and scores one cell."""

    def __init__(self, budget: LLMBudget, echo: Callable[[str], None] = print) -> None:
        from ..cli.causal_lm import CausalLMCollator

        self.budget, self.echo = budget, echo
        self.teacher, self.tokenizer = load_teacher()
        self.teacher.requires_grad_(False)
        blocks = text_blocks(load_documents(), self.tokenizer, budget.block_length)
        limits = {"train": budget.train_blocks, "validation": budget.validation_blocks, "test": budget.test_blocks}
        self.blocks = {split: rows[: limits[split] or None] for split, rows in blocks.items()}
        self.rows = {split: [{"input_ids": ids} for ids in rows] for split, rows in self.blocks.items()}
        self.collate = CausalLMCollator(self.tokenizer)
        self.top_k = min(budget.kd_top_k, int(self.teacher.config.vocab_size))
        self.eval_teacher = CachedTeacher(self.teacher) if budget.teacher_cache else self.teacher
        self.train_teachers: dict[int, nn.Module] = {}  # per Student layer count

    def train_teacher(self, student_layers: int) -> nn.Module:
        """The Teacher the Distiller sees: cached (top-k logits, the uniformly paired layers' inputs) or live."""
        if not self.budget.teacher_cache:
            return self.teacher
        if student_layers not in self.train_teachers:
            paired = [t - 1 for t in uniform_layer_map(self.teacher.config.num_hidden_layers, student_layers)]
            self.train_teachers[student_layers] = CachedTeacher(self.teacher, layers=paired, top_k=self.top_k)
        return self.train_teachers[student_layers]

    def teacher_passes(self) -> int:
        """Blocks the real Teacher ran on so far (cached Teachers only)."""
        caches = [self.eval_teacher, *self.train_teachers.values()]
        return sum(c.teacher_passes for c in caches if isinstance(c, CachedTeacher))

    def train_collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Training batches without labels: the Student would compute its own (unused) cross-entropy."""
        batch = self.collate(rows)
        del batch["labels"]
        return batch

    def describe(self) -> str:
        sizes = ", ".join(f"{split} {len(rows)}" for split, rows in self.blocks.items())
        return f"blocks of {self.budget.block_length} tokens: {sizes}"

    def evaluate(self, student: nn.Module, split: str) -> tuple[dict[str, float], dict[str, float]]:
        """Student and Teacher metrics on a split (``val_``-prefixed for validation)."""
        from ..cli.causal_lm import evaluate_causal_lm

        metrics, _ = evaluate_causal_lm(self.eval_teacher, student, self.rows[split], self.collate,
                                        batch_size=self.budget.eval_batch_size)
        prefix = "val_" if split == "validation" else ""

        def named(m: dict[str, float]) -> dict[str, float]:
            scores = {"perplexity": m["perplexity"], "next_token_accuracy_pct": m["next_token_accuracy"]}
            if "kl_teacher_student" in m:
                scores.update(kl_to_teacher=m["kl_teacher_student"], top1_agreement_pct=m["top1_agreement"])
            return {prefix + k: float(v) for k, v in scores.items()}

        return named(metrics["student"]), named(metrics["teacher"])

    def distiller(self, student: nn.Module, method: str, alpha_scale: float) -> nn.Module:
        from ..distiller import Distiller

        loss = parse_method(method).attention_loss
        options = {"num_relation_heads": relation_heads(self.teacher, student)} if loss == "minilm-relations" else {}
        pairs = student.config.num_hidden_layers
        return Distiller(self.train_teacher(pairs), student, attention_loss=loss, layers="uniform", alpha="auto",
                         alpha_ratio=alpha_scale / pairs, alpha_batches=self.budget.alpha_batches,
                         kd_top_k=self.top_k, attention_loss_options=options)

    def run_cell(self, shape: StudentShape, method: str, seed: int, *, alpha_scale: float = 1.0,
                 splits: Sequence[str] = ("test",)) -> tuple[dict[str, float], dict[str, float]]:
        """Train the Student of ``shape`` with ``method`` (``init``: untrained); its scores and the Teacher's."""
        from transformers import PrinterCallback

        from ..trainer import DistillationTrainer

        student = build_student(self.teacher, shape)
        extra: dict[str, float] = {}
        if method != UNTRAINED:
            distiller = self.distiller(student, method, alpha_scale)
            label = f"{shape.name} {method} seed {seed}" + (f" alpha x{alpha_scale:g}" if alpha_scale != 1 else "")
            progress = _Progress(self.echo, max(1, self.budget.steps // 5), label)
            with tempfile.TemporaryDirectory(prefix="amad-llm-") as tmp:
                args = training_arguments(tmp, self.budget, self.budget.steps, seed)
                trainer = DistillationTrainer(model=distiller, args=args, train_dataset=self.rows["train"],
                                              data_collator=self.train_collate, callbacks=[progress.callback])
                trainer.remove_callback(PrinterCallback)
                progress.started = time.perf_counter()
                trainer.train()
            extra["seconds_per_step"] = (time.perf_counter() - progress.started) / max(1, progress.steps)
            if distiller.layer_pairs:
                extra["alpha_mean"] = float(distiller.alpha.mean())
        student.eval()
        scores, teacher = {}, {}
        for split in splits:
            s, t = self.evaluate(student, split)
            scores.update(s)
            teacher.update(t)
        return {**scores, **extra}, teacher


# -- the run ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    task: str
    method: str  # a method, "init", or a sensitivity variant "<method>@alpha<scale>x"
    seed: int
    base: str  # the method trained
    alpha_scale: float = 1.0
    splits: tuple[str, ...] = ("test",)


def plan_cells(shapes: dict[str, StudentShape], methods: Sequence[str], seeds: int, sensitivity: bool) -> list[Cell]:
    """Every cell of a run, in run order: per seed and Student, ``init`` (seed 0) and the methods, scored on the
    test blocks; with ``sensitivity``, then the alpha-sensitivity cells (seed 0), scored on the validation blocks."""
    cells = [Cell(task, method, seed, method) for seed in range(seeds) for task in shapes
             for method in ([UNTRAINED] if seed == 0 else []) + list(methods)]
    if sensitivity:
        attention = [m for m in methods if parse_method(m).attention_loss]
        for task in shapes:
            if "kd" in methods:
                cells.append(Cell(task, KD_VALIDATION, 0, "kd", 1.0, ("validation",)))
            cells += [Cell(task, variant_name(m, s), 0, m, s, ("validation",)) for m in attention for s in ALPHA_SCALES]
    return cells


def tuned_cells(records: Sequence[dict[str, Any]], shapes: dict[str, StudentShape], methods: Sequence[str],
                settings: LLMDemoSettings) -> list[Cell]:
    """With ``alpha_sensitivity``: the test cells, every seed, of each method at its chosen factor where it is not 1."""
    if not settings.alpha_sensitivity:
        return []
    return [Cell(task, tuned_name(m, f), seed, m, f) for task in shapes
            for m, f in chosen_scales(records, task, methods).items() if f != 1 for seed in range(settings.seeds)]


def _records(task: str, method: str, seed: int, scores: dict[str, float]) -> list[dict[str, Any]]:
    return [{"task": task, "method": method, "seed": seed, "metric": k, "value": float(v)} for k, v in scores.items()]


def _format(scores: dict[str, float]) -> str:
    shown = [k for k in ("perplexity", "kl_to_teacher", "top1_agreement_pct", "val_perplexity") if k in scores]
    return ", ".join(f"{k} {scores[k]:.3f}" for k in shown)


def _resolve(settings: LLMDemoSettings) -> tuple[LLMBudget, dict[str, StudentShape], list[str]]:
    if settings.scale not in BUDGETS:
        raise ValueError(f"unknown scale {settings.scale!r}; expected one of {tuple(BUDGETS)}")
    budget = BUDGETS[settings.scale]
    if settings.students:
        budget = replace(budget, students=tuple(settings.students))
    shapes = {task_name(parse_shape(s)): parse_shape(s) for s in budget.students}
    methods = [parse_method(m).name for m in settings.methods]
    bad = [m for m in methods if m == "gt" or parse_method(m).attention_loss in ("amad-projected",)]
    if bad or not methods or settings.seeds < 1:
        raise ValueError(f"the LLM demo needs kd or kd+<loss> methods (not gt: no ground-truth labels beyond the text; "
                         f"not amad-projected: its projection is sized for one map size) and seeds >= 1; got methods "
                         f"{methods}, seeds {settings.seeds}")
    return budget, shapes, methods


def _run_cells(experiment: LLMExperiment, shapes: dict[str, StudentShape], todo: list[Cell], results_path: Path,
               echo: Callable[[str], None]) -> tuple[list, list]:
    """Run the cells in order, appending each one's records (and the Teacher's, once per metric) as it ends."""
    trained, failed = [], []
    teacher_done = {(r["task"], r["metric"]) for r in report.load_results(results_path) if r["method"] == "teacher"}
    phase = time.perf_counter()
    for i, cell in enumerate(todo, 1):
        cell_started = time.perf_counter()
        name = f"cell {i}/{len(todo)} {cell.task} {cell.method} seed {cell.seed}"
        try:
            scores, teacher = experiment.run_cell(shapes[cell.task], cell.base, cell.seed,
                                                  alpha_scale=cell.alpha_scale, splits=cell.splits)
        except Exception:  # a failed cell must not lose the others: reported, the run goes on
            import traceback

            failed.append((cell.task, cell.method, cell.seed))
            echo(f"{name} FAILED\n{traceback.format_exc()}")
            continue
        new = {k: v for k, v in teacher.items() if (cell.task, k) not in teacher_done}
        if new:  # the Teacher's metrics on each split, once
            report.append_results(results_path, _records(cell.task, "teacher", 0, new))
            teacher_done.update((cell.task, k) for k in new)
        report.append_results(results_path, _records(cell.task, cell.method, cell.seed, scores))
        trained.append((cell.task, cell.method, cell.seed))
        eta = (time.perf_counter() - phase) / i * (len(todo) - i)
        echo(f"{name}: {_format(scores)} ({time.perf_counter() - cell_started:.0f} s); eta {_duration(eta)}")
    return trained, failed


def run_llm_demo(settings: LLMDemoSettings) -> DemoSummary:
    """Run every cell not yet in ``OUT/results.json``; write the tables and plots; return what happened."""
    from .llm_report import write_llm_outputs

    started = time.perf_counter()
    out, echo = Path(settings.out), settings.echo
    budget, shapes, methods = _resolve(settings)
    out.mkdir(parents=True, exist_ok=True)
    common = {k: v for k, v in asdict(budget).items() if k != "students"}
    _check_run_file(out, f"llm-{settings.scale}",
                    {t: fingerprint(common, s.name, sys.version_info[:2]) for t, s in shapes.items()})
    results_path = out / "results.json"
    records = report.load_results(results_path)
    done = {(r["task"], r["method"], r["seed"]) for r in records}
    cells = plan_cells(shapes, methods, settings.seeds, settings.alpha_sensitivity)
    cells += tuned_cells(records, shapes, methods, settings)
    todo = [c for c in cells if (c.task, c.method, c.seed) not in done]
    skipped = [(c.task, c.method, c.seed) for c in cells if (c.task, c.method, c.seed) in done]
    echo(f"amad demo --llm ({settings.scale}): {len(cells)} cells ({len(shapes)} Students x {settings.seeds} seeds x "
         f"{len(methods)} methods, + init{' + alpha sensitivity' if settings.alpha_sensitivity else ''}), {len(skipped)} "
         f"already in {results_path}, {len(todo)} to run; {budget.steps} steps of {budget.batch_size} blocks each")
    trained: list[tuple[str, str, int]] = []
    failed: list[tuple[str, str, int]] = []
    experiment = None
    try:
        while todo:
            if experiment is None:
                quiet(settings.threads or torch.get_num_threads())
                loading = time.perf_counter()
                experiment = LLMExperiment(budget, echo)
                gc.collect()
                gc.freeze()  # the Teacher, the blocks and the caches live as long as the run: out of later collections
                echo(f"Teacher and text loaded in {time.perf_counter() - loading:.0f} s; {experiment.describe()}")
            ran, lost = _run_cells(experiment, shapes, todo, results_path, echo)
            trained, failed = trained + ran, failed + lost
            records = report.load_results(results_path)
            finished = {(r["task"], r["method"], r["seed"]) for r in records} | set(failed)
            todo = [c for c in tuned_cells(records, shapes, methods, settings)
                    if (c.task, c.method, c.seed) not in finished]
            if todo:
                echo(f"alpha chosen on validation: {len(todo)} cells of methods whose factor is not 1")
    finally:
        gc.unfreeze()
    if experiment is not None:
        echo(f"the real Teacher ran on {experiment.teacher_passes()} blocks"
             + (" (the rest replayed from its cache)" if budget.teacher_cache else ""))
    table = write_llm_outputs(out, settings.plots, list(shapes), settings.scale)
    seconds = time.perf_counter() - started
    echo(f"amad demo --llm finished in {_duration(seconds)}: {len(trained)} cells run, {len(skipped)} skipped, "
         f"{len(failed)} failed; {results_path}, {table}, {out / 'plots'}")
    return DemoSummary(trained, skipped, failed, seconds, results_path, table)


def main_from_args(args: Any, parser: Any) -> int:
    """``amad demo --llm ...`` after parsing; returns the exit status (1 when a cell failed)."""
    if args.tasks or args.real:
        parser.error("--llm runs its own benchmark: --tasks and --real do not apply (choose --students)")
    scale = "quick" if args.quick else (args.scale or "full")
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[scale]
    settings = LLMDemoSettings(out=args.out, scale=scale, seeds=seeds, methods=args.methods or list(METHODS),
                               students=args.students, threads=args.threads, plots=not args.no_plots,
                               alpha_sensitivity=args.alpha_sensitivity)
    try:
        _resolve(settings)
    except ValueError as error:
        parser.error(str(error))
    summary = run_llm_demo(settings)
    return 1 if summary.failed else 0
