"""Experiments on object storage, against a real S3-compatible server on loopback (moto's ThreadedMotoServer).

One tiny search runs with --storage s3://... in a CLI child process (its local Ray's workers inherit the test's
AWS_* credentials from it); the slow tests read that one experiment: the bucket holds everything, a node
without the driver's caches downloads the prepared artifacts, and `status` / `export` read the bucket from a
fresh mirror, as another machine would. Bad URIs fail before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from distil_core.errors import UserInputError
from test_search import ROOT, write_space

BUCKET = "distil"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}  # no instance-metadata lookups on this machine


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server on 127.0.0.1 with one bucket, these credentials in the environment, and a fresh
    $XDG_CACHE_HOME (mirrors and the node cache), all for this module only."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = pytest.MonkeyPatch()
    try:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        env.delenv("AWS_PROFILE", raising=False)
        env.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        client.create_bucket(Bucket=BUCKET)

        def uri(path: str, bucket: str = BUCKET) -> str:
            return f"s3://{bucket}/{path}?endpoint_override=127.0.0.1:{port}&scheme=http"

        yield SimpleNamespace(port=port, client=client, uri=uri)
    finally:
        env.undo()
        server.stop()


def keys(s3, prefix: str = "") -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment (credentials, cache) for a CLI child, without RAY_* (it starts its own Ray)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", **extra)
    return env


def cli(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env), cwd=ROOT)


@contextmanager
def away(folder: Path):
    """The folder renamed for a while: a node that lacks the driver's paths."""
    moved = folder.with_name(folder.name + "-away")
    folder.rename(moved)
    try:
        yield moved
    finally:
        moved.rename(folder)


# ------------------------------------------------------------------------------ bad URIs (fast)
@pytest.mark.parametrize("uri", ["http://example.com/x", "ftp://host/x", "s3://", "file://otherhost/x"])
def test_storage_that_is_neither_folder_nor_object_storage_is_one_clear_error(tmp_path, uri):
    from search.results import resolve_experiment
    from search.run import SearchOptions, run_search

    with pytest.raises(UserInputError, match=r"^--storage .*expected a folder .* s3://BUCKET/PATH or gs://BUCKET/PATH"):
        run_search(SearchOptions(space=str(tmp_path / "no-such-space.yaml"), storage=uri, live=False))
    with pytest.raises(UserInputError, match="^--storage"):
        resolve_experiment("x", uri)


def test_a_missing_bucket_is_one_clear_error_and_nothing_is_written(s3, tmp_path, capsys):
    from search.cli import main
    from search.storage import cache_home

    missing = s3.uri("exps", bucket="no-such-bucket")
    before = s3.client.list_buckets()["Buckets"]
    # refused before the (long) preparation: the space file does not even exist
    assert main(["run", str(tmp_path / "no-such-space.yaml"), "--storage", missing, "--no-progress"]) == 2
    assert main(["status", "x", "--storage", missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(f"error: --storage {missing}: bucket 'no-such-bucket' does not exist")
                                 for line in err), err
    assert s3.client.list_buckets()["Buckets"] == before  # no bucket created
    assert not (cache_home() / "experiments").exists()  # no staging folder


# ------------------------------------------------------------------------------ one search on S3 (slow)
@pytest.fixture(scope="module")
def uri_search(s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3search")
    space = write_space(tmp, num_samples=2)
    storage = s3.uri("exps")
    # the driver's own cache folder: its staging folder lives there
    run = cli("run", str(space), "--storage", storage, "--name", "tiny", "--no-progress", "--scheduler", "fifo",
              XDG_CACHE_HOME=str(tmp / "driver-cache"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    summary = json.loads(s3.client.get_object(Bucket=BUCKET, Key="exps/tiny/summary.json")["Body"].read())
    meta = json.loads(s3.client.get_object(Bucket=BUCKET, Key="exps/tiny/distil_search.json")["Body"].read())
    return SimpleNamespace(tmp=tmp, storage=storage, stdout=run.stdout, summary=summary, meta=meta)


@pytest.mark.slow
def test_the_bucket_holds_the_whole_experiment(s3, uri_search):
    found = keys(s3, "exps/tiny/")
    rel = [k.removeprefix("exps/tiny/") for k in found]
    assert {"distil_search.json", "optuna.db", "summary.json"} <= set(rel)
    assert [k for k in rel if k.startswith("events.out.tfevents")]  # the HParams config
    assert uri_search.summary["experiment"] == "s3://distil/exps/tiny" and "s3://distil/exps/tiny" in uri_search.stdout
    # balanced labels: the constant predictor's floor is recorded and printed
    assert uri_search.meta["majority_class"] == uri_search.summary["majority_class"] == {"accuracy": 0.5}
    assert "majority-class baseline: dev accuracy 0.5000" in uri_search.stdout
    # the size and latency lines, whole and within an 80-column terminal
    lines = uri_search.stdout.splitlines()
    size = next(line for line in lines if line.startswith("size: "))
    latency = next(line for line in lines if line.startswith("latency: "))
    assert "parameters vs teacher" in size and size.endswith("%)") and len(size) <= 80
    assert latency.endswith("x faster (batch 1, in turn)") and len(latency) <= 80
    trials = {k.split("/")[0] for k in rel if k.endswith("/result.json")}
    assert len(trials) == 2 == uri_search.summary["trials"] == uri_search.summary["counts"]["TERMINATED"]
    for trial in trials:
        assert [k for k in rel if k.startswith(f"{trial}/checkpoint_") and k.endswith("/model.safetensors")], trial
        assert [k for k in rel if k.startswith(f"{trial}/run/tb/events.out.tfevents")], trial  # synced artifacts
    # the prepared artifacts, named by their content hash
    names = uri_search.meta["artifacts"]["remote"]
    assert names["train"].startswith("tokenized/tokenize-") and names["teacher"].startswith("teachers/finetuned-")
    for name in (names["train"], *names["dev"].values()):
        assert f"artifacts/{name}" in rel
    assert f"artifacts/{names['outputs']}/logits.npy" in rel
    assert f"artifacts/{names['teacher']}/model.safetensors" in rel
    # the study: both trials
    db = uri_search.tmp / "optuna-copy.db"
    db.write_bytes(s3.client.get_object(Bucket=BUCKET, Key="exps/tiny/optuna.db")["Body"].read())
    import optuna

    assert len(optuna.load_study(study_name="optuna", storage=f"sqlite:///{db}").trials) == 2


@pytest.mark.slow
def test_a_node_without_the_driver_paths_downloads_the_artifacts_once(uri_search, tmp_path):
    """What a trial does on a node that lacks the driver's caches: localize() downloads each artifact once
    (temporary folder + rename; two trials starting together are fine) and load_prepared reads the same data."""
    from concurrent.futures import ThreadPoolExecutor

    from datasets import Dataset

    from distil_core.config import config_from_dict
    from distil_core.recipe import load_prepared
    from search.artifacts import localize
    from search.storage import parse_storage

    artifacts = uri_search.meta["artifacts"]
    store = parse_storage(uri_search.storage).experiment("tiny").artifact_store()
    cfg = config_from_dict(uri_search.meta["base"])
    node = tmp_path / "node-cache"
    with away(uri_search.tmp / "cache") as moved:
        assert not Path(artifacts["train"]).exists() and not Path(artifacts["teacher"]).exists()
        with ThreadPoolExecutor(2) as pool:  # two trials starting at once on one node
            first, second = pool.map(lambda _: localize(artifacts, store, cache=node), range(2))
        assert first == second
        for path in (first["train"], *first["dev"].values(), first["outputs"], first["teacher"]):
            assert Path(path).is_relative_to(node) and Path(path).exists(), path
        assert not [p for p in node.rglob(".*")]  # no temporary folders left
        mtime = Path(first["train"]).stat().st_mtime_ns
        assert localize(artifacts, store, cache=node) == first  # once per node
        assert Path(first["train"]).stat().st_mtime_ns == mtime
        prep = load_prepared(cfg, first)
        original = lambda p: moved / Path(p).relative_to(uri_search.tmp / "cache")  # noqa: E731
        assert prep.train.to_dict() == Dataset.from_file(str(original(artifacts["train"]))).to_dict()
        assert np.array_equal(prep.signal.logits, np.load(original(artifacts["outputs"]) / "logits.npy"))
        assert prep.teacher_path == first["teacher"] and prep.teacher.config.num_labels == 2
    # where the driver's paths exist (local Ray, a shared file system) nothing is copied
    assert localize(artifacts, store, cache=tmp_path / "unused") == artifacts
    assert not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_status_and_export_read_the_bucket_from_another_machine(s3, uri_search, monkeypatch):
    """A fresh mirror and node cache, and no driver caches: status lists the trials, export downloads one
    checkpoint and reproduces the trial's metric (as tests/test_export.py checks for a folder)."""
    import torch
    from sklearn.metrics import accuracy_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from search.export import export

    reader = uri_search.tmp / "reader-cache"
    status = cli("status", "tiny", "--storage", uri_search.storage, timeout=300, XDG_CACHE_HOME=str(reader))
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("TERMINATED") == 2 and "local mirror" in status.stderr, status.stdout + status.stderr
    mirror = next(reader.rglob("distil_search.json")).parent
    assert not list(mirror.rglob("checkpoint_*"))  # status needs no checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(reader))
    out = uri_search.tmp / "export"
    with away(uri_search.tmp / "cache"):
        summary = export("tiny", out, storage=uri_search.storage)
    best = uri_search.summary["best"]
    assert summary["trial_id"] == best["trial_id"] and summary["experiment"] == "s3://distil/exps/tiny"
    assert summary["checkpoint"].startswith(f"s3://distil/exps/tiny/{Path(best['path']).name}/checkpoint_")
    assert len(list(mirror.rglob("checkpoint_*"))) == 1  # only the exported trial's last checkpoint
    fetched = reader / "distil-search" / "artifacts"
    assert list(fetched.glob("tokenized/*")) and list(fetched.glob("teachers/*"))
    assert not list(fetched.glob("teacher_outputs/*"))  # export evaluates: no teacher outputs downloaded
    model = AutoModelForSequenceClassification.from_pretrained(out / "student").eval()
    tok = AutoTokenizer.from_pretrained(out / "student")
    lines = (uri_search.tmp / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]
    texts, labels = zip(*(line.split("\t") for line in lines))
    with torch.no_grad():
        enc = tok(list(texts), padding=True, truncation=True, max_length=16, return_tensors="pt")
        preds = model(**enc).logits.argmax(-1).numpy()
    assert abs(accuracy_score(np.array(labels, dtype=int), preds) - best["main"]) <= 0.005
    assert abs(summary["reevaluated"]["dev_accuracy"] - best["main"]) <= 0.005


@pytest.mark.slow
def test_tensorboard_mirror_follows_growing_event_files(uri_search, tmp_path, monkeypatch):
    """The TensorBoard mirror holds only event files, and a file that grew on storage is appended to. (The
    experiment named by its URI, options included.)"""
    from search.storage import find_experiment, is_event_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    exp = find_experiment(uri_search.storage.replace("/exps?", "/exps/tiny?"))
    assert exp.name == "tiny" and exp.uri == "s3://distil/exps/tiny"
    exp.pull(include=is_event_file)
    files = [p for p in exp.local.rglob("*") if p.is_file()]
    assert files and all(is_event_file(p.name) for p in files)
    assert len(files) == 1 + 2 * 2  # the HParams config, and per trial its session and the trainer's run
    one = files[0]
    whole = one.read_bytes()
    one.write_bytes(whole[: len(whole) // 2])  # as if mirrored before the rest was written
    os.utime(one, ns=(0, 0))
    inode = one.stat().st_ino
    exp.pull(include=is_event_file)
    assert one.read_bytes() == whole and one.stat().st_ino == inode  # appended in place: a reader follows it
    shutil.rmtree(exp.local)


def test_fetch_is_safe_when_two_downloads_race(tmp_path):
    """Two downloads of one artifact folder at once (two trials starting on one node): both end with the
    same complete folder and no temporary folder is left."""
    import pyarrow.fs as pafs

    from search.artifacts import ArtifactStore, fetch

    src = tmp_path / "store" / "teacher_outputs" / "abc"
    src.mkdir(parents=True)
    for i in range(20):
        (src / f"part{i}.npy").write_bytes(os.urandom(1 << 16))
    store = ArtifactStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    cache = tmp_path / "cache"
    results, barrier = [], threading.Barrier(4)

    def go():
        barrier.wait()
        results.append(fetch(store, "teacher_outputs/abc", cache))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [cache / "teacher_outputs" / "abc"] * 4
    assert sorted(p.name for p in results[0].iterdir()) == sorted(p.name for p in src.iterdir())
    assert all((results[0] / p.name).read_bytes() == p.read_bytes() for p in src.iterdir())
    assert [p.name for p in (cache / "teacher_outputs").iterdir()] == ["abc"]
