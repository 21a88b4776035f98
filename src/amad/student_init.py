"""Students initialised from their Teacher: fewer layers and fewer attention heads, everything else copied.

    student = student_from_teacher(teacher, layers=6, num_heads=3, head_rule="amad", calibration_batch=batch)

The Student is a model of the Teacher's own class, built from a copy of its
config with fewer layers and heads, so ``save_pretrained`` / ``from_pretrained``
work as for any model of that class. Embeddings, norms, MLPs, the output head
and every other weight of the kept layers are copied unchanged; each kept
layer's attention is built from the Teacher's heads of that layer. Two layouts:

* **Selection** (Llama, Mistral, Qwen2, ...: ``q_proj``/``k_proj``/``v_proj``/``o_proj``
  with a configurable ``head_dim``): the Student keeps ``H_s`` of the Teacher's
  query heads and ``KV_s`` of its key/value heads, with head dimension and hidden
  size unchanged, so the attention width shrinks to ``H_s * d``. Rows of
  ``q_proj`` (query heads), of ``k_proj``/``v_proj`` (kv heads) and columns of
  ``o_proj`` (query heads) are copied. Grouped-query attention is kept
  consistent: the Student keeps whole kv groups, ``g_s = H_s / KV_s`` query heads
  of each (``g_s`` at most the Teacher's group size), so every kept query head
  still reads its own key/value head. What the dropped heads added to the
  output is lost (distillation recovers it).
* **Re-split** (BERT, RoBERTa, ViT, ...: ``query``/``key``/``value`` and the
  sibling ``output.dense``, head size ``hidden / heads``): the config ties the
  attention width to the hidden size, so the Student keeps hidden size and
  attention width and re-splits them into ``H_s`` wider heads of
  ``r = H_t / H_s`` Teacher heads each (``H_s`` must divide ``H_t``). Student
  head ``j`` concatenates the Q/K/V rows (and ``output.dense`` columns) of its
  group of Teacher heads, and its query rows are scaled by ``r ** -0.5``: its
  logits are then the *mean* of the group's logits (the Student's scaling is
  ``(r d)**-0.5``), i.e. its map is the renormalised geometric mean of the
  group's maps, and a group of identical heads gives that very map back. Values
  and outputs of all heads are kept.

Which Teacher heads are kept (or grouped) per layer is decided by a head rule of
:mod:`amad.head_selection`: ``"first"``, ``"amad"`` (calibrated on the Teacher's maps) or ``"magnitude"``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .capture import AttentionRecorder, attention_layers, uniform_layer_map
from .head_selection import HEAD_RULES, HeadPlan, group_heads, self_similarity, select_heads

__all__ = ["student_from_teacher"]

_INDEX = re.compile(r"^\d+$")


# -- the Teacher's layout -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where a model keeps its attention: layer names ``{prefix}.{i}.{attention}``, projection module names
    relative to ``{prefix}.{i}``, and whether heads are selected (Llama) or re-split (BERT)."""

    prefix: str
    attention: str
    query: str
    key: str
    value: str
    output: str
    resplit: bool


def _layout(model: nn.Module) -> _Layout:
    stacks = attention_layers(model)
    if list(stacks) != ["self"]:
        raise ValueError(
            f"student_from_teacher supports models with one stack of self-attention layers (decoder-only or "
            f"encoder-only); {type(model).__name__} has stacks {list(stacks)}"
        )
    first = stacks["self"][0]
    tokens = first.split(".")
    at = next((i for i, t in enumerate(tokens) if _INDEX.match(t)), None)
    if at is None:
        raise ValueError(f"cannot find the layer index in the attention layer name {first!r}")
    prefix, attention = ".".join(tokens[:at]), ".".join(tokens[at + 1 :])
    modules = dict(model.named_modules())
    module, parent = modules[first], first.rsplit(".", 1)[0]
    rel = attention + "."
    if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return _Layout(prefix, attention, rel + "q_proj", rel + "k_proj", rel + "v_proj", rel + "o_proj", False)
    if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("query", "key", "value")) and isinstance(
        modules.get(parent + ".output.dense"), nn.Linear
    ):
        outer = ".".join(tokens[at + 1 : -1])
        out = (outer + "." if outer else "") + "output.dense"
        return _Layout(prefix, attention, rel + "query", rel + "key", rel + "value", out, True)
    raise ValueError(
        f"student_from_teacher: {type(module).__name__} ({first!r}) has neither q_proj/k_proj/v_proj/o_proj "
        "(Llama-style) nor query/key/value with a sibling output.dense (BERT-style) projections"
    )


def _head_counts(config: Any) -> tuple[int, int]:
    heads = int(config.num_attention_heads)
    return heads, int(getattr(config, "num_key_value_heads", None) or heads)


def _kept_layers(num_layers: int, layers: int | Sequence[int] | None) -> list[int]:
    """0-based Teacher layers to keep: all (None), a count (:func:`amad.capture.layers.uniform_layer_map`) or a list."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= num_layers:
            raise ValueError(f"layers={layers}: a Student keeps 1..{num_layers} of the Teacher's layers")
        return [t - 1 for t in uniform_layer_map(num_layers, layers)]
    kept = list(layers)
    bad = [i for i in kept if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
    if not kept or bad or len(set(kept)) != len(kept):
        raise ValueError(
            f"layers={layers!r}: give distinct 0-based Teacher layer indices in 0..{num_layers - 1} (or a count)"
        )
    return kept


def _check_heads(layout: _Layout, teacher_counts: tuple[int, int], num_heads: int, num_kv_heads: int | None,
                 hidden: int) -> int:
    """Validate the Student's head counts; return its kv head count."""
    t_heads, t_kv = teacher_counts
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or not 1 <= num_heads <= t_heads:
        raise ValueError(f"num_heads={num_heads!r}: a Student keeps 1..{t_heads} of the Teacher's {t_heads} heads")
    if layout.resplit:
        if num_kv_heads not in (None, num_heads):
            raise ValueError(f"num_kv_heads={num_kv_heads}: this model has no grouped-query attention")
        if t_heads % num_heads or hidden % num_heads:
            raise ValueError(
                f"re-splitting {t_heads} heads (hidden size {hidden}) into num_heads={num_heads}: it must divide both"
            )
        return num_heads
    t_group = t_heads // t_kv
    if num_kv_heads is None:
        if num_heads % t_group:
            raise ValueError(f"num_heads={num_heads} is not a multiple of the Teacher's {t_group} query heads per "
                             "key/value head; give num_kv_heads")
        num_kv_heads = num_heads // t_group
    if not 1 <= num_kv_heads <= t_kv or num_heads % num_kv_heads or num_heads // num_kv_heads > t_group:
        raise ValueError(
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}: the Student needs 1..{t_kv} kv heads, each shared "
            f"by the same number of query heads, at most the Teacher's {t_group} (Teacher {t_heads}/{t_kv})"
        )
    return num_kv_heads


# -- plans, config, weights -----------------------------------------------------------------------------------------


def _head_dim(model: nn.Module, layout: _Layout, layer: int, heads: int) -> int:
    query = model.get_submodule(f"{layout.prefix}.{layer}.{layout.query}")
    return query.out_features // heads


@torch.no_grad()
def _magnitudes(teacher: nn.Module, layout: _Layout, layer: int, counts: tuple[int, int], dim: int) -> Tensor:
    """``||W_O^h W_V^{kv(h)}||_F`` per query head (float64)."""
    heads, kv = counts
    value = teacher.get_submodule(f"{layout.prefix}.{layer}.{layout.value}").weight.double()
    output = teacher.get_submodule(f"{layout.prefix}.{layer}.{layout.output}").weight.double()
    group = heads // kv

    def block(weight: Tensor, head: int) -> Tensor:
        return weight[head * dim : (head + 1) * dim]

    norms = [torch.linalg.matrix_norm(block(output.T, h).T @ block(value, h // group)) for h in range(heads)]
    return torch.stack(norms)


@torch.no_grad()
def _similarities(teacher: nn.Module, names: list[str], batch: dict) -> list[Tensor]:
    """:func:`self_similarity` of each named attention layer on one Teacher pass over ``batch`` (eval mode)."""
    if not isinstance(batch, dict) or not batch:
        raise ValueError("head rule 'amad' needs calibration_batch: a dict of model inputs (e.g. input_ids, "
                         f"attention_mask); got {type(batch).__name__}")
    training = teacher.training
    teacher.eval()
    try:
        with AttentionRecorder(teacher, names) as rec:
            teacher(**batch)
    finally:
        teacher.train(training)
    return [self_similarity(rec.inputs(name)) for name in names]


def _plans(teacher: nn.Module, layout: _Layout, kept: list[int], counts: tuple[int, int], num_heads: int,
           num_kv_heads: int, rule: str, calibration_batch: dict | None, dim: int) -> list[HeadPlan]:
    if rule not in HEAD_RULES:
        raise ValueError(f"unknown head_rule {rule!r}; choose one of {HEAD_RULES}")
    similarities: list[Tensor | None] = [None] * len(kept)
    if rule == "amad":
        names = [f"{layout.prefix}.{t}.{layout.attention}" for t in kept]
        similarities = list(_similarities(teacher, names, calibration_batch))  # type: ignore[arg-type]
    plans = []
    for t, similarity in zip(kept, similarities):
        if layout.resplit:
            plans.append(group_heads(num_heads, teacher_heads=counts[0], rule=rule, similarity=similarity))
            continue
        scores = _magnitudes(teacher, layout, t, counts, dim) if rule == "magnitude" else None
        plans.append(select_heads(num_heads, num_kv_heads, teacher_heads=counts[0], teacher_kv_heads=counts[1],
                                  rule=rule, similarity=similarity, scores=scores))
    return plans


def _student_config(teacher: nn.Module, layout: _Layout, kept: list[int], num_heads: int, num_kv_heads: int,
                    dim: int) -> Any:
    config = copy.deepcopy(teacher.config)
    config.__dict__.pop("quantization_config", None)  # e.g. a GGUF Teacher: the Student is plain weights
    num_layers = config.num_hidden_layers
    config.num_hidden_layers = len(kept)
    config.num_attention_heads = num_heads
    if not layout.resplit:
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = num_kv_heads
        if hasattr(config, "head_dim"):
            config.head_dim = dim
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == num_layers:
        config.layer_types = [layer_types[t] for t in kept]
    return config


def _rows(weight: Tensor, heads: Sequence[int], dim: int) -> Tensor:
    index = torch.tensor([h * dim + i for h in heads for i in range(dim)], device=weight.device)
    return weight.index_select(0, index)


def _layer_tensor(rel: str, tensor: Tensor, layout: _Layout, plan: HeadPlan, dim: int) -> Tensor:
    """The Student's tensor ``rel`` (a name inside a layer) from the Teacher's: attention projections sliced."""
    module, _, kind = rel.rpartition(".")
    if module == layout.query:
        return _rows(tensor, plan.query_heads, dim) * plan.query_scale
    if module in (layout.key, layout.value):
        return _rows(tensor, plan.kv_heads, dim)
    if module == layout.output and kind == "weight":
        return _rows(tensor.T, plan.query_heads, dim).T
    return tensor


@torch.no_grad()
def _student_state(teacher: nn.Module, student: nn.Module, layout: _Layout, kept: list[int], plans: list[HeadPlan],
                   dim: int) -> dict[str, Tensor]:
    source = teacher.state_dict()
    layer_key = re.compile(rf"^{re.escape(layout.prefix)}\.(\d+)\.(.+)$")
    state = {}
    for key, target in student.state_dict().items():
        match = layer_key.match(key)
        if match:
            i, rel = int(match.group(1)), match.group(2)
            teacher_key = f"{layout.prefix}.{kept[i]}.{rel}"
            value = _layer_tensor(rel, source[teacher_key], layout, plans[i], dim) if teacher_key in source else None
        else:
            teacher_key, value = key, source.get(key)
        if value is None:
            raise ValueError(
                f"student_from_teacher: the Teacher has no tensor {teacher_key!r} for the Student's {key!r}"
            )
        if value.shape != target.shape:
            raise ValueError(
                f"student_from_teacher: Teacher {teacher_key!r} gives shape {tuple(value.shape)} but the Student's "
                f"{key!r} has {tuple(target.shape)} (does the config keep the head dimension?)"
            )
        state[key] = value
    return state


def student_from_teacher(
    teacher: nn.Module,
    *,
    layers: int | Sequence[int] | None = None,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_rule: str = "first",
    calibration_batch: dict | None = None,
) -> nn.Module:
    """A Student of the Teacher's class with fewer layers/heads, initialised from the Teacher (module doc).

    layers: None (all), a count (uniform subset, :func:`amad.capture.layers.uniform_layer_map`: the Student's layer
    j starts as the Teacher layer it is later paired with by ``layers="uniform"``, the last kept), or
    0-based Teacher layer indices in Student order. num_heads / num_kv_heads: per Student layer
    (``num_kv_heads`` defaults to keeping the Teacher's query heads per kv head). head_rule: ``"first"``,
    ``"amad"`` (needs ``calibration_batch``, a dict of Teacher inputs) or ``"magnitude"``.
    The Student is in the Teacher's dtype, on its device, in eval mode; the Teacher is not changed.
    ``student.head_plans`` lists, per Student layer, the :class:`~amad.head_selection.HeadPlan` used.
    """
    layout = _layout(teacher)
    config = teacher.config
    counts = _head_counts(config)
    kept = _kept_layers(int(config.num_hidden_layers), layers)
    num_kv_heads = _check_heads(layout, counts, num_heads, num_kv_heads, int(config.hidden_size))
    if layout.resplit and head_rule == "magnitude":
        raise ValueError("head rule 'magnitude' selects heads; BERT-style attention is re-split: use 'first' or 'amad'")
    dim = _head_dim(teacher, layout, kept[0], counts[0])
    plans = _plans(teacher, layout, kept, counts, num_heads, num_kv_heads, head_rule, calibration_batch, dim)
    student_config = _student_config(teacher, layout, kept, num_heads, num_kv_heads, dim)
    reference = next(teacher.parameters())
    student = type(teacher)(student_config).to(device=reference.device, dtype=reference.dtype)
    student.load_state_dict(_student_state(teacher, student, layout, kept, plans, dim))
    student.head_plans = plans  # kept for inspection: which Teacher heads each layer came from
    return student.eval()
