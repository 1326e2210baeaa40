"""The search: prepare once, then Tuner + OptunaSearch (seeded multivariate TPE, or NSGA-II) + ASHA.

Experiment folder (storage/name): Tune's state and trials, plus distil_search.json (what this search
is, for resume/status/export), optuna.db (the study), summary.json and confirm.json. On object storage
(search/storage.py) Tune writes there itself, and these files are written to the experiment's local
folder and uploaded whenever they change; with the prepared artifacts uploaded too (search/artifacts.py).
search/results.py reads an experiment back (status, report, export, confirmation).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

# The live view replaces Tune's own tables and boxes; a forced state snapshot per checkpoint is expected
# with CheckpointConfig(num_to_keep), so its "excessive sync" hint is noise here.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune's TBX logger writes one hparams experiment per trial; search/tensorboard.py writes one for the
# experiment instead, and run_config() adds the CSV and JSON loggers back.
os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
from ray import tune  # noqa: E402
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from distil_core.config import Config, config_from_dict
from distil_core.errors import UserInputError
from distil_core.recipe import prepare
from distil_core.student import measure_latency_ms
from distil_core.teacher import resolve_teacher

from . import SearchInterrupted
from .artifacts import ArtifactStore, upload
from .results import load_meta, objective_metrics, pareto_front, resolve_experiment, trial_rows
from .space import (SearchSpace, base_config, compile_space, config_of_params, config_point, defaults_point, dotted_get,
                    fix_keys, load_space, searched_keys, space_from_dict)
from .storage import META, Experiment, parse_storage
from .tensorboard import write_experiment_config
from .trainable import RUNG_SCORE, distil_trainable, per_example_schedule

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's group=True
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the live view reports trials instead


@dataclass
class SearchOptions:
    space: str
    name: str | None = None
    storage: str | None = None
    address: str | None = None
    task: str | None = None
    data_dir: str | None = None
    teacher: str | None = None
    cache_dir: str | None = None
    num_samples: int | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_failures: int = 1
    seed: int | None = None
    objectives: list[str] | None = None
    warm_start: str | None = None
    confirm_top_k: int = 0
    seeds: int = 3
    sampler: str = "tpe"  # tpe | random (a baseline)
    defaults_first: bool = True  # the DistilBERT defaults as the first trial
    scheduler: str = "asha"  # asha | fifo (a baseline: every trial runs to the end)
    live: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped early as PRUNED, not COMPLETE.

    Tune calls on_trial_complete for a scheduler-stopped trial with its last result; only a trial that
    reached its final evaluation reports is_final. A pruned trial's last value is reported as an
    intermediate value first, so Optuna records it as the pruned trial's value.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not result or result.get("is_final") or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        if not isinstance(self.metric, list) and result.get(self.metric) is not None:
            ot_trial.report(result[self.metric], result.get("training_iteration", 0))
        self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def num_evaluations(cfg: Config, n_train: int, batches: list[int]) -> int:
    """Evaluations a full trial makes (ASHA's max_t): the most over the batch sizes the space allows, each
    with its per-example schedule (rounding can differ by one)."""
    most = 1
    for batch in batches:
        o = per_example_schedule(cfg.optim, replace(cfg.optim, batch_size=batch))
        micro = math.ceil(n_train / batch)
        steps = o.max_steps or max(1, math.ceil(o.epochs * math.ceil(micro / o.grad_accum)))
        most = max(most, math.ceil(steps / o.eval_every))
    return most


def make_trainable(meta: dict[str, Any], store: ArtifactStore | None = None):
    """store: where trials on nodes without the driver's disk download the prepared artifacts from."""
    t = meta["tune"]
    trainable = tune.with_parameters(distil_trainable, base=meta["base"], artifacts=meta.get("artifacts"), store=store)
    return tune.with_resources(trainable, {"cpu": t["cpus_per_trial"], "gpu": t["gpus_per_trial"]})


def warm_start_points(ref: str, storage: str | None, space: SearchSpace, base: Config, k: int = 3) -> list[dict[str, Any]]:
    """Optuna params of this space for an earlier experiment's best completed trials: each trial's config,
    rebuilt from its params in the earlier space, re-expressed in this one. Trials that agree with the keys
    this search fixes (`--set student.num_layers=3` after a search over depth) come first, best first."""
    from transformers import AutoConfig

    exp = resolve_experiment(ref, storage).local
    then = load_meta(exp)
    study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{exp / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    done.sort(key=lambda t: t.values[0], reverse=True)
    then_space, then_base = space_from_dict(then["space"]), then["base"]  # base: the full config, as saved
    teacher_cfg = AutoConfig.from_pretrained(resolve_teacher(base.teacher.name))
    then_path = Path(then["teacher"]["path"])  # the earlier teacher, where it is still on this machine
    then_teacher = AutoConfig.from_pretrained(then_path) if then_path.is_dir() else teacher_cfg
    configs = [{**{k: dotted_get(then_base, k) for k in space.params},
                **config_of_params(then_space, then_teacher, then_base, t.params)} for t in done]
    now = base.to_dict()
    fixed = [k for k in then_space.params if k not in space.params]
    configs.sort(key=lambda c: all(c.get(key) == dotted_get(now, key) for key in fixed), reverse=True)  # stable
    return [config_point(space, teacher_cfg, base, c) for c in configs[:k]]


def make_scheduler(meta: dict[str, Any]) -> ASHAScheduler | FIFOScheduler:
    """ASHA over a trial's evaluations, ranking by RUNG_SCORE (the main metric, ties broken by dev loss);
    FIFO (every trial runs to the end) for the baseline of bench/search_efficiency.py."""
    t = meta["tune"]
    if t.get("scheduler") == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", metric=RUNG_SCORE, mode="max", max_t=meta["max_evals"],
                         grace_period=min(t["grace_period"], meta["max_evals"]), reduction_factor=t["reduction_factor"])


def build_tuner(meta: dict[str, Any], space: SearchSpace, exp: Experiment, callbacks: list) -> tune.Tuner:
    from transformers import AutoConfig

    t = meta["tune"]
    teacher_cfg = AutoConfig.from_pretrained(meta["teacher"]["path"])
    metrics, modes = objective_metrics(t["objectives"])
    multi = len(metrics) > 1
    if t.get("sampler") == "random":
        sampler = optuna.samplers.RandomSampler(seed=t["seed"])
    elif multi:
        sampler = optuna.samplers.NSGAIISampler(seed=t["seed"])
    else:
        startup = t.get("startup_trials") or min(10, max(4, t["num_samples"] // 3))
        sampler = optuna.samplers.TPESampler(seed=t["seed"], n_startup_trials=startup, multivariate=True, group=True,
                                             constant_liar=True)
    base = config_from_dict(meta["base"])
    points = [defaults_point(space, teacher_cfg, base)] if t.get("defaults_first", True) else []
    points += [p for p in meta.get("warm_points", []) if p not in points]  # the earlier search ran the defaults too
    searcher = PrunedAwareOptunaSearch(space=compile_space(space, teacher_cfg, base), metric=metrics if multi else metrics[0],
                                       mode=modes if multi else modes[0], sampler=sampler, points_to_evaluate=points)
    return tune.Tuner(
        make_trainable(meta, _store(exp, meta)),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(meta), num_samples=t["num_samples"],
                                    max_concurrent_trials=t["max_concurrent"]),
        run_config=run_config(meta, exp.name, _parent(exp.tune_path), callbacks, exp.fs),
    )


def _parent(tune_path: str) -> str:
    return tune_path.rstrip("/").rpartition("/")[0]


def _store(exp: Experiment, meta: dict[str, Any]) -> ArtifactStore | None:
    return exp.artifact_store() if (meta.get("artifacts") or {}).get("remote") else None


def run_config(meta: dict[str, Any], name: str, storage_path: str, callbacks: list, fs=None) -> tune.RunConfig:
    """Keep each trial's last checkpoint, retry failed trials from it, and sync trial folders (TensorBoard
    runs) to the experiment's storage from whichever node ran them. fs: the pyarrow filesystem of object
    storage (storage_path is then BUCKET/PATH), None for a folder."""
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=fs,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=meta["max_failures"]),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        callbacks=[*callbacks, CSVLoggerCallback(), JsonLoggerCallback()],
        verbose=0,
    )


def prepare_search(opts: SearchOptions) -> tuple[SearchSpace, dict[str, Any]]:
    """Read the space, fill every cache the trials read (data, teacher, teacher outputs), describe the search."""
    space = fix_keys(load_space(opts.space), opts.overrides)  # --set on a searched key takes it out of the search
    overrides = dict(opts.overrides)
    for key, value in (("data.task", opts.task), ("data.data_dir", opts.data_dir), ("teacher.name", opts.teacher),
                       ("cache_dir", opts.cache_dir)):
        if value is not None:
            overrides[key] = value
    cfg = base_config(space, overrides)
    if cfg.cache_dir is None:  # trials must find the same caches
        cfg.cache_dir = str(cfg.cache_root())
    keys = searched_keys(space)
    prep = prepare(cfg, progress=opts.live, need_hidden="loss.alpha_cos" in keys or cfg.loss.alpha_cos > 0)
    t = asdict(space.tune)
    for key, value in (("num_samples", opts.num_samples), ("max_concurrent", opts.max_concurrent),
                       ("cpus_per_trial", opts.cpus_per_trial), ("gpus_per_trial", opts.gpus_per_trial),
                       ("seed", opts.seed), ("objectives", opts.objectives), ("sampler", opts.sampler),
                       ("scheduler", opts.scheduler), ("defaults_first", opts.defaults_first)):
        if value is not None:
            t[key] = value
    t["objectives"] = list(t["objectives"])
    batch = space.params.get("optim.batch_size")
    batches = [int(b) for b in ((batch.values() if batch else None) or [cfg.optim.batch_size])]
    meta = {
        "space_file": str(Path(opts.space).resolve()),
        "space": space.raw,
        "searched_keys": keys,
        "base": cfg.to_dict(),
        "tune": t,
        "max_failures": opts.max_failures,
        "max_evals": num_evaluations(cfg, len(prep.train), batches),
        "main_metric": prep.main_metric,
        "teacher": {
            "name": cfg.teacher.name,
            "path": resolve_teacher(cfg.teacher.name),
            "identity": prep.teacher_identity,
            "metrics": prep.teacher_metrics,
            "params": prep.teacher.num_parameters(),
            "latency_ms": measure_latency_ms(prep.teacher, cfg.data.max_length, device=prep.device),
        },
        "majority_class": prep.majority_baseline(),
        "prepare_seconds": prep.timings,
        "artifacts": prep.artifacts(),
        "warm_points": warm_start_points(opts.warm_start, opts.storage, space, cfg) if opts.warm_start else [],
        "confirm_top_k": opts.confirm_top_k,
        "seeds": opts.seeds,
    }
    return space, meta


# ---- running, resuming, summarising ----

def start_ray(address: str | None) -> bool:
    """Connect to a cluster, or start a local Ray; True when this process started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    # Trials' stdout stays in their logs: the driver shows the live view instead of a flood of lines.
    kwargs = {"log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
        return False
    ray.init(include_dashboard=False, **kwargs)
    return True


def save_study(exp: Experiment) -> optuna.Study | None:
    """Copy the searcher's in-memory Optuna study (restored from Tune's searcher state) to optuna.db."""
    searcher = PrunedAwareOptunaSearch()
    try:
        searcher.restore_from_dir(str(exp.local))
    except (FileNotFoundError, RuntimeError):
        return None
    db = exp.local / "optuna.db"
    db.unlink(missing_ok=True)
    optuna.copy_study(from_study_name="optuna", from_storage=searcher._ot_study._storage,
                      to_storage=f"sqlite:///{db}", to_study_name="optuna")
    exp.push(db.name)
    return optuna.load_study(study_name="optuna", storage=f"sqlite:///{db}")


def summarise(exp: Experiment, meta: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """summary.json; wall_seconds adds up every run and resume of the experiment."""
    rows = trial_rows(exp.local)
    finished = [r for r in rows if r["status"] == "TERMINATED" and r["main"] is not None]
    best = max(finished, key=lambda r: r["main"]) if finished else None
    counts = {s: sum(r["status"] == s for r in rows) for s in ("TERMINATED", "PRUNED", "ERROR", "RUNNING", "PENDING")}
    summary = {
        "experiment": exp.uri,
        "main_metric": meta["main_metric"],
        "teacher": meta["teacher"],
        "majority_class": meta.get("majority_class"),  # absent from searches begun before it was recorded
        "trials": len(rows),
        "counts": counts,
        "best": best,
        # points_to_evaluate: the DistilBERT defaults come first
        "defaults_trial": rows[0] if rows and meta["tune"].get("defaults_first", True) else None,
        "pareto": pareto_front(rows, meta["tune"]["objectives"]) if len(meta["tune"]["objectives"]) > 1 else None,
        "wall_seconds": wall_seconds,
    }
    _write(exp, "summary.json", summary)
    return summary


def _write(exp: Experiment, name: str, content: Any) -> None:
    (exp.local / name).write_text(json.dumps(content, indent=2, default=str))
    exp.push(name)


def confirm_rank(entry: dict[str, Any]) -> tuple[bool, float, float]:
    """Sort key (descending) of a confirmed configuration: the higher mean, then the lower std. Means are
    rounded first: on a dev set of n examples, equal counts summed in another order differ in the last bits."""
    return entry["mean"] is not None, round(entry["mean"] or 0.0, 9), -entry["std"]


def confirm_top_k(exp: Experiment, meta: dict[str, Any], k: int, seeds: int, callbacks: list) -> list[dict[str, Any]]:
    """Re-run the top-k finished configurations, and the DistilBERT defaults trial beside them, with `seeds`
    seeds each (the base seed and the next ones); rank by mean (confirm_rank). An interrupted confirmation resumes."""
    import statistics

    rows = trial_rows(exp.local)
    done = [r for r in rows if r["status"] == "TERMINATED" and r["main"] is not None]
    top = sorted(done, key=lambda r: r["main"], reverse=True)[:k]
    if not top:
        return []
    defaults = rows[0] if meta["tune"].get("defaults_first", True) else None
    runs = top + ([defaults] if defaults and defaults["overrides"] not in [r["overrides"] for r in top] else [])
    folder = f"{exp.tune_path}/confirm"
    trainable = make_trainable(meta, _store(exp, meta))
    if tune.Tuner.can_restore(folder, storage_filesystem=exp.fs):
        tuner = tune.Tuner.restore(folder, trainable=trainable, resume_errored=True, storage_filesystem=exp.fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"overrides": tune.grid_search([r["overrides"] for r in runs]),
                         "seed": tune.grid_search([meta["base"]["seed"] + i for i in range(seeds)])},
            tune_config=tune.TuneConfig(max_concurrent_trials=meta["tune"]["max_concurrent"]),
            run_config=run_config(meta, "confirm", exp.tune_path, callbacks, exp.fs),
        )
    tuner.fit()
    exp.pull()
    # Tune's saved state, not the ResultGrid: after a Ctrl-C the grid calls runs never started TERMINATED
    ran = trial_rows(exp.local / "confirm")
    if sum(c["status"] in ("TERMINATED", "ERROR") for c in ran) < len(runs) * seeds:
        raise SearchInterrupted(f"confirmation interrupted; finish it with: distil-search resume {exp.name} "
                                f"--storage {shlex.quote(str(exp.storage))}")
    ranking = []
    for r in runs:
        by_seed = sorted((c["seed"], c["main"]) for c in ran  # restored: any order
                         if c["overrides"] == r["overrides"] and c["status"] == "TERMINATED" and c["main"] is not None)
        values = [v for _, v in by_seed]
        ranking.append({"trial_id": r["trial_id"], "overrides": r["overrides"], "search_value": r["main"],
                        "defaults": defaults is not None and r["overrides"] == defaults["overrides"],
                        "top_k": r in top, "seeds": [s for s, _ in by_seed], "values": values, "mean": statistics.fmean(values) if values else None,
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0})
    ranking.sort(key=confirm_rank, reverse=True)
    _write(exp, "confirm.json", ranking)
    return ranking


def run_search(opts: SearchOptions) -> dict[str, Any]:
    wall0 = time.perf_counter()
    storage = parse_storage(opts.storage)  # checked before the (long) preparation; a bucket: that it exists
    if opts.name:
        _check_new(storage.experiment(opts.name))
    space, meta = prepare_search(opts)
    name = opts.name or f"{Path(opts.space).stem}-{meta['base']['data']['task']}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp = storage.experiment(name)
    _check_new(exp)
    exp.start()
    if exp.remote and meta["artifacts"]:  # trials on nodes without this disk download them (once per node)
        meta["artifacts"] = upload(meta["artifacts"], exp.artifact_store())
    meta.update({"name": name, "storage": str(storage), "address": opts.address})
    write_experiment_config(exp.local, space, list(meta["teacher"]["metrics"]))
    exp.push(*(p.name for p in exp.local.glob("events.out.tfevents*")))
    _write(exp, META, meta)  # last: an experiment with distil_search.json has everything it needs
    return _fit(exp, meta, space, opts.address, opts.live, wall0, tuner=None)


def _check_new(exp: Experiment) -> None:
    if exp.exists():
        raise UserInputError(f"experiment {exp.uri} exists: use `distil-search resume {exp.name}` or another --name")


def resume_search(ref: str, storage: str | None = None, address: str | None = None, live: bool = True) -> dict[str, Any]:
    wall0 = time.perf_counter()
    exp = resolve_experiment(ref, storage)
    meta = load_meta(exp.local)
    space = space_from_dict(meta["space"], meta["space_file"])  # as searched, even if the file changed since
    refill_caches(meta, live)
    previous = exp.local / "summary.json"  # an interrupted run's wall time counts too
    if previous.is_file():
        wall0 -= json.loads(previous.read_text()).get("wall_seconds", 0.0)
    return _fit(exp, meta, space, address or meta.get("address"), live, wall0, tuner="restore")


def local_artifact_paths(artifacts: dict[str, Any]) -> list[str]:
    return [artifacts["train"], *artifacts["dev"].values(), artifacts["outputs"], artifacts["teacher"]]


def refill_caches(meta: dict[str, Any], progress: bool) -> None:
    """Prepare again what a resumed search's trials read from local caches, where any of it is gone (a new
    machine, a cleaned cache). The caches are named by hashes of their inputs, so the same paths come back;
    a teacher whose fine-tuning does not reproduce its recorded dev metrics is reported."""
    artifacts = meta.get("artifacts")
    if not artifacts or artifacts.get("remote"):  # none (objective mlm), or trials fetch them from storage
        return
    paths = local_artifact_paths(artifacts)
    if all(Path(p).exists() for p in paths if Path(p).is_absolute()):  # a hub id (relative) stays as it is
        return
    print("some of this search's prepared caches are gone: preparing them again", file=sys.stderr, flush=True)
    prep = prepare(config_from_dict(meta["base"]), progress=progress, need_hidden=artifacts["hidden"])
    again = prep.artifacts()
    if again is None or local_artifact_paths(again) != paths:
        raise UserInputError(f"the caches prepared again for {meta['name']} are not the ones it was searched on "
                             f"(its data, teacher or cache settings changed): start a new search")
    if again["teacher_metrics"] != artifacts["teacher_metrics"]:
        print(f"warning: the teacher fine-tuned again scores {again['teacher_metrics']}, the search's teacher scored "
              f"{artifacts['teacher_metrics']}: trials run from now on distil a slightly different teacher",
              file=sys.stderr, flush=True)


def _fit(exp: Experiment, meta: dict[str, Any], space: SearchSpace, address: str | None, live: bool, wall0: float,
         tuner: str | None) -> dict[str, Any]:
    from .live import LiveView

    started = start_ray(address)
    try:
        view = LiveView(meta, enabled=live)
        if tuner == "restore":
            t = tune.Tuner.restore(exp.tune_path, trainable=make_trainable(meta, _store(exp, meta)),
                                   resume_errored=True, storage_filesystem=exp.fs)
        else:
            t = build_tuner(meta, space, exp, [view])
        with view:
            t.fit()
        exp.pull()  # object storage: Tune's state and the trials' results, beside this driver's own files
        save_study(exp)
        summary = summarise(exp, meta, time.perf_counter() - wall0)
        c = summary["counts"]
        if summary["trials"] < meta["tune"]["num_samples"] or c["RUNNING"] or c["PENDING"]:
            raise SearchInterrupted(f"search interrupted after {c['TERMINATED'] + c['PRUNED']} of "
                                    f"{meta['tune']['num_samples']} trials; finish it with: distil-search resume "
                                    f"{exp.name} --storage {shlex.quote(str(exp.storage))}")
        if meta.get("confirm_top_k"):
            try:
                with view:
                    summary["confirm"] = confirm_top_k(exp, meta, meta["confirm_top_k"], meta["seeds"], [view])
            finally:  # an interrupted confirmation's time counts too: `resume` adds to it
                summary["wall_seconds"] = time.perf_counter() - wall0
                _write(exp, "summary.json", summary)
        return summary
    finally:
        if started:
            import ray

            ray.shutdown()
