"""VL-T5 and BLIP demo models: shapes, gradients, masks, save/load, Teacher/Student map sizes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoModelForVisualQuestionAnswering
from transformers.models.t5.modeling_t5 import T5Attention

from amad.bench.data import BlipCaptionCollator, build_tokenizer
from amad.bench.models.blip import make_blip
from amad.bench.models.vlt5 import VLT5Config, VLT5ForConditionalGeneration, VLT5ForVQA, extend_encoder_mask, make_vlt5

VOCAB, ANSWERS, B = 40, 7, 3
# small enough for a fast test, same head counts as the demo sizes (12 vs 8)
TINY = {"teacher": dict(d_model=48, d_kv=4, d_ff=64, num_layers=2, num_decoder_layers=2),
        "student": dict(d_model=32, d_kv=4, d_ff=48, num_layers=1, num_decoder_layers=1)}


def tiny(size: str, task: str, **extra):
    torch.manual_seed(0)
    return make_vlt5(size, task, vocab_size=VOCAB, num_answers=ANSWERS, dropout_rate=0.0, **TINY[size], **extra)


def batch(length: int = 6, pad_last: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (B, length), generator=g)
    ids[:, -1] = 1
    mask = torch.ones(B, length, dtype=torch.long)
    if pad_last:
        ids[-1, -pad_last:], mask[-1, -pad_last:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(B, 3, 48, 48, generator=g)}


def test_vqa_forward_backward_shapes():
    model = tiny("teacher", "vqa")
    out = model(**batch(), labels=torch.tensor([0, 3, 6]))
    assert out.logits.shape == (B, ANSWERS) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("visual.patch.weight", "visual.position.weight", "shared.weight", "answer_head.out.weight",
                 "encoder.block.0.layer.0.SelfAttention.q.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(TypeError, match="labels"):
        model(**batch(), labels=torch.zeros(B, ANSWERS))


def test_generation_model_teacher_forcing_and_generate():
    model = tiny("student", "translate")
    labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100], [5, 1, -100, -100]])
    out = model(**batch(), labels=labels)
    assert out.logits.shape == (B, 4, VOCAB) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.visual.patch.weight.grad.abs().sum() > 0
    model.eval()
    generated = model.generate(**batch(pad_last=2), max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == B and generated.shape[1] <= 6
    assert torch.all(generated[:, 0] == model.config.decoder_start_token_id)
    # greedy generation = argmax of teacher-forced logits fed back by hand
    b = batch(pad_last=2)
    dec = torch.zeros(B, 1, dtype=torch.long)
    for _ in range(generated.shape[1] - 1):
        logits = model(**b, decoder_input_ids=dec).logits
        dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(dec[0], generated[0])


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_padding_does_not_change_a_sample(task):
    model = tiny("teacher", task).eval()
    full = batch(length=6)
    padded = {k: v.clone() for k, v in full.items()}
    short = {k: v[-1:, :4] if k != "pixel_values" else v[-1:] for k, v in full.items()}
    short["input_ids"][:, -1] = 1
    padded["input_ids"][-1, :4] = short["input_ids"][0]
    padded["input_ids"][-1, 4:] = 0
    padded["attention_mask"][-1, 4:] = 0
    extra = {} if task == "vqa" else {"decoder_input_ids": torch.tensor([[0, 5, 6]])}
    alone = model(**short, **extra).logits
    extra = {} if task == "vqa" else {"decoder_input_ids": torch.tensor([[0, 5, 6]] * B)}
    in_batch = model(**padded, **extra).logits[-1:]
    torch.testing.assert_close(in_batch, alone, rtol=1e-5, atol=1e-5)


def test_encoder_mask_extension_and_errors():
    mask = torch.tensor([[1, 1, 0]])
    assert extend_encoder_mask(mask, 39, 36).tolist() == [[1] * 36 + [1, 1, 0]]
    assert extend_encoder_mask(mask, 3, 36) is mask
    assert extend_encoder_mask(None, 39, 36) is None
    with pytest.raises(ValueError, match="attention_mask"):
        extend_encoder_mask(mask, 40, 36)
    model = tiny("student", "vqa")
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="task"):
        make_vlt5("student", "summarise", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="num_answers"):
        make_vlt5("student", "vqa", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="patch_size"):
        VLT5Config(image_size=48, patch_size=7)


@pytest.mark.parametrize("task,auto", [("vqa", AutoModelForVisualQuestionAnswering), ("translate", AutoModelForSeq2SeqLM)])
def test_save_load_round_trip(task, auto, tmp_path):
    model = tiny("teacher", task).eval()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is VLT5Config
    for loader in (type(model), auto):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is type(model)
        extra = {} if task == "vqa" else {"decoder_input_ids": torch.tensor([[0, 5]] * B)}
        torch.testing.assert_close(loaded(**batch(), **extra).logits, model(**batch(), **extra).logits)
    assert loaded.shared.weight is loaded.encoder.embed_tokens.weight


def attention_names(model) -> dict[str, str]:
    """Last encoder self-, decoder self- and cross-attention module names (T5 layout)."""
    enc, dec = len(model.encoder.block) - 1, len(model.decoder.block) - 1
    return {"encoder_attentions": f"encoder.block.{enc}.layer.0.SelfAttention",
            "decoder_attentions": f"decoder.block.{dec}.layer.0.SelfAttention",
            "cross_attentions": f"decoder.block.{dec}.layer.1.EncDecAttention"}


@pytest.mark.parametrize("task", ["vqa", "translate"])
def test_teacher_and_student_maps_have_same_q_and_k(task):
    teacher, student = tiny("teacher", task), tiny("student", task)
    assert (teacher.config.num_heads, student.config.num_heads) == (12, 8)
    extra = {} if task == "vqa" else {"decoder_input_ids": torch.tensor([[0, 5, 6, 7]] * B)}
    shapes = {}
    for name, model in (("teacher", teacher), ("student", student)):
        for module_name in attention_names(model).values():
            assert type(model.get_submodule(module_name)) is T5Attention  # stock attention, recordable
        model.set_attn_implementation("eager")
        out = model(**batch(), **extra, output_attentions=True)
        shapes[name] = {kind: getattr(out, kind)[-1].shape for kind in attention_names(model)}
    q_dec = 1 if task == "vqa" else 4
    expected_qk = {"encoder_attentions": (42, 42), "decoder_attentions": (q_dec, q_dec), "cross_attentions": (q_dec, 42)}
    for kind, qk in expected_qk.items():
        assert shapes["teacher"][kind] == (B, 12, *qk)
        assert shapes["student"][kind] == (B, 8, *qk)


def test_demo_sizes_have_the_documented_heads():
    teacher = make_vlt5("teacher", "vqa", vocab_size=VOCAB, num_answers=ANSWERS)
    student = make_vlt5("student", "vqa", vocab_size=VOCAB, num_answers=ANSWERS)
    assert (teacher.config.num_heads, teacher.config.d_kv) == (12, 16)
    assert (student.config.num_heads, student.config.d_kv) == (8, 16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(teacher) > 2 * count(student)


def test_blip_trains_with_our_tokenizer_and_generates():
    words = ["the small red circle is left of the large blue square .", "there are two objects : a red circle ."]
    tokenizer = build_tokenizer(words)
    kw = dict(vision_overrides=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1),
              text_overrides=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1))
    torch.manual_seed(0)
    teacher, student = (make_blip(size, vocab_size=len(tokenizer), **kw) for size in ("teacher", "student"))
    text = teacher.config.text_config
    assert (text.pad_token_id, text.bos_token_id, text.sep_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    rows = [{"caption": w, "image": torch.randint(0, 255, (48, 48, 3), dtype=torch.uint8).numpy()} for w in words]
    b = BlipCaptionCollator(tokenizer)(rows)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = student(**b).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    student.eval()
    generated = student.generate(pixel_values=b["pixel_values"], max_new_tokens=14)
    assert torch.all(generated[:, 0] == tokenizer.bos_token_id)
    assert tokenizer.decode(generated[0], skip_special_tokens=True) == words[0]
    maps = {n: m(**b, output_attentions=True).attentions[-1].shape for n, m in (("t", teacher), ("s", student))}
    assert maps["t"] == (2, 8, 37, 37) and maps["s"] == (2, 4, 37, 37)
