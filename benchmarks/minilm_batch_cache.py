"""Seconds per training step of the real-Teacher benchmark with the live Teacher and with the batch cache.

For each Student setting and attention loss of `amad demo --real` (full budget, seed 0), the same training batches
are run through three Distillers in turn: on the live Teacher, on the batch cache while it fills, and on the
filled cache (amad.bench.batch_cache). Reports the mean seconds per step (forward, backward, optimiser step) of
each, over --repeats rounds interleaved (min / max beside the mean), and whether every step's loss agrees.

    .venv/bin/python benchmarks/minilm_batch_cache.py [--settings h4-d256-l3 h4-d256-l3-uniform] [--batches 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from amad.bench.minilm_experiment import BUDGETS, TextExperiment, parse_setting

MODES = ("live", "filling", "cached")


def steps(experiment: TextExperiment, setting: str, method: str, mode: str, batches: list) -> tuple[float, list]:
    """Mean seconds per step and the losses, on ``batches``; ``filling`` starts from an empty cache."""
    parsed = parse_setting(setting)
    if mode == "filling":
        experiment.cached_teacher.clear()
    torch.manual_seed(0)
    distiller = experiment.distiller(experiment.student(parsed, 0), method, parsed, alpha=1.0,
                                     seed=None if mode == "live" else 0).train()
    optimiser = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], 1e-4)
    losses, started = [], time.perf_counter()
    for batch in batches:
        loss = distiller(**batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(float(loss.detach()))
    return (time.perf_counter() - started) / len(batches), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["h4-d256-l3", "h4-d256-l3-uniform"])
    parser.add_argument("--methods", nargs="+", default=["kd+amad-kl", "kd+minilm-relations"])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    experiment = TextExperiment(BUDGETS["full"])
    rows = experiment.seed_data(0).train_rows[: 16 * args.batches]
    batches = [experiment.collate(rows[i:i + 16]) for i in range(0, len(rows), 16)]
    print("| setting | loss | live s/step | filling s/step | cached s/step | live / cached | losses equal |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        for method in args.methods:
            times: dict[str, list[float]] = {m: [] for m in MODES}
            losses: dict[str, list] = {}
            for _ in range(args.repeats):
                for mode in MODES:  # interleaved, so that a noisy machine treats the three alike
                    seconds, losses[mode] = steps(experiment, setting, method, mode, batches)
                    times[mode].append(seconds)
            cells = [f"{statistics.mean(t):.3f} ({min(t):.3f}-{max(t):.3f})" for t in times.values()]
            ratio = statistics.mean(times["live"]) / statistics.mean(times["cached"])
            same = losses["live"] == losses["filling"] == losses["cached"]
            print(f"| {setting} | {method} | {' | '.join(cells)} | {ratio:.2f}x | {same} |")


if __name__ == "__main__":
    main()
