"""The Optuna study of ``amad tune`` in ``DIR/study.db``: opened only with the configuration it was made with,
resumed (trials left failed or running are queued again with their parameters), one process at a time."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

from .run_dir import exclusive_lock
from .tune_report import Row
from .typed import ConfigError

__all__ = ["STUDY_DB", "STUDY_NAME", "make_sampler", "open_study", "recover", "locked", "study_rows", "completed"]

STUDY_DB = "study.db"
STUDY_NAME = "amad-tune"


def make_sampler(optuna: Any, kind: str, seed: int) -> Any:
    """``tpe``: Optuna's TPESampler; ``grid``: BruteForceSampler, every point of the conditional grid once."""
    if kind == "grid":
        with warnings.catch_warnings():  # experimental in Optuna, and the tool for a conditional grid
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.BruteForceSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _differences(a: Any, b: Any, key: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{key}.{k}".strip("."))]
    return [] if a == b else [key or "(all)"]


def open_study(optuna: Any, out: Path, sampler: Any, signature: dict) -> tuple[Any, Any, bool]:
    """Create or load the study in ``out/study.db``; returns (study, storage, whether it is new).

    ``signature`` (``{"config": ..., "data": ...}``, plain JSON data) is stored with a new study; a
    stored study whose signature differs is refused, naming the keys that differ.
    """
    signature = json.loads(json.dumps(signature, default=str))
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / STUDY_DB}")
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, direction="maximize",
                                load_if_exists=True)
    stored = study.user_attrs.get("signature")
    if stored is None:
        study.set_user_attr("signature", signature)
    elif stored != signature:
        keys = ", ".join(dict.fromkeys(k.removeprefix("config.") if not k.startswith("data") else "the data files"
                                       for k in _differences(stored, signature)))
        raise ConfigError(f"--out: {out / STUDY_DB} holds a study of another configuration (differs in: {keys}); "
                          "continue it with the same config and data, or tune into a new --out")
    return study, storage, stored is None


def recover(optuna: Any, study: Any, storage: Any) -> int:
    """Fail trials left running by a killed process, queue every failed trial again; returns how many were queued.

    A queued trial has the failed one's parameters and ``user_attrs["retry_of"]`` = its number, so each
    failure is queued once.
    """
    state = optuna.trial.TrialState
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, state.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = 0
    for trial in trials:
        if trial.state == state.FAIL and trial.number not in retried and "alpha_factor" in trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            queued += 1
    return queued


def locked(out: Path) -> contextlib.AbstractContextManager[None]:
    """One ``amad tune`` per directory at a time (so a trial found running is surely stale)."""
    return exclusive_lock(out / ".tune.lock", f"--out: another amad tune is running on {out}")


def completed(optuna: Any, study: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def study_rows(study: Any) -> list[Row]:
    """Every trial, as the report shows it."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        rows.append(Row(t.number, t.state.name, t.params.get("loss"), t.params.get("alpha_factor"),
                        attrs.get("alpha"), t.params.get("temperature"), t.value, attrs.get("seconds"),
                        attrs.get("retry_of")))
    return rows
