"""Export a search's winner: the student as a save_pretrained folder, its config for full training, a summary.

DIR/student/    from_pretrained folder with tokenizer (weights: the trial's last checkpoint)
DIR/train.yaml  the trial's complete distil_core config with the full-data schedule; `distil-search train` runs it
DIR/summary.json  space, config, metrics, seeds, code version, data and teacher identity, size and latency,
                  the majority-class baseline

The exported student is evaluated again from DIR/student/ and both numbers are recorded, so a broken
export shows up at once. DIR is written whole or not at all. An experiment on object storage is read from
its local mirror, with only the exported trial's last checkpoint downloaded, and the prepared artifacts
from the node cache (search/artifacts.py).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors.torch import load_model

from distil_core.config import Config, OptimConfig, save_config
from distil_core.errors import UserInputError
from distil_core.recipe import build_run_student, task_evaluator
from distil_core.student import describe_student

from .artifacts import prepared_for
from .results import load_meta, resolve_experiment, trial_rows
from .trainable import trial_config


def pick_trial(exp: Path, trial_id: str | None) -> dict[str, Any]:
    """The named trial of an experiment's (local) folder; else the seed-confirmed winner (confirm.json);
    else the best finished trial."""
    rows = trial_rows(exp)
    if trial_id:
        found = [r for r in rows if r["trial_id"] == trial_id]
        if not found:
            raise UserInputError(f"--trial {trial_id}: no such trial in {exp}; trials: {', '.join(r['trial_id'] for r in rows)}")
        return found[0]
    confirm = exp / "confirm.json"
    if confirm.is_file():
        ranking = json.loads(confirm.read_text())
        by_id = {r["trial_id"]: r for r in rows}
        if ranking and ranking[0]["trial_id"] in by_id:
            return by_id[ranking[0]["trial_id"]]
    finished = [r for r in rows if r["status"] == "TERMINATED" and r["main"] is not None]
    if not finished:
        raise UserInputError(f"experiment {exp}: no trial finished; pass --trial ID to export a pruned one")
    return max(finished, key=lambda r: r["main"])


def last_checkpoint(trial_path: str) -> Path:
    found = sorted(Path(trial_path).glob("checkpoint_*"))
    if not found or not (found[-1] / "model.safetensors").is_file():
        raise UserInputError(f"trial folder {trial_path}: no checkpoint with model.safetensors to export")
    return found[-1]


def full_training_config(cfg: Config, out_dir: str) -> Config:
    """The trial's config on the whole train and dev sets, by epochs instead of the search's step budget."""
    full = dataclasses.replace(cfg)
    full.data = dataclasses.replace(cfg.data, train_limit=None, dev_limit=None)
    default = OptimConfig()
    full.optim = dataclasses.replace(cfg.optim, max_steps=None, epochs=cfg.optim.epochs or default.epochs,
                                     eval_every=max(cfg.optim.eval_every, default.eval_every))
    full.output = dataclasses.replace(cfg.output, dir=out_dir)
    return full


def code_version() -> dict[str, str | None]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        version = metadata.version("distil-search")
    except metadata.PackageNotFoundError:
        version = None
    return {"distil_search": version, "git_commit": commit}


def export(ref: str, out: str | Path, storage: str | None = None, trial_id: str | None = None,
           overwrite: bool = False) -> dict[str, Any]:
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserInputError(f"--out {out} is not empty: choose another folder or pass --overwrite")
    located = resolve_experiment(ref, storage)
    exp = located.local
    meta = load_meta(exp)
    row = pick_trial(exp, trial_id)
    located.pull_checkpoint(Path(row["path"]))  # object storage: this trial's last checkpoint only
    ckpt = last_checkpoint(row["path"])
    cfg = trial_config(meta["base"], {"overrides": row["overrides"], **({"seed": row["seed"]} if row["seed"] is not None else {})},
                       out / "trial-run")
    artifacts = meta.get("artifacts")
    prep = prepared_for(cfg, artifacts, located.artifact_store(), training=False)  # evaluates only
    student, _ = build_run_student(prep)
    load_model(student, str(ckpt / "model.safetensors"), device=str(prep.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        labels = prep.task.label_names
        if prep.task_kind != "mlm" and labels:
            student.config.id2label = dict(enumerate(labels))
            student.config.label2id = {name: i for i, name in enumerate(labels)}
        student.save_pretrained(tmp / "student")
        prep.tokenizer.save_pretrained(tmp / "student")
        reproduced = reevaluate(tmp / "student", prep) if prep.task_kind != "mlm" else None
        save_config(full_training_config(cfg, f"runs/{exp.name}-full"), tmp / "train.yaml")
        reported = row["last_result"]
        summary = {
            "experiment": located.uri,
            "trial_id": row["trial_id"],
            "status": row["status"],
            "space": meta["space"],
            "searched": row["overrides"],
            "config": cfg.to_dict(),
            "main_metric": meta["main_metric"],
            "metrics": {k: v for k, v in reported.items() if k.startswith("dev_") or k == "main"},
            "reevaluated": reproduced,
            "step": row["step"],
            "checkpoint": located.where(ckpt),
            "seeds": {"seed": cfg.seed, "data.seed": cfg.data.seed, "teacher.finetune.seed": cfg.teacher.finetune.seed,
                      "tune.seed": meta["tune"]["seed"]},
            "confirm": _confirmed(exp, row["trial_id"]),
            "code": code_version(),
            "data": {"task": cfg.data.task, **dataclasses.asdict(cfg.data), "train_file": artifacts and artifacts["train"],
                     "train_fingerprint": prep.train._fingerprint},
            "teacher": {k: meta["teacher"][k] for k in ("name", "path", "identity", "metrics", "params", "latency_ms")},
            "majority_class": prep.majority_baseline(),  # the constant predictor's dev metrics: the floor
            "student": describe_student(student, cfg.data.max_length),
            "size_and_speed": {k: reported.get(k) for k in ("params", "params_ratio", "latency_ms",
                                                             "teacher_latency_ms", "speedup")},
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = str(out)
    return summary


def reevaluate(student_dir: Path, prep) -> dict[str, float]:
    """The exported folder loaded back as a user would, scored on the trial's dev split."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(student_dir).to(prep.device)
    batch = prep.cfg.optim.eval_batch_size
    metrics = task_evaluator(prep.task, prep.dev, prep.collate, batch, prep.device)(model)
    return {f"dev_{k}": v for k, v in metrics.items()}


def _confirmed(exp: Path, trial_id: str) -> dict[str, Any] | None:
    confirm = exp / "confirm.json"
    if not confirm.is_file():
        return None
    return next((r for r in json.loads(confirm.read_text()) if r["trial_id"] == trial_id), None)
