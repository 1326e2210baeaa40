"""The Ray Tune function trainable: one trial = one distil_core run.

Each dev evaluation becomes one `tune.report` with a `tune.Checkpoint`; a restored trial resumes from
`tune.get_checkpoint()`. Data, the fine-tuned teacher and the teacher outputs come from the caches that
the search filled once before the trials (keyed by content hash), so a trial only reads them: in place
where the node has the driver's paths (local Ray, a shared file system), else downloaded once per node
from the experiment's object storage (search/artifacts.py).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from distil_core.config import Config, OptimConfig, apply_overrides, config_from_dict
from distil_core.recipe import distill, seeded_student
from distil_core.student import measure_latencies_ms
from distil_core.trainer import EvalEvent

from . import MAIN
from .artifacts import ArtifactStore, prepared_for
from .tensorboard import TRAINER_RUN, write_trial_session

RUNG_SCORE = "rung_score"  # what ASHA ranks trials by: MAIN, ties broken by the dev loss
SCRATCH_PREFIX = "distil-ckpt-"


def rung_score(main: float, dev_loss: float | None) -> float:
    """MAIN with ties broken by the dev loss (lower is better). Accuracy and Matthews correlation tie
    exactly whenever students still predict only the majority class, and on a tie ASHA's cutoff lets
    every tied trial go on. The loss term stays below 1e-6, under any difference in accuracy that a dev
    set of fewer than a million examples can show (and far under any meaningful one in MCC or Pearson),
    so it orders ties only."""
    if dev_loss is None or not math.isfinite(dev_loss) or dev_loss < 0:
        return main
    return main - 1e-6 * dev_loss / (1.0 + dev_loss)


def trial_scratch() -> Path:
    """A checkpoint scratch folder for this trial, outside the synced trial folder, named by its process. A
    trial that ASHA stops is killed before its `finally` runs: each new trial first removes the folders of
    trials on this node whose process is gone (a 4-layer trial's is ~400 MB)."""
    for old in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = old.name[len(SCRATCH_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


class TrialDiverged(RuntimeError):
    """The loss turned NaN/inf: the trial fails with this reason and the search goes on."""


def trial_config(base: dict[str, Any], config: dict[str, Any], out_dir: Path) -> Config:
    overrides = dict(config.get("overrides", {}))
    if "seed" in config:  # seed re-runs of a configuration
        overrides["seed"] = config["seed"]
    overrides["output.dir"] = str(out_dir)
    cfg = config_from_dict(apply_overrides(base, overrides))
    cfg.optim = per_example_schedule(config_from_dict(base).optim, cfg.optim)
    return cfg


def per_example_schedule(base: OptimConfig, optim: OptimConfig) -> OptimConfig:
    """OPTIM with eval_every (and max_steps) rescaled by the base's batch over its own (batch_size x
    grad_accum), so a trial with a searched batch evaluates, and stops, after as many examples as the base
    config does. ASHA's rungs count evaluations: at one rung every trial has then seen the same data (in
    steps, a batch-16 trial would be judged on half the examples of a batch-32 one)."""
    ratio = (base.batch_size * base.grad_accum) / (optim.batch_size * optim.grad_accum)
    if ratio == 1:
        return optim
    # eval_every rounds up: a remainder of steps would otherwise add one more (short) evaluation than the base's
    return dataclasses.replace(optim, eval_every=max(1, math.ceil(optim.eval_every * ratio)),
                               max_steps=optim.max_steps and max(1, round(optim.max_steps * ratio)))


class TuneReporter:
    """distil_core callback: one tune.report per dev evaluation, with the checkpoint just written."""

    def __init__(self, main_metric: str, static: dict[str, float], started: float):
        self.main_metric, self.static, self.started = main_metric, static, started
        self.report_seconds = 0.0  # the previous tune.report: checkpoint copy, and the wait for the driver

    def on_evaluate(self, event: EvalEvent) -> None:
        metrics = {k.replace("/", "_"): v for k, v in event.metrics.items()}
        metrics.update({f"train_{k.replace('/', '_')}": v for k, v in event.train_logs.items()})
        metrics.update(self.static)
        main = event.metrics[f"dev/{self.main_metric}"]
        metrics.update(
            {
                MAIN: main,
                RUNG_SCORE: rung_score(main, event.metrics.get("dev/loss")),
                "step": event.step,
                "total_steps": event.total_steps,
                "is_final": event.step >= event.total_steps,
                "examples_seen": event.examples_seen,
                "train_seconds": event.train_seconds,
                # where a trial's time goes besides training (bench/trial_overhead.py sums them)
                "eval_seconds": event.eval_seconds,
                "checkpoint_seconds": event.checkpoint_seconds,
                "report_seconds": self.report_seconds,
                "trial_seconds": time.perf_counter() - self.started,
            }
        )
        checkpoint = tune.Checkpoint.from_directory(str(event.checkpoint)) if event.checkpoint else None
        t0 = time.perf_counter()
        tune.report(metrics, checkpoint=checkpoint)
        self.report_seconds = time.perf_counter() - t0


def distil_trainable(config: dict[str, Any], base: dict[str, Any], artifacts: dict[str, Any] | None = None,
                     store: ArtifactStore | None = None) -> None:
    started, started_at = time.perf_counter(), time.time()
    out_dir = Path(tune.get_context().get_trial_dir()) / TRAINER_RUN.split("/")[0]
    cfg = trial_config(base, config, out_dir)
    prep = student = None
    scratch = trial_scratch()
    try:
        prep = prepared_for(cfg, artifacts, store)
        student = seeded_student(prep)  # built once: timed here, then trained
        # Student and teacher timed in turn in this trial's process: same threads, same neighbours, same spikes.
        latency, teacher_latency = measure_latencies_ms([student[0], prep.teacher], cfg.data.max_length,
                                                        repeats=10, device=prep.device)
        size = student[0].num_parameters()
        main_metric = prep.main_metric
        static = {
            "latency_ms": latency,
            "teacher_latency_ms": teacher_latency,
            "speedup": teacher_latency / latency,
            "params": size,
            "params_ratio": size / prep.teacher.num_parameters(),
            "started_at": started_at,  # wall clock, to see which trials ran at the same time
            "setup_seconds": time.perf_counter() - started,  # caches loaded, student built, latencies timed
            # which Ray node ran this (attempt of the) trial: a retried trial may move to another node
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
        }
        if cfg.output.tensorboard:
            hparams = {**config.get("overrides", {}), **({"seed": config["seed"]} if "seed" in config else {})}
            write_trial_session(out_dir.parent, tune.get_context().get_trial_id(), hparams, static)
        reporter = TuneReporter(main_metric, static, started)
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt_dir:
                summary = distill(cfg, prep, callbacks=(reporter,), resume=Path(ckpt_dir), progress=False,
                                  checkpoint_dir=scratch, save_student=False, student=student)
        else:
            summary = distill(cfg, prep, callbacks=(reporter,), overwrite=True, progress=False,
                              checkpoint_dir=scratch, save_student=False, student=student)
        if summary["status"] != "completed":
            raise TrialDiverged(summary["message"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        del prep, student
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
