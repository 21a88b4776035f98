"""Whether a Teacher and a Student can be distilled into one another, from their configs alone.

Used by :class:`amad.Distiller` (on the two models' ``config``) and by the
command line (on configs read before any weights), so both refuse the same
pairs with the same words. Nothing here imports torch: a config is read through
``to_dict()`` and attributes.

A pair is refused when

* their heads differ (a causal LM Teacher cannot teach a sentence classifier);
* a field that fixes the attention map's size differs (``vocab_size``: the
  tokenizer is shared; ``image_size``, ``patch_size``, ``num_channels``: the
  number of patches), in the config or one of its sub-configs;
* classifiers have different numbers of labels, or different label names.

Classifiers whose label names agree but come in another order are matched by
name: :func:`label_permutation` gives the Teacher's logit index of each of the
Student's labels.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "HEAD_SUFFIXES",
    "CLASSIFICATION_HEADS",
    "MAP_SIZE_FIELDS",
    "head_kind",
    "size_fields",
    "check_pair",
    "named_labels",
    "label_permutation",
    "position_limits",
]

#: Class-name suffixes (a model class or a saved ``architectures`` entry) -> the kind of head.
HEAD_SUFFIXES = {
    "ForSequenceClassification": "sequence-classification",
    "ForImageClassification": "image-classification",
    "ForQuestionAnswering": "visual-question-answering",
    "ForVisualQuestionAnswering": "visual-question-answering",
    "ForConditionalGeneration": "seq2seq",
    "ForSeq2SeqLM": "seq2seq",
    "ForImageTextToText": "seq2seq",
    "EncoderDecoderModel": "seq2seq",
    "ForMaskedLM": "masked language modelling",
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",
    "ForTokenClassification": "token classification",
    "ForMultipleChoice": "multiple choice",
}
#: Heads whose logits are one score per label (``num_labels`` / ``id2label`` must agree).
CLASSIFICATION_HEADS = (
    "sequence-classification", "image-classification", "visual-question-answering", "token classification",
)
#: Config fields that fix the attention map's size; they must agree between Teacher and Student.
MAP_SIZE_FIELDS = ("image_size", "patch_size", "num_channels", "vocab_size")
#: Model types whose learned positions start after the padding index (usable = max_position_embeddings - pad - 1).
_OFFSET_POSITIONS = (
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer", "xmod",
    "roberta-prelayernorm", "ibert", "mpnet",
)


def head_kind(name: str | None) -> str | None:
    """The kind of head a class name says (``BertForSequenceClassification`` -> sequence-classification)."""
    for suffix, kind in HEAD_SUFFIXES.items():
        if name and name.endswith(suffix):
            return kind
    return None


def size_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """The map-size fields of a config and its sub-configs (``vision_config.image_size`` ...)."""
    out: dict[str, Any] = {}
    data = config if isinstance(config, dict) else config.to_dict()
    for name, value in data.items():
        if isinstance(value, dict) and name.endswith("_config"):
            out.update(size_fields(value, f"{prefix}{name}."))
        elif name in MAP_SIZE_FIELDS and value is not None:
            out[prefix + name] = list(value) if isinstance(value, (list, tuple)) else value
    for name in ("encoder", "decoder"):
        if isinstance(data.get(name), dict):
            out.update(size_fields(data[name], f"{prefix}{name}."))
    return out


def named_labels(config: Any) -> list[str] | None:
    """A config's class names in id order, or None when they are the generic ``LABEL_i``."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in range(len(id2label))] if all(i in id2label for i in range(len(id2label))) else []
    return names if names and names != [f"LABEL_{i}" for i in range(len(names))] else None


def _refuse(text: str) -> None:
    raise ValueError(f"teacher and student cannot be matched: {text}")


def check_pair(
    teacher: Any, student: Any, *, teacher_class: str | None = None, student_class: str | None = None,
    task: str | None = None,
) -> list[int] | None:
    """Raise ``ValueError`` naming the first reason why ``teacher`` and ``student`` (configs) cannot be paired.

    ``teacher_class`` / ``student_class``: the names of the model classes (their
    heads); ``task``: the head both are built for, when the classes do not say it.
    Returns, for classifiers, :func:`label_permutation` (None: same order).
    """
    t_head, s_head = head_kind(teacher_class) or task, head_kind(student_class) or task
    if t_head and s_head and t_head != s_head:
        _refuse(
            f"the teacher is a {t_head} model ({teacher_class}) but the student a {s_head} model ({student_class}); "
            "distil between models with the same kind of head"
        )
    t_sizes, s_sizes = size_fields(teacher), size_fields(student)
    for name in sorted(set(t_sizes) & set(s_sizes)):
        if t_sizes[name] != s_sizes[name]:
            why = "the tokenizer's vocabulary" if name.endswith("vocab_size") else "the attention map size"
            _refuse(
                f"{name} is {t_sizes[name]} in the teacher but {s_sizes[name]} in the student (they must share {why})"
            )
    if t_head in CLASSIFICATION_HEADS and s_head in CLASSIFICATION_HEADS:
        if teacher.num_labels != student.num_labels:
            _refuse(
                f"the teacher has {teacher.num_labels} labels, the student {student.num_labels} "
                "(set student.config.num_labels or use the same label set)"
            )
        return label_permutation(teacher, student)
    return None


def label_permutation(teacher: Any, student: Any) -> list[int] | None:
    """The Teacher's label index of each of the Student's labels, or None when they are in the same order.

    ``teacher_logits[..., perm]`` are then in the Student's label order. Labels
    are matched by name (``id2label``); when either side has only the generic
    ``LABEL_i`` names they are matched by position. Different names are an error.
    """
    t_names, s_names = named_labels(teacher), named_labels(student)
    if t_names is None or s_names is None or t_names == s_names:
        return None
    if sorted(t_names) != sorted(s_names) or len(set(t_names)) != len(t_names):
        _refuse(f"the teacher's labels {t_names} are not the student's {s_names} (id2label must name the same labels)")
    index = {name: i for i, name in enumerate(t_names)}
    return [index[name] for name in s_names]


def position_limits(config: Any) -> dict[str, int]:
    """How many token positions a config's text embeddings hold: ``{field: limit}`` (empty when unbounded).

    Reads ``max_position_embeddings`` (``n_positions`` ...) of the config and of
    its ``text_config`` / ``decoder`` sub-configs; RoBERTa-like models lose
    ``pad_token_id + 1`` positions to their padding offset.
    """
    out: dict[str, int] = {}
    for prefix, sub in (("", config), ("text_config.", getattr(config, "text_config", None)),
                        ("decoder.", getattr(config, "decoder", None))):
        limit = getattr(sub, "max_position_embeddings", None) if sub is not None else None
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if getattr(sub, "model_type", None) in _OFFSET_POSITIONS:
                limit -= int(getattr(sub, "pad_token_id", None) or 0) + 1
            out[prefix + "max_position_embeddings"] = limit
    return out
