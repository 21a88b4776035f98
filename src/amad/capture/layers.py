"""Which modules of a model are attention layers, their stacks, and Teacher/Student layer pairs.

A *recordable attention layer* is a module :class:`amad.AttentionRecorder` can
record: either it dispatches through the Transformers attention interface
(its ``forward`` calls ``ALL_ATTENTION_FUNCTIONS``: BERT, ViT, DeiT, T5, GPT-2,
Llama, ...) or it is a known inline attention class
(:data:`amad.capture.hooks.HOOK_SPECS`: BLIP, ViLT).

:func:`attention_layers` groups them into *stacks* (one per transformer stack
and attention kind) under keys that depend only on the module names, so they
are shared by all sizes of a family: ``"self"`` for a single-stack model
(BERT, GPT-2, Llama, ViT), ``"encoder.self"``, ``"decoder.self"``,
``"decoder.cross"`` for T5, ``"vision.self"``, ``"text.self"``, ``"text.cross"``
for BLIP captioning.
"""

from __future__ import annotations

import inspect
import re
from typing import Iterable, Sequence

from torch import nn

from ..attention import AttentionInputs, check_map_shapes
from .hooks import hook_spec

LayerPairs = list[tuple[str, str]]

_INDEX = re.compile(r"^\d+$")
_CROSS_WORDS = ("cross", "encdec", "encoder_attn")
_ROLE_WORDS = (
    (("vision", "visual", "image"), "vision"),
    (("text",), "text"),
    (("decoder",), "decoder"),
    (("encoder",), "encoder"),
)


def attention_backend(module: nn.Module) -> str | None:
    """``"interface"``, ``"hooks"`` or None (not a recordable attention layer)."""
    if hook_spec(module) is not None:
        return "hooks"
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    config = getattr(module, "config", None)
    if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names and hasattr(config, "_attn_implementation"):
        return "interface"
    return None


def recordable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All recordable attention layers of ``model`` by name, in ``named_modules()`` order."""
    return {name: m for name, m in model.named_modules() if attention_backend(m) is not None}


def is_cross_attention(name: str, module: nn.Module) -> bool:
    """Whether a layer attends to another stack's states (decided by its name within its layer)."""
    if getattr(module, "is_cross_attention", None) is True:
        return True
    tokens = name.split(".")
    first_index = next((i for i, t in enumerate(tokens) if _INDEX.match(t)), -1)
    inner = ".".join(tokens[first_index + 1 :]).lower()
    return any(word in inner for word in _CROSS_WORDS)


def _layer_order(name: str) -> tuple[int, ...]:
    return tuple(int(t) for t in name.split(".") if _INDEX.match(t))


def _stack_prefix(pattern: str) -> tuple[str, ...]:
    """The path of a stack above its first layer index (``encoder.block`` of ``encoder.block.*.layer.*.X``)."""
    tokens = pattern.split(".")
    return tuple(tokens[: tokens.index("*")]) if "*" in tokens else tuple(tokens[:-1])


def _role(token: str) -> str:
    lowered = token.lower()
    for words, role in _ROLE_WORDS:
        if any(word in lowered for word in words):
            return role
    return token


def _stack_roles(prefixes: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """Short stable names for the distinct stack prefixes: '' if there is one, else e.g. 'encoder'/'decoder'."""
    distinct = list(dict.fromkeys(prefixes))
    if len(distinct) == 1:
        return {distinct[0]: ""}
    width = max(len(p) for p in distinct)
    padded = [p + ("",) * (width - len(p)) for p in distinct]
    split = next(i for i in range(width) if len({p[i] for p in padded}) > 1)
    roles = {p: _role(q[split]) for p, q in zip(distinct, padded)}
    for candidates in ({p: q[split] for p, q in zip(distinct, padded)}, {p: ".".join(p[split:]) for p in distinct}):
        clashing = [p for p in distinct if list(roles.values()).count(roles[p]) > 1]
        for p in clashing:
            roles[p] = candidates[p]
    return roles


def attention_layers(model: nn.Module) -> dict[str, list[str]]:
    """The recordable attention layers of ``model`` grouped by stack, each stack in layer order.

    Layers are grouped by their name with every numeric index replaced by
    ``*``; stacks are keyed ``"<role>.<kind>"`` (kind ``self`` or ``cross``;
    role from the first path component where the stacks differ, e.g.
    ``encoder``/``decoder``/``vision``/``text``; no role for single-stack models).
    """
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in recordable_layers(model).items():
        pattern = ".".join("*" if _INDEX.match(t) else t for t in name.split("."))
        groups.setdefault(pattern, []).append((name, module))
    roles = _stack_roles([_stack_prefix(p) for p in groups])
    keyed: dict[str, list[str]] = {}
    for pattern, members in groups.items():
        role = roles[_stack_prefix(pattern)]
        kind = "cross" if is_cross_attention(*members[0]) else "self"
        key = f"{role}.{kind}" if role else kind
        if key in keyed:  # two stacks of the same kind under one prefix: name them by their path
            key = f"{key}[{pattern}]"
        keyed[key] = [name for name, _ in sorted(members, key=lambda item: _layer_order(item[0]))]
    return keyed


def _examples(model: nn.Module, limit: int = 6) -> str:
    stacks = attention_layers(model)
    names = list(dict.fromkeys(n for layers in stacks.values() for n in (layers[0], layers[-1])))
    total = sum(len(v) for v in stacks.values())
    if not names:
        return "it has no recordable attention layers"
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"its attention layers include {shown} ({total} in all)"


def attention_module(model: nn.Module, name: str, *, role: str = "model") -> nn.Module:
    """The recordable attention layer ``name`` of ``model``; ValueError naming valid layers otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"{role} attention layer names must be strings; got {type(name).__name__} {name!r}")
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"{role} ({type(model).__name__}) has no module named {name!r}; {_examples(model)}")
    module = modules[name]
    if attention_backend(module) is None:
        inside = [n for n in recordable_layers(model) if n.startswith(name + ".")] if name else []
        hint = (
            f"attention layers inside it: {', '.join(repr(n) for n in inside[:4])}"
            if inside
            else _examples(model)
        )
        raise ValueError(
            f"{role} module {name!r} ({type(module).__name__}) is not a recordable attention layer; {hint}"
        )
    return module


def uniform_layer_map(num_teacher: int, num_student: int) -> list[int]:
    """Teacher layer (1-based) for each Student layer j = 1..L_s: ``round(j * L_t / L_s)``, halves up, at least 1.

    12 -> 6 gives 2, 4, ..., 12; 12 -> 5 gives 2, 5, 7, 10, 12; with
    ``L_s > L_t`` Teacher layers repeat (6 -> 12 gives 1, 1, 2, 2, ..., 6, 6).
    The last Student layer always learns the last Teacher layer.
    """
    if num_teacher < 1 or num_student < 1:
        raise ValueError(f"layer counts must be >= 1; got Teacher {num_teacher}, Student {num_student}")
    return [max(1, (2 * j * num_teacher + num_student) // (2 * num_student)) for j in range(1, num_student + 1)]


def _shared_stacks(teacher: nn.Module, student: nn.Module) -> list[tuple[list[str], list[str]]]:
    t_stacks, s_stacks = attention_layers(teacher), attention_layers(student)
    shared = [key for key in t_stacks if key in s_stacks]
    if not shared:
        raise ValueError(
            f"Teacher ({type(teacher).__name__}) attention stacks {list(t_stacks)} and Student "
            f"({type(student).__name__}) stacks {list(s_stacks)} share none; give explicit layer pairs"
        )
    return [(t_stacks[key], s_stacks[key]) for key in shared]


def resolve_layer_pairs(
    teacher: nn.Module, student: nn.Module, layers: str | Iterable[tuple[str, str]] = "last"
) -> LayerPairs:
    """(Teacher layer, Student layer) module-name pairs to distil.

    ``"last"``: the last layer of every stack both models have (the paper's
    default); ``"uniform"``: every Student layer of every shared stack, Student
    layer j learning Teacher layer :func:`uniform_layer_map`; a list of
    ``(teacher_name, student_name)`` pairs: validated and returned as is.
    """
    if isinstance(layers, str):
        if layers not in ("last", "uniform"):
            raise ValueError(f"layers must be 'last', 'uniform' or a list of (teacher, student) names; got {layers!r}")
        pairs: LayerPairs = []
        for t_layers, s_layers in _shared_stacks(teacher, student):
            if layers == "last":
                pairs.append((t_layers[-1], s_layers[-1]))
            else:
                mapping = uniform_layer_map(len(t_layers), len(s_layers))
                pairs.extend((t_layers[t - 1], s_layers[j]) for j, t in enumerate(mapping))
        return pairs
    try:
        given = list(layers)
    except TypeError:
        raise TypeError(f"layers must be 'last', 'uniform' or a list of pairs; got {type(layers).__name__}") from None
    if not given:
        raise ValueError("layers: the list of (teacher, student) layer pairs is empty")
    pairs = []
    for pair in given:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"layers: each entry must be a (teacher_name, student_name) pair; got {pair!r}")
        t_name, s_name = pair
        attention_module(teacher, t_name, role="Teacher")
        attention_module(student, s_name, role="Student")
        pairs.append((t_name, s_name))
    return pairs


def check_layer_shapes(
    teacher_name: str, teacher: AttentionInputs, student_name: str, student: AttentionInputs
) -> None:
    """Recorded Teacher and Student layers must give maps of equal ``B, q, k``; the error names both modules."""
    check_map_shapes(teacher, student, name=f"Teacher layer {teacher_name!r} vs Student layer {student_name!r}")
