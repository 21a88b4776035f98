"""A real pretrained Teacher: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, width 384) distilled,
task-agnostically, into sentence encoders with fewer heads, on English sentences Python ships.

The pieces (the run itself is :mod:`amad.bench.minilm_run`):

- data: :func:`doc_sentences` extracts the prose sentences of the Python reference manual's topics
  (``pydoc_data.topics``, part of the standard library; its text depends on the Python version),
  deduplicated and sorted; :func:`split_sentences` makes a seed-determined train / held-out split;
- the target: the Teacher's sentence embedding, mask-aware mean pooling of its last hidden state
  (as sentence-transformers does for this model), :func:`mean_pool`;
- the Students (:class:`SentenceStudent`): a BERT with fewer heads (and possibly fewer layers and a
  smaller width), the same mean pooling, and a linear map to the Teacher's width when it is narrower.
  Initialisation: the token, position and token-type embeddings are the Teacher's (projected onto
  their top principal directions when the Student is narrower; the token embeddings stay frozen),
  every transformer layer and the linear map are random;
- the objective: :class:`EmbeddingLoss` (cosine or MSE between the two embeddings) is the
  ``output_loss`` of :class:`amad.Distiller`, to which each attention loss is added;
- the scores (:func:`embedding_scores`): on held-out sentences, the mean cosine similarity of
  Student and Teacher embeddings, and nearest-neighbour retrieval agreement (:func:`neighbour_agreement`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import ModelOutput

__all__ = [
    "doc_sentences", "fitting_sentences", "split_sentences", "mean_pool", "sentence_embedding", "StudentShape",
    "STUDENT_SHAPES", "SentenceStudent", "SentenceEmbeddingOutput", "embedding_basis", "build_student", "EmbeddingLoss",
    "TokenCollator", "encode", "neighbour_agreement", "embedding_scores",
]

_BLANK_LINES = re.compile(r"\n\s*\n")
_UNDERLINE = re.compile(r"[*=\-^~]{3,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_LIST_MARKER = re.compile(r"^(?:\*|\d+\.|\[\d+\])\s+")


# -- data ---------------------------------------------------------------------------------
def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text: no headings, grammar rules, interactive examples or code blocks."""
    paragraphs = []
    for block in _BLANK_LINES.split(text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or (len(lines) >= 2 and _UNDERLINE.fullmatch(lines[-1].strip())):
            continue
        if any("::=" in line or ">>>" in line or line.startswith(" " * 6) for line in lines):
            continue
        paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs


def _is_sentence(text: str, min_words: int, max_words: int) -> bool:
    words = len(text.split())
    letters = sum(c.isalpha() for c in text)
    return min_words <= words <= max_words and text[-1] in ".!?" and letters >= 0.6 * len(text)


def doc_sentences(*, min_words: int = 6, max_words: int = 40, topics: dict[str, str] | None = None) -> list[str]:
    """The prose sentences of ``pydoc_data.topics`` (or the given ``{name: text}``), unique and sorted.

    A sentence ends in ``.``, ``!`` or ``?`` before whitespace and a capital or a quote; it is kept when it
    has ``min_words`` to ``max_words`` words and at least 60% letters (not code). List markers are dropped.
    """
    if topics is None:
        from pydoc_data.topics import topics
    found = set()
    for name in sorted(topics):
        for paragraph in _prose_paragraphs(topics[name]):
            for sentence in _SENTENCE_END.split(paragraph):
                sentence = _LIST_MARKER.sub("", sentence.strip())
                if sentence and _is_sentence(sentence, min_words, max_words):
                    found.add(sentence)
    return sorted(found)


def fitting_sentences(sentences: Sequence[str], tokenizer: Any, max_length: int) -> list[str]:
    """The sentences whose tokenisation (with [CLS] and [SEP]) has at most ``max_length`` tokens: none is cut."""
    lengths = [len(ids) for ids in tokenizer(list(sentences))["input_ids"]]
    return [s for s, n in zip(sentences, lengths) if n <= max_length]


def split_sentences(sentences: Sequence[str], held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: a shuffle determined by ``seed``; the first ``held_out`` sentences are held out."""
    if len(set(sentences)) != len(sentences):
        raise ValueError("split_sentences needs unique sentences (a duplicate could land on both sides)")
    if not 2 <= held_out < len(sentences):
        raise ValueError(f"held_out must be in [2, {len(sentences) - 1}] for {len(sentences)} sentences; "
                         f"got {held_out}")
    order = list(sentences)
    random.Random(seed).shuffle(order)
    return order[held_out:], order[:held_out]


# -- pooling and the Student -----------------------------------------------------------------
def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``sum_l m_l h_l / sum_l m_l``: mean of the real tokens' states, ``(B, L, D)``, ``(B, L)`` -> ``(B, D)``."""
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"mean_pool needs hidden (B, L, D) and mask (B, L); got {tuple(hidden.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("mean_pool: a sequence has no real token (its attention_mask is all zero)")
    return (hidden * weights).sum(dim=1) / counts


@dataclass
class SentenceEmbeddingOutput(ModelOutput):
    """``embedding`` ``(B, D_teacher)``: what is compared with the Teacher; ``last_hidden_state``: the encoder's."""

    embedding: Tensor | None = None
    last_hidden_state: Tensor | None = None


def sentence_embedding(outputs: Any, attention_mask: Tensor) -> Tensor:
    """A Student's ``embedding``, or the mean-pooled last hidden state of a plain encoder (the Teacher)."""
    if isinstance(outputs, SentenceEmbeddingOutput):
        return outputs.embedding
    return mean_pool(outputs.last_hidden_state, attention_mask)


@dataclass(frozen=True)
class StudentShape:
    heads: int
    hidden: int
    layers: int

    @property
    def name(self) -> str:
        return f"h{self.heads}-d{self.hidden}-l{self.layers}"


# 6 and 4 heads, the Teacher's width and a smaller one, 6 and 3 layers (the Teacher: h12-d384-l6).
STUDENT_SHAPES: dict[str, StudentShape] = {
    s.name: s for s in (StudentShape(6, 384, 6), StudentShape(4, 384, 3), StudentShape(4, 256, 3))
}


class SentenceStudent(nn.Module):
    """A BERT encoder, mask-aware mean pooling and, when narrower than the Teacher, a linear map to its width."""

    def __init__(self, encoder: nn.Module, output_size: int) -> None:
        super().__init__()
        self.bert = encoder
        width = encoder.config.hidden_size
        self.projection = nn.Identity() if width == output_size else nn.Linear(width, output_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                **_: Any) -> SentenceEmbeddingOutput:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        return SentenceEmbeddingOutput(embedding=self.projection(mean_pool(hidden, attention_mask)),
                                       last_hidden_state=hidden)


@torch.no_grad()
def embedding_basis(teacher: nn.Module, width: int) -> Tensor:
    """``(D_t, width)``: orthonormal top principal directions of the Teacher's token embeddings (the identity
    when ``width`` is the Teacher's); a Student's embeddings are the Teacher's times this basis."""
    words = teacher.embeddings.word_embeddings.weight
    if width == words.shape[1]:
        return torch.eye(width, dtype=words.dtype)
    centred = words.double() - words.double().mean(dim=0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues of the scatter matrix
    return vectors[:, -width:].flip(1).contiguous().to(words.dtype)


@torch.no_grad()
def _copy_embeddings(teacher_embeddings: nn.Module, student_embeddings: nn.Module, basis: Tensor) -> None:
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        getattr(student_embeddings, name).weight.copy_(getattr(teacher_embeddings, name).weight @ basis)
    if basis.shape[0] == basis.shape[1]:
        student_embeddings.LayerNorm.load_state_dict(teacher_embeddings.LayerNorm.state_dict())


def build_student(teacher: nn.Module, shape: StudentShape, *, seed: int, dropout: float = 0.0,
                  basis: Tensor | None = None) -> SentenceStudent:
    """A random Student of ``shape`` (same ``seed``, same weights) using the Teacher's tokenizer and embeddings.

    The token / position / token-type embeddings are the Teacher's, projected onto the top ``shape.hidden``
    principal directions of its token embeddings when narrower (then the embedding LayerNorm starts fresh);
    the token embeddings are frozen. The rest (layers, linear map) is randomly initialised. ``basis``: a
    precomputed :func:`embedding_basis` of this width (it is computed when None).
    """
    from transformers import BertConfig, BertModel

    if shape.hidden % shape.heads:
        raise ValueError(f"a Student's width must be a multiple of its heads; got {shape}")
    tc = teacher.config
    if shape.hidden > tc.hidden_size:
        raise ValueError(f"Student width {shape.hidden} exceeds the Teacher's {tc.hidden_size}")
    config = BertConfig(
        vocab_size=tc.vocab_size, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=4 * shape.hidden,
        max_position_embeddings=tc.max_position_embeddings, type_vocab_size=tc.type_vocab_size,
        pad_token_id=tc.pad_token_id, layer_norm_eps=tc.layer_norm_eps, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    encoder = BertModel(config, add_pooling_layer=False)
    student = SentenceStudent(encoder, tc.hidden_size)
    basis = embedding_basis(teacher, shape.hidden) if basis is None else basis
    if basis.shape != (tc.hidden_size, shape.hidden):
        raise ValueError(f"basis of shape {tuple(basis.shape)} for Teacher width {tc.hidden_size} -> {shape.hidden}")
    _copy_embeddings(teacher.embeddings, encoder.embeddings, basis)
    encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    return student


class EmbeddingLoss:
    """``output_loss`` of the Distiller: ``mean_b (1 - cos(s_b, t_b))`` ("cosine") or ``mean((s - t)^2)`` ("mse"),
    ``s`` the Student's embedding, ``t`` the Teacher's mean-pooled one."""

    KINDS = ("cosine", "mse")

    def __init__(self, kind: str = "cosine") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"embedding loss kind must be one of {self.KINDS}; got {kind!r}")
        self.kind = kind

    def __call__(self, student_outputs: Any, teacher_outputs: Any, batch: dict) -> Tensor:
        mask = batch["attention_mask"]
        student = sentence_embedding(student_outputs, mask)
        teacher = sentence_embedding(teacher_outputs, mask).to(student.dtype)
        if student.shape != teacher.shape:
            raise ValueError(f"Student embeddings {tuple(student.shape)} vs Teacher's {tuple(teacher.shape)}")
        if self.kind == "cosine":
            return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        return F.mse_loss(student, teacher)

    def __repr__(self) -> str:
        return f"EmbeddingLoss({self.kind!r})"


class TokenCollator:
    """Rows ``{"input_ids": [...]}`` -> a padded batch with ``input_ids`` and ``attention_mask``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: Sequence[dict]) -> dict[str, Tensor]:
        batch = self.tokenizer.pad([{"input_ids": r["input_ids"]} for r in rows], return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def encode(model: nn.Module, tokenizer: Any, sentences: Sequence[str], *, max_length: int,
           batch_size: int = 64) -> Tensor:
    """Sentence embeddings ``(N, D)``, float32 on the CPU (a Student's ``embedding`` or a plain encoder's mean
    pool), computed on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        mask = batch["attention_mask"]
        outputs = model(input_ids=batch["input_ids"], attention_mask=mask)
        chunks.append(sentence_embedding(outputs, mask).float().cpu())
    model.train(was_training)
    return torch.cat(chunks)


# -- scores ---------------------------------------------------------------------------------
def _neighbour_order(embeddings: Tensor) -> Tensor:
    """``(N, N-1)``: for each row, the other rows from most to least cosine-similar."""
    unit = F.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    return similarity.argsort(dim=1, descending=True, stable=True)[:, :-1]


def neighbour_agreement(student: Tensor, teacher: Tensor, *, k: int = 5) -> tuple[float, float]:
    """Retrieval agreement of two embeddings of the same N sentences, as fractions in [0, 1]:

    top-1: the share of sentences whose nearest other sentence (cosine) is the same for Student and Teacher;
    top-k: the share whose Teacher nearest neighbour is among the Student's ``k`` nearest others.
    """
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"neighbour_agreement needs (N, D_s) and (N, D_t) embeddings; got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if not 1 <= k < student.shape[0]:
        raise ValueError(f"k must be in [1, N-1] = [1, {student.shape[0] - 1}]; got {k}")
    student_order, teacher_nearest = _neighbour_order(student), _neighbour_order(teacher)[:, :1]
    top1 = (student_order[:, :1] == teacher_nearest).double().mean()
    topk = (student_order[:, :k] == teacher_nearest).any(dim=1).double().mean()
    return float(top1), float(topk)


def embedding_scores(student: Tensor, teacher: Tensor) -> dict[str, float]:
    """The recorded metrics, in percent: mean cosine of Student vs Teacher embedding, top-1 and top-5 agreement."""
    if student.shape != teacher.shape:
        raise ValueError(f"embedding_scores needs equal shapes; got {tuple(student.shape)} and {tuple(teacher.shape)}")
    cosine = F.cosine_similarity(student.double(), teacher.double(), dim=-1).mean()
    top1, top5 = neighbour_agreement(student, teacher, k=5)
    return {"cosine_pct": 100 * float(cosine), "top1_pct": 100 * top1, "top5_pct": 100 * top5}
