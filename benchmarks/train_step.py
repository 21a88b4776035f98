"""Cost of one Student training step with attention-map distillation, five ways.

Teacher: BERT-style, hidden 768, 12 heads, 2 layers (intermediate 3072);
Student: hidden 512, 8 heads, 2 layers (intermediate 2048); sequence
classification (3 labels), batch 1, every token real. One step = forward,
backward and an AdamW step of the Student:

  gt            ground truth only (the Student's own loss);
  kd            logit KD only, the Teacher's forward under no_grad (``Distiller(attention_loss=None)``);
  streaming     KD + AMAD variant 1 on the last layers, ``Distiller(streaming=True)`` (SDPA everywhere,
                maps recomputed blockwise from the recorded Q/K, never held whole);
  materialised  the same with ``streaming=False`` (the two recorded layers' maps materialised);
  output_attns  what other toolkits and the paper's code do: both models with eager attention and
                ``output_attentions=True`` on every layer, maps taken from ``outputs.attentions[-1]``,
                AMAD written straightforwardly on whole maps (:func:`plain_amad`) plus the same KD.

Attention dropout is 0 in both models (so SDPA keeps its fused kernel in training and all
paths compute the same maps); hidden dropout keeps BERT's 0.1. Alpha is fixed (0.2).

Every (configuration, sequence, round) runs twice, each time in a fresh Python process: once
for time, once for memory (the memory set-up below slows allocation-heavy code, so it must
not be timed). Each round runs every configuration once, in alternating order, so a change
of machine load hits all of them alike.

Time: the median step time over ``--steps`` steps after ``--warmup`` steps, pooled over the
rounds; plain glibc allocator settings.

Memory: glibc is told to serve every allocation above 64 KiB with mmap
(``MALLOC_MMAP_THRESHOLD_=65536``), so freed tensors go back to the kernel and the resident
set follows live memory. After ``--warmup`` steps (weights, AdamW state, lazy
initialisations resident), the process resets the kernel's high-water mark of its RSS
(``/proc/self/clear_refs`` <- 5), reads its RSS, runs one step and reads ``VmHWM`` twice:
after the backward pass and after the optimizer step. Peak extra = VmHWM - RSS before: what
the step needed beyond the resident baseline at its worst moment (activations, maps,
gradients, AdamW temporaries), measured by the kernel without sampling; the median over the
rounds. The "fwd+bwd" column is the same up to the end of the backward pass: with a
30522-token vocabulary the optimizer step (the word embeddings' dense gradient and AdamW
temporaries) sets the whole step's peak at short sequences.

    .venv/bin/python benchmarks/train_step.py [--seqs 512 2048] [--steps 3] [--rounds 2]
    .venv/bin/python benchmarks/train_step.py --profile streaming --profile-seq 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

from capture_memory import _reset_peak, _rss_kib  # same directory: the scripts share the RSS probes

CONFIGS = ("gt", "kd", "streaming", "materialised", "output_attns")
ALPHA = 0.2
TEACHER = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
STUDENT = dict(hidden_size=512, num_attention_heads=8, intermediate_size=2048)
TARGETS = {"time_streaming_over_kd": 1.10, "time_output_attns_over_streaming": 1.5, "memory_ratio": 8.0}


def plain_amad(teacher_maps, student_maps):
    """Spec section 2 written directly on whole maps: mean of (T^ - rownorm2(softmax(T^ S^^T) S^))^2."""
    import torch
    from torch.nn.functional import normalize

    batch = teacher_maps.shape[0]
    t = normalize(teacher_maps.reshape(batch, teacher_maps.shape[1], -1), dim=-1)
    s = normalize(student_maps.reshape(batch, student_maps.shape[1], -1), dim=-1)
    mixed = normalize(torch.softmax(t @ s.transpose(1, 2), dim=-1) @ s, dim=-1)
    return ((t - mixed) ** 2).mean()


def build(config: str, seq: int, layers: tuple[int, int] = (2, 2)):
    """Teacher, Student (``layers`` = their depths), a batch and the loss of ``config`` (fixed seeds)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    impl = "eager" if config == "output_attns" else "sdpa"

    def model(sizes: dict, depth: int, seed: int):
        torch.manual_seed(seed)
        bert = BertConfig(**sizes, num_hidden_layers=depth, num_labels=3, max_position_embeddings=max(512, seq),
                          attention_probs_dropout_prob=0.0, attn_implementation=impl)
        return BertForSequenceClassification(bert)

    teacher, student = model(TEACHER, layers[0], 0), model(STUDENT, layers[1], 1)
    g = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(1, 30522, (1, seq), generator=g),
             "attention_mask": torch.ones(1, seq, dtype=torch.long), "labels": torch.tensor([1])}
    return teacher, student, batch, loss_function(config, teacher, student)


def loss_function(config: str, teacher, student) -> tuple[Callable[[dict], object], list]:
    """``(batch -> scalar loss, parameters to optimise)`` of one configuration."""
    import torch

    from amad import Distiller
    from amad.losses import logit_kd

    if config == "gt":
        student.train()
        return (lambda batch: student(**batch).loss), list(student.parameters())
    if config == "output_attns":
        teacher.eval().requires_grad_(False)
        student.train()

        def paper_style(batch: dict):
            with torch.no_grad():
                t_out = teacher(**batch, output_attentions=True)
            s_out = student(**batch, output_attentions=True)
            return logit_kd(s_out.logits, t_out.logits) + ALPHA * plain_amad(t_out.attentions[-1], s_out.attentions[-1])

        return paper_style, list(student.parameters())
    attention_loss = None if config == "kd" else "amad-mse"
    distiller = Distiller(teacher, student, attention_loss=attention_loss, alpha=ALPHA,
                          streaming=config == "streaming").train()
    return (lambda batch: distiller(**batch).loss), list(distiller.parameters())


def measure(config: str, seq: int, warmup: int, steps: int, threads: int, mode: str, layers: list[int]) -> dict:
    """One configuration in this (fresh) process: step times (mode "time") or peak extra memory ("memory")."""
    import torch

    torch.set_num_threads(threads)
    teacher, student, batch, (loss_of, params) = build(config, seq, tuple(layers))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    marks: list[int] = []

    def step() -> None:
        loss = loss_of(batch)
        loss.backward()
        del loss
        marks.append(_rss_kib("VmHWM") if mode == "memory" else 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    gc.collect()
    if mode == "memory":
        _reset_peak()
        baseline = _rss_kib("VmRSS")
        step()
        return {"config": config, "seq": seq, "peak_mib": (_rss_kib("VmHWM") - baseline) / 1024,
                "fwd_bwd_peak_mib": (marks[-1] - baseline) / 1024, "baseline_mib": baseline / 1024}
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"config": config, "seq": seq, "times": times}


def run_isolated(config: str, seq: int, warmup: int, steps: int, threads: int, mode: str,
                 layers: list[int]) -> dict:
    env = dict(os.environ)
    if mode == "memory":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--one", json.dumps([config, seq, warmup, steps, threads, mode, layers])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{config} seq {seq} ({mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_equivalence(seq: int = 64) -> float:
    """The three AMAD paths compute the same attention term on the same weights (max abs difference)."""
    import torch

    from amad import Distiller

    terms = []
    for config in ("streaming", "materialised", "output_attns"):
        teacher, student, batch, _ = build(config, seq)
        if config == "output_attns":
            with torch.no_grad():
                maps = [m(**batch, output_attentions=True).attentions[-1] for m in (teacher.eval(), student.eval())]
            terms.append(ALPHA * plain_amad(*maps))
        else:
            with torch.no_grad():
                out = Distiller(teacher, student, alpha=ALPHA, streaming=config == "streaming").eval()(**batch)
            terms.append(next(v for k, v in out.losses.items() if k.startswith("attn")))
    return max(abs(float(a - terms[0])) for a in terms)


def collect(seqs: list[int], rounds: int, warmup: int, steps: int, threads: int, layers: list[int],
            configs: tuple[str, ...] = CONFIGS) -> list[dict]:
    rows = []
    for seq in seqs:
        merged = {c: {"config": c, "seq": seq, "times": [], "peaks": [], "fwd_bwd_peaks": []} for c in configs}
        for r in range(rounds):
            for config in configs if r % 2 == 0 else reversed(configs):
                timed = run_isolated(config, seq, warmup, steps, threads, "time", layers)
                memory = run_isolated(config, seq, warmup, steps, threads, "memory", layers)
                row = merged[config]
                row["times"] += timed["times"]
                row["peaks"].append(memory["peak_mib"])
                row["fwd_bwd_peaks"].append(memory["fwd_bwd_peak_mib"])
                print(f"  seq {seq} round {r} {config}: step {statistics.median(timed['times']):.3f} s, "
                      f"peak extra {memory['peak_mib']:.0f} MiB (fwd+bwd {memory['fwd_bwd_peak_mib']:.0f}), "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        for row in merged.values():
            row["time_s"] = statistics.median(row["times"])
            row["peak_mib"] = statistics.median(row["peaks"])
            row["fwd_bwd_peak_mib"] = statistics.median(row["fwd_bwd_peaks"])
            rows.append(row)
    return rows


def report(rows: list[dict]) -> str:
    by = {(r["seq"], r["config"]): r for r in rows}
    lines = ["| seq | configuration | step s (median) | x kd | peak extra MiB | over kd MiB | fwd+bwd peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for seq, config in sorted(by, key=lambda k: (k[0], CONFIGS.index(k[1]))):
        r, kd = by[(seq, config)], by[(seq, "kd")]
        lines.append(f"| {seq} | {config} | {r['time_s']:.3f} | {r['time_s'] / kd['time_s']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['peak_mib'] - kd['peak_mib']:+.0f} | {r['fwd_bwd_peak_mib']:.0f} |")
    lines.append("")
    for seq in sorted({r["seq"] for r in rows}):
        kd, st, oa = (by.get((seq, c)) for c in ("kd", "streaming", "output_attns"))
        if kd is None or st is None:
            continue
        ratios = {"time_streaming_over_kd": (st["time_s"] / kd["time_s"], "<=")}
        if oa is not None:
            extra = {key: (oa[key] - kd[key], st[key] - kd[key]) for key in ("peak_mib", "fwd_bwd_peak_mib")}
            ratios["time_output_attns_over_streaming"] = (oa["time_s"] / st["time_s"], ">=")
            ratios["memory_ratio"] = (extra["peak_mib"][0] / max(extra["peak_mib"][1], 1.0), ">=")
        for name, (value, op) in ratios.items():
            target = TARGETS[name]
            met = value <= target if op == "<=" else value >= target
            lines.append(f"seq {seq}: {name} = {value:.2f} (target {op} {target}: {'met' if met else 'NOT met'})")
        if oa is not None:
            (oa_step, st_step), (oa_fb, st_fb) = extra["peak_mib"], extra["fwd_bwd_peak_mib"]
            lines.append(f"seq {seq}: extra peak over kd, output_attns / streaming: whole step {oa_step:+.0f} / "
                         f"{st_step:+.0f} MiB; fwd+bwd {oa_fb:+.0f} / {st_fb:+.0f} MiB")
    return "\n".join(lines)


def profile(config: str, seq: int, threads: int, rows: int, layers: list[int]) -> None:
    """torch.profiler over one warm step of ``config``: top ops by self CPU time and by memory."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    _, _, batch, (loss_of, params) = build(config, seq, tuple(layers))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for recorded in (False, True):
        with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) if recorded else _null() as prof:
            loss_of(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    averages = prof.key_averages()
    print(f"profile of one step: {config}, seq {seq}, threads {threads}")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    print(averages.table(sort_by="self_cpu_memory_usage", row_limit=rows))


def _null():
    from contextlib import nullcontext

    return nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 2], metavar=("TEACHER", "STUDENT"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--profile", choices=CONFIGS, help="profile one step of this configuration instead")
    parser.add_argument("--profile-seq", type=int, default=2048)
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    threads = args.threads or torch.get_num_threads()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    if args.profile:
        profile(args.profile, args.profile_seq, threads, args.profile_rows, args.layers)
        return
    cores, load = os.cpu_count(), os.getloadavg()
    print(f"CPU cores {cores}, torch threads {threads}, torch {torch.__version__}; load average at start "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"AMAD paths agree on the attention term (seq 64): max abs difference {check_equivalence():.2e}")
    rows = collect(args.seqs, args.rounds, args.warmup, args.steps, threads, args.layers, tuple(args.configs))
    end = os.getloadavg()
    print(f"Teacher 768/12 heads/{args.layers[0]} layers, Student 512/8 heads/{args.layers[1]} layers, batch 1; "
          f"{args.rounds} rounds x "
          f"{args.steps} steps after {args.warmup} warm-up; load average at end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}"
          + (f" -- LOADED: the 1-minute load exceeded the {cores} cores, timings are noisy" if
             max(load[0], end[0]) > (cores or 1) else ""))
    print(report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
