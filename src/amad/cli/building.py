"""Model configs, the Teacher/Student compatibility check, and loading models and processors.

Everything up to :func:`check_model_pair` reads configs only (``config.json`` or a
``model_type`` + kwargs mapping), so a pair whose attention maps cannot be
matched (the library's :func:`amad.compat.check_pair`, plus the task and
``data.max_length`` here) is refused before any weights are loaded. A model,
tokenizer or processor that fails to load because a file is damaged is named
(:func:`amad.cli.inputs.unreadable`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Callable

from ..compat import check_pair, head_kind, named_labels, position_limits, size_fields
from .config import ModelSpec, RunConfig
from .inputs import unreadable
from .plugins import register_model_types
from .sources import pretrained_kwargs
from .typed import ConfigError, suggest

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_CLASSES",
    "model_config",
    "model_configs",
    "check_model_pair",
    "model_class",
    "load_model",
    "load_tokenizer",
    "run_tokenizer",
    "load_image_processor",
]

#: The Auto class each task builds its models with (seq2seq falls back to image-text-to-text).
AUTO_CLASSES = {
    "sequence-classification": ("AutoModelForSequenceClassification",),
    "image-classification": ("AutoModelForImageClassification",),
    "visual-question-answering": ("AutoModelForVisualQuestionAnswering",),
    "seq2seq": ("AutoModelForSeq2SeqLM", "AutoModelForImageTextToText"),
    "causal-lm": ("AutoModelForCausalLM",),
}
#: Tasks whose models predict tokens: no class labels.
GENERATIVE = ("seq2seq", "causal-lm")
_NOT_COPIED = ("architectures", "_name_or_path", "transformers_version")


def _known_keys(config_cls: type) -> set[str] | None:
    """Fields a config class understands (None if it cannot be built without arguments)."""
    try:
        default = config_cls()
    except Exception:  # composite configs (encoder-decoder) need arguments: skip the check
        return None
    keys = set(default.to_dict()) | set(getattr(config_cls, "attribute_map", {})) | {"num_labels"}
    for klass in config_cls.__mro__:
        if "__init__" in vars(klass):
            keys |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
    return keys


def _check_keys(config_cls: type, kwargs: dict, key: str) -> None:
    known = _known_keys(config_cls)
    if known is None:
        return
    for name in kwargs:
        if name not in known:
            raise ConfigError(f"{key}.{name}: not a field of {config_cls.__name__}{suggest(name, known)}")


def model_config(spec: ModelSpec, key: str, base: Any = None) -> Any:
    """A ``PretrainedConfig`` from a directory, from ``model_type`` + kwargs, or ``base`` + changes."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    register_model_types()
    if spec.path is not None:
        where = key if key.startswith("-") or key == "run_dir" else f"{key}.path"  # a command-line argument
        try:
            return AutoConfig.from_pretrained(spec.path, **pretrained_kwargs(spec))
        except (OSError, ValueError, KeyError) as exc:
            damaged = unreadable(where, spec.path, "model config", exc)
            if damaged is not exc:
                raise damaged from None
            raise ConfigError(f"{where}: cannot read the model config in {spec.path!r}: {exc}") from None
    kwargs = dict(spec.config or {})
    model_type = kwargs.pop("model_type", None)
    if model_type is None:  # the Student as "the Teacher with these changes"
        config_cls = type(base)
        _check_keys(config_cls, kwargs, f"{key}.config")
        values = {k: v for k, v in base.to_dict().items() if k not in _NOT_COPIED}
        return config_cls.from_dict({**values, **kwargs})
    if model_type not in CONFIG_MAPPING:
        hint = suggest(str(model_type), CONFIG_MAPPING.keys())
        raise ConfigError(f"{key}.config.model_type: unknown model type {model_type!r}{hint}")
    config_cls: type[PretrainedConfig] = CONFIG_MAPPING[model_type]
    _check_keys(config_cls, kwargs, f"{key}.config")
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}.config: {' '.join(str(exc).split())}") from None


def model_configs(cfg: RunConfig, label_names: Callable[[Any], list[str] | None] | None = None) -> tuple[Any, Any]:
    """The Teacher's and the Student's configs, checked to form a matchable pair.

    ``label_names(teacher_config)`` gives the class names (or answer vocabulary)
    of classification tasks; they are written into each config that does not
    fix its labels itself (one built from ``config:`` without ``num_labels`` /
    ``id2label``, or a checkpoint saved without a head for the task), and name
    the classes of a trained Teacher saved with unnamed (``LABEL_i``) ones.
    """
    teacher = model_config(cfg.teacher, "teacher")
    names = label_names(teacher) if label_names is not None and cfg.task not in GENERATIVE else None
    if names and (_labels_open(cfg.teacher, teacher, cfg.task) or named_labels(teacher) is None):
        if not _labels_open(cfg.teacher, teacher, cfg.task) and len(names) != teacher.num_labels:
            raise ConfigError(f"data.labels: {len(names)} names for the Teacher's {teacher.num_labels} classes")
        _set_labels(teacher, names)
    student = model_config(cfg.student, "student", base=teacher)
    if cfg.task not in GENERATIVE and _labels_open(cfg.student, student, cfg.task):
        _set_labels(student, [teacher.id2label[i] for i in range(teacher.num_labels)])
    check_model_pair(cfg, teacher, student)
    return teacher, student


def _labels_open(spec: ModelSpec, config: Any, task: str) -> bool:
    """Whether the labels of ``config`` are still ours to set."""
    if spec.path is not None:
        head = _head_task(config)
        return head is None or head[1] != task
    given = spec.config or {}
    return "num_labels" not in given and "id2label" not in given


def _set_labels(config: Any, names: list[str]) -> None:
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}


def _head_task(config: Any) -> tuple[str, str] | None:
    """(architecture, task) read from a saved config's ``architectures``, if it names a head."""
    for arch in getattr(config, "architectures", None) or []:
        if head_kind(arch):
            return arch, head_kind(arch)
    return None


def check_model_pair(cfg: RunConfig, teacher: Any, student: Any) -> None:
    """Refuse a Teacher/Student pair whose attention maps or outputs cannot be matched."""
    t_head, s_head = _head_task(teacher), _head_task(student)
    if cfg.teacher.model_class is None and t_head and t_head[1] != cfg.task:
        raise ConfigError(
            f"teacher: saved as {t_head[0]} ({t_head[1]}), but task is {cfg.task!r}; "
            "the Teacher must be trained for the task it teaches"
        )
    if s_head and s_head[1] != cfg.task:
        logger.warning("student: saved as %s; its %s head starts untrained", s_head[0], cfg.task)
    classes = [model_class(cfg.task, spec, config, key).__name__
               for spec, config, key in ((cfg.teacher, teacher, "teacher"), (cfg.student, student, "student"))]
    try:
        check_pair(teacher, student, teacher_class=classes[0], student_class=classes[1], task=cfg.task)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_lengths(cfg, teacher, student)


def check_lengths(cfg: RunConfig, teacher: Any, student: Any) -> None:
    """``data.max_length`` (and a seq2seq ``data.max_target_length``) must fit both models' position embeddings."""
    keys = ["max_length"] + (["max_target_length"] if cfg.task == "seq2seq" else [])
    for model, config in (("teacher", teacher), ("student", student)):
        for field, limit in position_limits(config).items():
            for key in keys:
                value = getattr(cfg.data, key)
                if value > limit:
                    raise ConfigError(
                        f"data.{key}: {value} tokens do not fit the {model}'s {limit} positions ({field} of "
                        f"{config.model_type}); set data.{key} to at most {limit}"
                    )


# -- models -------------------------------------------------------------------------------------
def model_class(task: str, spec: ModelSpec, config: Any, key: str) -> Any:
    """The class to build ``spec`` with: ``spec.model_class`` or the task's Auto class for ``config``."""
    import transformers

    if spec.model_class:
        module_name, sep, name = spec.model_class.rpartition(":" if ":" in spec.model_class else ".")
        try:
            module = importlib.import_module(module_name) if sep else transformers
            return getattr(module, name)
        except (ImportError, AttributeError, ValueError):
            raise ConfigError(
                f"{key}.model_class: cannot import {spec.model_class!r} "
                "(give a transformers class name or 'package.module:Class')"
            ) from None
    for auto_name in AUTO_CLASSES[task]:
        auto = getattr(transformers, auto_name)
        if type(config) in auto._model_mapping:
            return auto
    names = " or ".join(AUTO_CLASSES[task])
    raise ConfigError(
        f"{key}: model type {config.model_type!r} has no {task} model in transformers ({names}); "
        f"set {key}.model_class"
    )


def load_model(task: str, spec: ModelSpec, config: Any, key: str, path: str | None = None) -> Any:
    """Weights from ``path`` (default ``spec.path``) with ``config``, or a fresh model from ``config``."""
    cls = model_class(task, spec, config, key)
    kwargs = pretrained_kwargs(spec) if path is None else {}  # a saved checkpoint is no GGUF file
    path = path or spec.path
    if path is None:
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    try:
        model = cls.from_pretrained(path, config=config, **kwargs)
    except Exception as exc:  # a damaged file surfaces as whatever its reader raises
        raise unreadable(f"{key}.path" if path == spec.path else key, path, "model", exc) from exc
    if kwargs and key == "student":
        model = _trainable_copy(cls, model, config, key)
    return model


def _trainable_copy(cls: Any, model: Any, config: Any, key: str) -> Any:
    """A model read from a GGUF file stays marked quantized (not trainable, not savable): copy its weights out."""
    plain = cls.from_config(config)
    try:
        plain.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"{key}.gguf_file: its weights were loaded in a packed (quantized) form that cannot be trained; "
            f"{' '.join(str(exc).split())[:200]}"
        ) from None
    return plain


def load_tokenizer(path: str, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as exc:
        damaged = unreadable("tokenizer", path, "tokenizer", exc)
        if damaged is not exc or not isinstance(exc, (OSError, ValueError)):
            raise damaged from exc
        where = f"{gguf_file!r} in {path!r}" if gguf_file else repr(path)
        raise ConfigError(f"tokenizer: cannot load a tokenizer from {where}: {exc}") from None


def run_tokenizer(cfg: RunConfig) -> Any:
    """The ``tokenizer:`` directory's tokenizer, else the one in the Teacher's GGUF file, else None."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.teacher.gguf_file:
        return load_tokenizer(str(cfg.teacher.path), cfg.teacher.gguf_file)
    return None


def load_image_processor(path: str) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except Exception as exc:
        damaged = unreadable("image_processor", path, "image processor", exc)
        if damaged is not exc or not isinstance(exc, (OSError, ValueError)):
            raise damaged from exc
        raise ConfigError(f"image_processor: cannot load an image processor from {path!r}: {exc}") from None


def processor_size(processor: Any) -> tuple[int, int] | None:
    """The (height, width) an image processor outputs, when it is fixed."""
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    height = getattr(size, "height", None) or (size.get("height") if isinstance(size, dict) else None)
    width = getattr(size, "width", None) or (size.get("width") if isinstance(size, dict) else None)
    return (int(height), int(width)) if height and width else None


def check_processors(tokenizer: Any, image_processor: Any, teacher: Any) -> None:
    """The tokenizer must fit the models' vocabulary; the processor must output the models' image size."""
    fields = size_fields(teacher)
    sizes = [v for k, v in fields.items() if k.endswith("vocab_size")]
    if tokenizer is not None and sizes and len(tokenizer) > min(sizes):
        raise ConfigError(
            f"tokenizer: has {len(tokenizer)} tokens but the models' vocab_size is {min(sizes)} "
            "(use the tokenizer the Teacher was trained with)"
        )
    out = processor_size(image_processor) if image_processor is not None else None
    images = [v for k, v in fields.items() if k.endswith("image_size")]
    if out and images:
        expected = images[0] if isinstance(images[0], list) else [images[0], images[0]]
        if list(out) != list(expected):
            raise ConfigError(
                f"image_processor: outputs {out[0]}x{out[1]} images but the models' image_size is "
                f"{expected[0]}x{expected[1]}"
            )

