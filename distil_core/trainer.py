"""The training loop: AdamW + linear warmup/decay, clipping, accumulation, bf16 on CUDA,
evaluation with callbacks, TensorBoard scalars, exact-resume checkpoints.

The same loop fine-tunes a teacher (no teacher outputs, hard loss only) and distils a student.
Data-parallel when a torch.distributed process group is up (Ray Train sets one up; this module never
imports ray): DDP, each rank trains on its share of every micro-batch, rank 0 evaluates and writes.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from transformers import get_linear_schedule_with_warmup

from .config import LossConfig, OptimConfig
from .losses import LossWeights, combine_losses

Batch = dict[str, torch.Tensor]


class TeacherSignal(Protocol):
    """Where the teacher's logits/hidden states for a batch come from (a cache or a live model)."""

    def outputs(self, batch: Batch, need_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass
class EvalEvent:
    step: int
    total_steps: int
    epoch: float
    metrics: dict[str, float]  # dev metrics, prefixed "dev/"
    train_logs: dict[str, float]  # mean loss terms since the last evaluation
    checkpoint: Path | None
    train_seconds: float
    examples_seen: int
    eval_seconds: float = 0.0  # this evaluation's dev pass
    checkpoint_seconds: float = 0.0  # and its checkpoint's save


class Callback(Protocol):
    def on_evaluate(self, event: EvalEvent) -> None: ...


@dataclass
class TrainResult:
    status: str  # "completed" or "diverged"
    step: int
    metrics: dict[str, float] = field(default_factory=dict)  # last dev evaluation
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    message: str = ""
    world_size: int = 1
    examples_per_rank: list[int] = field(default_factory=list)  # rows each rank trained on in this call


class NonFiniteLossError(RuntimeError):
    pass


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    # bf16 autocast where the hardware has it; full fp32 on the CPU keeps runs reproducible.
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def rows_to_batch(dataset, indices: list[int], collate_fn: Callable) -> Batch:
    cols = dataset[indices]
    return collate_fn([dict(zip(cols, vals)) for vals in zip(*cols.values())])


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        task_kind: str,  # "classification" | "regression" | "mlm"
        train_data,
        collate_fn: Callable,
        optim: OptimConfig,
        loss: LossConfig,
        seed: int,
        evaluate: Callable[[torch.nn.Module], dict[str, float]],
        main_metric: str,
        teacher: TeacherSignal | None = None,
        projection: torch.nn.Module | None = None,
        out_dir: Path | None = None,
        callbacks: tuple[Callback, ...] = (),
        tensorboard: bool = True,
        progress: bool = True,
        keep_checkpoints: int = 2,
        device: torch.device | None = None,
        desc: str = "distil",
        checkpoint_dir: Path | None = None,
        distributed: bool = True,  # False: stay single-process inside a process group (probe, teacher fine-tune)
    ):
        self.device = device or pick_device()
        self.model = model.to(self.device)
        self.projection = projection.to(self.device) if projection is not None else None
        self.rank, self.world = dist_info() if distributed else (0, 1)
        self.is_main = self.rank == 0
        self.task_kind, self.train_data, self.collate_fn = task_kind, train_data, collate_fn
        self.optim_cfg, self.loss_cfg, self.seed = optim, loss, seed
        self.weights = LossWeights(loss.alpha_kd, loss.alpha_hard, loss.alpha_cos, loss.alpha_mse)
        if teacher is None and (self.weights.alpha_kd or self.weights.alpha_cos or self.weights.alpha_mse):
            raise ValueError("teacher terms have weight > 0 but no teacher was given")
        self.teacher, self.evaluate_fn, self.main_metric = teacher, evaluate, main_metric
        self.out_dir = Path(out_dir) if out_dir else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else (self.out_dir / "checkpoints" if out_dir else None)
        self.callbacks, self.progress, self.keep, self.desc = callbacks, progress, keep_checkpoints, desc
        self.tb = None
        if tensorboard and self.out_dir and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tb"))

        n = len(train_data)
        self.micro_per_epoch = math.ceil(n / optim.batch_size)
        steps_per_epoch = math.ceil(self.micro_per_epoch / optim.grad_accum)
        self.total_steps = optim.max_steps or max(1, math.ceil(optim.epochs * steps_per_epoch))
        params = list(self.model.parameters()) + (list(self.projection.parameters()) if self.projection else [])
        self.params = params
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # biases and LayerNorms, as BERT does
        # torch's fused kernel: on the CPU its default is a per-tensor loop, about 6x slower (bench/optimizer.py)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr, fused=fused or None,
        )
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(optim.warmup_ratio * self.total_steps), self.total_steps
        )
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.examples_per_rank = [0] * self.world
        self.net = self.model  # what the training step runs: the DDP wrapper when data-parallel
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's weights now and averages gradients in backward. BERT's buffers are
            # constants: no per-forward broadcast.
            ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
            self.net = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
            for p in self.projection.parameters() if self.projection is not None else ():
                torch.distributed.broadcast(p.data, src=0)  # the projection is outside DDP: synced by hand

    # ---- data order: a pure function of (seed, epoch), so resuming needs only the step ----
    def _micro_batch(self, micro: int) -> tuple[Batch, int]:
        """The micro-batch's rows for this rank, and how many of them count (0: a stand-in row)."""
        epoch, pos = divmod(micro, self.micro_per_epoch)
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.seed + epoch))
        bs = self.optim_cfg.batch_size
        idx = order[pos * bs : (pos + 1) * bs]
        rows = len(idx)
        if self.world > 1:
            # optim.batch_size is the global micro-batch: rank r takes the r-th contiguous share of the
            # same global order, so steps, schedule and checkpoints match a single-process run.
            share = idx.tensor_split(self.world)[self.rank]
            rows = len(share)
            idx = share if rows else idx[:1]  # an empty share still runs forward/backward (DDP), at weight 0
        batch = rows_to_batch(self.train_data, idx.tolist(), self.collate_fn)
        return {k: v.to(self.device) for k, v in batch.items()}, rows

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        need_hidden = self.weights.alpha_cos > 0
        teacher_logits = teacher_hidden = None
        if self.teacher is not None:
            with torch.no_grad(), autocast(self.device):
                teacher_logits, teacher_hidden = self.teacher.outputs(batch, need_hidden)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
        with autocast(self.device):
            out = self.net(**inputs, output_hidden_states=need_hidden)
        labels = batch["labels"]
        return combine_losses(
            self.weights,
            task_kind=self.task_kind,
            temperature=self.loss_cfg.temperature,
            student_logits=out.logits,
            labels=labels,
            teacher_logits=teacher_logits,
            student_hidden=out.hidden_states[-1] if need_hidden else None,
            teacher_hidden=teacher_hidden,
            attention_mask=batch["attention_mask"],
            projection=self.projection,
            kd_mask=(labels != -100) if self.task_kind == "mlm" else None,
        )

    def _train_step(self) -> dict[str, float]:
        self.net.train()
        accum = self.optim_cfg.grad_accum
        sums: dict[str, float] = {}
        for k in range(accum):
            # DDP all-reduces gradients in the step's last micro-batch only (its forward included)
            sync = self.world == 1 or k == accum - 1
            with contextlib.nullcontext() if sync else self.net.no_sync():
                batch, rows = self._micro_batch(self.step * accum + k)
                loss, logs = self._loss(batch)
                if self.world > 1:
                    loss, logs = self._sync_micro(loss, logs, rows)
                elif not torch.isfinite(loss):
                    terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
                    raise NonFiniteLossError(f"loss is {loss.item()} at step {self.step + 1} ({terms})")
                else:
                    self.examples_per_rank[0] += rows
                (loss / accum).backward()
            for name, v in logs.items():
                sums[name] = sums.get(name, 0.0) + v / accum
        if self.world > 1 and self.projection is not None:
            for p in self.projection.parameters():  # the mean over ranks, as DDP does for the student
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world
        clip = self.optim_cfg.grad_clip or float("inf")
        sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        sums["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return sums

    def _sync_micro(self, loss: torch.Tensor, logs: dict[str, float], rows: int
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Data-parallel: one all-reduce per micro-batch tells every rank whether any rank's loss is not
        finite (all stop together, before a backward that would wait on the others), each rank's rows and
        the row-weighted loss terms; the loss is scaled so DDP's mean over ranks is the global row mean
        (exact for row-averaged terms; token-averaged ones, cosine and MLM, are weighted by rows too)."""
        keys = sorted(logs)
        local_bad = not bool(torch.isfinite(loss))
        stats = torch.zeros(1 + self.world + len(keys), dtype=torch.float64)
        stats[0] = float(local_bad)
        stats[1 + self.rank] = rows
        stats[1 + self.world :] = torch.tensor([logs[k] * rows for k in keys], dtype=torch.float64)
        stats = stats.to(self.device)  # NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(stats)
        stats = stats.cpu()
        if stats[0] > 0:
            where = ", ".join(f"{k}={v:.4g}" for k, v in logs.items()) if local_bad else "on another rank"
            raise NonFiniteLossError(f"loss is not finite at step {self.step + 1} ({where})")
        per_rank = [int(n) for n in stats[1 : 1 + self.world]]
        total = sum(per_rank)
        self.examples_per_rank = [a + b for a, b in zip(self.examples_per_rank, per_rank)]
        mean_logs = {k: float(v) / total for k, v in zip(keys, stats[1 + self.world :])}
        return loss * (rows * self.world / total), mean_logs

    def train(self, resume_from: Path | None = None) -> TrainResult:
        if self.world > 1:  # every rank resumes from rank 0's pick
            box = [resume_from]
            torch.distributed.broadcast_object_list(box, src=0)
            resume_from = box[0]
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        bar = None
        if self.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True)
        window: dict[str, float] = {}
        window_n, metrics = 0, (self.history[-1]["metrics"] if self.history else {})
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                logs = self._train_step()
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                examples = self.optim_cfg.batch_size * self.optim_cfg.grad_accum
                logs["examples_per_s"] = examples / dt
                for k, v in logs.items():
                    window[k] = window.get(k, 0.0) + v
                window_n += 1
                if self.tb:
                    for k, v in logs.items():
                        self.tb.add_scalar(k if "/" in k else f"train/{k}", v, self.step)
                if self.step % self.optim_cfg.eval_every == 0 or self.step == self.total_steps:
                    metrics = self._evaluate_and_checkpoint({k: v / window_n for k, v in window.items()})
                    window, window_n = {}, 0
                if bar:  # after the evaluation, so the last step shows the final dev metric
                    dev = metrics.get(f"dev/{self.main_metric}")
                    bar.set_postfix(loss=f"{logs['loss/total']:.3f}",
                                    **({self.main_metric: f"{dev:.4f}"} if dev is not None else {}))
                    bar.update(1)
        except NonFiniteLossError as e:
            return self._finish(TrainResult("diverged", self.step, metrics, self.history, self.train_seconds, str(e)))
        finally:
            if bar:
                bar.close()
        return self._finish(TrainResult("completed", self.step, metrics, self.history, self.train_seconds))

    def _finish(self, result: TrainResult) -> TrainResult:
        result.world_size, result.examples_per_rank = self.world, list(self.examples_per_rank)
        if self.tb:
            self.tb.flush()
            self.tb.close()
        return result

    def _evaluate_and_checkpoint(self, train_logs: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return self._evaluate_and_checkpoint_main(train_logs)
        # Data-parallel: rank 0 evaluates, writes and checkpoints (with every rank's RNG state); the
        # others wait, and their metrics stay empty.
        rank_rng = self._gather_rng() if self.checkpoint_dir else None
        metrics = self._evaluate_and_checkpoint_main(train_logs, rank_rng) if self.is_main else {}
        torch.distributed.barrier()
        return metrics

    def _gather_rng(self) -> list:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        states: list = [None] * self.world
        torch.distributed.all_gather_object(states, (torch.get_rng_state(), cuda))
        return states

    def _evaluate_and_checkpoint_main(self, train_logs: dict[str, float],
                                      rank_rng: list | None = None) -> dict[str, float]:
        t0 = time.perf_counter()
        self.model.eval()
        with torch.no_grad(), autocast(self.device):
            metrics = {f"dev/{k}": float(v) for k, v in self.evaluate_fn(self.model).items()}
        eval_seconds = time.perf_counter() - t0
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, self.step)
            self.tb.flush()
        epoch = self.step * self.optim_cfg.grad_accum / self.micro_per_epoch
        examples = self.step * self.optim_cfg.batch_size * self.optim_cfg.grad_accum
        self.history.append({"step": self.step, "epoch": epoch, "metrics": metrics, "train": train_logs,
                             "train_seconds": self.train_seconds})
        t0 = time.perf_counter()
        ckpt = self.save_checkpoint(rank_rng) if self.checkpoint_dir else None
        event = EvalEvent(self.step, self.total_steps, epoch, metrics, train_logs, ckpt, self.train_seconds, examples,
                          eval_seconds, time.perf_counter() - t0)
        for cb in self.callbacks:
            cb.on_evaluate(event)
        return metrics

    # ---- checkpoints: safetensors weights; optimizer, scheduler and RNG state; exact resume ----
    def save_checkpoint(self, rank_rng: list | None = None) -> Path:
        root = self.checkpoint_dir
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-step-{self.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.model, str(tmp / "model.safetensors"))
        if self.projection is not None:
            save_model(self.projection, str(tmp / "projection.safetensors"))
        opt_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        if rank_rng is not None:
            opt_state["rank_rng"] = rank_rng  # (torch, cuda) RNG state of each rank: exact data-parallel resume
        torch.save(opt_state, tmp / "optimizer.pt")
        np_state = np.random.get_state()
        state = {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "history": self.history,
            "python_rng": _jsonable(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint folder is complete or absent
        for old in sorted(root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        path = Path(path)
        load_model(self.model, str(path / "model.safetensors"), device=str(self.device))
        if self.projection is not None:
            load_model(self.projection, str(path / "projection.safetensors"), device=str(self.device))
        state = torch.load(path / "optimizer.pt", weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        if len(state.get("rank_rng") or []) == self.world > 1:  # same world size: each rank its own stream
            cpu_rng, cuda_rng = state["rank_rng"][self.rank]
            torch.set_rng_state(cpu_rng.cpu())
            if cuda_rng is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng.cpu(), self.device)
        meta = json.loads((path / "trainer_state.json").read_text())
        self.step, self.train_seconds, self.history = meta["step"], meta["train_seconds"], meta["history"]
        random.setstate(_tupled(meta["python_rng"]))
        np_rng = meta["numpy_rng"]
        np.random.set_state((np_rng[0], np.array(np_rng[1], dtype=np.uint32), *np_rng[2:]))


def forward_batches(model, data, collate_fn: Callable, batch_size: int, device: torch.device, need_hidden: bool = False):
    """Eval-mode forward over a dataset, shortest rows first (less padding): yields (rows, batch, logits,
    last hidden or None) on the CPU, where rows are the batch's row positions in `data`."""
    model.eval()
    order = np.argsort([len(x) for x in data["input_ids"]], kind="stable")
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(data), batch_size):
            rows = order[start : start + batch_size].tolist()
            batch = rows_to_batch(data, rows, collate_fn)
            inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "idx")}
            out = model(**inputs, output_hidden_states=need_hidden)
            hidden = out.hidden_states[-1].float().cpu() if need_hidden else None
            yield rows, batch, out.logits.float().cpu(), hidden


def predict(model, data, collate_fn: Callable, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for a whole split, in the split's row order."""
    logits = labels = None
    for rows, batch, out, _ in forward_batches(model, data, collate_fn, batch_size, device):
        if logits is None:
            logits = np.zeros((len(data), *out.shape[1:]), dtype=np.float32)
            labels = np.zeros((len(data), *batch["labels"].shape[1:]), dtype=batch["labels"].numpy().dtype)
        logits[rows], labels[rows] = out.numpy(), batch["labels"].numpy()
    return logits, labels


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = sorted(Path(checkpoint_dir).glob("step-*"))
    return found[-1] if found else None


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, tuple) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x
