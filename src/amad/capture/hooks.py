"""Recording attention layers that are not on the Transformers attention interface.

Some models compute attention inline (BLIP's vision ``BlipAttention`` with a
fused ``qkv`` projection, BLIP's text ``BlipTextSelfAttention`` incl. its
cross-attention, ViLT's ``ViltSelfAttention``). For those, :class:`HookedLayer`
puts forward hooks on the layer's own projection modules and keeps their
outputs: the very Q/K/V tensors the layer used, so recording costs no extra
compute and no memory beyond keeping them, and the autograd graph reaches the
projection weights and the hidden states. A forward pre-hook on the layer
reads its mask (and whether it is called as cross-attention); a forward hook
assembles the :class:`~amad.attention.AttentionInputs` when the layer returns.

Supported layers are listed in :data:`HOOK_SPECS` by class name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..attention import AttentionInputs
from ..distributed import unwrapped_class
from .tensors import make_inputs


@dataclass(frozen=True)
class HookSpec:
    """How to read one inline attention class.

    projections: names of the Q, K, V ``nn.Linear`` submodules, or of one fused
        ``qkv`` projection whose output is ``(B, T, 3 * H * d)`` ordered (3, H, d).
    num_heads / head_dim: attribute names on the layer.
    scaling: the factor the layer applies to ``Q K^T``.
    mask_arg: forward argument holding the additive mask (self-attention).
    cross_states_arg / cross_mask_arg: forward arguments that make the call a
        cross-attention call (keys/values from them) and hold its mask.
    """

    projections: tuple[str, ...]
    num_heads: str
    head_dim: str
    scaling: Callable[[nn.Module], float]
    mask_arg: str | None = None
    cross_states_arg: str | None = None
    cross_mask_arg: str | None = None


def _inverse_sqrt_head_size(module: nn.Module) -> float:
    return float(module.attention_head_size) ** -0.5


#: Inline attention classes the hooks know how to read, by class name.
HOOK_SPECS: dict[str, HookSpec] = {
    "BlipAttention": HookSpec(("qkv",), "num_heads", "head_dim", lambda m: float(m.scale)),
    "BlipTextSelfAttention": HookSpec(
        ("query", "key", "value"),
        "num_attention_heads",
        "attention_head_size",
        _inverse_sqrt_head_size,
        mask_arg="attention_mask",
        cross_states_arg="encoder_hidden_states",
        cross_mask_arg="encoder_attention_mask",
    ),
    "ViltSelfAttention": HookSpec(
        ("query", "key", "value"),
        "num_attention_heads",
        "attention_head_size",
        _inverse_sqrt_head_size,
        mask_arg="attention_mask",
    ),
}


def hook_spec(module: nn.Module) -> HookSpec | None:
    """The spec for ``module`` if it is a known inline attention layer with its projections."""
    spec = HOOK_SPECS.get(unwrapped_class(module).__name__)  # FSDP2 renames a sharded module's class
    if spec is None or not all(isinstance(getattr(module, p, None), nn.Module) for p in spec.projections):
        return None
    return spec


def _split_heads(states: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """``(B, T, H * d)`` -> ``(B, H, T, d)``, exactly as the layers do it."""
    return states.view(*states.shape[:-1], num_heads, head_dim).transpose(1, 2)


def _cached_keys_values(cache: Any, layer_idx: int, cross: bool) -> tuple[Tensor, Tensor]:
    """Keys/values of this layer held by a KV cache after the layer updated it."""
    sub = cache
    if hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache
        sub = cache.cross_attention_cache if cross else cache.self_attention_cache
    layer = sub.layers[layer_idx]
    return layer.keys, layer.values


class HookedLayer:
    """Records one inline attention layer through forward hooks while attached."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        spec: HookSpec,
        sink: Callable[[str, AttentionInputs], None],
        *,
        self_attention: bool,
    ) -> None:
        self.name, self.module, self.spec, self.sink = name, module, spec, sink
        self.self_attention = self_attention
        self._signature = inspect.signature(module.forward)
        self._var_keyword = next(
            (p.name for p in self._signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        self._handles: list[RemovableHandle] = []
        self._call: dict[str, Any] | None = None

    def attach(self) -> None:
        self._handles.append(self.module.register_forward_pre_hook(self._before, with_kwargs=True))
        for projection in self.spec.projections:
            hook = self._projection_hook(projection)
            self._handles.append(getattr(self.module, projection).register_forward_hook(hook))
        self._handles.append(self.module.register_forward_hook(self._after))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call = None

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = self._signature.bind_partial(*args, **kwargs).arguments
        extra = arguments.get(self._var_keyword, {}) if self._var_keyword else {}

        def argument(arg: str | None) -> Any:
            return None if arg is None else arguments.get(arg, extra.get(arg))

        cross = argument(self.spec.cross_states_arg) is not None
        self._call = {
            "cross": cross,
            "mask": argument(self.spec.cross_mask_arg if cross else self.spec.mask_arg),
            "cache": argument("past_key_values"),
            "outputs": {},
        }

    def _projection_hook(self, projection: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def keep_output(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            if self._call is not None:
                self._call["outputs"][projection] = output

        return keep_output

    def _after(self, module: nn.Module, _args: tuple, _output: Any) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        heads, head_dim = int(getattr(module, self.spec.num_heads)), int(getattr(module, self.spec.head_dim))
        outputs = call["outputs"]
        if len(self.spec.projections) == 1:
            fused = outputs[self.spec.projections[0]]
            b, t = fused.shape[:2]
            query, key, value = fused.reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        else:
            q_name, k_name, v_name = self.spec.projections
            query = _split_heads(outputs[q_name], heads, head_dim)
            key = _split_heads(outputs[k_name], heads, head_dim) if k_name in outputs else None
            value = _split_heads(outputs[v_name], heads, head_dim) if v_name in outputs else None
        if call["cache"] is not None:  # keys may include earlier steps (or come only from the cache)
            key, value = _cached_keys_values(call["cache"], module.layer_idx, call["cross"])
        if key is None:
            raise RuntimeError(f"AttentionRecorder: layer {self.name!r} computed no keys that could be recorded")
        self.sink(
            self.name,
            make_inputs(
                query=query,
                key=key,
                value=value,
                scaling=self.spec.scaling(module),
                mask=call["mask"],
                bias=None,
                causal=False,
                self_attention=self.self_attention and not call["cross"],
                where=f"AttentionRecorder layer {self.name!r}",
            ),
        )
