"""The search on a real two-node Ray cluster (cluster/local_cluster.py, token auth, loopback): trials land
on both nodes, a worker node that dies mid-search costs no trial (retried from its last checkpoint on the
head), an interrupted driver resumes against the cluster; and what --storage takes (folders, file:// URIs,
s3:// and gs:// object storage; tests/test_storage.py runs a search against an S3 server).

The cluster tests are slow (a cluster start, a driver that prepares the caches, trial actors on two nodes).
The pytest process never initialises Ray: the search runs in a CLI child process with the cluster's token.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distil_core.errors import UserInputError
from search.results import resolve_experiment, trial_rows
from search.run import SearchOptions, run_search
from search.storage import parse_storage
from test_search import write_space

ROOT = Path(__file__).resolve().parents[1]


def _load_local_cluster():
    if "local_cluster" in sys.modules:  # tests/test_cluster.py loaded it already
        return sys.modules["local_cluster"]
    spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "cluster" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_cluster"] = module  # before running it: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lc = _load_local_cluster()
DONE = ("TERMINATED", "PRUNED")


# ------------------------------------------------------------------------------------ --storage (fast)
def test_storage_accepts_paths_and_file_uris(tmp_path):
    assert parse_storage(str(tmp_path)).local == tmp_path.resolve()
    assert parse_storage(f"file://{tmp_path}/a%20b").local == tmp_path.resolve() / "a b"
    assert parse_storage(f"file://localhost{tmp_path}").local == tmp_path.resolve()
    exp = tmp_path / "exp" / "x"
    exp.mkdir(parents=True)
    (exp / "distil_search.json").write_text("{}")
    found = resolve_experiment("x", f"file://{tmp_path}/exp")
    assert found.local == exp.resolve() and not found.remote and found.tune_path == str(exp.resolve())
    assert resolve_experiment(f"file://{exp}").local == exp.resolve()  # an experiment URI


@pytest.mark.parametrize("uri, scheme, path", [
    ("s3://bucket/experiments?region=us-west-2", "s3", "bucket/experiments"),
    ("s3://bucket/exps/?endpoint_override=127.0.0.1:9000&scheme=http", "s3", "bucket/exps"),
    ("gs://bucket/x", "gs", "bucket/x"),
])
def test_storage_takes_object_storage_uris(tmp_path, monkeypatch, uri, scheme, path):
    """Parsed without a request (check=False): Tune gets BUCKET/PATH and the filesystem, distil-search's own
    files a local folder under the user's cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    storage = parse_storage(uri, check=False)
    assert storage.remote and storage.local is None and storage.path == path and str(storage) == uri
    exp = storage.experiment("e")
    assert exp.tune_path == f"{path}/e" and exp.uri == f"{scheme}://{path}/e"
    assert exp.local.is_relative_to(tmp_path / "distil-search" / "experiments") and exp.local.name == "e"
    assert exp.artifact_store().root == f"{path}/e/artifacts"
    assert not list(tmp_path.iterdir())  # nothing written by parsing


@pytest.mark.parametrize("uri", ["http://host/experiments", "ftp://host/x", "file://otherhost/x"])
def test_storage_neither_folder_nor_object_storage_is_one_clear_error(tmp_path, uri):
    # refused before the (long) preparation: the space file does not even exist
    with pytest.raises(UserInputError, match=r"^--storage .*expected a folder .*s3://BUCKET/PATH or gs://BUCKET/PATH") as e:
        run_search(SearchOptions(space=str(tmp_path / "no-such-space.yaml"), storage=uri, live=False))
    assert uri in str(e.value)
    with pytest.raises(UserInputError, match="--storage"):
        resolve_experiment("x", uri)


# ------------------------------------------------------------------------------------- the local cluster
def test_kill_worker_of_a_recorded_cluster_that_is_gone_signals_nothing(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    nodes = [lc.Node(role=role, pid=2 ** 22 + i, start_time=1, temp_dir=str(root / role), log=str(root / f"{role}.log"),
                     command=["ray", "start"]) for i, role in enumerate(("head", "worker"))]
    lc.LocalCluster(root=str(root), address="127.0.0.1:1", client_address="ray://127.0.0.1:2", dashboard_url=None,
                    token_path=str(root / "auth_token"), nodes=nodes).save()
    assert lc.kill_node(root, "worker") == []
    res = subprocess.run([sys.executable, str(ROOT / "cluster" / "local_cluster.py"), "kill-worker", "--dir", str(root)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "not running" in res.stdout, res.stdout + res.stderr
    with pytest.raises(lc.ClusterError, match="no gpu node"):
        lc.load(root).kill_node("gpu")


def _pids(cluster) -> dict[int, int]:
    found: dict[int, int] = {}
    for node in cluster.nodes:
        found.update(lc._group_and_descendants(node.pid))
    return found


@contextlib.contextmanager
def local_cluster(head_cpus: int = 1, worker_cpus: int = 1):
    """A head and a worker node with 1 CPU each (so trials land on both), in a short per-test folder under
    /tmp (Ray's unix socket paths are limited); stopped afterwards, and none of its processes left."""
    root = Path(tempfile.mkdtemp(prefix="dsc-", dir="/tmp"))
    cluster = None
    seen: dict[int, int] = {}
    try:
        cluster = lc.start(root, head_cpus=head_cpus, worker_cpus=worker_cpus, dashboard=False, timeout=150)
        cluster.seen = seen  # processes the test saw (trial workers come and go)
        yield cluster
    finally:
        if cluster is not None:
            seen.update(_pids(cluster))
            cluster.stop()
        elif (root / lc.STATE_FILE).exists():
            with contextlib.suppress(lc.ClusterError, OSError):
                lc.stop(root)
        shutil.rmtree(root, ignore_errors=True)
    left = sorted(p for p, t in seen.items() if lc._alive(p, t))
    assert not left, f"processes of the local cluster left after stop: {left}"


def node_ids(cluster) -> tuple[str, str]:
    nodes = lc.wait_for_nodes(cluster, 2, timeout=60)
    (head,) = [n["node_id"] for n in nodes if not n["resources"].get(lc.WORKER_RESOURCE)]
    (worker,) = [n["node_id"] for n in nodes if n["resources"].get(lc.WORKER_RESOURCE)]
    return head, worker


def cluster_cli(cluster, *args: str) -> subprocess.Popen:
    """distil-search in a child process with the cluster's token (and no other RAY_* settings)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env = cluster.client_env(base)
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    return subprocess.Popen([sys.executable, "-m", "search.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # the driver this test started
        out, err = proc.communicate()
        pytest.fail(f"the search did not end within {timeout:.0f}s:\n{out[-3000:]}\n{err[-5000:]}")
    return proc.returncode, out, err


def results(exp: Path) -> dict[str, list[dict]]:
    """Every trial's reported results so far (result.json, one JSON line per evaluation), by trial folder."""
    found = {}
    for path in exp.glob("*/result.json"):
        lines = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                lines.append(json.loads(line))
        found[path.parent.name] = lines
    return found


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the search ended (exit {proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-5000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout:.0f}s")


@pytest.mark.slow
def test_a_worker_node_dies_mid_search_and_every_trial_still_finishes(tmp_path):
    """The worker node is SIGKILLed (its recorded processes only) after a trial on it reported twice: that
    trial is retried from its last checkpoint on the head (FailureConfig(max_failures)), and all planned
    trials finish. FIFO, so every trial runs all its evaluations and the retried one is still running at the
    kill."""
    space = write_space(tmp_path, num_samples=3,
                        optim={"lr": 3e-3, "batch_size": 16, "max_steps": 100, "eval_every": 10})
    storage = f"file://{tmp_path}/exp"  # a file:// URI works as a path
    exp = tmp_path / "exp" / "faults"
    with local_cluster() as cluster:
        head, worker = node_ids(cluster)
        proc = cluster_cli(cluster, "run", str(space), "--address", cluster.address, "--name", "faults",
                           "--storage", storage, "--no-progress", "--num-samples", "3", "--max-concurrent", "2",
                           "--cpus-per-trial", "1", "--max-failures", "3", "--scheduler", "fifo")

        def reported_on_worker():
            # two results: Tune schedules a trial's next training step only after the last checkpoint was
            # saved, so at least the first checkpoint is registered and the retry cannot start from scratch
            return [t for t, lines in results(exp).items() if sum(r.get("node_id") == worker for r in lines) >= 2]

        (victim,) = wait_for(reported_on_worker, proc, 200, "result from a trial on the worker node")
        cluster.seen.update(_pids(cluster))
        assert cluster.kill_node("worker")  # raises if any of the worker node's processes survived SIGKILL
        before_kill = len(results(exp)[victim])
        rc, out, err = finish(proc, 300)
        assert rc == 0, out[-2000:] + err[-5000:]
        cluster.seen.update(_pids(cluster))

    rows = trial_rows(exp)
    assert len(rows) == 3, [(r["trial_id"], r["status"]) for r in rows]
    assert all(r["status"] == "TERMINATED" and r["last_result"]["is_final"] for r in rows), \
        [(r["trial_id"], r["status"], r["step"]) for r in rows]
    assert not [r for r in rows if r["status"] == "ERROR"]
    # the trial that ran on the worker finished on the head, from its checkpoint: steps go on, not over
    history = results(exp)[victim]
    nodes = [r["node_id"] for r in history]
    assert nodes[0] == worker and nodes[-1] == head and before_kill < len(history), nodes
    on_worker = [r for r in history if r["node_id"] == worker]
    on_head = history[len(on_worker):]
    assert all(r["node_id"] == head for r in on_head), nodes
    worker_steps, head_steps = [r["step"] for r in on_worker], [r["step"] for r in on_head]
    assert worker_steps == list(range(10, worker_steps[-1] + 1, 10)) and len(worker_steps) >= 2, worker_steps
    assert head_steps == list(range(head_steps[0], 101, 10)), head_steps
    # Tune reports a result and saves its checkpoint in two steps: a kill between them loses that checkpoint,
    # and the retry repeats that one evaluation from the checkpoint before (at-least-once). Nothing is skipped.
    assert head_steps[0] in (worker_steps[-1], worker_steps[-1] + 10), (worker_steps, head_steps)
    if head_steps[0] == worker_steps[-1]:  # the repeated evaluation: resumed state gives the same model
        assert on_head[0]["dev_loss"] == pytest.approx(on_worker[-1]["dev_loss"], rel=1e-4)
    # the new Optuna study knows all three trials as complete
    assert json.loads((exp / "summary.json").read_text())["counts"]["TERMINATED"] == 3


@pytest.mark.slow
def test_an_interrupted_driver_resumes_on_the_cluster(tmp_path):
    """Ctrl-C of the driver (Tune saves the experiment and stops), then `resume --address` finishes the
    planned trials on the same cluster."""
    space = write_space(tmp_path, num_samples=3, max_steps=8)
    storage = f"file://{tmp_path}/exp"
    exp = tmp_path / "exp" / "cut"
    with local_cluster() as cluster:
        proc = cluster_cli(cluster, "run", str(space), "--address", cluster.address, "--name", "cut",
                           "--storage", storage, "--no-progress", "--num-samples", "3", "--max-concurrent", "2",
                           "--cpus-per-trial", "1")
        wait_for(lambda: any(results(exp).values()), proc, 200, "first result")
        proc.send_signal(signal.SIGINT)
        rc, out, err = finish(proc, 180)
        assert rc == 130, out[-2000:] + err[-5000:]
        assert "distil-search resume cut" in err
        resumed = cluster_cli(cluster, "resume", "cut", "--address", cluster.address, "--storage", storage,
                              "--no-progress")
        rc, out, err = finish(resumed, 240)
        assert rc == 0, out[-2000:] + err[-5000:]
        cluster.seen.update(_pids(cluster))
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["counts"]["TERMINATED"] + summary["counts"]["PRUNED"] == 3
    assert all(r["status"] in DONE for r in trial_rows(exp))
    status = cluster_cli(cluster, "status", "cut", "--storage", storage)
    rc, out, err = finish(status, 120)
    assert rc == 0 and out.count("TERMINATED") + out.count("PRUNED") == 3, out + err
