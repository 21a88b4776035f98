"""Task metrics for ``amad evaluate``: accuracy, VQA accuracy, BLEU and CIDEr, all in percent.

The paper's tables report every metric on a 0-100 scale (CIDEr 115.1 means
pycocoevalcap's 1.151), so these functions do too. BLEU is sacrebleu's
corpus BLEU; CIDEr is pycocoevalcap's CIDEr-D scorer (pure Python) on text
lower-cased and split into words here (no Java PTB tokenizer). CIDEr's IDF
comes from the evaluated references themselves, so it needs several
examples to mean anything (one example always scores 0).
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

import torch

from .data import TaskCollator, answer_scores

__all__ = ["accuracy", "vqa_accuracy", "bleu", "cider", "evaluate_model", "format_table", "METRICS"]

#: The metrics each task reports.
METRICS = {
    "sequence-classification": ("accuracy",),
    "image-classification": ("accuracy",),
    "visual-question-answering": ("vqa_accuracy",),
    "seq2seq": ("bleu", "cider"),
    "causal-lm": ("perplexity", "next_token_accuracy", "kl_teacher_student", "top1_agreement"),  # causal_lm.py
}


def _check_lengths(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} predictions but {len(b)} references")
    if not a:
        raise ValueError(f"{what}: no examples to score")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percentage of predictions equal to their label."""
    _check_lengths(predictions, labels, "accuracy")
    return 100.0 * sum(int(p) == int(t) for p, t in zip(predictions, labels)) / len(labels)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Any]) -> float:
    """VQA accuracy in percent: ``min(1, #annotators who gave the answer / 3)``, a single string answer scores 1."""
    _check_lengths(predictions, answers, "vqa_accuracy")
    return 100.0 * sum(answer_scores(gold).get(str(p), 0.0) for p, gold in zip(predictions, answers)) / len(answers)


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (0-100); each hypothesis may have any number of references."""
    import sacrebleu

    _check_lengths(hypotheses, references, "bleu")
    width = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def _words(text: str) -> str:
    return " ".join(re.findall(r"[\w']+", text.lower()))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap CIDEr-D x 100 on lower-cased word tokens."""
    from pycocoevalcap.cider.cider import Cider

    _check_lengths(hypotheses, references, "cider")
    gts = {i: [_words(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [_words(h)] for i, h in enumerate(hypotheses)}
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)


def _batches(rows: Any, size: int) -> Iterator[list[dict]]:
    for start in range(0, len(rows), size):
        yield [rows[i] for i in range(start, min(start + size, len(rows)))]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_model(
    model: Any,
    rows: Any,
    collator: TaskCollator,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    device: str | torch.device = "cpu",
    progress: str | None = None,
) -> dict[str, float]:
    """The task's metrics of ``model`` on ``rows`` (a ``datasets.Dataset`` or a list of row dicts).

    Classes are compared by name: a Student whose ``id2label`` orders the
    Teacher's labels differently is scored through its own ``id2label``.

    ``progress``: a label for a tqdm progress bar on stderr (None: no bar).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    model = model.to(device).eval()
    if getattr(model, "config", None) is not None and collator.config is not None:
        collator = collator.for_model(model.config)  # gold labels in this model's own label order
    task, spec = collator.task, collator.spec
    predictions: list = []
    gold: list = []
    inputs_only = collator.without_labels()
    bar = tqdm(total=len(rows), desc=progress, unit="example", disable=progress is None)
    for chunk in _batches(rows, batch_size):
        if task == "seq2seq":
            inputs = _to(inputs_only(chunk), device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
            predictions += collator.tokenizer.batch_decode(generated, skip_special_tokens=True)
            gold += [collator.references(r) for r in chunk]
        else:
            batch = collator(chunk)
            labels = batch.pop("labels")
            ids = model(**_to(batch, device)).logits.argmax(dim=-1).tolist()
            if task == "visual-question-answering":
                predictions += [model.config.id2label[i] for i in ids]
                gold += [r[spec.answer_column] for r in chunk]
            else:
                predictions += ids
                gold += labels.tolist()
        bar.update(len(chunk))
    bar.close()
    if task == "seq2seq":
        return {"bleu": bleu(predictions, gold), "cider": cider(predictions, gold)}
    if task == "visual-question-answering":
        return {"vqa_accuracy": vqa_accuracy(predictions, gold)}
    return {"accuracy": accuracy(predictions, gold)}


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per model (``results[model][metric]``)."""
    models = list(results)
    metrics = list(dict.fromkeys(m for r in results.values() for m in r))
    width = max([len("metric")] + [len(m) for m in metrics])
    header = "metric".ljust(width) + "".join(f"  {name:>10}" for name in models)
    lines = [header, "-" * len(header)]
    for metric in metrics:
        cells = "".join(f"  {results[name].get(metric, float('nan')):>10.2f}" for name in models)
        lines.append(metric.ljust(width) + cells)
    return "\n".join(lines)
