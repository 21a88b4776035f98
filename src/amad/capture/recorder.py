"""Record chosen attention layers of a Hugging Face model during its forward passes.

    with AttentionRecorder(model, ["encoder.layer.11.attention.self"]) as rec:
        outputs = model(**batch)
    maps = rec.maps("encoder.layer.11.attention.self")    # (B, H, q, k)

Only the listed layers are recorded; no ``output_attentions``, and every other
layer keeps its fast attention kernel (SDPA). What is recorded is the layer's
:class:`~amad.attention.AttentionInputs` (Q, K, V, scaling, bias, mask,
causality), still attached to the autograd graph, so maps are recomputed on
demand (or streamed by the losses) and a loss on them trains the layer.

Two mechanisms, chosen per layer (see :func:`amad.capture.layers.attention_backend`):

* Layers on the Transformers attention interface (BERT, ViT, DeiT, T5, GPT-2,
  Llama, ...): while recording, the layer gets its own shallow copy of its
  config whose ``_attn_implementation`` is :data:`RECORDING_IMPLEMENTATION`, a
  function registered in ``ALL_ATTENTION_FUNCTIONS`` for as long as any
  recorder is active. That function records its arguments and calls the
  layer's original implementation (``"sdpa"``, or the model's own
  ``eager_attention_forward``) with them unchanged, so outputs are identical.
  Only ``"eager"`` and ``"sdpa"`` layers are supported (their masks are known).
* Inline attention classes (BLIP, ViLT): forward hooks on the layer's own
  projections (:mod:`amad.capture.hooks`).

Semantics: entering clears earlier records; if a layer runs several times
inside the context (several forwards, generation steps), the latest call is
kept. Exiting restores the model exactly (same config objects, no hooks, the
registered function removed when no recorder is active). Records stay
readable after exiting. For self-attention, ``query_mask`` marks the real
(non-padding) query rows, derived from the key mask; for cross-attention it
is None (the recorder cannot see the query padding).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Iterable

from torch import Tensor, nn
from transformers.modeling_utils import AttentionInterface

from ..attention import AttentionInputs
from .hooks import HookedLayer, hook_spec
from .tensors import make_inputs
from .layers import attention_backend, attention_module, is_cross_attention

__all__ = ["AttentionRecorder", "RECORDING_IMPLEMENTATION", "IGNORED_ATTENTION_KWARGS"]

#: Name under which the recording function is registered in ``ALL_ATTENTION_FUNCTIONS``.
RECORDING_IMPLEMENTATION = "amad_record"
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")

#: Keyword arguments of attention functions that do not change the probabilities
#: of eager/SDPA attention (or that the recorder reads itself: scaling,
#: is_causal, position_bias). ``sliding_window`` is already part of the masks
#: eager and SDPA layers receive. Any other keyword with a value that is not
#: None/False makes recording fail loudly rather than record wrong maps.
IGNORED_ATTENTION_KWARGS = frozenset(
    {
        "dropout",
        "scaling",
        "is_causal",
        "position_bias",
        "sliding_window",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "num_items_in_batch",
        "position_ids",
        "cache_position",
        "use_cache",
        "past_key_values",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
    }
)

# Layers currently dispatching to the recording function -> their recorder slot.
_ACTIVE: dict[nn.Module, "_InterfaceLayer"] = {}


def _recording_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, *args: Any, **kwargs: Any
) -> Any:
    """Registered attention function: record the call, then run the layer's original implementation."""
    slot = _ACTIVE.get(module)
    if slot is None:
        raise RuntimeError(
            f"{type(module).__name__} dispatched to {RECORDING_IMPLEMENTATION!r} but no AttentionRecorder "
            "is recording it (a copy of a model made inside a recorder context?)"
        )
    if args:
        raise TypeError(f"AttentionRecorder: layer {slot.name!r} passed unexpected positional arguments to attention")
    slot.record(query, key, value, attention_mask, kwargs)
    return slot.original(module, query, key, value, attention_mask, **kwargs)


def recorded_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the attention layers of ``model`` that an active recorder is recording now (layers on
    the attention interface: their calls go through the recorder)."""
    return [(name, module) for name, module in model.named_modules() if module in _ACTIVE]


def _register() -> None:
    if not _ACTIVE:
        AttentionInterface.register(RECORDING_IMPLEMENTATION, _recording_attention)


def _unregister() -> None:
    if not _ACTIVE:
        AttentionInterface._global_mapping.pop(RECORDING_IMPLEMENTATION, None)


def _implementation(module: nn.Module, name: str) -> str:
    impl = module.config._attn_implementation or "eager"
    if impl == RECORDING_IMPLEMENTATION or module in _ACTIVE:
        raise RuntimeError(f"AttentionRecorder: layer {name!r} is already being recorded by another recorder")
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"AttentionRecorder: layer {name!r} runs attn_implementation={impl!r}; recording supports "
            f"{SUPPORTED_IMPLEMENTATIONS} (load the model with attn_implementation='sdpa')"
        )
    return impl


def _original_function(module: nn.Module, impl: str) -> Callable[..., Any]:
    """What the layer would have called: its module's ``eager_attention_forward`` or the SDPA function."""
    forward = inspect.unwrap(type(module).forward)
    if impl == "eager":
        if getattr(module, "reorder_and_upcast_attn", False) and hasattr(module, "_upcast_and_reordered_attn"):
            # GPT-2's eager path with reorder_and_upcast_attn bypasses the interface; keep doing so.
            return lambda m, q, k, v, mask, **_: m._upcast_and_reordered_attn(q, k, v, mask)
        eager = forward.__globals__.get("eager_attention_forward")
        if eager is None:
            raise TypeError(f"{type(module).__name__}: no eager_attention_forward next to its forward to fall back on")
        return eager
    return forward.__globals__.get("ALL_ATTENTION_FUNCTIONS", AttentionInterface())[impl]


class _InterfaceLayer:
    """One layer on the attention interface: swaps in a config copy that dispatches to the recorder."""

    def __init__(
        self, name: str, module: nn.Module, sink: Callable[[str, AttentionInputs], None], *, self_attention: bool
    ) -> None:
        self.name, self.module, self.sink, self.self_attention = name, module, sink, self_attention
        _implementation(module, name)  # fail at construction on unsupported implementations
        self.impl = ""
        self.original: Callable[..., Any] = _recording_attention
        self._config: Any = None

    def attach(self) -> None:
        self.impl = _implementation(self.module, self.name)
        self.original = _original_function(self.module, self.impl)
        self._config = self.module.config
        recording = copy.copy(self._config)
        # Set the stored field directly: the property setter would also rewrite shared sub-configs.
        recording._attn_implementation_internal = RECORDING_IMPLEMENTATION
        _register()
        _ACTIVE[self.module] = self
        self.module.config = recording

    def detach(self) -> None:
        if self._config is None:
            return
        self.module.config = self._config
        self._config = None
        _ACTIVE.pop(self.module, None)
        _unregister()

    def record(self, query: Tensor, key: Tensor, value: Tensor, mask: Any, kwargs: dict) -> None:
        where = f"AttentionRecorder layer {self.name!r}"
        for kw, val in kwargs.items():
            if kw not in IGNORED_ATTENTION_KWARGS and val is not None and val is not False:
                raise ValueError(
                    f"{where}: attention received {kw}={val!r}, which the recorder does not know how to "
                    "reproduce; refusing to record maps that could differ from the model's"
                )
        scaling = kwargs.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        bias = kwargs.get("position_bias")
        causal = False
        if self.impl == "sdpa":  # mirror sdpa_attention_forward: None mask + causal layer = implicit causality
            flag = kwargs.get("is_causal")
            flag = getattr(self.module, "is_causal", True) if flag is None else flag
            causal = query.shape[2] > 1 and mask is None and bool(flag)
            if causal and key.shape[2] > query.shape[2]:  # SDPA drops the unused tail of a static cache
                q_len = query.shape[2]
                key, value = key[:, :, :q_len], value[:, :, :q_len]
                bias = None if bias is None else bias[..., :q_len]
        self.sink(
            self.name,
            make_inputs(
                query=query,
                key=key,
                value=value,
                scaling=scaling,
                mask=mask,
                bias=bias,
                causal=causal,
                self_attention=self.self_attention,
                where=where,
            ),
        )


class AttentionRecorder:
    """Context manager recording the listed attention layers of ``model``.

    ``layers``: one module name or a list of them, as in
    ``model.named_modules()``; each must be a recordable attention layer
    (:func:`amad.capture.layers.attention_layers` lists them); a wrong name is a
    ValueError at construction naming it and suggesting valid layers.

    Inside the context every forward pass records the listed layers;
    :meth:`inputs` / :meth:`maps` return the latest call of a layer (entering
    clears older records; records stay readable after exiting). The recorded
    tensors keep their autograd graph: detach them for a Teacher, or run the
    Teacher under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, layers: str | Iterable[str]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"AttentionRecorder needs a torch.nn.Module; got {type(model).__name__}")
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise ValueError("AttentionRecorder: no layers to record")
        self.model = model
        self._records: dict[str, AttentionInputs] = {}
        self._slots: dict[str, _InterfaceLayer | HookedLayer] = {}
        for name in dict.fromkeys(names):
            module = attention_module(model, name)
            self_attention = not is_cross_attention(name, module)
            if attention_backend(module) == "hooks":
                self._slots[name] = HookedLayer(
                    name, module, hook_spec(module), self._store, self_attention=self_attention
                )
            else:
                self._slots[name] = _InterfaceLayer(name, module, self._store, self_attention=self_attention)
        self._attached: list[_InterfaceLayer | HookedLayer] = []

    @property
    def layers(self) -> tuple[str, ...]:
        """The recorded layer names, in the order given."""
        return tuple(self._slots)

    @property
    def active(self) -> bool:
        return bool(self._attached)

    def _store(self, name: str, inputs: AttentionInputs) -> None:
        self._records[name] = inputs

    def __enter__(self) -> "AttentionRecorder":
        if self._attached:
            raise RuntimeError("AttentionRecorder is already active; it cannot be entered twice at once")
        self._records.clear()
        try:
            for slot in self._slots.values():
                slot.attach()
                self._attached.append(slot)
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._detach()

    def _detach(self) -> None:
        while self._attached:
            self._attached.pop().detach()

    def clear(self) -> None:
        """Forget what was recorded (recording continues if active)."""
        self._records.clear()

    def inputs(self, name: str) -> AttentionInputs:
        """What layer ``name`` computed in its latest call: Q, K, V ``(B, H, *, d)``, scaling, bias, masks."""
        if name not in self._slots:
            raise ValueError(f"AttentionRecorder does not record {name!r}; it records {list(self._slots)}")
        if name not in self._records:
            raise RuntimeError(
                f"AttentionRecorder: layer {name!r} has not run inside the recorder since it was entered or cleared"
            )
        return self._records[name]

    def maps(self, name: str) -> Tensor:
        """Attention probabilities ``(B, H, q, k)`` of layer ``name`` (pre-dropout, recomputed on demand)."""
        return self.inputs(name).probs()

    def __repr__(self) -> str:
        return f"AttentionRecorder({type(self.model).__name__}, layers={list(self._slots)}, active={self.active})"
