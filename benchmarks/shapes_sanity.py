"""Sanity check of the Shapes data and the demo models: plain ground-truth training, no distillation.

Trains a Teacher and a Student (VL-T5 VQA classifier, VL-T5 En-De translator,
or BLIP captioner) on the Shapes training split for a fixed wall-clock or step
budget and reports test accuracy (VQA) or BLEU (sacrebleu; translation and
captioning, greedy decoding, all reference captions for captioning), with the
training time (wall clock and process CPU time: on a shared machine the CPU
time is the steadier number). It tells whether the data is learnable and whether the Teacher
clearly beats the Student within the demo's budget.

    python benchmarks/shapes_sanity.py --task vqa --sizes teacher student --minutes 2
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import sacrebleu
import torch
from torch.utils.data import DataLoader

from amad.bench.data import (
    ANSWERS,
    BlipCaptionCollator,
    Seq2SeqCollator,
    ShapesConfig,
    VQACollator,
    build_shapes_tokenizer,
    caption_view,
    generate_shapes,
    translation_view,
    vqa_view,
)
from amad.bench.data.collate import pixel_values
from amad.bench.models.blip import make_blip
from amad.bench.models.vlt5 import make_vlt5


def build(task: str, size: str, tokenizer: Any) -> torch.nn.Module:
    if task == "blip":
        return make_blip(size, vocab_size=len(tokenizer))
    return make_vlt5(size, task, vocab_size=len(tokenizer), num_answers=len(ANSWERS))


def views(task: str, data: Any) -> tuple[Any, Any, Any]:
    if task == "vqa":
        return vqa_view(data["train"]), vqa_view(data["test"]), VQACollator
    if task == "translate":
        return translation_view(data["train"]), translation_view(data["test"]), lambda t: Seq2SeqCollator(t, "translate")
    train = caption_view(data["train"], per_reference=True)
    test = caption_view(data["test"], per_reference=False)
    return train, test, (lambda t: Seq2SeqCollator(t, "caption")) if task == "caption" else BlipCaptionCollator


@torch.no_grad()
def evaluate(task: str, model: torch.nn.Module, test: Any, collate: Any, tokenizer: Any, batch: int) -> float:
    model.eval()
    correct, hyps, refs = 0, [], []
    for start in range(0, len(test), batch):
        rows = [test[i] for i in range(start, min(start + batch, len(test)))]
        b = collate(rows)
        if task == "vqa":
            correct += int((model(**b).logits.argmax(-1) == b["labels"]).sum())
            continue
        if task == "blip":
            out = model.generate(pixel_values=pixel_values([r["image"] for r in rows]), max_new_tokens=48)
        else:
            out = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 pixel_values=b["pixel_values"], max_new_tokens=48)
        hyps += tokenizer.batch_decode(out, skip_special_tokens=True)
        refs += [[r["target"]] if task == "translate" else r["references"] for r in rows]
    model.train()
    if task == "vqa":
        return 100.0 * correct / len(test)
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    return sacrebleu.corpus_bleu(hyps, streams, tokenize="none").score


def train(task: str, size: str, data: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    train_rows, test_rows, make_collate = views(task, data)
    collate = make_collate(tokenizer)
    model = build(task, size, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    loader = DataLoader(train_rows, batch_size=args.batch, shuffle=True, collate_fn=collate, drop_last=True)
    start, cpu_start, step, losses = time.time(), time.process_time(), 0, []
    while step < args.steps and time.time() - start < 60 * args.minutes:
        for b in loader:
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            warmup.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if step >= args.steps or time.time() - start >= 60 * args.minutes:
                break
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    test_subset = test_rows.select(range(min(args.eval_size, len(test_rows))))
    score = evaluate(task, model, test_subset, collate, tokenizer, args.batch)
    return {"task": task, "size": size, "params": sum(p.numel() for p in model.parameters()), "steps": step,
            "examples_seen": step * args.batch, "train_seconds": round(seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1), "threads": torch.get_num_threads(),
            "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
            "metric": "accuracy" if task == "vqa" else "bleu", "value": round(score, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["vqa", "translate", "caption", "blip"], default="vqa")
    parser.add_argument("--sizes", nargs="+", default=["teacher", "student"])
    parser.add_argument("--minutes", type=float, default=2.0, help="wall-clock training budget per model")
    parser.add_argument("--steps", type=int, default=10**9, help="step budget per model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-size", type=int, default=ShapesConfig.train_size)
    parser.add_argument("--eval-size", type=int, default=1000, help="test rows evaluated")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest for these sizes on a busy CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = generate_shapes(ShapesConfig(seed=args.seed, train_size=args.train_size))
    tokenizer = build_shapes_tokenizer(data)
    for size in args.sizes:
        print(json.dumps(train(args.task, size, data, tokenizer, args)), flush=True)


if __name__ == "__main__":
    main()
