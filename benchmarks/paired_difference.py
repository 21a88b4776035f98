"""Per-seed values of two rows of a committed run and their paired difference (95 % t interval).

    python benchmarks/paired_difference.py RESULTS_JSON TASK METRIC METHOD_A METHOD_B

e.g. ``docs/results/fair-shapes-translation/results.json translation-pretrained bleu kd+head-mean@x1 kd+amad-kl@x1``:
the numbers the readings in docs/results/README.md quote beside the tables (which pair each loss with kd only).
"""

import sys

from amad.bench import report


def per_seed(records: list, task: str, metric: str, method: str) -> dict[int, float]:
    values = {r["seed"]: r["value"] for r in records
              if r["task"] == task and r["metric"] == metric and r["method"] == method}
    if not values:
        methods = sorted({r["method"] for r in records if r["task"] == task})
        raise SystemExit(f"no {metric!r} record of {method!r} for task {task!r}; its methods: {', '.join(methods)}")
    return values


if __name__ == "__main__":
    if len(sys.argv) != 6:
        raise SystemExit(__doc__)
    path, task, metric, first, second = sys.argv[1:]
    records = report.load_results(path)
    a, b = per_seed(records, task, metric, first), per_seed(records, task, metric, second)
    for seed in sorted(set(a) | set(b)):
        print(f"seed {seed}: {first} {a.get(seed, float('nan')):.2f}, {second} {b.get(seed, float('nan')):.2f}")
    d = report.paired_difference(a, b)
    if d is None:
        raise SystemExit(f"{first} and {second} share no seed: nothing to pair")
    print(f"{first} - {second}: {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}] over {d.n} seeds")
