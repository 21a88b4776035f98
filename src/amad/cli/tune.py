"""``amad tune``: choose the attention loss, its alpha and AMAD's temperature on a validation split, with Optuna.

The protocol (docs/tuning.md):

1. Validation split: ``tune.validation`` when given, else ``tune.validation_fraction`` of ``data.train`` held
   out by ``datasets.Dataset.train_test_split`` (seeded). ``data.eval``, the test split, is never read. Both
   parts are saved to ``DIR/data/{train,validation}``: trials train on the first and are scored on the second.
2. ``alpha = factor * distill.alpha``; ``"auto"`` is measured once per loss by a run of ``alpha_batches``
   steps (``DIR/reference/LOSS``), so factor 1 is the alpha ``auto`` gives that loss.
3. Each trial is an ``amad distill`` run (:func:`~amad.cli.commands.run_distillation`) into
   ``DIR/trials/N``; its Student is then scored like ``amad evaluate`` on the validation split.
4. The study is stored in ``DIR/study.db`` (SQLite, Optuna's RDBStorage). Running the command again
   continues it: completed trials are kept, failed or interrupted ones run again with their parameters,
   until ``n_trials`` trials have completed.
5. After each trial: ``DIR/tune.md``, ``DIR/plots/alpha_vs_metric.png`` and ``DIR/best.yaml`` (the
   config with the best loss, alpha and temperature, for ``amad distill``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from ..options import DistillOptions
from .commands import _device, _student_from, _write_json, run_distillation
from .config import RunConfig, config_to_dict
from .data import load_splits
from .evaluation import METRICS, evaluate_model
from .tune_options import DEFAULT_TPE_TRIALS, TuneOptions, require_optuna
from .tune_report import Row, alpha_figure, markdown_report
from .tune_study import STUDY_DB, completed, locked, make_sampler, open_study, recover, study_rows
from .typed import ConfigError

__all__ = ["tune", "Search", "make_search", "split_data", "run_config", "best_config"]

logger = logging.getLogger("amad.cli")

PLOT = "plots/alpha_vs_metric.png"


@dataclass
class Search:
    """Everything fixed for the whole study."""

    cfg: RunConfig
    config_path: str
    out: Path
    losses: list[str]
    loss_options: dict[str, dict]
    with_temperature: dict[str, bool]
    metric: str
    n_trials: int
    seed: int

    @property
    def options(self) -> TuneOptions:
        return self.cfg.tune


# -- the search space ---------------------------------------------------------------------------
def _has_temperature(name: str, options: dict) -> bool:
    """Whether the loss takes an alignment ``temperature`` (checked on the meta device: nothing allocated)."""
    import inspect

    from .. import losses

    with torch.device("meta"):
        loss = losses.get(name, **options)
    return "temperature" in inspect.signature(type(loss)).parameters


def make_search(cfg: RunConfig, config_path: str, out: Path) -> Search:
    """The losses (checked as the Distiller builds them), the metric and the number of trials."""
    if cfg.task == "causal-lm":  # its validation scores the Student alone; causal-lm's metrics need the Teacher too
        raise ConfigError("task: amad tune does not support causal-lm yet; run amad distill and amad evaluate per setting")
    opts = cfg.tune
    losses = list(opts.losses or [cfg.distill.attention_loss])
    if None in losses:
        raise ConfigError("tune.losses: distill.attention_loss is null (logit KD only); name the losses to compare")
    for name in opts.loss_options:
        if name not in losses:
            raise ConfigError(f"tune.loss_options.{name}: not one of the losses searched ({', '.join(losses)})")
    loss_options, with_temperature = {}, {}
    for name in losses:
        own = cfg.distill.attention_loss_options if name == cfg.distill.attention_loss else {}
        loss_options[name] = dict(opts.loss_options.get(name, own))
        try:
            DistillOptions(attention_loss=name, attention_loss_options=loss_options[name]).check_attention_loss()
        except ValueError as exc:
            raise ConfigError(f"tune.losses: {name}: {exc}") from None
        with_temperature[name] = _has_temperature(name, loss_options[name])
    metrics = METRICS[cfg.task]
    metric = opts.metric or metrics[0]
    if metric not in metrics:
        raise ConfigError(f"tune.metric: {metric!r} is not a metric of {cfg.task} ({', '.join(metrics)})")
    grid = sum(len(opts.alpha_factors) * (len(opts.temperatures or [None]) if with_temperature[n] else 1)
               for n in losses)
    n_trials = opts.n_trials or (grid if opts.sampler == "grid" else DEFAULT_TPE_TRIALS)
    if opts.sampler == "grid" and n_trials > grid:
        raise ConfigError(f"tune.n_trials: {n_trials} is more than the {grid} points of the grid")
    seed = cfg.seed if opts.seed is None else opts.seed
    return Search(cfg, config_path, out, losses, loss_options, with_temperature, metric, n_trials, seed)


def suggest(trial: Any, search: Search) -> tuple[str, float, float | None]:
    """The trial's (loss, alpha factor, temperature or None) from the sampler."""
    opts, grid = search.options, search.options.sampler == "grid"
    loss = trial.suggest_categorical("loss", search.losses)
    if grid:
        factor = trial.suggest_categorical("alpha_factor", opts.alpha_factors)
    else:
        factor = trial.suggest_float("alpha_factor", *opts.alpha_range, log=True)
    temperature = None
    if search.with_temperature[loss] and (opts.temperatures if grid else opts.temperature_range):
        if grid:
            temperature = trial.suggest_categorical("temperature", opts.temperatures)
        else:
            temperature = trial.suggest_float("temperature", *opts.temperature_range, log=True)
    return loss, float(factor), temperature


# -- data -----------------------------------------------------------------------------------------
def split_data(search: Search) -> tuple[Any, Any, str]:
    """(training rows, validation rows, a sentence saying where the validation rows come from)."""
    cfg = copy.deepcopy(search.cfg)
    opts = search.options
    cfg.data.eval = opts.validation  # never data.eval: that is the test split
    cfg.training = {**cfg.training, "eval_strategy": "no"}  # reading the data only: no evaluation split needed yet
    if opts.validation is not None:
        train, validation = load_splits(cfg, need_eval=True)
        return train, validation, f"the validation file {opts.validation}"
    train, _ = load_splits(cfg)  # a DatasetDict's own evaluation split is not used either
    try:
        parts = train.train_test_split(test_size=opts.validation_fraction, seed=search.seed)
    except ValueError as exc:
        raise ConfigError(f"tune.validation_fraction: cannot hold out {opts.validation_fraction} of "
                          f"{len(train)} training rows ({exc})") from None
    where = (f"{len(parts['test'])} of the {len(train)} rows of data.train held out "
             f"(validation_fraction {opts.validation_fraction}, seed {search.seed})")
    return parts["train"], parts["test"], where


def signature(search: Search, train: Any, validation: Any) -> dict:
    """What a stored study must have been made with to be continued: the config but ``tune.n_trials``, the data.

    The data are named by their ``datasets`` fingerprints (which change when a data file does).
    """
    config = config_to_dict(search.cfg)
    config["tune"] = {**dataclasses.asdict(search.options), "n_trials": None}
    return {"config": config, "data": [getattr(t, "_fingerprint", None) for t in (train, validation)]}


# -- one run ------------------------------------------------------------------------------------
def run_config(search: Search, run_dir: Path, loss: str, options: dict, alpha: Any, max_steps: int | None) -> RunConfig:
    """The config of a trial (or of a reference run): the user's, on the tuning data, with the trial's choices."""
    cfg = copy.deepcopy(search.cfg)
    cfg.tune = TuneOptions()
    data = search.out / "data"
    cfg.data = dataclasses.replace(cfg.data, train=str(data / "train"), eval=str(data / "validation"),
                                   format="disk", max_train_samples=None, max_eval_samples=None)
    try:
        cfg.distill = dataclasses.replace(cfg.distill, attention_loss=loss, attention_loss_options=options,
                                          alpha=alpha)
    except ValueError as exc:
        raise ConfigError(f"distill.{exc}") from None
    training = {**cfg.training, "output_dir": str(run_dir), "save_strategy": "no",
                "load_best_model_at_end": False, "disable_tqdm": True}
    if max_steps is not None:
        training["max_steps"] = max_steps
    cfg.training = training
    return cfg


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send the run's printed output and ``amad`` log records (below warnings) to ``log``, not the console."""
    log.parent.mkdir(parents=True, exist_ok=True)
    amad_logger = logging.getLogger("amad")
    levels = [(h, h.level) for h in amad_logger.handlers]
    with open(log, "a") as stream, contextlib.redirect_stdout(stream):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        amad_logger.addHandler(handler)
        for h, level in levels:
            h.setLevel(max(level, logging.WARNING))
        try:
            yield
        finally:
            amad_logger.removeHandler(handler)
            for h, level in levels:
                h.setLevel(level)


def _validate(result: Any, run_dir: Path) -> dict[str, float]:
    """The Student saved in ``run_dir``, scored like ``amad evaluate`` on the validation rows."""
    cfg = result.run.cfg
    student = _student_from(result.run, str(run_dir), "trial")
    metrics = evaluate_model(student, result.run.eval, result.run.collator, batch_size=cfg.evaluation.batch_size,
                             max_new_tokens=cfg.evaluation.max_new_tokens, num_beams=cfg.evaluation.num_beams,
                             device=_device(None))
    _write_json(run_dir / "validation_results.json", {"split": "validation", "metrics": metrics})
    return metrics


def reference_alpha(search: Search, loss: str) -> float | list[float]:
    """``distill.alpha`` as numbers for ``loss``: the config's numbers, or what ``"auto"`` measures."""
    alpha = search.cfg.distill.alpha
    if not isinstance(alpha, str):
        return alpha
    steps = search.cfg.distill.alpha_batches
    run_dir = search.out / "reference" / loss
    cfg = run_config(search, run_dir, loss, search.loss_options[loss], alpha, steps)
    with _output_to(run_dir / "train.log"):
        result = run_distillation(cfg, run_dir)
    if not result.distiller.alpha_frozen:
        raise RuntimeError(f"alpha={alpha!r} was not fixed after {steps} step(s) of {loss} (see {run_dir})")
    return [float(a) for a in result.summary["alpha"].values()]


def scaled(reference: float | list[float], factor: float) -> float | list[float]:
    if isinstance(reference, list):
        return factor * reference[0] if len(reference) == 1 else [factor * a for a in reference]
    return factor * reference


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """No per-file progress bars of ``datasets`` and ``transformers`` (saving, loading) between the trial lines."""
    import datasets
    from transformers.utils import logging as hf_logging

    were = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were[0]:
            datasets.enable_progress_bars()
        if were[1]:
            hf_logging.enable_progress_bar()


def best_config(search: Search, best: Row) -> RunConfig:
    """The user's config (data, training budget) with the best trial's loss, alpha and temperature."""
    cfg = copy.deepcopy(search.cfg)
    cfg.tune = TuneOptions()
    options = dict(search.loss_options[best.loss])
    if best.temperature is not None:
        options["temperature"] = best.temperature
    cfg.distill = dataclasses.replace(cfg.distill, attention_loss=best.loss, attention_loss_options=options,
                                      alpha=best.alpha)
    return cfg


def write_reports(search: Search, study: Any, where: str, references: dict) -> Row | None:
    """``tune.md``, the plot and ``best.yaml``; returns the best completed trial (None before the first)."""
    from .plotting import save_figure

    rows = study_rows(study)
    done = [r for r in rows if r.state == "COMPLETE"]
    best = max(done, key=lambda r: (r.value, -r.number)) if done else None
    (search.out / "tune.md").write_text(markdown_report(search, rows, best, where, references))
    save_figure(alpha_figure(rows, search.metric, best), search.out / PLOT)
    if best is not None:
        temperature = "" if best.temperature is None else f", temperature {best.temperature}"
        header = (f"# amad tune: the best of {len(done)} trials (trial {best.number}): validation {search.metric} "
                  f"{best.value:.2f}\n# loss {best.loss}, alpha {best.alpha} (= {best.factor:.4g} x distill.alpha of "
                  f"{search.config_path}){temperature}\n# amad distill best.yaml --out RUN\n")
        text = yaml.safe_dump(config_to_dict(best_config(search, best)), sort_keys=False)
        (search.out / "best.yaml").write_text(header + text)
    return best


def _trial_line(search: Search, row: Row, best: Row | None, done: int) -> str:
    temperature = "" if row.temperature is None else f" temperature {row.temperature:.3g}"
    result = f"{search.metric} {row.value:.2f}" if row.value is not None else row.state.lower()
    best_text = f"; best {best.value:.2f} (trial {best.number})" if best is not None else ""
    return (f"trial {row.number} [{done}/{search.n_trials}] {row.loss} alpha {_short(row.alpha)} "
            f"(x{row.factor:.3g}){temperature} -> {result} ({row.seconds or 0:.1f} s){best_text}")


def _short(alpha: Any) -> str:
    return "[" + ", ".join(f"{a:.3g}" for a in alpha) + "]" if isinstance(alpha, list) else f"{alpha:.3g}"


# -- the command ----------------------------------------------------------------------------------
def _save_split(out: Path, train: Any, validation: Any, fresh: bool) -> None:
    """``DIR/data/{train,validation}``: written for a new study, kept for one that continues."""
    import shutil

    data = out / "data"
    if fresh or not (data / "validation").is_dir():
        shutil.rmtree(data, ignore_errors=True)
        train.save_to_disk(str(data / "train"))
        validation.save_to_disk(str(data / "validation"))


def run_trial(trial: Any, search: Search, references: dict) -> float:
    """The objective: one ``amad distill`` run with the trial's choices, scored on the validation rows."""
    loss, factor, temperature = suggest(trial, search)
    alpha = scaled(references[loss], factor)
    options = dict(search.loss_options[loss], **({} if temperature is None else {"temperature": temperature}))
    run_dir = search.out / "trials" / str(trial.number)
    started = time.time()
    trial.set_user_attr("alpha", alpha)
    trial.set_user_attr("run_dir", str(run_dir))
    with _output_to(run_dir / "train.log"):
        result = run_distillation(run_config(search, run_dir, loss, options, alpha, search.options.max_steps), run_dir)
        metrics = _validate(result, run_dir)
    trial.set_user_attr("metrics", metrics)
    trial.set_user_attr("seconds", round(time.time() - started, 2))
    return metrics[search.metric]


def _references(study: Any, search: Search) -> dict:
    """``distill.alpha`` as numbers for every loss searched: stored in the study, measured once."""
    references = dict(study.user_attrs.get("alpha_reference", {}))
    for loss in search.losses:
        if loss not in references:
            references[loss] = reference_alpha(search, loss)
            study.set_user_attr("alpha_reference", references)
            if isinstance(search.cfg.distill.alpha, str):
                print(f"distill.alpha={search.cfg.distill.alpha!r} for {loss}: {_short(references[loss])} "
                      f"(measured in {search.out / 'reference' / loss})", flush=True)
    return references


def optimize(optuna: Any, study: Any, search: Search, where: str) -> Row | None:
    """Run trials until ``n_trials`` have completed, one progress line and fresh reports after each."""
    references = _references(study, search)

    def after_trial(study: Any, trial: Any) -> None:
        if torch.cuda.is_available():  # after Optuna's gc.collect: the trial's models are gone
            torch.cuda.empty_cache()
        best = write_reports(search, study, where, references)
        done = completed(optuna, study)
        row = next(r for r in study_rows(study) if r.number == trial.number)
        print(_trial_line(search, row, best, done), flush=True)

    complete = completed(optuna, study)
    try:
        if complete < search.n_trials:
            study.optimize(lambda trial: run_trial(trial, search, references), n_trials=search.n_trials - complete,
                           callbacks=[after_trial], gc_after_trial=torch.cuda.is_available())
    except BaseException:
        logger.warning("the study is kept in %s; run the same command again to continue it (failed and "
                       "interrupted trials run again)", search.out / STUDY_DB)
        raise
    finally:
        best = write_reports(search, study, where, references)
    return best


def tune(args: Any, cfg: RunConfig) -> int:
    require_optuna()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out).resolve()
    search = make_search(cfg, str(Path(args.config).resolve()), out)
    with _quiet_progress_bars():
        train, validation, where = split_data(search)
        out.mkdir(parents=True, exist_ok=True)
        with locked(out):
            sampler = make_sampler(optuna, search.options.sampler, search.seed)
            study, storage, fresh = open_study(optuna, out, sampler, signature(search, train, validation))
            _save_split(out, train, validation, fresh)
            queued = recover(optuna, study, storage)
            complete = completed(optuna, study)
            print(f"amad tune: {out / STUDY_DB}: {complete} of {search.n_trials} trials complete"
                  f"{f', {queued} to run again' if queued else ''}; validation: {where}; "
                  f"training: {len(train)} rows; metric: {search.metric}", flush=True)
            best = optimize(optuna, study, search, where)
    if best is None:
        raise RuntimeError(f"no trial completed (see {out / 'tune.md'})")
    temperature = "" if best.temperature is None else f", temperature {best.temperature:.3g}"
    print(f"best: trial {best.number}, {best.loss}, alpha {_short(best.alpha)}{temperature}: validation "
          f"{search.metric} {best.value:.2f}\nwrote {out / 'tune.md'}, {out / PLOT} and {out / 'best.yaml'} "
          f"(amad distill {out / 'best.yaml'} --out RUN)")
    return 0
