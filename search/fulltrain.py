"""`distil-search train --num-workers N`: one distil_core run, data-parallel on Ray Train (TorchTrainer, DDP).

The driver prepares once (data, teacher fine-tune, teacher outputs; all cached) and claims output.dir;
then N workers load what was prepared by path and each runs distil_core's `distill` in the process group
Ray set up (gloo on CPUs, NCCL on GPUs). Rank 0 evaluates and writes output.dir, so on a cluster
output.dir and the cache root must be on storage every node reaches (Ray Train checks output.dir/ray).
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distil_core.errors import UserInputError

if TYPE_CHECKING:  # torch and friends load only once the arguments passed check_scaling
    from distil_core.config import Config


def check_scaling(num_workers: int, gpus_per_worker: float, address: str | None) -> None:
    """Reject bad --num-workers/--gpus-per-worker/--address before anything loads."""
    if num_workers < 1:
        raise UserInputError(f"--num-workers {num_workers}: expected an integer >= 1")
    if gpus_per_worker < 0:
        raise UserInputError(f"--gpus-per-worker {gpus_per_worker:g}: expected a number >= 0")
    if num_workers == 1 and (address or gpus_per_worker):
        raise UserInputError("--address and --gpus-per-worker are for Ray Train runs (--num-workers 2 or more); "
                             "with one worker the run is in-process, on this machine's GPU when it has one")
    if 0 < gpus_per_worker < 1:  # NCCL refuses two ranks on one GPU
        raise UserInputError(f"--gpus-per-worker {gpus_per_worker:g}: each worker needs a whole GPU (or 0 for CPUs)")


def absolute_paths(cfg: Config) -> Config:
    """cfg with its local paths made absolute: Ray Train runs the workers in another working directory."""
    cfg = copy.deepcopy(cfg)
    cfg.output.dir = str(Path(cfg.output.dir).expanduser().resolve())
    cfg.cache_dir = str(cfg.cache_root().resolve())  # also pins $DISTIL_SEARCH_CACHE for the workers
    for name in ("data_dir", "train_file", "dev_file", "corpus"):
        value = getattr(cfg.data, name)
        if value and Path(value).expanduser().exists():
            setattr(cfg.data, name, str(Path(value).expanduser().resolve()))
    if Path(cfg.teacher.name).expanduser().exists():  # a local folder, not a hub id or packaged name
        cfg.teacher.name = str(Path(cfg.teacher.name).expanduser().resolve())
    return cfg


def train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: distil_core's distill in the process group Ray set up; rank 0 returns the summary."""
    import ray.train
    import ray.train.torch

    from distil_core.config import config_from_dict
    from distil_core.recipe import distill, load_prepared, prepare

    cfg = config_from_dict(config["cfg"])
    device = ray.train.torch.get_device()
    artifacts = config["artifacts"]
    # What the driver prepared, by path; objective mlm has none (its teacher runs live): prepare again,
    # from the caches the driver filled.
    prep = load_prepared(cfg, artifacts, device) if artifacts else prepare(cfg, progress=False, device=device)
    # resume=True: the driver has claimed output.dir (cleared it for --overwrite), so this starts fresh or
    # continues from its last checkpoint, also when Ray restarts the workers.
    summary = distill(cfg, prep, resume=True, progress=False)
    return summary if ray.train.get_context().get_world_rank() == 0 else None


def train_on_ray(cfg: Config, num_workers: int, gpus_per_worker: float = 0.0, address: str | None = None,
                 resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run cfg data-parallel on num_workers Ray Train workers (a local Ray unless address); returns
    metrics.json's content. Checkpoints, --resume and --overwrite work as in the in-process run."""
    from distil_core.recipe import build_run_student, prepare

    check_scaling(num_workers, gpus_per_worker, address)
    cfg = absolute_paths(cfg)
    out = Path(cfg.output.dir)
    if not resume and out.exists() and any(out.iterdir()) and not overwrite:
        raise UserInputError(f"output.dir {out} already holds a run: pass --resume to continue it or --overwrite")
    # Everything that can reject the input runs here, once, before output.dir is touched or workers start.
    prep = prepare(cfg, progress=progress)
    build_run_student(prep)
    artifacts = prep.artifacts()
    del prep
    if overwrite and not resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .run import start_ray

    started = start_ray(address)
    try:
        resources = {"CPU": 1, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"cfg": cfg.to_dict(), "artifacts": artifacts},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpus_per_worker > 0,
                                         resources_per_worker=resources),
            # Ray Train's own run folder, in output.dir so that Ray checks at start that every worker's node
            # reaches it; it holds no checkpoints (distil_core's are in output.dir/checkpoints).
            run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(out / "ray")),
        )
        if progress:
            print(f"training on {num_workers} Ray Train workers; TensorBoard: {out / 'tb'}", file=sys.stderr)
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(out / "ray", ignore_errors=True)  # only Ray's storage check marker was in there
    summary = getattr(result, "return_value", None)  # rank 0's return (Ray Train V2); else rank 0's file
    return summary if summary is not None else json.loads((out / "metrics.json").read_text())
