"""`distil-search train --num-workers N`: data-parallel distil_core, on gloo directly and on local Ray Train."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny import write_sst2, write_tiny_teacher

ROOT = Path(__file__).parents[1]


def cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def raw_config(tmp_path: Path, n_train: int = 64, **optim) -> dict:
    glue = write_sst2(tmp_path / "glue", n_train=n_train, n_dev=24)
    teacher = write_tiny_teacher(tmp_path / "teacher")
    return {
        "seed": 7,
        "cache_dir": str(tmp_path / "cache"),
        "data": {"task": "sst2", "data_dir": str(glue), "max_length": 16},
        "teacher": {"name": str(teacher), "finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 16}},
        "student": {"num_layers": 1, "hidden_size": 16, "init": "teacher-slice"},  # 16 != 32: a projection too
        "optim": {"lr": 1e-3, "batch_size": 16, "max_steps": 4, "eval_every": 2, **optim},
        "output": {"dir": str(tmp_path / "out")},
    }


def test_bad_worker_counts_give_one_clear_message(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(tmp_path)))
    for args, fragment in ((["--num-workers", "0"], "--num-workers 0"),
                           (["--num-workers", "2", "--gpus-per-worker", "-1"], "--gpus-per-worker -1"),
                           (["--num-workers", "2", "--gpus-per-worker", "0.5"], "whole GPU"),
                           (["--address", "auto"], "--num-workers 2 or more")):
        proc = cli("train", str(cfg), *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert fragment in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_trainer(rank: int, world: int, port: int, raw: dict, artifacts: dict, out: str) -> None:
    """Trainer on prepared tiny data, dropout off; data-parallel when world > 1 (gloo)."""
    from transformers import set_seed

    from distil_core.config import config_from_dict
    from distil_core.recipe import build_run_student, load_prepared, task_evaluator
    from distil_core.trainer import Trainer

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    cfg = config_from_dict(raw)
    prep = load_prepared(cfg, artifacts, torch.device("cpu"))
    set_seed(cfg.seed)
    student, projection = build_run_student(prep)
    for m in student.modules():  # the same dropout masks cannot be drawn on 1 and on 2 ranks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trainer = Trainer(student, task_kind="classification", train_data=prep.train, collate_fn=prep.collate,
                      optim=cfg.optim, loss=cfg.loss, seed=cfg.seed, teacher=prep.signal, projection=projection,
                      evaluate=task_evaluator(prep.task, prep.dev, prep.collate, 64, prep.device),
                      main_metric="accuracy", progress=False, tensorboard=False)
    result = trainer.train()
    if rank == 0:
        torch.save({"student": student.state_dict(), "projection": projection.state_dict(),
                    "result": (result.step, result.examples_per_rank, result.history)}, out)
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_train_like_one_process_on_the_global_batch(tmp_path):
    from distil_core.config import config_from_dict
    from distil_core.recipe import prepare

    # 97 rows, batch 16: every epoch ends on a 1-row micro-batch, so rank 1 then trains on nothing.
    # Every tiny sentence has the same length, so the token-averaged cosine term splits exactly too.
    raw = raw_config(tmp_path, n_train=97, max_steps=8, eval_every=4, grad_accum=2)
    artifacts = prepare(config_from_dict(raw), progress=False).artifacts()
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    threads = torch.get_num_threads()
    try:
        _run_trainer(0, 1, 0, raw, artifacts, one)
    finally:
        torch.set_num_threads(threads)
    torch.multiprocessing.spawn(_run_trainer, args=(2, _free_port(), raw, artifacts, two), nprocs=2)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a["result"][0] == b["result"][0] == 8
    # 16 micro-batches: 14 of 16 rows (8 per rank) and 2 of one row (rank 0's)
    assert a["result"][1] == [14 * 16 + 2] and b["result"][1] == [14 * 8 + 2, 14 * 8]
    for part in ("student", "projection"):
        for k, v in a[part].items():
            assert torch.allclose(v, b[part][k], atol=1e-5), k
    # rank 0 evaluated; the row-weighted loss terms are the single process's
    for ha, hb in zip(a["result"][2], b["result"][2]):
        assert ha["metrics"] == pytest.approx(hb["metrics"], abs=1e-6)
        assert ha["train"]["loss/total"] == pytest.approx(hb["train"]["loss/total"], rel=1e-4)


@pytest.mark.slow
def test_train_cli_on_two_ray_train_workers_and_resume(tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(tmp_path)))
    out = tmp_path / "out"
    proc = cli("train", str(cfg), "--no-progress", "--num-workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "student dev/accuracy" in proc.stdout and "data-parallel on 2 workers" in proc.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 4
    # both ranks trained: 4 steps x 16 rows, half each
    assert summary["data_parallel"] == {"world_size": 2, "examples_per_rank": [32, 32]}
    assert [h["step"] for h in summary["history"]] == [2, 4]
    assert AutoModelForSequenceClassification.from_pretrained(out / "student").config.hidden_size == 16
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes

    # output.dir holds a run: refused before Ray starts
    proc = cli("train", str(cfg), "--no-progress", "--num-workers", "2")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr, proc.stderr

    # as if killed right after the step-2 checkpoint: resuming on 2 workers ends with the same weights
    full = load_file(out / "student" / "model.safetensors")
    for p in (out / "student", out / "checkpoints" / "step-00000004"):
        shutil.rmtree(p)
    (out / "metrics.json").unlink()
    proc = cli("train", str(cfg), "--no-progress", "--num-workers", "2", "--resume")
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["data_parallel"]["examples_per_rank"] == [16, 16]  # steps 3 and 4 only
    assert [h["step"] for h in resumed["history"]] == [2, 4]
    assert resumed["metrics"] == summary["metrics"]
    again = load_file(out / "student" / "model.safetensors")
    for k in full:
        assert torch.equal(full[k], again[k]), k
