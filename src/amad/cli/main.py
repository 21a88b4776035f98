"""The ``amad`` command: ``distill``, ``evaluate``, ``plot``, ``tune`` and ``demo``.

Errors are one line on stderr: exit code 2 for a problem in the
configuration or the arguments, 1 for anything that fails while running;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Sequence

from .. import __version__
from .errors import ConfigError, missing_cli_modules

__all__ = ["main", "build_parser"]

logger = logging.getLogger("amad")

DISTILL_HELP = """\
Distil a Teacher into a Student as the YAML config says, then save the Student
(from_pretrained-loadable), the resolved config (config.yaml), a small sample of
inputs for `amad plot` and summary.json into the run directory.

examples:
  amad init-example sequence_classification --out my_sst2   # a runnable example
  amad distill my_sst2/config.yaml --out runs/sst2
  amad distill my_t5/config.yaml --out runs/t5 \\
      --set distill.alpha=0.2 --set training.max_steps=10
  amad distill cfg.yaml --out runs/x --set distill.attention_loss=one-to-one \\
      --set 'distill.layers=[[encoder.layer.11.attention.self, encoder.layer.5.attention.self]]'

--set takes a dotted key and a YAML value; relative paths in the config file
are relative to the file, those given with --set to the current directory.

A run directory holds one run: reusing one is refused unless --resume (continue
from its newest complete checkpoint; give the same --set options) or
--overwrite (remove its checkpoints and the files amad distill wrote first).
Checkpoints are written aside and renamed into place, so a crash leaves only
complete ones; after Ctrl-C the message says how to resume.
"""

EVALUATE_HELP = """\
Score the Teacher (from the config) and a distilled Student (--checkpoint) on
the config's evaluation data, side by side: accuracy for classification, VQA
accuracy for visual question answering, BLEU and CIDEr for seq2seq (all 0-100);
perplexity, next-token accuracy, KL(Teacher || Student) per token and top-1
agreement for causal-lm.
Prints a table and writes JSON (default CHECKPOINT/eval_results.json).

examples:
  amad evaluate runs/sst2/config.yaml --checkpoint runs/sst2
  amad evaluate my_t5/config.yaml --checkpoint runs/t5/checkpoint-5 \\
      --set data.max_eval_samples=200 --output t5_eval.json
"""

PLOT_HELP = """\
Figures of a distillation run (like the AMAD paper's Figures 2-9): for every
distilled layer pair, the Teacher x Student cosine similarity of the heads'
attention maps (averaged over the inputs) next to AMAD's alignment softmax,
and the per-head attention maps of both models for a few inputs. Needs the
run directory written by `amad distill` (and the Teacher it names).

examples:
  amad plot runs/sst2
  amad plot runs/vit --samples 4 --out figures/vit
"""

TUNE_HELP = """\
Choose the attention loss, its alpha (and AMAD's alignment temperature) on a
validation split with Optuna: each trial is a short `amad distill` run scored on
rows held out of data.train (data.eval, the test split, is never used). The study
is kept in OUT/study.db: running the same command again continues it. Writes
OUT/tune.md, OUT/plots/alpha_vs_metric.png and OUT/best.yaml (for amad distill).
Needs the 'tune' extra (optuna). The search space is the config's tune: section
(docs/tuning.md); the flags below override it.

examples:
  amad tune examples/sequence_classification.yaml --out runs/tune --max-steps 200
  amad tune cfg.yaml --out runs/tune --losses amad-mse,one-to-one --sampler grid
  amad distill runs/tune/best.yaml --out runs/best
"""

INIT_EXAMPLE_HELP = """\
Write a runnable copy of a config in examples/: OUT/config.yaml, a tiny Teacher
with random weights (OUT/models/teacher, saved with save_pretrained with its
tokenizer / image processor) and a few rows of data (OUT/data), so that the
example's commands run as written, in seconds on a CPU. Replace the Teacher and
the data by real ones to distil for real.

examples:
  amad init-example sequence_classification --out my_sst2
  amad distill my_sst2/config.yaml --out runs/sst2
  amad init-example seq2seq_t5 --out my_t5
"""

DEMO_HELP = """\
The offline demo benchmarks (provided by amad.bench); their own options follow.

examples:
  amad demo --help
  amad demo --quick --out runs/demo
"""


def _command(sub: Any, name: str, text: str, summary: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name, help=summary, description=text.split("\n\n")[0], epilog="\n\n".join(text.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amad",
        description="Attention-map alignment distillation between transformers with different head counts.",
        epilog="examples:\n  amad init-example sequence_classification --out my_sst2\n"
        "  amad distill my_sst2/config.yaml --out runs/sst2\n"
        "  amad evaluate runs/sst2/config.yaml --checkpoint runs/sst2\n  amad plot runs/sst2\n"
        "  amad tune examples/sequence_classification.yaml --out runs/tune\n"
        "  amad demo --quick --out runs/demo\n\nRun `amad COMMAND --help` for each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"amad {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    distill = _command(sub, "distill", DISTILL_HELP, "distil a Teacher into a Student from a YAML config")
    distill.add_argument("config", help="the run's YAML config")
    distill.add_argument("--out", help="run directory (default: training.output_dir)")
    _add_set(distill)
    distill.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                         help="resume training from the newest complete (or the given) checkpoint")
    distill.add_argument("--overwrite", action="store_true",
                         help="replace a previous run in the run directory (its checkpoints and outputs are removed)")
    distill.set_defaults(handler=lambda a: _with_config(a, "distill"))

    evaluate = _command(sub, "evaluate", EVALUATE_HELP, "score Teacher and Student side by side")
    evaluate.add_argument("config", help="the run's YAML config (e.g. RUN_DIR/config.yaml)")
    evaluate.add_argument("--checkpoint", required=True, help="directory with the distilled Student")
    evaluate.add_argument("--output", help="JSON file to write (default: CHECKPOINT/eval_results.json)")
    evaluate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _add_set(evaluate)
    evaluate.set_defaults(handler=lambda a: _with_config(a, "evaluate"))

    plot = _command(sub, "plot", PLOT_HELP, "plot attention similarity and per-head maps of a run")
    plot.add_argument("run_dir", help="directory written by `amad distill`")
    plot.add_argument("--samples", type=int, default=4, help="number of inputs to average over (default 4)")
    plot.add_argument("--heads-samples", type=int, default=2, help="inputs to draw per-head maps for (default 2)")
    plot.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/plots)")
    plot.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    plot.set_defaults(handler=lambda a: _commands().plot(a))

    tune = _command(sub, "tune", TUNE_HELP, "choose the loss, alpha and temperature on a validation split")
    tune.add_argument("config", help="the run's YAML config (its tune: section sets the search)")
    tune.add_argument("--out", required=True, help="directory of the study (created; reused to continue)")
    tune.add_argument("--losses", help="comma-separated attention losses (tune.losses)")
    tune.add_argument("--sampler", choices=("tpe", "grid"), help="tune.sampler (default tpe)")
    tune.add_argument("--n-trials", type=int, help="trials in the study (tune.n_trials)")
    tune.add_argument("--max-steps", type=int, help="training.max_steps of each trial (tune.max_steps)")
    tune.add_argument("--validation", help="a separate validation file (tune.validation)")
    tune.add_argument("--validation-fraction", type=float, help="share of data.train held out (default 0.1)")
    tune.add_argument("--metric", help="validation metric to maximise (default: the task's first)")
    tune.add_argument("--seed", type=int, help="seed of the sampler and the split (default: the config's)")
    _add_set(tune)
    tune.set_defaults(handler=_tune)

    init = _command(sub, "init-example", INIT_EXAMPLE_HELP, "write an example config with a tiny Teacher and data")
    init.add_argument("name", help="sequence_classification, image_classification, seq2seq_t5 or "
                      "visual_question_answering (a file of examples/)")
    init.add_argument("--out", required=True, help="directory to write (must not hold a config.yaml yet)")
    init.set_defaults(handler=_init_example)

    demo = sub.add_parser("demo", help="run the offline demo benchmarks (provided by amad.bench)", add_help=False,
                          description=DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("args", nargs=argparse.REMAINDER)
    demo.set_defaults(handler=lambda a: run_plugin("demo", a.args))
    return parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, YAML value); repeatable")


def _with_config(args: argparse.Namespace, command: str) -> int:
    """Run ``command`` on the config ``args.config`` (with ``--set``), read and checked before torch is imported."""
    from .config import load_config

    cfg = load_config(args.config, args.set)
    return getattr(_commands(), command)(args, cfg)


def _tune(args: argparse.Namespace) -> int:
    from .config import load_config
    from .tune_options import flag_overrides, require_optuna

    require_optuna()  # before the config is read: a missing extra is the first thing to hear about
    cfg = load_config(args.config, [*args.set, *flag_overrides(args)])
    from .tune import tune

    return tune(args, cfg)
def _init_example(args: argparse.Namespace) -> int:
    from .examples import init_example

    config = init_example(args.name, args.out)
    print(f"wrote {config}, its Teacher ({config.parent / 'models' / 'teacher'}) and data ({config.parent / 'data'})")
    return 0


def _commands() -> Any:
    from . import commands  # heavy imports (torch, transformers) only when a command runs

    return commands


def run_plugin(name: str, args: Sequence[str]) -> int:
    """Hand ``args`` (strings, as on the command line) to the plugin command ``name`` (``amad.cli.plugins``)."""
    from .plugins import load_command

    entry = load_command(name)
    try:
        code = entry(list(args))
    except SystemExit as exc:  # the demo's own argparse: --help, or a usage error it printed
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return int(code) if isinstance(code, int) else 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (it may be swapped, e.g. by tests)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging() -> None:
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return text or type(exc).__name__


def _split_demo(argv: list[str]) -> tuple[bool, list[str]] | None:
    """``amad [--debug] demo ARGS``: the demo's arguments go to it untouched."""
    i = 0
    while i < len(argv) and argv[i] == "--debug":
        i += 1
    if i < len(argv) and argv[i] == "demo":
        return i > 0, argv[i + 1:]
    return None


def _run(name: str, action: Callable[[], int | None], debug: bool) -> int:
    try:
        code = action()
    except ConfigError as exc:
        if debug:
            raise
        print(f"amad {name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # its message, if any, says how to resume (amad distill)
        print(f"amad {name}: interrupted" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        _release(exc)
        print(f"amad {name}: error: {type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1
    return int(code or 0)


def _release(exc: BaseException) -> None:
    """Free what the failed run still holds (its open progress bars close and print now, not after the error)."""
    import gc

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
    gc.collect()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``amad`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = missing_cli_modules()
    if missing:
        print(f"amad: error: the command line needs {', '.join(missing)}, which are not installed; "
              "install the 'cli' extra: pip install 'amad[cli]'", file=sys.stderr)
        return 2
    demo = _split_demo(argv)
    if demo is not None:
        return _run("demo", lambda: run_plugin("demo", demo[1]), demo[0])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse printed it)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    _setup_logging()
    return _run(args.command, lambda: args.handler(args), args.debug)
