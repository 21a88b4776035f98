"""One cell of ``amad demo --real`` (:mod:`amad.bench.minilm_run`): the budgets, the settings, and
:class:`TextExperiment`, which trains a Student with one method and alpha and scores it.

A *setting* is a Student shape (``h<heads>-d<width>-l<layers>``) plus how it starts and which layers are
distilled: ``h4-d256-l3`` (random layers, last layer pair), ``...-from-teacher`` (initialised from the Teacher
by :func:`amad.student_from_teacher`, BERT heads re-split with the "amad" head rule on a training batch; the
Teacher's width only), ``...-uniform`` (uniformly mapped layer pairs).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .alpha import cached_auto_alpha, cell_alpha, measure_auto_alpha
from .batch_cache import BatchCachedTeacher
from .fair import parse_variant, with_validation
from .jobs import parse_method, save_snapshot
from .minilm_text import (
    EmbeddingLoss, SentenceStudent, StudentShape, TokenCollator, build_student, doc_sentences, embedding_basis,
    embedding_scores, encode, fitting_sentences, split_sentences,
)

UNTRAINED = "init"
# Batches are padded to their longest sentence, so every loss uses its mask-aware reduction.
_MASK_AWARE = {"reduction": "mean"}
_RELATION_HEADS = (12, 8, 4)
_SETTING = re.compile(r"^h(\d+)-d(\d+)-l(\d+)(-from-teacher)?(-uniform)?$")


@dataclass(frozen=True)
class TextSetting:
    """A Student shape, its initialisation ("random" or "teacher") and the distilled layers ("last"/"uniform")."""

    shape: StudentShape
    init: str = "random"
    layers: str = "last"

    @property
    def name(self) -> str:
        return (self.shape.name + ("-from-teacher" if self.init == "teacher" else "")
                + ("-uniform" if self.layers == "uniform" else ""))


def parse_setting(name: str) -> TextSetting:
    """``h4-d384-l3-from-teacher-uniform`` -> its :class:`TextSetting` (a bad name is an error saying the form)."""
    match = _SETTING.match(name)
    if match is None:
        raise ValueError(f"unknown Student setting {name!r}: expected h<heads>-d<width>-l<layers>, optionally "
                         "followed by -from-teacher and then -uniform (e.g. h4-d384-l3-from-teacher)")
    heads, width, layers = (int(g) for g in match.groups()[:3])
    return TextSetting(StudentShape(heads, width, layers), "teacher" if match.group(4) else "random",
                       "uniform" if match.group(5) else "last")


# The full scale's settings: three random-init shapes, the two of the Teacher's width initialised from it, and
# uniformly mapped layer pairs for the smallest Student.
FULL_SETTINGS: tuple[str, ...] = ("h4-d256-l3", "h4-d384-l3", "h6-d384-l6", "h4-d384-l3-from-teacher",
                                  "h6-d384-l6-from-teacher", "h4-d256-l3-uniform")


@dataclass(frozen=True)
class TextBudget:
    """What a scale trains: Student settings, steps, batch, data sizes and the objective (same for every method)."""

    students: tuple[str, ...]
    steps: int
    batch_size: int
    learning_rate: float = 1e-3
    max_length: int = 48  # sentences with more tokens are left out (none is cut)
    held_out: int = 250  # test sentences per seed
    validation: int = 150  # validation sentences per seed, carved out of the training sentences
    other_domain: int = 400  # standard-library docstring sentences (amad.bench.stdlib_text), the same for every seed
    max_train: int = 0  # 0: every remaining sentence
    embedding_loss: str = "cosine"
    alpha_batches: int = 8  # random training batches alpha "auto" is measured on (the Distiller's default)


BUDGETS: dict[str, TextBudget] = {
    "tiny": TextBudget(("h4-d256-l3",), steps=2, batch_size=4, held_out=12, validation=8, other_domain=12,
                       max_train=16, alpha_batches=2),
    "quick": TextBudget(("h4-d256-l3",), steps=400, batch_size=16),
    "full": TextBudget(FULL_SETTINGS, steps=600, batch_size=16),
}
DEFAULT_SEEDS = {"tiny": 1, "quick": 1, "full": 3}


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
    validation: list[str] = field(default_factory=list)
    validation_embeddings: torch.Tensor | None = None


def _as_setting(setting: TextSetting | StudentShape) -> TextSetting:
    return setting if isinstance(setting, TextSetting) else TextSetting(setting)


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
        self._other: tuple[list[str], torch.Tensor] | None = None
        # The Distillers' Teacher: every cell of a seed trains on the same batches, so the Teacher runs once per
        # batch (per worker process) and is replayed after (amad.bench.batch_cache); emptied when the seed changes.
        # A cell meets a little more than `steps` distinct batches; the room left covers the snapshot's batches.
        self.cached_teacher = BatchCachedTeacher(self.teacher, max_batches=2 * budget.steps + 16)
        self._cached_seed: int | None = None

    def student(self, setting: TextSetting | StudentShape, seed: int) -> nn.Module:
        """The seed's untrained Student of the setting (the same weights for every method)."""
        setting = _as_setting(setting)
        shape = setting.shape
        if setting.init == "teacher":
            return self._student_from_teacher(shape, seed)
        if shape.hidden not in self._bases:
            self._bases[shape.hidden] = embedding_basis(self.teacher, shape.hidden)
        return build_student(self.teacher, shape, seed=seed, basis=self._bases[shape.hidden])

    def _student_from_teacher(self, shape: StudentShape, seed: int) -> SentenceStudent:
        """:func:`amad.student_from_teacher` (heads re-split, "amad" rule calibrated on the seed's first training
        batch); dropout off and token embeddings frozen, as for the random Students."""
        from ..student_init import student_from_teacher

        width = self.teacher.config.hidden_size
        if shape.hidden != width:
            raise ValueError(f"a Student initialised from the Teacher keeps its width {width}; got {shape.name}")
        rows = self.seed_data(seed).train_rows[: self.budget.batch_size]
        device = next(self.teacher.parameters()).device
        batch = {k: v.to(device) for k, v in self.collate(rows).items()}
        encoder = student_from_teacher(self.teacher, layers=shape.layers, num_heads=shape.heads, head_rule="amad",
                                       calibration_batch=batch)
        encoder.config.hidden_dropout_prob = encoder.config.attention_probs_dropout_prob = 0.0
        for module in encoder.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        return SentenceStudent(encoder, width).train()

    def seed_data(self, seed: int) -> SeedData:
        if seed not in self._seeds:
            budget = self.budget
            rest, held_out = split_sentences(self.sentences, budget.held_out, seed)
            validation, train = rest[: budget.validation], rest[budget.validation:]
            if budget.max_train:
                train = train[: budget.max_train]
            ids = self.tokenizer(train)["input_ids"]
            self._seeds[seed] = SeedData([{"input_ids": i} for i in ids], held_out, self._embed(held_out),
                                         validation, self._embed(validation))
        return self._seeds[seed]

    def _embed(self, sentences: Sequence[str], model: nn.Module | None = None) -> torch.Tensor:
        """Embeddings of ``sentences`` by ``model`` (default: the Teacher)."""
        return encode(model or self.teacher, self.tokenizer, sentences, max_length=self.budget.max_length)

    def other_domain(self) -> tuple[list[str], torch.Tensor]:
        """The standard-library docstring sentences and the Teacher's embeddings of them."""
        if self._other is None:
            from .stdlib_text import other_domain_sentences

            sentences = other_domain_sentences(self.tokenizer, self.budget.max_length, self.budget.other_domain)
            self._other = (sentences, self._embed(sentences))
        return self._other

    def scores(self, student: nn.Module, data: SeedData) -> dict[str, float]:
        """Held-out (test) scores, ``val_`` ones on the validation sentences, ``stdlib_`` ones on the docstrings."""
        def score(sentences: Sequence[str], teacher: torch.Tensor) -> dict[str, float]:
            return embedding_scores(self._embed(sentences, student), teacher)

        sentences, teacher = self.other_domain()
        test = {**score(data.held_out, data.teacher_embeddings),
                **{f"stdlib_{k}": v for k, v in score(sentences, teacher).items()}}
        return with_validation(test, score(data.validation, data.validation_embeddings))

    def distiller(self, student: nn.Module, method: str, setting: TextSetting | StudentShape,
                  alpha: Any = "auto", options: dict | None = None, seed: int | None = None) -> nn.Module:
        """The cell's Distiller; with ``seed``, on the seed's cached Teacher (same losses, the Teacher run once per
        batch), else on the live Teacher (its module names then lack the ``teacher.`` prefix)."""
        from ..distiller import Distiller

        setting = _as_setting(setting)
        loss = parse_method(method).attention_loss
        options = {**loss_options(loss, setting.shape, self.teacher.config.hidden_size), **(options or {})}
        teacher = self.teacher
        if seed is not None:
            if seed != self._cached_seed:
                self.cached_teacher.clear()
                self._cached_seed = seed
            teacher = self.cached_teacher
        return Distiller(teacher, student, attention_loss=loss, layers=setting.layers, alpha=alpha,
                         output_loss=EmbeddingLoss(self.budget.embedding_loss), attention_loss_options=options,
                         alpha_batches=self.budget.alpha_batches)

    def train(self, distiller: nn.Module, data: SeedData, seed: int, callbacks: Sequence[Any] = ()) -> None:
        from transformers import PrinterCallback

        from ..trainer import DistillationTrainer

        with tempfile.TemporaryDirectory(prefix="amad-minilm-") as tmp:
            trainer = DistillationTrainer(model=distiller, args=training_arguments(tmp, self.budget, seed),
                                          train_dataset=data.train_rows, data_collator=self.collate,
                                          callbacks=list(callbacks))
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        distiller.eval()

    def run_cell(self, setting: TextSetting | StudentShape, method: str, seed: int, snapshot: Path | None = None,
                 alpha_cache: Path | None = None) -> dict[str, float]:
        """Train the seed's Student of the setting with ``method`` (a :mod:`amad.bench.fair` cell name; ``init``:
        no training) and score it; ``alpha_cache``: where this setting/method/seed's alpha "auto" is kept."""
        setting = _as_setting(setting)
        data = self.seed_data(seed)
        if method == UNTRAINED:
            return self.scores(self.student(setting, seed), data)
        variant = parse_variant(method)

        def measure() -> list[float]:
            distiller = self.distiller(self.student(setting, seed), variant.base, setting, seed=seed)
            return measure_auto_alpha(distiller, lambda callbacks: self.train(distiller, data, seed, callbacks))

        auto: Callable[[], list[float]] = measure if alpha_cache is None else (
            lambda: cached_auto_alpha(alpha_cache, measure))
        alpha, options = cell_alpha(variant, auto)
        student = self.student(setting, seed)
        distiller = self.distiller(student, variant.base, setting, alpha, options, seed=seed)
        self.train(distiller, data, seed)
        if snapshot is not None:
            first = [{"input_ids": self.tokenizer(data.held_out[0])["input_ids"]}]
            device = next(student.parameters()).device
            save_snapshot(snapshot, distiller, {k: v.to(device) for k, v in self.collate(first).items()})
        return self.scores(student, data)
