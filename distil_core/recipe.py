"""One distillation, end to end: prepare (data, teacher, teacher outputs; all cached) then distil.

`prepare` is what a search runs once before its trials; `distill` is what each trial runs.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import Dataset
from transformers import BertForSequenceClassification, set_seed

from . import data as data_mod
from .config import Config, LossConfig, OptimConfig, save_config
from .errors import UserInputError
from .losses import make_projection
from .student import build_student, describe_student, spec_from_config
from .tasks import Task, compute_metrics, get_task, majority_baseline, prediction_loss
from .teacher import (
    CachedTeacherOutputs,
    LiveTeacher,
    ensure_finetuned,
    load_mlm_teacher,
    load_task_teacher,
    load_tokenizer,
    model_fingerprint,
    resolve_teacher,
    teacher_outputs,
)
from .trainer import Callback, Trainer, TrainResult, dist_info, latest_checkpoint, pick_device, predict

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything a run needs besides the student; cheap to rebuild from the caches."""

    cfg: Config
    task: Task
    tokenizer: Any
    teacher: torch.nn.Module
    teacher_identity: str
    teacher_metrics: dict[str, float]
    train: Any  # tokenized datasets.Dataset
    dev: dict[str, Any]  # split name -> tokenized dataset
    collate: Callable
    signal: Any  # CachedTeacherOutputs or LiveTeacher; None when loaded for evaluation only
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    teacher_path: str = ""  # the folder (or hub id) the teacher loads from, fine-tuned head included

    def artifacts(self) -> dict[str, Any] | None:
        """Paths to what was prepared, for runs that load them instead of preparing again (a search's
        trials); None where they are not all on disk (objective mlm: its teacher runs live)."""
        datasets_ = [self.train, *self.dev.values()]
        if self.cfg.objective != "task" or not all(ds.cache_files for ds in datasets_):
            return None
        return {
            "key": preparation_key(self.cfg),
            "train": self.train.cache_files[0]["filename"],
            "dev": {split: ds.cache_files[0]["filename"] for split, ds in self.dev.items()},
            "teacher": self.teacher_path,
            "teacher_identity": self.teacher_identity,
            "teacher_metrics": self.teacher_metrics,
            "outputs": str(self.signal.folder),
            "hidden": self.signal.hidden is not None,
        }

    def majority_baseline(self) -> dict[str, float] | None:
        """Dev metrics of always predicting this run's most frequent train label: the floor a student must
        clear to have learnt anything. None for regression and for mlm."""
        if self.cfg.objective == "mlm":
            return None
        return majority_baseline(self.task, self.train["labels"], self.dev[self.task.dev_splits[0]]["labels"])

    @property
    def main_metric(self) -> str:
        """The dev metric a run is judged by: the task's; for mlm the probe's (or masked-LM accuracy)."""
        if self.cfg.objective == "mlm":
            return f"probe_{self.task.main_metric}" if "probe" in self.dev else "mlm_accuracy"
        return self.task.main_metric

    @property
    def task_kind(self) -> str:
        if self.cfg.objective == "mlm":
            return "mlm"
        return "regression" if self.task.is_regression else "classification"


def preparation_key(cfg: Config) -> dict[str, Any]:
    """The parts of a config that decide what `prepare` produces."""
    return {"data": dataclasses.asdict(cfg.data), "teacher": dataclasses.asdict(cfg.teacher), "cache": str(cfg.cache_root())}


def load_prepared(cfg: Config, artifacts: dict[str, Any], device: torch.device | None = None) -> Prepared:
    """Prepared from the paths of `Prepared.artifacts()`: memory-mapped datasets and outputs, no re-reading.
    An "outputs" of None (a run that only evaluates, e.g. an export) leaves `signal` None."""
    device = device or pick_device()
    if artifacts["key"] != preparation_key(cfg) or (cfg.loss.alpha_cos > 0 and not artifacts["hidden"]):
        raise ValueError("these artifacts were prepared for another data/teacher config")
    task = get_task(cfg.data.task)
    teacher, _ = load_task_teacher(artifacts["teacher"], task.num_labels, task.is_regression)
    dev = {split: Dataset.from_file(path) for split, path in artifacts["dev"].items()}
    tokenizer = load_tokenizer(artifacts["teacher"])
    return Prepared(cfg, task, tokenizer, teacher.to(device).eval(), artifacts["teacher_identity"],
                    artifacts["teacher_metrics"], Dataset.from_file(artifacts["train"]), dev,
                    data_mod.task_collator(tokenizer),
                    CachedTeacherOutputs(Path(artifacts["outputs"])) if artifacts["outputs"] else None, device,
                    teacher_path=artifacts["teacher"])


def task_evaluator(task: Task, dev: dict[str, Any], collate: Callable, batch_size: int, device) -> Callable:
    """model -> dev metrics and loss; the first dev split's keys are plain, others are prefixed (MNLI
    mismatched)."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, (split, ds) in enumerate(dev.items()):
            logits, labels = predict(model, ds, collate, batch_size, device)
            metrics = {**compute_metrics(task, logits, labels), "loss": prediction_loss(task, logits, labels)}
            out.update(metrics if i == 0 else {f"{split}_{k}": v for k, v in metrics.items()})
        return out

    return evaluate


def mlm_evaluator(heldout, collate: Callable, batch_size: int, device, seed: int) -> Callable:
    """Masked-LM loss and accuracy on a held-out slice, with the same masks at every evaluation."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        total, correct, count = 0.0, 0, 0
        with torch.random.fork_rng(devices=[]):  # fixed masks, and the training RNG is left alone
            torch.manual_seed(seed)
            for start in range(0, len(heldout), batch_size):
                rows = heldout[start : start + batch_size]
                batch = collate([dict(zip(rows, v)) for v in zip(*rows.values())])
                inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "idx")}
                labels = batch["labels"].to(device)
                logits = model(**inputs).logits.float()
                valid = labels != -100
                total += torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum").item()
                correct += (logits[valid].argmax(-1) == labels[valid]).sum().item()
                count += int(valid.sum())
        return {"mlm_loss": total / max(count, 1), "mlm_accuracy": correct / max(count, 1)}

    return evaluate


def probe_evaluator(cfg: Config, task: Task, probe_data: tuple, device) -> Callable:
    """MLM student -> the GLUE dev metrics of a copy of its encoder fine-tuned for probe.steps steps."""
    train, dev, collate = probe_data
    p = cfg.probe
    optim = OptimConfig(lr=p.lr, batch_size=p.batch_size, max_steps=p.steps, eval_every=p.steps, warmup_ratio=0.1)
    hard_only = LossConfig(alpha_kd=0.0, alpha_hard=1.0, alpha_cos=0.0, alpha_mse=0.0)
    evaluate = task_evaluator(task, dev, collate, cfg.optim.eval_batch_size, device)

    def probe(student: torch.nn.Module) -> dict[str, float]:
        config = copy.deepcopy(student.config)
        config.num_labels = task.num_labels
        config.problem_type = "regression" if task.is_regression else "single_label_classification"
        model = BertForSequenceClassification(config)
        model.bert.load_state_dict(student.bert.state_dict(), strict=False)  # the MLM encoder has no pooler
        # The probe must not touch the distillation's RNG stream (exact resume) or its no-grad context.
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(cfg.data.seed)
            result = Trainer(model, task_kind="regression" if task.is_regression else "classification",
                             train_data=train, collate_fn=collate, optim=optim, loss=hard_only, seed=cfg.data.seed,
                             evaluate=evaluate, main_metric=task.main_metric, tensorboard=False, progress=False,
                             device=device, distributed=False).train()
        student.train(False)
        return {f"probe_{k.removeprefix('dev/')}": v for k, v in result.metrics.items()}

    return probe


def _finetune_fn(cfg: Config, task: Task, train, collate, evaluate, device, progress: bool) -> Callable:
    ft = cfg.teacher.finetune
    optim = OptimConfig(lr=ft.lr, batch_size=ft.batch_size, epochs=ft.epochs, max_steps=ft.max_steps,
                        warmup_ratio=ft.warmup_ratio, weight_decay=ft.weight_decay, eval_every=10**9)
    hard_only = LossConfig(alpha_kd=0.0, alpha_hard=1.0, alpha_cos=0.0, alpha_mse=0.0)
    kind = "regression" if task.is_regression else "classification"

    def finetune(model: torch.nn.Module, out_dir: Path) -> dict[str, float]:
        set_seed(ft.seed)
        result = Trainer(model, task_kind=kind, train_data=train, collate_fn=collate, optim=optim, loss=hard_only,
                         seed=ft.seed, evaluate=evaluate, main_metric=task.main_metric, out_dir=out_dir,
                         tensorboard=False, progress=progress, keep_checkpoints=1, device=device,
                         desc="teacher fine-tune", distributed=False).train()
        if result.status != "completed":
            raise UserInputError(f"teacher fine-tuning failed: {result.message}; lower teacher.finetune.lr")
        return {k.removeprefix("dev/"): v for k, v in result.metrics.items()}

    return finetune


def load_task_data(cfg: Config, task: Task, tokenizer, train_limit: int | None) -> tuple[Any, dict[str, Any], Callable]:
    """Tokenized train subset, dev split(s) and the padding collator of a GLUE task (all cached)."""
    tok_dir = str(cfg.cache_root() / "tokenized")
    raw_train = data_mod.load_run_split(cfg.data, "train", train_limit)
    train = data_mod.tokenize_task(raw_train, tokenizer, task, cfg.data.max_length, cache_dir=tok_dir)
    dev = {}
    for split in task.dev_splits:
        raw = data_mod.load_run_split(cfg.data, split, cfg.data.dev_limit)
        dev[split] = data_mod.tokenize_task(raw, tokenizer, task, cfg.data.max_length, cache_dir=tok_dir)
    return train, dev, data_mod.task_collator(tokenizer)


def prepare(cfg: Config, progress: bool = True, device: torch.device | None = None,
            need_hidden: bool | None = None) -> Prepared:
    """Data, teacher and teacher outputs for cfg. need_hidden: cache the teacher's hidden states too
    (default: when cfg's cosine loss is on; a search asks for them when any trial may use them)."""
    device = device or pick_device()
    cache = cfg.cache_root()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = resolve_teacher(cfg.teacher.name)
    tokenizer = load_tokenizer(source)
    task = get_task(cfg.data.task)
    if cfg.objective == "mlm":
        corpus = data_mod.tokenize_corpus(data_mod.load_corpus(cfg.data.corpus), tokenizer, cfg.data.max_length,
                                          cache_dir=str(cache / "tokenized"))
        split = corpus.train_test_split(test_size=min(1000, max(1, len(corpus) // 20)), seed=cfg.data.seed)
        train = data_mod.train_subset(split["train"], cfg.data.train_limit, cfg.data.seed)
        collate = data_mod.mlm_collator(tokenizer, cfg.data.mlm_probability)
        teacher = load_mlm_teacher(source).to(device)
        dev = {"heldout": split["test"]}
        if cfg.probe.steps:
            dev["probe"] = load_task_data(cfg, task, tokenizer, cfg.probe.train_limit)
        timings["data_s"] = time.perf_counter() - t0
        return Prepared(cfg, task, tokenizer, teacher, model_fingerprint(source), {}, train, dev,
                        collate, LiveTeacher(teacher), device, timings)

    train, dev, collate = load_task_data(cfg, task, tokenizer, cfg.data.train_limit)
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    set_seed(cfg.teacher.finetune.seed)  # a new task head is initialised at load: seed it first
    teacher, has_head = load_task_teacher(source, task.num_labels, task.is_regression)
    evaluate = task_evaluator(task, dev, collate, cfg.optim.eval_batch_size, device)
    identity, metrics, teacher_path = model_fingerprint(source), {}, source
    if not has_head:
        ft_train = train
        if cfg.teacher.finetune.train_limit not in (None, cfg.data.train_limit):
            ft_train = load_task_data(cfg, task, tokenizer, cfg.teacher.finetune.train_limit)[0]
        key_parts = {"task": task.name, "train": ft_train._fingerprint, "finetune": vars(cfg.teacher.finetune)}
        done = ensure_finetuned(source, teacher, tokenizer, key_parts, cache,
                                _finetune_fn(cfg, task, ft_train, collate, evaluate, device, progress))
        teacher, identity, teacher_path = done.model, f"finetuned:{done.identity}", done.path
        log.info("teacher %s (%s): %s", "reused from cache" if done.from_cache else "fine-tuned", done.path, done.metrics)
    teacher.to(device).eval()
    timings["teacher_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if need_hidden is None:
        need_hidden = cfg.loss.alpha_cos > 0
    signal = teacher_outputs(teacher, identity, train, collate, cache, need_hidden, device, cfg.optim.eval_batch_size)
    dev_first = next(iter(dev.values()))
    dev_out = teacher_outputs(teacher, identity, dev_first, collate, cache, False, device, cfg.optim.eval_batch_size)
    metrics = compute_metrics(task, dev_out.logits[:].astype("float32"), dev_first["labels"][:])
    timings["teacher_outputs_s"] = time.perf_counter() - t0
    return Prepared(cfg, task, tokenizer, teacher, identity, metrics, train, dev, collate, signal, device, timings,
                    teacher_path)


def build_run_student(prep: Prepared) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    spec = spec_from_config(prep.cfg.student)
    try:
        student = build_student(prep.teacher, spec, num_labels=prep.task.num_labels, mlm=prep.cfg.objective == "mlm")
    except ValueError as e:
        raise UserInputError(str(e)) from None
    projection = None
    if prep.cfg.loss.alpha_cos > 0:
        projection = make_projection(student.config.hidden_size, prep.teacher.config.hidden_size)
    return student, projection


def seeded_student(prep: Prepared) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The run's student and cosine projection, built right after seeding with cfg.seed (as `distill` does)."""
    set_seed(prep.cfg.seed)
    return build_run_student(prep)


def distill(
    cfg: Config,
    prep: Prepared | None = None,
    callbacks: tuple[Callback, ...] = (),
    resume: bool | Path = False,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    save_student: bool = True,
    student: tuple[torch.nn.Module, torch.nn.Module | None] | None = None,
) -> dict[str, Any]:
    """Run one distillation into cfg.output.dir; returns (and writes) metrics.json's content.

    checkpoint_dir: where checkpoints go (default output.dir/checkpoints); a Tune trial keeps them out
    of its synced trial folder, since Tune persists each reported checkpoint itself.
    save_student: write output.dir/student at the end (a trial's last checkpoint already holds it).
    Data-parallel (a torch.distributed process group is up, e.g. on Ray Train): every rank calls this,
    rank 0 alone writes output.dir (on several machines it must be shared storage).
    student: (student, projection) from `seeded_student(prep)`, for a caller that looks at the student
    first (a trial times its latency); the run is the same as when distill builds it.
    """
    wall0 = time.perf_counter()
    out = Path(cfg.output.dir)
    main = dist_info()[0] == 0
    # resume: True = output.dir's last checkpoint; a path = that checkpoint (e.g. one Ray Tune restored)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
    ckpt = resume if isinstance(resume, Path) else (latest_checkpoint(checkpoint_dir) if resume else None)
    if main and not resume and out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserInputError(f"output.dir {out} already holds a run: pass --resume to continue it or --overwrite")
    # Everything that can reject the input runs before output.dir is touched.
    prep = prep or prepare(cfg, progress=progress)
    student, projection = student or seeded_student(prep)
    if main:
        if overwrite and not resume:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if prep.task_kind == "mlm":
        mlm_eval = mlm_evaluator(prep.dev["heldout"], prep.collate, cfg.optim.eval_batch_size, prep.device, cfg.data.seed)
        probe = probe_evaluator(cfg, prep.task, prep.dev["probe"], prep.device) if "probe" in prep.dev else None

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            return {**mlm_eval(model), **(probe(model) if probe else {})}
    else:
        evaluate = task_evaluator(prep.task, prep.dev, prep.collate, cfg.optim.eval_batch_size, prep.device)
    main_metric = prep.main_metric
    trainer = Trainer(student, task_kind=prep.task_kind, train_data=prep.train, collate_fn=prep.collate,
                      optim=cfg.optim, loss=cfg.loss, seed=cfg.seed, evaluate=evaluate, main_metric=main_metric,
                      teacher=prep.signal, projection=projection, out_dir=out, callbacks=callbacks,
                      tensorboard=cfg.output.tensorboard, progress=progress, keep_checkpoints=cfg.output.keep_checkpoints,
                      device=prep.device, checkpoint_dir=checkpoint_dir)
    if trainer.tb:
        for k, v in prep.teacher_metrics.items():
            trainer.tb.add_scalar(f"teacher/dev/{k}", v, 0)
    result: TrainResult = trainer.train(resume_from=ckpt)
    if main and result.status == "completed" and save_student:
        student.save_pretrained(out / "student")
        prep.tokenizer.save_pretrained(out / "student")
    summary = {
        "status": result.status,
        "message": result.message,
        "step": result.step,
        "main_metric": main_metric,
        "metrics": result.metrics,
        "teacher_metrics": {f"dev/{k}": v for k, v in prep.teacher_metrics.items()},
        "majority_class_metrics": {f"dev/{k}": v for k, v in (prep.majority_baseline() or {}).items()},
        "student": describe_student(student, cfg.data.max_length),
        "teacher": describe_student(prep.teacher, cfg.data.max_length),
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - wall0,
        "prepare_seconds": prep.timings,
        "history": result.history,
        # examples_per_rank: rows each rank trained on in this call (a resumed run counts from its resume)
        "data_parallel": {"world_size": result.world_size, "examples_per_rank": result.examples_per_rank},
    }
    if main:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
