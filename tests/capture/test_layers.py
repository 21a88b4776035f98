"""attention_layers (stacks with stable keys), resolve_layer_pairs and the pair shape check."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import transformers as hf
from torch import nn

from amad.attention import AttentionInputs
from amad.capture.layers import attention_layers, check_layer_shapes, resolve_layer_pairs, uniform_layer_map

VOCAB = 40


def text_config(layers: int, heads: int = 2) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=8 * heads, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=16, max_position_embeddings=16)


def vision_config(layers: int, heads: int = 2) -> dict:
    return dict(image_size=8, patch_size=4, hidden_size=8 * heads, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=16)


def bert(layers: int, heads: int = 2) -> nn.Module:
    return hf.BertForMaskedLM(hf.BertConfig(**text_config(layers, heads)))


def t5(layers: int, heads: int = 2) -> nn.Module:
    return hf.T5ForConditionalGeneration(hf.T5Config(vocab_size=VOCAB, d_model=8 * heads, d_kv=8, d_ff=16,
                                                     num_layers=layers, num_heads=heads))


def blip(layers: int, heads: int = 2) -> nn.Module:
    text = dict(text_config(layers, heads), encoder_hidden_size=8 * heads)
    return hf.BlipForConditionalGeneration(hf.BlipConfig(text_config=text, vision_config=vision_config(layers, heads)))


def blip_vqa(layers: int, heads: int = 2) -> nn.Module:
    text = dict(text_config(layers, heads), encoder_hidden_size=8 * heads)
    return hf.BlipForQuestionAnswering(hf.BlipConfig(text_config=text, vision_config=vision_config(layers, heads)))


def gpt2(layers: int, heads: int = 2) -> nn.Module:
    return hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=8 * heads, n_layer=layers, n_head=heads, vocab_size=VOCAB))


def llama(layers: int, heads: int = 2) -> nn.Module:
    config = hf.LlamaConfig(hidden_size=8 * heads, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=1, intermediate_size=16, vocab_size=VOCAB)
    return hf.LlamaForCausalLM(config)


def vit(layers: int, heads: int = 2) -> nn.Module:
    return hf.ViTForImageClassification(hf.ViTConfig(**vision_config(layers, heads)))


def deit(layers: int, heads: int = 2) -> nn.Module:
    return hf.DeiTModel(hf.DeiTConfig(**vision_config(layers, heads)))


def vilt(layers: int, heads: int = 2) -> nn.Module:
    return hf.ViltModel(hf.ViltConfig(**text_config(layers, heads), image_size=8, patch_size=4))


def vision_encoder_decoder(layers: int, heads: int = 2) -> nn.Module:
    decoder = hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=8 * heads, n_layer=layers, n_head=heads, vocab_size=VOCAB,
                                               add_cross_attention=True))
    return hf.VisionEncoderDecoderModel(encoder=hf.ViTModel(hf.ViTConfig(**vision_config(layers, heads))),
                                        decoder=decoder)


STACKS: dict[str, tuple[Callable[..., nn.Module], dict[str, str]]] = {
    # family: (builder, {stack key: pattern of its layer names})
    "bert": (bert, {"self": "bert.encoder.layer.{i}.attention.self"}),
    "t5": (t5, {"encoder.self": "encoder.block.{i}.layer.0.SelfAttention",
                "decoder.self": "decoder.block.{i}.layer.0.SelfAttention",
                "decoder.cross": "decoder.block.{i}.layer.1.EncDecAttention"}),
    "blip": (blip, {"vision.self": "vision_model.encoder.layers.{i}.self_attn",
                    "text.self": "text_decoder.bert.encoder.layer.{i}.attention.self",
                    "text.cross": "text_decoder.bert.encoder.layer.{i}.crossattention.self"}),
    "blip_vqa": (blip_vqa, {"vision.self": "vision_model.encoder.layers.{i}.self_attn",
                            "text_encoder.self": "text_encoder.encoder.layer.{i}.attention.self",
                            "text_encoder.cross": "text_encoder.encoder.layer.{i}.crossattention.self",
                            "text_decoder.self": "text_decoder.bert.encoder.layer.{i}.attention.self",
                            "text_decoder.cross": "text_decoder.bert.encoder.layer.{i}.crossattention.self"}),
    "gpt2": (gpt2, {"self": "transformer.h.{i}.attn"}),
    "llama": (llama, {"self": "model.layers.{i}.self_attn"}),
    "vit": (vit, {"self": "vit.layers.{i}.attention"}),
    "deit": (deit, {"self": "layers.{i}.attention"}),
    "vilt": (vilt, {"self": "encoder.layer.{i}.attention.attention"}),
    "vision_encoder_decoder": (vision_encoder_decoder, {
        "encoder.self": "encoder.layers.{i}.attention",
        "decoder.self": "decoder.transformer.h.{i}.attn",
        "decoder.cross": "decoder.transformer.h.{i}.crossattention"}),
}


@pytest.mark.parametrize("family", list(STACKS))
def test_attention_layers_stacks_in_layer_order_with_size_independent_keys(family: str) -> None:
    build, patterns = STACKS[family]
    for layers in (2, 3):
        stacks = attention_layers(build(layers))
        assert stacks == {key: [p.format(i=i) for i in range(layers)] for key, p in patterns.items()}


def test_layer_order_is_numeric_not_lexicographic() -> None:
    names = attention_layers(bert(11))["self"]
    assert names[-1] == "bert.encoder.layer.10.attention.self" and names[2] == "bert.encoder.layer.2.attention.self"


# -- uniform map -----------------------------------------------------------------------------------------------


def reference_uniform(num_teacher: int, num_student: int) -> list[int]:
    """round(j * L_t / L_s) with halves rounded up, at least 1 -- with exact fractions."""
    from fractions import Fraction
    from math import floor

    return [max(1, floor(Fraction(j * num_teacher, num_student) + Fraction(1, 2))) for j in range(1, num_student + 1)]


def test_uniform_layer_map_examples() -> None:
    assert uniform_layer_map(12, 6) == [2, 4, 6, 8, 10, 12]
    assert uniform_layer_map(12, 5) == [2, 5, 7, 10, 12]
    assert uniform_layer_map(6, 12) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert uniform_layer_map(1, 3) == [1, 1, 1]
    assert uniform_layer_map(4, 4) == [1, 2, 3, 4]


def test_uniform_layer_map_general_rule() -> None:
    for num_teacher in range(1, 25):
        for num_student in range(1, 25):
            mapping = uniform_layer_map(num_teacher, num_student)
            assert mapping == reference_uniform(num_teacher, num_student)
            assert mapping[-1] == num_teacher and mapping == sorted(mapping)
            assert all(1 <= t <= num_teacher for t in mapping)
    with pytest.raises(ValueError, match="layer counts"):
        uniform_layer_map(0, 3)


# -- resolve_layer_pairs ----------------------------------------------------------------------------------------


def test_last_pairs_every_shared_stack() -> None:
    teacher, student = t5(3, heads=4), t5(2, heads=2)
    assert resolve_layer_pairs(teacher, student) == [
        ("encoder.block.2.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention"),
        ("decoder.block.2.layer.0.SelfAttention", "decoder.block.1.layer.0.SelfAttention"),
        ("decoder.block.2.layer.1.EncDecAttention", "decoder.block.1.layer.1.EncDecAttention"),
    ]
    pairs = resolve_layer_pairs(blip(3, heads=4), blip(2), "last")
    assert [t.split(".")[0] for t, _ in pairs] == ["vision_model", "text_decoder", "text_decoder"]


def test_uniform_pairs_follow_the_map() -> None:
    pairs = resolve_layer_pairs(bert(5), bert(2), "uniform")
    assert pairs == [("bert.encoder.layer.2.attention.self", "bert.encoder.layer.0.attention.self"),
                     ("bert.encoder.layer.4.attention.self", "bert.encoder.layer.1.attention.self")]
    pairs = resolve_layer_pairs(t5(2), t5(4), "uniform")
    assert len(pairs) == 12
    assert [t for t, s in pairs if s.startswith("decoder.block.") and "EncDec" in s] == [
        f"decoder.block.{i}.layer.1.EncDecAttention" for i in (0, 0, 1, 1)]


def test_explicit_pairs_are_validated() -> None:
    teacher, student = bert(3), bert(2)
    pairs = [("bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self")]
    assert resolve_layer_pairs(teacher, student, pairs) == pairs
    assert resolve_layer_pairs(teacher, student, [list(pairs[0])]) == pairs
    with pytest.raises(ValueError, match=r"Student \(BertForMaskedLM\) has no module named 'bert.encoder.layer.5"):
        resolve_layer_pairs(teacher, student, [("bert.encoder.layer.0.attention.self", "bert.encoder.layer.5.x")])
    with pytest.raises(ValueError, match=r"Teacher module 'bert.encoder.layer.0.attention' .* not a recordable"
                                         r".*'bert.encoder.layer.0.attention.self'"):
        wrapper, layer = "bert.encoder.layer.0.attention", "bert.encoder.layer.0.attention.self"
        resolve_layer_pairs(teacher, student, [(wrapper, layer)])
    with pytest.raises(TypeError, match="pair"):
        resolve_layer_pairs(teacher, student, ["bert.encoder.layer.0.attention.self"])
    with pytest.raises(ValueError, match="empty"):
        resolve_layer_pairs(teacher, student, [])
    with pytest.raises(ValueError, match="'last', 'uniform'"):
        resolve_layer_pairs(teacher, student, "first")


def test_no_shared_stack_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"stacks \['self'\].*\['encoder.self', 'decoder.self', 'decoder.cross'\]"):
        resolve_layer_pairs(bert(2), t5(2), "last")


def test_pair_shape_check_names_both_modules() -> None:
    def inputs(batch: int, q: int, k: int, heads: int) -> AttentionInputs:
        return AttentionInputs(query=torch.zeros(batch, heads, q, 4), key=torch.zeros(batch, heads, k, 4), scaling=0.5)

    check_layer_shapes("t.layer", inputs(2, 5, 5, 4), "s.layer", inputs(2, 5, 5, 2))  # heads may differ
    with pytest.raises(ValueError, match=r"Teacher layer 't.layer' vs Student layer 's.layer'.*\(2, 4, 5, 5\).*"
                                         r"\(2, 2, 6, 6\)"):
        check_layer_shapes("t.layer", inputs(2, 5, 5, 4), "s.layer", inputs(2, 6, 6, 2))
