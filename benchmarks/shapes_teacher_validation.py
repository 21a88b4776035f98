"""How much the Shapes Teacher's test score depends on the images held out for validation.

Trains the demo's Teacher of ``--task`` (full budget, seed 0, the demo's own training code) once per value of
``--validation-images`` (the training images carved out for choosing alpha; the fair protocol holds out 300 of
3,000, the pre-fair runs none) and prints its test scores. Same seed, same code: only the training images differ.

    .venv/bin/python benchmarks/shapes_teacher_validation.py [--task vqa] [--validation-images 0 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from amad.bench.jobs import fit, seeded_teacher
from amad.bench.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="vqa", choices=sorted(TASKS))
    parser.add_argument("--validation-images", type=int, nargs="+", default=[0, 300])
    parser.add_argument("--scale", default="full")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = TASKS[args.task]
    print("| validation images | training images | training rows | test scores | seconds |\n|---|---|---|---|---|")
    for held_out in args.validation_images:
        budget = dataclasses.replace(task.budget(args.scale), validation_images=held_out)
        data = task.prepare(budget)
        started = time.perf_counter()
        model = seeded_teacher(task, data, budget)
        fit(model, data.train, data.collate, budget, budget.teacher_steps, seed=0)
        scores = ", ".join(f"{k} {v:.2f}" for k, v in task.evaluate(model, data, budget).items())
        print(f"| {held_out} | {budget.train_images - held_out} | {len(data.train)} | {scores} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
