"""``amad init-example``: a runnable copy of one of the configs in ``examples/``.

Each example config names a Teacher at ``models/teacher`` and data at
``data/{train,dev}.jsonl`` (relative to the config). :func:`init_example` writes
them next to a copy of the config: a tiny Teacher with random weights (built
from a config, saved with ``save_pretrained`` with its tokenizer and / or image
processor) and a few rows of generated data, so that

    amad init-example sequence_classification --out my_sst2
    amad distill my_sst2/config.yaml --out runs/sst2

runs as written, in seconds on a CPU. Replace ``models/teacher`` and ``data/``
by a real Teacher and data to distil for real. The writers are also the
fixtures of the command line's tests.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ConfigError

__all__ = [
    "EXAMPLES",
    "examples_dir",
    "init_example",
    "write_text_classification",
    "write_image_classification",
    "write_seq2seq",
    "write_vqa",
    "write_jsonl",
    "bert_tokenizer",
    "t5_tokenizer",
    "bert_config",
    "vit_config",
    "t5_config",
]

WORDS = "good bad movie film great awful the a is was fine boring fun plot actor".split()
EN = "the a cat dog sat on mat red blue big small".split()
DE = "die der katze hund sass auf matte rot blau gross klein".split()
LABELS = ["neg", "pos"]


# -- tiny processors and configs -----------------------------------------------------------------------
def bert_tokenizer(directory: Path) -> Any:
    """A WordPiece tokenizer over :data:`WORDS` (its ``vocab.txt`` written to ``directory``)."""
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(str(vocab))


def t5_tokenizer() -> Any:
    """A unigram tokenizer over the English and German words of :data:`EN` / :data:`DE`."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in EN + DE]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def bert_config(vocab_size: int, heads: int = 4, layers: int = 2, **changes: Any) -> Any:
    """BERT, width 16, 128 positions (the default ``data.max_length``), labels neg / pos."""
    from transformers import BertConfig

    values = dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=32, max_position_embeddings=128, id2label=dict(enumerate(LABELS)),
                  label2id={n: i for i, n in enumerate(LABELS)})
    return BertConfig(**{**values, **changes})


def vit_config(heads: int = 4, layers: int = 2, **changes: Any) -> Any:
    """ViT on 16 x 16 images in 8 x 8 patches, width 16, labels dark / light."""
    from transformers import ViTConfig

    values = dict(hidden_size=16, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=32,
                  image_size=16, patch_size=8, id2label={0: "dark", 1: "light"}, label2id={"dark": 0, "light": 1})
    return ViTConfig(**{**values, **changes})


def t5_config(vocab_size: int, heads: int = 4, layers: int = 2, **changes: Any) -> Any:
    """T5, width 16, ``layers`` encoder and decoder layers."""
    from transformers import T5Config

    values = dict(vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=layers, num_decoder_layers=layers,
                  num_heads=heads, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5Config(**{**values, **changes})


def _seed() -> None:
    """The Teachers' random weights are the same on every run."""
    import torch

    torch.manual_seed(0)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- Teachers and data, one writer per task ----------------------------------------------------------------
def write_text_classification(root: Path) -> None:
    """``root/models/teacher`` (BERT, 4 heads, tokenizer inside) and ``root/data/{train,dev}.jsonl``."""
    _seed()
    from transformers import BertForSequenceClassification

    teacher_dir = root / "models" / "teacher"
    tokenizer = bert_tokenizer(teacher_dir)
    BertForSequenceClassification(bert_config(len(tokenizer))).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    rng = random.Random(0)
    for split, n in (("train", 12), ("dev", 6)):
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))), "label": rng.choice(LABELS)}
                for _ in range(n)]
        write_jsonl(root / "data" / f"{split}.jsonl", rows)


def write_image_classification(root: Path) -> None:
    """``root/models/teacher`` (ViT 16x16 / 8 patches, image processor inside), PNGs and ``root/data/*.jsonl``."""
    _seed()
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    teacher_dir = root / "models" / "teacher"
    ViTForImageClassification(vit_config()).save_pretrained(teacher_dir)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(teacher_dir)
    rng = np.random.default_rng(0)
    (root / "data" / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 8), ("dev", 4)):
        rows = []
        for i in range(n):
            label = int(rng.integers(2))
            pixels = rng.integers(0, 128, size=(20, 20, 3)) + 127 * label
            name = f"images/{split}{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(root / "data" / name)
            rows.append({"image": name, "label": ["dark", "light"][label]})
        write_jsonl(root / "data" / f"{split}.jsonl", rows)


def write_seq2seq(root: Path) -> None:
    """``root/models/teacher`` (T5, 4 heads, tokenizer inside) and ``root/data/{train,dev}.jsonl`` (en -> de)."""
    _seed()
    from transformers import T5ForConditionalGeneration

    teacher_dir = root / "models" / "teacher"
    tokenizer = t5_tokenizer()
    T5ForConditionalGeneration(t5_config(len(tokenizer))).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    rng = random.Random(0)
    for split, n in (("train", 8), ("dev", 4)):
        rows = []
        for _ in range(n):
            idx = [rng.randrange(len(EN)) for _ in range(rng.randint(2, 5))]
            rows.append({"source": " ".join(EN[i] for i in idx), "target": " ".join(DE[i] for i in idx)})
        write_jsonl(root / "data" / f"{split}.jsonl", rows)


def write_vqa(root: Path) -> None:
    """``root/models/teacher`` (ViLT, 4 heads, 16x16 images in 8x8 patches, tokenizer and processor inside) + data."""
    _seed()
    from PIL import Image
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor

    teacher_dir = root / "models" / "teacher"
    tokenizer = bert_tokenizer(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    answers = ["yes", "no", "two"]
    config = ViltConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, image_size=16, patch_size=8, max_position_embeddings=40,
                        id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)})
    ViltForQuestionAnswering(config).save_pretrained(teacher_dir)
    ViltImageProcessor(size={"shortest_edge": 16}, size_divisor=8).save_pretrained(teacher_dir)
    rng = np.random.default_rng(0)
    (root / "data" / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 6), ("dev", 4)):
        rows = []
        for i in range(n):
            name = f"images/{split}{i}.png"
            Image.fromarray(rng.integers(0, 255, size=(16, 16, 3)).astype(np.uint8)).save(root / "data" / name)
            answer = [str(a) for a in rng.choice(answers, size=3)]
            rows.append({"image": name, "question": " ".join(rng.choice(WORDS, size=4)), "answer": answer})
        write_jsonl(root / "data" / f"{split}.jsonl", rows)


#: Example name (its file in ``examples/`` without ``.yaml``) -> the writer of its Teacher and data.
EXAMPLES: dict[str, Callable[[Path], None]] = {
    "sequence_classification": write_text_classification,
    "image_classification": write_image_classification,
    "seq2seq_t5": write_seq2seq,
    "visual_question_answering": write_vqa,
}


def examples_dir() -> Path:
    """The ``examples/`` directory of the source checkout this package runs from."""
    folder = Path(__file__).resolve().parents[3] / "examples"
    if not folder.is_dir():
        raise ConfigError(
            f"the example configs are not here ({folder} does not exist): they ship with amad's source "
            "repository (examples/); install amad from a checkout (make install) to use init-example"
        )
    return folder


def init_example(name: str, out: str | Path) -> Path:
    """Write ``out/config.yaml`` (a copy of ``examples/<name>.yaml``), its tiny Teacher and data; return the config."""
    key = name.removesuffix(".yaml").replace("-", "_")
    if key not in EXAMPLES:
        from .typed import suggest

        raise ConfigError(f"example {name!r} does not exist{suggest(key, EXAMPLES)} (examples: {', '.join(EXAMPLES)})")
    source = examples_dir() / f"{key}.yaml"
    if not source.is_file():
        raise ConfigError(f"example {name!r}: {source} does not exist")
    out = Path(out)
    taken = [p for p in ("config.yaml", "models/teacher", "data") if (out / p).exists()]
    if taken:
        raise ConfigError(f"--out: {str(out)!r} already holds {', '.join(taken)}; give a new directory (nothing is "
                          "overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    EXAMPLES[key](out)
    shutil.copy(source, out / "config.yaml")
    return out / "config.yaml"
