"""alpha "auto" (gradient-norm balance) against the former first-batch loss ratio, on the real MiniLM Teacher.

For the Student h4-d256-l3 of `amad demo --real` (full budget: batch 16, sentences of at most 48 tokens,
seed 0's training split) and each attention loss of the demo (mask-aware reductions), every batch below is
measured once by the library (`Distiller` with alpha "auto", whose `_alpha_sums` gain one row of
`amad.weighting.measure_batch` per training forward): the gradient norms of the KD (embedding) term and of
the attention term over the Student parameters both reach, and both loss values. From those rows:

- new rule, (i) on the first 8 batches of a length-grouped sampler (`group_by_length`, what a Distiller
  measuring its first training batches sees) and (ii) on 8 random batches of seeds 0, 1, 2 (what
  `DistillationTrainer` measures: a permutation seeded by the data seed, whatever the sampler);
- former rule (loss ratio on the first batch): on the first length-grouped batch and on the first random one.

No training happens; the Student is the seed's untrained one. `--train` also trains one demo cell with the
current alpha "auto" (600 steps) and prints its held-out scores. `--tiny` instead measures tiny random BERT
and GPT-2 pairs on 8 batches of lengths 3 to 16 in three orders (calibrated, or while training).

    .venv/bin/python benchmarks/alpha_rule.py [--losses amad-mse amad-kl] [--train kd+amad-mse:2]
    .venv/bin/python benchmarks/alpha_rule.py --tiny
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from amad import weighting
from amad.demo.minilm_run import BUDGETS, METHODS, TextExperiment
from amad.demo.minilm_text import STUDENT_SHAPES

BATCHES = 8
RANDOM_SEEDS = (0, 1, 2)


def batch_orders(rows: list[dict], batch_size: int, seed: int) -> dict[str, list[list[int]]]:
    """Row indices of the first BATCHES batches: length-grouped, and random for each of RANDOM_SEEDS."""
    lengths = [len(r["input_ids"]) for r in rows]
    grouped = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    orders = {"grouped": grouped}
    for s in RANDOM_SEEDS:
        orders[f"random{s}"] = torch.randperm(len(rows), generator=torch.Generator().manual_seed(s)).tolist()
    return {name: [order[b * batch_size : (b + 1) * batch_size] for b in range(BATCHES)]
            for name, order in orders.items()}


def per_batch_rows(
    experiment: TextExperiment, method: str, batches: list[dict], seed: int, layer_scope: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (4,) measurement per batch, ``(len(batches), 4)``, from the library's own measuring forward.

    ``layer_scope``: also the gradient norms over the distilled Student layer's parameters only (GradNorm's
    "last shared layer"), ``(len(batches), 2)``.
    """
    shape = STUDENT_SHAPES["h4-d256-l3"]
    distiller = experiment.distiller(experiment.student(shape, seed), method, shape)
    distiller.alpha_batches = 10**9  # never freezes: every training forward adds its batch's row
    distiller.train()
    layer = dict(distiller.student.named_modules())[distiller.layer_pairs[0][1]]
    layer_params = [p for p in layer.parameters() if p.requires_grad]
    rows, layer_rows = [], []
    for batch in batches:
        before = distiller._alpha_sums[:, 0].clone()
        out = distiller(**batch)
        rows.append(distiller._alpha_sums[:, 0] - before)
        if layer_scope:
            term = out.losses[distiller._term_name(0)] / distiller.alpha[0].to(torch.float32)  # unweighted
            layer_rows.append(weighting.measure_batch(out.losses["kd"], [term], layer_params)[:2, 0])
    return torch.stack(rows), torch.stack(layer_rows) if layer_scope else None


def auto(rows: torch.Tensor) -> float:
    return float(weighting.balanced_alpha(rows.sum(0)[:, None], "auto")[0])


def loss_ratio(rows: torch.Tensor) -> float:
    return float(weighting.balanced_alpha(rows.sum(0)[:, None], "loss-ratio")[0])


# -- tiny models (--tiny): the same batches in three orders ---------------------------------------------------------
TINY_LENGTHS = (3, 16, 5, 12, 8, 14, 4, 10)


def tiny_pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Teacher 2 layers x 4 heads, Student 2 layers x 2 heads, width 4 per head, default initialisation."""
    import transformers as hf

    def build(heads: int, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        if family == "bert":
            return hf.BertForSequenceClassification(hf.BertConfig(
                vocab_size=40, hidden_size=4 * heads, num_hidden_layers=2, num_attention_heads=heads,
                intermediate_size=16, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0))
        return hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=4 * heads, n_layer=2, n_head=heads, vocab_size=40,
                                                n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    return build(4, 0), build(2, 1)


def tiny_batches(family: str) -> list[dict]:
    """Four sequences per batch padded to its length (the first full length, the others 2 tokens or more)."""
    batches = []
    for seed, length in enumerate(TINY_LENGTHS):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 40, (4, length), generator=g)
        real = torch.randint(2, length + 1, (4,), generator=g)
        real[0] = length
        mask = (torch.arange(length) < real[:, None]).long()
        labels = (ids * mask).masked_fill(mask == 0, -100) if family == "gpt2" else torch.arange(4) % 3
        batches.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return batches


def tiny_alpha(family: str, batches: list[dict], rule: str, optimizer: str | None) -> float:
    """alpha measured on ``batches``: calibrated (no training) or while training with ``optimizer`` steps."""
    from amad import Distiller

    teacher, student = tiny_pair(family)
    distiller = Distiller(teacher, student, alpha=rule, alpha_batches=len(batches)).train()
    if optimizer is None:
        distiller.calibrate_alpha(batches)
    else:
        kind, lr = optimizer.split()
        step = (torch.optim.SGD if kind == "SGD" else torch.optim.AdamW)(student.parameters(), lr=float(lr))
        for batch in batches:
            distiller(**batch).loss.backward()
            step.step()
            step.zero_grad()
    return float(distiller.alpha[0])


def tiny() -> None:
    import warnings

    warnings.simplefilter("ignore")  # the former rule's imbalance warnings
    print("| model | rule | measured on | given order | longest first | reversed |\n|---|---|---|---|---|---|")
    for family in ("bert", "gpt2"):
        batches = tiny_batches(family)
        by_length = sorted(batches, key=lambda b: -int(b["attention_mask"].sum()))
        orders = (batches, by_length, batches[::-1])
        cases = [("auto", "8 batches, calibrated", None, 8), ("auto", "8 batches while training", "SGD 0.01", 8),
                 ("auto", "8 batches while training", "AdamW 1e-3", 8), ("auto", "first batch", None, 1),
                 ("loss-ratio", "first batch", None, 1), ("loss-ratio", "8 batches, calibrated", None, 8)]
        for rule, where, optimizer, count in cases:
            values = [tiny_alpha(family, order[:count], rule, optimizer) for order in orders]
            label = where + (f" ({optimizer})" if optimizer else "")
            print(f"| {family} | {rule} | {label} | " + " | ".join(f"{v:.4g}" for v in values) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", nargs="+", default=[m[3:] for m in METHODS if m.startswith("kd+")])
    parser.add_argument("--seed", type=int, default=0, help="Student initialisation and training split")
    parser.add_argument("--train", nargs="*", default=[], help="cells METHOD:SEED to train, e.g. kd+amad-mse:2")
    parser.add_argument("--tiny", action="store_true", help="only the tiny-model table (about a minute)")
    args = parser.parse_args()
    if args.tiny:
        torch.set_num_threads(1)
        return tiny()
    torch.set_num_threads(1)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("amad.distiller").setLevel(logging.INFO)  # the alpha each trained cell chose
    started = time.perf_counter()
    experiment = TextExperiment(BUDGETS["full"])
    data = experiment.seed_data(args.seed)
    size = experiment.budget.batch_size
    orders = batch_orders(data.train_rows, size, args.seed)
    batches = {name: [experiment.collate([data.train_rows[i] for i in b]) for b in order]
               for name, order in orders.items()}
    lengths = {name: [float(b["attention_mask"].sum(1).float().mean()) for b in bs] for name, bs in batches.items()}
    print(f"mean real length of the {BATCHES} batches: " + "; ".join(
        f"{name} {statistics.mean(v):.1f} (first {v[0]:.1f})" for name, v in lengths.items()))
    print("\n| loss | auto, first 8 grouped | auto, 8 random (seeds 0/1/2) | max/min of auto over the 4 sets "
          "| loss ratio, first grouped batch | loss ratio, first random batch (seeds 0/1/2) | median of per-batch "
          "gradient ratios, random0 |\n|---|---|---|---|---|---|---|")
    for loss in args.losses:
        first = loss == args.losses[0]
        both = {name: per_batch_rows(experiment, f"kd+{loss}", bs, args.seed, first) for name, bs in batches.items()}
        measured = {name: rows for name, (rows, _) in both.items()}
        autos = {name: auto(rows) for name, rows in measured.items()}
        randoms = [autos[f"random{s}"] for s in RANDOM_SEEDS]
        firsts = [loss_ratio(measured[f"random{s}"][:1]) for s in RANDOM_SEEDS]
        ratios = measured["random0"][:, weighting.REF_GRAD] / measured["random0"][:, weighting.TERM_GRAD]
        print(f"| {loss} | {autos['grouped']:.4g} | {' / '.join(f'{a:.4g}' for a in randoms)} | "
              f"{max(autos.values()) / min(autos.values()):.2f} | {loss_ratio(measured['grouped'][:1]):.4g} | "
              f"{' / '.join(f'{a:.4g}' for a in firsts)} | {float(ratios.median()):.4g} |", flush=True)
        if first:
            detail = [(name, i, lengths[name][i], rows, both[name][1][i]) for name in ("grouped", "random0")
                      for i, rows in enumerate(measured[name])]
    print(f"\nper batch, {args.losses[0]}: | set | batch | mean real length | gradient ratio ||dKD||/||dL|| over "
          "shared parameters | over the distilled layer only | loss ratio KD/L |\n|---|---|---|---|---|---|")
    for name, i, length, row, layer in detail:
        print(f"| {name} | {i} | {length:.1f} | {float(row[0] / row[1]):.4g} | {float(layer[0] / layer[1]):.4g} | "
              f"{float(row[2] / row[3]):.4g} |")
    print(f"\nmeasurements: {time.perf_counter() - started:.0f} s")
    for cell in args.train:
        method, seed = cell.rsplit(":", 1)
        t0 = time.perf_counter()
        scores = experiment.run_cell(STUDENT_SHAPES["h4-d256-l3"], method, int(seed))
        print(f"trained {method} seed {seed} (alpha 'auto'): " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
