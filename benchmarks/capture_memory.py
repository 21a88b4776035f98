"""Peak memory and time of one forward of a 12-layer BERT-base-sized model, three ways:

  sdpa      SDPA attention, nothing recorded (the baseline);
  recorder  SDPA attention, AttentionRecorder on one layer, plus that layer's maps (B, H, q, k);
  eager_oa  eager attention with output_attentions=True (every layer's maps returned).

Run:  python benchmarks/capture_memory.py [--seqs 512 1024] [--batches 1 2] [--repeats 3]

How memory is measured (CPU): every configuration runs in a fresh Python
process. glibc is told to serve every allocation above 64 KiB with mmap
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to the kernel and the
resident set size follows live memory. Before each forward the process resets
the kernel's high-water mark of its RSS (``/proc/self/clear_refs`` <- 5) and
reads its RSS; after the forward (outputs, maps and, in grad mode, the
autograd graph still alive) it reads ``VmHWM``. Peak = VmHWM - RSS before: the
extra memory the forward needed at its worst moment, measured by the kernel
(no sampling, no tracing overhead). The weights are in the baseline, not the
peak. On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.

Modes: ``no_grad`` (a frozen Teacher's forward) and ``grad`` (a Student's
forward: activations saved for backward are part of the peak).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("sdpa", "recorder", "eager_oa")
MODES = ("no_grad", "grad")
RECORDED_LAYER = "encoder.layer.11.attention.self"


def _rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(method: str, mode: str, seq: int, batch: int, repeats: int, device: str) -> dict:
    """One configuration, in this (fresh) process: peak extra memory (MiB) and forward time (s)."""
    import gc

    import torch
    from transformers import BertConfig, BertModel

    from amad import AttentionRecorder

    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        max_position_embeddings=max(512, seq))
    impl = "eager" if method == "eager_oa" else "sdpa"
    model = BertModel(config, add_pooling_layer=False)
    model.set_attn_implementation(impl)
    model = model.eval().to(device)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)

    def forward(input_ids: torch.Tensor = input_ids, mask: torch.Tensor = mask) -> list:
        keep = []
        with torch.set_grad_enabled(mode == "grad"):
            if method == "recorder":
                with AttentionRecorder(model, RECORDED_LAYER) as rec:
                    keep.append(model(input_ids=input_ids, attention_mask=mask))
                keep.append(rec.maps(RECORDED_LAYER))
            else:
                keep.append(model(input_ids=input_ids, attention_mask=mask, output_attentions=method == "eager_oa"))
        if device == "cuda":
            torch.cuda.synchronize()
        return keep

    forward(input_ids[:, :16], mask[:, :16])  # warm-up (lazy initialisations), short so that it is cheap
    times, peaks = [], []
    for _ in range(repeats):
        gc.collect()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _reset_peak()
            before = _rss_kib("VmRSS") * 1024
        start = time.perf_counter()
        kept = forward()
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
        peaks.append((peak - before) / 2**20)
        del kept
    return {"method": method, "mode": mode, "seq": seq, "batch": batch, "device": device,
            "peak_mib": max(peaks), "time_s": statistics.median(times)}


def run_isolated(method: str, mode: str, seq: int, batch: int, repeats: int, device: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--one", json.dumps([method, mode, seq, batch, repeats, device])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    by_key = {(r["mode"], r["seq"], r["batch"], r["method"]): r for r in rows}
    lines = [
        "| mode | seq | batch | method | peak MiB | x sdpa | forward s | x sdpa |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, seq, batch, method in sorted(by_key, key=lambda k: (MODES.index(k[0]), k[1], k[2], METHODS.index(k[3]))):
        r, base = by_key[(mode, seq, batch, method)], by_key[(mode, seq, batch, "sdpa")]
        lines.append(
            f"| {mode} | {seq} | {batch} | {method} | {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f} "
            f"| {r['time_s']:.3f} | {r['time_s'] / base['time_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    rows = []
    for mode in args.modes:
        for seq in args.seqs:
            for batch in args.batches:
                for method in METHODS:
                    rows.append(run_isolated(method, mode, seq, batch, args.repeats, args.device))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"BERT-base shape (12 layers, hidden 768, 12 heads), device {args.device}, threads {_threads()}; "
          f"peak = extra memory of one forward over the weights; time = median of {args.repeats}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
