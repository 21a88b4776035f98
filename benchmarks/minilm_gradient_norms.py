"""Step-0 gradient norms of each weighted loss term over the Student, for the real-Teacher benchmark.

On the first batch (16 training sentences of seed 0) of `amad demo --real` at the full budget, for the
Student h4-d256-l3 and each attention loss: the value of every weighted term of the Distiller (alpha "auto"
makes them equal on this batch) and the L2 norm of its gradient over the Student's trainable parameters.
It tells whether one loss starts with a much larger pull on the Student than another (docs/results/README.md).

    .venv/bin/python benchmarks/minilm_gradient_norms.py [--student h4-d256-l3] [--batch 16]
"""

from __future__ import annotations

import argparse

import torch

from amad.bench.minilm_run import BUDGETS, METHODS, TextExperiment
from amad.bench.minilm_text import STUDENT_SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", choices=tuple(STUDENT_SHAPES), default="h4-d256-l3")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    experiment = TextExperiment(BUDGETS["full"])
    shape = STUDENT_SHAPES[args.student]
    batch = experiment.collate(experiment.seed_data(args.seed).train_rows[: args.batch])
    print("| method | term | value | gradient norm |\n|---|---|---|---|")
    for method in METHODS:
        student = experiment.student(shape, args.seed)
        distiller = experiment.distiller(student, method, shape).train()
        terms = distiller(**batch).losses
        params = [p for p in student.parameters() if p.requires_grad]
        for name, value in terms.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))
            label = "attention" if name.startswith("attn") else name
            print(f"| {method} | {label} | {value.item():.4f} | {norm.item():.4f} |", flush=True)


if __name__ == "__main__":
    main()
