"""Reading an experiment, live or finished: its folder, distil_search.json, and one row per trial from
Tune's saved state (PRUNED for ASHA-stopped trials); the Pareto front of the finished ones."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from distil_core.errors import UserInputError

from . import MAIN
from .storage import META, Experiment, find_experiment

T = TypeVar("T")

# Reading an experiment (status, and Tuner.restore on resume) warns once per trial that has not reported
# yet, with a FileNotFoundError each: pending trials are expected there.
logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

# latency: the student's speed-up over the teacher timed beside it in the same trial; a trial's milliseconds
# move with the machine's load (on SST-2 the teacher timed 40-127 ms across one search's trials)
OBJECTIVE_METRICS = {"main": (MAIN, "max"), "latency": ("speedup", "max"), "params": ("params", "min")}


def resolve_experiment(ref: str, storage: str | None = None, pull: bool = True) -> Experiment:
    """A name under --storage, an experiment folder or URI. pull: an experiment on object storage is first
    mirrored into its local folder (all but checkpoints, artifacts and event files)."""
    exp = find_experiment(ref, storage)
    if pull:
        exp.pull()
    return exp


def load_meta(exp: Path) -> dict[str, Any]:
    """distil_search.json of an experiment's (local) folder."""
    return json.loads((Path(exp) / META).read_text())


def majority_floor(meta: dict[str, Any]) -> float | None:
    """The majority-class baseline's main metric from distil_search.json or summary.json; None for
    regression, mlm, and searches begun before it was recorded."""
    return (meta.get("majority_class") or {}).get(meta["main_metric"])


def objective_metrics(names: list[str]) -> tuple[list[str], list[str]]:
    """The reported metrics and Tune modes of the objectives a space names (main first)."""
    bad = [n for n in names if n not in OBJECTIVE_METRICS]
    if bad or not names or names[0] != "main":
        raise UserInputError(f"objectives {names}: expected 'main' first, then any of latency, params")
    return [OBJECTIVE_METRICS[n][0] for n in names], [OBJECTIVE_METRICS[n][1] for n in names]


def trial_rows(exp: Path | str) -> list[dict[str, Any]]:
    """One row per trial from Tune's state in an experiment's (local) folder: status (PRUNED for
    ASHA-stopped), overrides, last/best main."""
    from ray.tune import ExperimentAnalysis

    exp = Path(exp)
    state = tune_state_file(exp)
    saved, analysis = read_half_written_retrying(
        lambda: (saved_statuses(state) if state else {}, ExperimentAnalysis(str(state or exp))))
    rows = []
    # experiment_tag starts with the trial's creation index: the DistilBERT defaults trial is index 1
    for trial in sorted(analysis.trials, key=lambda t: int(str(t.experiment_tag).split("_")[0] or 0)):
        last = trial.last_result or {}
        history = analysis.trial_dataframes.get(trial.trial_id)
        best = float(history[MAIN].max()) if history is not None and MAIN in history else None
        status = saved.get(trial.trial_id, trial.status)
        if status == "TERMINATED" and not last.get("is_final"):
            status = "PRUNED"
        rows.append({
            "trial_id": trial.trial_id,
            "status": status,
            "overrides": (trial.config or {}).get("overrides", {}),
            "seed": (trial.config or {}).get("seed"),
            "main": last.get(MAIN),
            "best_main": best,
            "step": last.get("step"),
            "total_steps": last.get("total_steps"),
            "evaluations": last.get("training_iteration"),
            "latency_ms": last.get("latency_ms"),
            "teacher_latency_ms": last.get("teacher_latency_ms"),
            "speedup": last.get("speedup"),
            "params": last.get("params"),
            "train_seconds": last.get("train_seconds"),
            "trial_seconds": last.get("trial_seconds"),
            "error": str(trial.error_file) if status == "ERROR" else None,
            "path": trial.path,
            "last_result": {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool))},
        })
    return rows


def tune_state_file(exp: Path) -> Path | None:
    """Tune's newest experiment state in a (local) experiment folder; Tune picks it the same way (max name)."""
    states = sorted(exp.glob("experiment_state-*.json"))
    return states[-1] if states else None


def read_half_written_retrying(read: Callable[[], T]) -> T:
    """read() of a live search's state: Tune rewrites the file in place, so a read can catch it
    half-written (json.JSONDecodeError, a ValueError); retried for up to 2 s."""
    for _ in range(9):
        try:
            return read()
        except ValueError:
            time.sleep(0.2)
    return read()


def saved_statuses(state_file: Path) -> dict[str, str]:
    """trial id -> status as Tune saved it. Ray's loader turns RUNNING into PENDING (ready for a restore),
    which a table read while the search runs must not show."""
    state = json.loads(state_file.read_text())
    try:
        return {t["trial_id"]: t["status"] for t in (json.loads(s) for s, _ in state["trial_data"])}
    except (ValueError, KeyError, TypeError):  # another Ray's layout: Ray's own view
        return {}


def pareto_front(rows: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    """Completed trials no other completed trial beats on every objective."""
    metrics, modes = objective_metrics(objectives)
    done = [r for r in rows if r["status"] == "TERMINATED"]

    def key(r):
        return [(r["last_result"].get(m) or 0) * (1 if mode == "max" else -1) for m, mode in zip(metrics, modes)]

    return [r for r in done if not any(all(a >= b for a, b in zip(key(o), key(r))) and key(o) != key(r) for o in done)]
