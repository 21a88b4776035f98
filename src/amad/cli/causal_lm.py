"""Causal language modelling in ``amad distill`` / ``amad evaluate``: token blocks, batches, held-out metrics.

Each text (a row's ``data.text_column``; a line of a ``.txt`` file; blank ones
skipped) is tokenized as the tokenizer does by default, followed by its EOS
token. Then, with ``data.max_length = n``:

* ``packing: true``: all texts are joined into one token stream and cut into
  blocks of ``n`` tokens (the last block may be shorter); no token is lost and
  no batch is padded, but a block may span two texts (the EOS between them
  says where one ends);
* ``packing: false``: one row per text, cut to its first ``n`` tokens (the
  number of texts cut is logged), padded to the longest row of each batch.

A batch holds ``input_ids``, ``attention_mask`` (0 at padding) and ``labels``
(the input ids, -100 at padding), so the models' own loss and the Distiller's
logit KD ignore padding. ``evaluate_causal_lm`` scores the next-token
predictions ``p(x_{t+1} | x_{<=t})`` of the Teacher and the Student at every
position whose next token is real.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import torch

from .config import DataSpec
from .typed import ConfigError

logger = logging.getLogger("amad.cli")

__all__ = ["token_blocks", "causal_lm_rows", "CausalLMCollator", "evaluate_causal_lm", "next_token_sums"]


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("tokenizer: causal-lm needs a tokenizer with an EOS token (eos_token) to end each text")
    return int(eos)


def _tokenized(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """Each non-blank text's token ids followed by EOS (unless the tokenizer put one there already)."""
    eos = _eos_id(tokenizer)
    texts = [str(t) for t in texts if t is not None and str(t).strip()]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    return [list(row) if row and row[-1] == eos else list(row) + [eos] for row in ids]


def token_blocks(texts: list[str], tokenizer: Any, max_length: int, packing: bool) -> list[list[int]]:
    """The rows of token ids that ``texts`` become (see the module doc)."""
    ids = _tokenized(texts, tokenizer)
    if packing:
        stream = [token for row in ids for token in row]
        return [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    cut = sum(len(row) > max_length for row in ids)
    if cut:
        logger.warning("%d of %d texts are longer than data.max_length=%d tokens and were cut "
                       "(packing: true keeps every token)", cut, len(ids), max_length)
    return [row[:max_length] for row in ids]


def causal_lm_rows(table: Any, spec: DataSpec, tokenizer: Any, source: str) -> Any:
    """A ``datasets.Dataset`` with one ``input_ids`` list per block, from a table of texts."""
    import datasets

    blocks = token_blocks(table[spec.text_column], tokenizer, spec.max_length, spec.packing)
    if not blocks:
        raise ConfigError(f"data.text_column: {source} has no non-blank text in column {spec.text_column!r}")
    return datasets.Dataset.from_dict({"input_ids": blocks})


class CausalLMCollator:
    """Rows of ``input_ids`` -> ``input_ids``, ``attention_mask``, ``labels`` padded on the right.

    ``labels`` are the input ids with -100 at padding (the models shift them
    themselves). Padding uses the tokenizer's pad token, else its EOS token
    (padded positions are masked, their id never matters).
    """

    def __init__(self, tokenizer: Any) -> None:
        pad = getattr(tokenizer, "pad_token_id", None)
        self.tokenizer = tokenizer
        self.pad_id = int(pad) if pad is not None else _eos_id(tokenizer)
        self.task = "causal-lm"

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -- evaluation -----------------------------------------------------------------------------------
#: Positions scored at once in float64 (bounds the (positions, vocabulary) temporaries).
POSITIONS_PER_CHUNK = 512


def next_token_sums(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Sums over the positions t whose next token ``labels[:, t+1]`` is real (not -100), in float64.

    ``nll_*``: sum of ``-log p(x_{t+1})``; ``correct_*``: argmax equals ``x_{t+1}``;
    ``kl``: sum of ``KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))``;
    ``agree``: the two argmaxes are equal; ``tokens``: how many positions.
    """
    targets = labels[:, 1:]
    valid = targets != -100
    teacher_logits, student_logits, gold = teacher_logits[:, :-1][valid], student_logits[:, :-1][valid], targets[valid]
    sums = dict.fromkeys(("nll_teacher", "nll_student", "kl"), 0.0)
    sums.update(dict.fromkeys(("correct_teacher", "correct_student", "agree"), 0), tokens=int(gold.numel()))
    for start in range(0, gold.numel(), POSITIONS_PER_CHUNK):
        part = slice(start, start + POSITIONS_PER_CHUNK)
        t_log = torch.log_softmax(teacher_logits[part].double(), dim=-1)
        s_log = torch.log_softmax(student_logits[part].double(), dim=-1)
        target = gold[part, None]
        t_top, s_top = t_log.argmax(dim=-1), s_log.argmax(dim=-1)
        sums["nll_teacher"] -= float(t_log.gather(1, target).sum())
        sums["nll_student"] -= float(s_log.gather(1, target).sum())
        sums["correct_teacher"] += int((t_top == target[:, 0]).sum())
        sums["correct_student"] += int((s_top == target[:, 0]).sum())
        sums["kl"] += float((t_log.exp() * (t_log - s_log)).sum())
        sums["agree"] += int((t_top == s_top).sum())
    return sums


def _batches(rows: Any, size: int) -> Iterator[list[dict]]:
    for start in range(0, len(rows), size):
        yield [rows[i] for i in range(start, min(start + size, len(rows)))]


@torch.no_grad()
def evaluate_causal_lm(
    teacher: Any, student: Any, rows: Any, collator: CausalLMCollator, *, batch_size: int = 16,
    device: str | torch.device = "cpu", progress: str | None = None,
) -> tuple[dict[str, dict[str, float]], int]:
    """Held-out next-token metrics of both models on ``rows``, padding masked, and the number of tokens scored.

    Per model: ``perplexity = exp(sum NLL / tokens)`` and ``next_token_accuracy``
    (percent); for the Student also ``kl_teacher_student`` (mean per token, nats)
    and ``top1_agreement`` (percent of positions where both argmaxes agree).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    teacher, student = teacher.to(device).eval(), student.to(device).eval()
    totals: dict[str, float] = {}
    bar = tqdm(total=len(rows), desc=progress, unit="block", disable=progress is None)
    for chunk in _batches(rows, batch_size):
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        sums = next_token_sums(teacher(**inputs).logits, student(**inputs).logits, batch["labels"])
        for key, value in sums.items():
            totals[key] = totals.get(key, 0) + value
        bar.update(len(chunk))
    bar.close()
    tokens = totals.get("tokens", 0)
    if not tokens:
        raise ConfigError("data.eval: no block of the evaluation data has two tokens; there is nothing to predict")
    metrics = {
        name: {"perplexity": math.exp(totals[f"nll_{name}"] / tokens),
               "next_token_accuracy": 100.0 * totals[f"correct_{name}"] / tokens}
        for name in ("teacher", "student")
    }
    metrics["student"]["kl_teacher_student"] = totals["kl"] / tokens
    metrics["student"]["top1_agreement"] = 100.0 * totals["agree"] / tokens
    return metrics, int(tokens)
