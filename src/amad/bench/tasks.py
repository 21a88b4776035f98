"""The demo's tasks on the generated Shapes data: what is trained, on which rows, and how it is scored.

- ``vqa``: VL-T5-style discriminative VQA (answer classifier), accuracy in percent.
- ``caption``: BLIP captioning, BLEU-4 (sacrebleu) and CIDEr-D x 100 (pycocoevalcap) against all
  reference captions of a test image.
- ``translation``: VL-T5 multimodal En -> De translation (the English source may say "object" where
  only the image tells the German noun and its gender), sacrebleu BLEU.

A *setting* is a task plus how the Student starts: from random initialisation, or ``-pretrained``.
What stands in for the paper's VL pre-training: the Student (a VL-T5 encoder-decoder) is first trained
on ground-truth image captioning of the training images (``caption :`` prefix, its own steps); its
embeddings, visual patch embedding, encoder and decoder then initialise the task Student (the VQA
answer head starts fresh). BLIP captioning has no pre-trained setting: pre-training it on the
captioning task itself would stand in for nothing.

Validation rows: the images carved out of the generated training images (Teachers, pre-training and
Students train on the others); the alpha grid is chosen on them, never on the test split.
Batches are padded to their longest text; for AMAD variant 3 (whose projection is defined for one
``q x k`` only) to the longest text of the data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..cli.evaluation import accuracy, bleu, cider

SCALES = ("tiny", "quick", "full")

# Model overrides per scale. The head counts are the paper's ratios: VL-T5 12 -> 8, BLIP 8 -> 4 (the make_*
# defaults). "full" trains the quick models on twice the data with about twice the steps: 3 seeds of every
# setting took 1 h 23 min on one CPU core before the alpha grid (docs/results/README.md). 16 x 16 patches are the
# scene's 3 x 3 grid cells (the patching is shared by Teacher and Student, so their maps keep the same q x k).
_GRID_PATCHES = dict(patch_size=16)
_SHORT_RUN = dict(dropout_rate=0.0, **_GRID_PATCHES)  # a few hundred steps: no dropout
_VLT5_QUICK = (dict(d_model=96, d_kv=8, d_ff=192, num_layers=3, num_decoder_layers=2, **_SHORT_RUN),
               dict(d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=1, **_SHORT_RUN))
_BLIP_QUICK = (dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, **_GRID_PATCHES),
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, **_GRID_PATCHES))
_VLT5 = {
    "tiny": (dict(d_model=48, d_kv=4, d_ff=64, num_layers=1, num_decoder_layers=1),
             dict(d_model=32, d_kv=4, d_ff=48, num_layers=1, num_decoder_layers=1)),
    "quick": _VLT5_QUICK,
    "full": _VLT5_QUICK,
}
_BLIP = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
             dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1)),
    "quick": _BLIP_QUICK,
    "full": _BLIP_QUICK,
}


@dataclass(frozen=True)
class Budget:
    """Data sizes, model overrides, steps and hyper-parameters of one task at one scale (same for every method)."""

    train_images: int
    test_images: int
    teacher: dict[str, Any]
    student: dict[str, Any]
    teacher_steps: int
    student_steps: int
    pretrain_steps: int
    batch_size: int
    learning_rate: float
    eval_batch_size: int = 128
    max_test_examples: int = 1000  # also the most validation examples
    validation_images: int = 0  # carved out of the train_images: the grid of alphas is chosen on them
    alpha_batches: int = 8  # random training batches alpha "auto" is measured on (the Distiller's default)

    def key(self, role: str) -> dict[str, Any]:
        """The fields a cached product depends on: "data", "teacher" or "pretrain"ed Student."""
        data = {"train_images": self.train_images, "test_images": self.test_images,
                "max_test_examples": self.max_test_examples, "validation_images": self.validation_images}
        training = {"batch_size": self.batch_size, "learning_rate": self.learning_rate}
        if role == "data":
            return data
        if role == "teacher":
            return {**data, **training, "model": self.teacher, "steps": self.teacher_steps}
        if role == "pretrain":
            return {**data, **training, "model": self.student, "steps": self.pretrain_steps}
        raise ValueError(f"unknown cache role {role!r}")


_STEPS = {  # (train images, test images, teacher steps, student steps, pre-training steps, batch size)
    "tiny": (24, 8, 3, 2, 2, 4),
    "quick": (1500, 150, 800, 150, 150, 32),
    "full": (3000, 300, 1500, 300, 300, 32),
}
# Validation images, carved out of the training images (Teachers and Students train on the rest).
_VALIDATION = {"tiny": 8, "quick": 150, "full": 300}


@dataclass
class TaskData:
    """Prepared rows (dicts with a numpy ``image``) and the collators that turn them into batches.

    ``collate`` pads to the longest text of the batch; ``fixed_collate`` to the longest text of the data,
    so that every batch's attention maps have the same ``q x k`` (AMAD variant 3 needs that).
    ``validation``: rows of the images carved out of the training split (never trained on).
    """

    tokenizer: Any
    train: list[dict]
    test: list[dict]
    collate: Callable[[list[dict]], dict]
    fixed_collate: Callable[[list[dict]], dict]
    pretrain: list[dict] | None = None
    pretrain_collate: Callable[[list[dict]], dict] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    validation: list[dict] = field(default_factory=list)

    def rows(self, split: str) -> list[dict]:
        """The evaluation rows of ``split``: "test" or "validation"."""
        if split not in ("test", "validation"):
            raise ValueError(f"unknown evaluation split {split!r}; expected 'test' or 'validation'")
        rows = self.test if split == "test" else self.validation
        if not rows:
            hint = " (its budget holds out validation_images=0; alpha is chosen on validation rows: hold some " \
                   "training images out)" if split == "validation" else ""
            raise ValueError(f"this task's data has no {split} rows{hint}")
        return rows


@dataclass
class FixedLength:
    """Pad a collated batch's text (``input_ids``/``attention_mask``) and ``labels`` to fixed lengths."""

    collate: Callable[[list[dict]], dict]
    text_length: int
    label_length: int | None = None
    pad_id: int = 0

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collate(rows)
        batch["input_ids"] = _pad(batch["input_ids"], self.text_length, self.pad_id, "input_ids")
        batch["attention_mask"] = _pad(batch["attention_mask"], self.text_length, 0, "attention_mask")
        if self.label_length is not None:
            batch["labels"] = _pad(batch["labels"], self.label_length, -100, "labels")
        return batch


def _pad(x: Tensor, length: int, value: int, name: str) -> Tensor:
    if x.shape[1] > length:
        raise ValueError(f"{name} has {x.shape[1]} positions, more than the fixed length {length}")
    return nn.functional.pad(x, (0, length - x.shape[1]), value=value)


def _rows(dataset: Any, limit: int | None = None) -> list[dict]:
    """Plain row dicts: ``image`` as a numpy array, everything else as Python values."""
    import numpy as np

    count = len(dataset) if limit is None else min(limit, len(dataset))
    images: dict[str, np.ndarray] = {}  # rows of one image share its array
    rows = []
    for row in dataset.select(range(count)).with_format("numpy", columns=["image"], output_all_columns=True):
        image = images.setdefault(row["image_id"], np.asarray(row["image"], dtype=np.uint8))
        rows.append({**row, "image": image})
    return rows


def _longest(tokenizer: Any, texts: Sequence[str]) -> int:
    return max(len(ids) for ids in tokenizer(list(texts))["input_ids"])


def _shapes(budget: Budget) -> tuple[Any, Any]:
    """The generated splits; ``validation``: the last ``validation_images`` of the generated training images."""
    from .data import ShapesConfig, build_shapes_tokenizer, generate_shapes

    data = generate_shapes(ShapesConfig(seed=0, train_size=budget.train_images, validation_size=0,
                                        test_size=budget.test_images))
    kept = budget.train_images - budget.validation_images
    if kept < 1:
        raise ValueError(f"validation_images {budget.validation_images} leaves no training image of "
                         f"{budget.train_images}")
    data["validation"] = data["train"].select(range(kept, budget.train_images) if budget.validation_images else [])
    data["train"] = data["train"].select(range(kept))
    return data, build_shapes_tokenizer(data)


def _captioning_rows(data: Any, tokenizer: Any) -> tuple[list[dict], Callable]:
    """The pre-training stand-in: VL-T5 ground-truth captioning of the training images."""
    from .data import Seq2SeqCollator, caption_view

    return _rows(caption_view(data["train"])), Seq2SeqCollator(tokenizer, "caption")


def _batches(rows: Sequence[dict], size: int):
    for start in range(0, len(rows), size):
        yield list(rows[start:start + size])


def _inputs(batch: dict, keys: Sequence[str]) -> dict:
    return {k: batch[k] for k in keys if k in batch}


def _generate(model: nn.Module, data: TaskData, budget: Budget, inputs: Callable[[list[dict]], dict],
              rows: Sequence[dict]) -> list[str]:
    """Greedy decoding of ``rows`` (``inputs`` turns rows into the model's inputs), as text."""
    hypotheses: list[str] = []
    for batch_rows in _batches(rows, budget.eval_batch_size):
        generated = model.generate(**inputs(batch_rows), max_new_tokens=data.extras["max_new_tokens"], do_sample=False,
                                   num_beams=1)
        hypotheses += data.tokenizer.batch_decode(generated, skip_special_tokens=True)
    return hypotheses


class DemoTask(ABC):
    """One task: data, Teacher/Student factories and the test metrics."""

    name: str = ""
    metrics: tuple[str, ...] = ()
    relative_cost: float = 1.0  # of a training step, to start the costliest Teacher first
    test_examples: int = 1000  # at most, at the quick and full scales

    def budget(self, scale: str) -> Budget:
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
        train, test, t_steps, s_steps, p_steps, batch = _STEPS[scale]
        teacher, student = self.model_sizes(scale)
        return Budget(train, test, teacher, student, t_steps, s_steps, p_steps, batch, learning_rate=1e-3,
                      eval_batch_size=128, max_test_examples=self.test_examples if scale != "tiny" else 16,
                      validation_images=_VALIDATION[scale], alpha_batches=2 if scale == "tiny" else 8)

    def model_sizes(self, scale: str) -> tuple[dict, dict]:
        return _VLT5[scale]

    @abstractmethod
    def prepare(self, budget: Budget) -> TaskData:
        """Generate the data and build the rows and collators."""

    @abstractmethod
    def build_model(self, size: str, data: TaskData, overrides: dict) -> nn.Module:
        """A randomly initialised model of ``size`` ("teacher" or "student") with the budget's ``overrides``."""

    def build_teacher(self, data: TaskData, budget: Budget) -> nn.Module:
        return self.build_model("teacher", data, budget.teacher)

    def build_student(self, data: TaskData, budget: Budget) -> nn.Module:
        return self.build_model("student", data, budget.student)

    def build_pretraining_student(self, data: TaskData, budget: Budget) -> nn.Module:
        from .models.vlt5 import make_vlt5

        return make_vlt5("student", "caption", vocab_size=len(data.tokenizer), **budget.student)

    def student_from_pretrained(self, pretrained: nn.Module, data: TaskData, budget: Budget) -> nn.Module:
        """A task Student initialised from the pre-trained captioner (shared parts only)."""
        student = self.build_student(data, budget)
        result = student.load_state_dict(pretrained.state_dict(), strict=False)
        allowed_missing = ("answer_head.",)
        bad_missing = [k for k in result.missing_keys if not k.startswith(allowed_missing)]
        bad_unexpected = [k for k in result.unexpected_keys if not k.startswith("lm_head.")]
        if bad_missing or bad_unexpected:
            raise ValueError(f"pre-trained Student does not fit the {self.name} Student: missing {bad_missing}, "
                             f"unexpected {bad_unexpected}")
        return student

    @abstractmethod
    def evaluate(self, model: nn.Module, data: TaskData, budget: Budget, split: str = "test") -> dict[str, float]:
        """The metrics of ``model`` on the ``split`` rows ("test" or "validation")."""


class VQATask(DemoTask):
    name = "vqa"
    metrics = ("accuracy",)

    def prepare(self, budget: Budget) -> TaskData:
        from .data import TASK_PREFIX, VQACollator, vqa_view

        data, tokenizer = _shapes(budget)
        train = _rows(vqa_view(data["train"]))
        test = _rows(vqa_view(data["test"]), budget.max_test_examples)
        validation = _rows(vqa_view(data["validation"]), budget.max_test_examples)
        length = _longest(tokenizer, [f"{TASK_PREFIX['vqa']} {r['question']}" for r in train + test + validation])
        pretrain, pretrain_collate = _captioning_rows(data, tokenizer)
        collate = VQACollator(tokenizer)
        return TaskData(tokenizer, train, test, collate, FixedLength(collate, length), pretrain, pretrain_collate,
                        validation=validation)

    def build_model(self, size: str, data: TaskData, overrides: dict) -> nn.Module:
        from .data import ANSWERS
        from .models.vlt5 import make_vlt5

        return make_vlt5(size, "vqa", vocab_size=len(data.tokenizer), num_answers=len(ANSWERS), **overrides)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, budget: Budget, split: str = "test") -> dict[str, float]:
        model.eval()
        predictions: list[int] = []
        labels: list[int] = []
        for rows in _batches(data.rows(split), budget.eval_batch_size):
            batch = data.collate(rows)
            logits = model(**_inputs(batch, ("input_ids", "attention_mask", "pixel_values"))).logits
            predictions += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        return {"accuracy": accuracy(predictions, labels)}


class CaptionTask(DemoTask):
    name = "caption"
    metrics = ("bleu4", "cider")

    def model_sizes(self, scale: str) -> tuple[dict, dict]:
        return _BLIP[scale]

    def prepare(self, budget: Budget) -> TaskData:
        from .data import BlipCaptionCollator, caption_view

        data, tokenizer = _shapes(budget)
        train = _rows(caption_view(data["train"]))
        test = _rows(caption_view(data["test"], per_reference=False), budget.max_test_examples)
        validation = _rows(caption_view(data["validation"], per_reference=False), budget.max_test_examples)
        texts = [f"{tokenizer.bos_token} {c}" for r in train + test + validation for c in r["references"]]
        length = _longest(tokenizer, texts)
        collate = BlipCaptionCollator(tokenizer)
        return TaskData(tokenizer, train, test, collate, FixedLength(collate, length, length),
                        extras={"max_new_tokens": length + 2}, validation=validation)

    def build_model(self, size: str, data: TaskData, overrides: dict) -> nn.Module:
        from .models.blip import make_blip

        tok = data.tokenizer
        overrides = dict(overrides)  # width/depth for both stacks; patch_size for the ViT
        patch_size = overrides.pop("patch_size", 8)
        return make_blip(size, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, patch_size=patch_size, vision_overrides=overrides,
                         text_overrides=overrides)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, budget: Budget, split: str = "test") -> dict[str, float]:
        from .data import pixel_values
        model.eval()
        rows = data.rows(split)
        hypotheses = _generate(model, data, budget,
                               lambda rows: {"pixel_values": pixel_values([r["image"] for r in rows])}, rows)
        references = [list(r["references"]) for r in rows]
        return {"bleu4": bleu(hypotheses, references), "cider": cider(hypotheses, references)}


class TranslationTask(DemoTask):
    name = "translation"
    metrics = ("bleu",)
    relative_cost = 2.0
    test_examples = 400  # greedy decoding of every test pair is a good part of a cell's time

    def prepare(self, budget: Budget) -> TaskData:
        from .data import TASK_PREFIX, Seq2SeqCollator, translation_view

        data, tokenizer = _shapes(budget)
        train = _rows(translation_view(data["train"]))
        test = _rows(translation_view(data["test"]), budget.max_test_examples)
        validation = _rows(translation_view(data["validation"]), budget.max_test_examples)
        every = train + test + validation
        text = _longest(tokenizer, [f"{TASK_PREFIX['translate']} {r['source']}" for r in every])
        labels = _longest(tokenizer, [r["target"] for r in every])
        pretrain, pretrain_collate = _captioning_rows(data, tokenizer)
        collate = Seq2SeqCollator(tokenizer, "translate")
        return TaskData(tokenizer, train, test, collate, FixedLength(collate, text, labels), pretrain, pretrain_collate,
                        extras={"max_new_tokens": labels + 2}, validation=validation)

    def build_model(self, size: str, data: TaskData, overrides: dict) -> nn.Module:
        from .models.vlt5 import make_vlt5

        return make_vlt5(size, "translate", vocab_size=len(data.tokenizer), **overrides)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, budget: Budget, split: str = "test") -> dict[str, float]:
        model.eval()
        rows = data.rows(split)
        keys = ("input_ids", "attention_mask", "pixel_values")
        hypotheses = _generate(model, data, budget, lambda batch_rows: _inputs(data.collate(batch_rows), keys), rows)
        return {"bleu": bleu(hypotheses, [[r["target"]] for r in rows])}


TASKS: dict[str, DemoTask] = {t.name: t for t in (VQATask(), CaptionTask(), TranslationTask())}


@dataclass(frozen=True)
class TaskSetting:
    """A task and how its Student starts; ``name`` is what results.json calls it."""

    name: str
    task: DemoTask
    pretrained: bool
    description: str


_SETTINGS = {
    "vqa": ("vqa", False, "VL-T5-style VQA (answer classifier), Student from random initialisation."),
    "vqa-pretrained": ("vqa", True, "VL-T5-style VQA, Student pre-trained: first trained on ground-truth "
                       "captioning of the training images (stand-in for VL pre-training), answer head fresh."),
    "caption": ("caption", False, "BLIP captioning, Student from random initialisation."),
    "translation": ("translation", False, "VL-T5 En->De multimodal translation, Student from random "
                    "initialisation (the paper has no such setting)."),
    "translation-pretrained": ("translation", True, "VL-T5 En->De multimodal translation, Student pre-trained "
                               "on ground-truth English captioning of the training images (stand-in for VL "
                               "pre-training)."),
}
SETTINGS: tuple[str, ...] = tuple(_SETTINGS)
# --quick keeps one setting per task (the one with the most paper numbers), to fit in about 10 minutes on 2 cores.
DEFAULT_SETTINGS = {"quick": ("vqa-pretrained", "caption", "translation-pretrained"), "full": SETTINGS}


def get_setting(name: str) -> TaskSetting:
    if name not in _SETTINGS:
        raise ValueError(f"unknown demo task {name!r}; expected one of {SETTINGS}")
    task, pretrained, description = _SETTINGS[name]
    return TaskSetting(name, TASKS[task], pretrained, description)
