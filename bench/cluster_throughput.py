"""Per-trial training throughput on the local two-node cluster: N trials at once against one trial alone.

Starts cluster/local_cluster.py (token auth, loopback; head and worker with the CPUs given), then runs the
search twice against it with `--address`, on one pinned configuration (the space's base config: a single
searched value, no DistilBERT-defaults point, FIFO) so every trial trains the same student:

  1. one trial alone (--num-samples 1 --max-concurrent 1),
  2. N trials at once (--num-samples N --max-concurrent N), one per free slot of the two nodes,

alternating for --rounds rounds on the same cluster (a single pair is within this machine's noise).

A trial's throughput is examples_seen / train_seconds of its last report (optimizer steps only: no start-up,
evaluations or checkpoints). Prints each trial (node, examples/s, run window), whether the N trials really
overlapped, each round's ratio mean(throughput of the N) / throughput alone and their median. Target >= 0.9:
trials on separate nodes (or separate cores) do not slow each other down. It also prints where the CPU went
while the N trials ran (trial processes, Ray's own processes, the driver), since on one small machine Ray's
daemons share the cores the trials use. Run it on an otherwise idle machine.

    GLUE_DIR=../shared/data/glue python bench/cluster_throughput.py quickstart    # real data (minutes)
    python bench/cluster_throughput.py --tiny                                    # tiny fixture, a smoke run
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _local_cluster():
    if "local_cluster" in sys.modules:
        return sys.modules["local_cluster"]
    spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "cluster" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_cluster"] = module
    spec.loader.exec_module(module)
    return module


def pinned_space(space_file: Path, out: Path) -> Path:
    """SPACE with its search replaced by one single-valued key: every trial trains the base configuration."""
    raw = yaml.safe_load(space_file.read_text())
    if "base_config" in raw:  # relative to the original file
        raw["base_config"] = str((space_file.parent / raw["base_config"]).resolve())
    temperature = (raw.get("base", {}).get("loss") or {}).get("temperature", 2.0)
    raw["search"] = {"loss.temperature": {"choice": [temperature]}}
    raw["normalize_alphas"] = False
    raw["description"] = f"{raw.get('description', space_file.stem)} (pinned to its base config)"
    out.write_text(yaml.safe_dump(raw))
    return out


def tiny_space(work: Path, steps: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_search import write_space

    return write_space(work, optim={"lr": 3e-3, "batch_size": 16, "max_steps": steps, "eval_every": steps // 2})


def cluster_cpu(cluster) -> Counter:
    """CPU seconds (user + system) so far of Ray's own daemons on the cluster's nodes, by process name. Worker
    processes (where trials train) are left out: they end with their trial, taking their counts along."""
    import psutil

    lc = _local_cluster()
    seconds: Counter = Counter()
    for node in cluster.nodes:
        for pid in lc._group_and_descendants(node.pid):
            try:
                proc = psutil.Process(pid)
                name = proc.name()
                if name.startswith("ray::") or "default_worker" in " ".join(proc.cmdline()[:3]):
                    continue
                times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            seconds[name] += times.user + times.system
    return seconds


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cluster, args, space: Path, storage: Path, name: str, n: int) -> list[dict]:
    from search.results import trial_rows

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env = cluster.client_env(base_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "search.cli", "run", str(space), "--address", cluster.address,
           "--storage", str(storage), "--name", name, "--no-progress", "--num-samples", str(n),
           "--max-concurrent", str(n), "--cpus-per-trial", str(args.cpus_per_trial), "--scheduler", "fifo",
           "--no-defaults-first"]
    for flag, value in (("--data-dir", args.data_dir), ("--cache-dir", args.cache_dir)):
        if value:
            cmd += [flag, value]
    t0, cpu0, driver0 = time.perf_counter(), cluster_cpu(cluster), children_cpu()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    wall, cpu1, driver = time.perf_counter() - t0, cluster_cpu(cluster), children_cpu() - driver0
    if res.returncode != 0:
        sys.exit(f"{name}: distil-search run failed (exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    rows = trial_rows(storage / name)
    used = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}  # processes that ended in between are not counted
    used["driver (distil-search run)"] = driver
    busy = ", ".join(f"{k} {v / wall:.2f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v / wall >= 0.005)
    print(f"{name}: {len(rows)} trial(s) in {wall:.0f}s; CPU used, in cores: {busy}")
    return rows


def throughput(row: dict) -> float:
    last = row["last_result"]
    return last["examples_seen"] / last["train_seconds"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("space", nargs="?", default="quickstart", help="space file or preset (default quickstart)")
    p.add_argument("--tiny", action="store_true", help="a tiny random BERT and GLUE-like fixture (smoke run)")
    p.add_argument("--tiny-steps", type=int, default=1000, help="steps per trial with --tiny (default 1000)")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="alone / at-once pairs to run (default 2)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--head-cpus", type=int, default=1, help="CPUs the head offers to trials (default 1)")
    p.add_argument("--worker-cpus", type=int, default=1, help="CPUs of the worker node (default 1)")
    p.add_argument("--dir", default=None, help="cluster folder, at most 36 characters (default: a new /tmp/dsc-*)")
    p.add_argument("--work", default=None, help="folder for the experiments (and the tiny fixture); default temp")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()
    if args.concurrent * args.cpus_per_trial > args.head_cpus + args.worker_cpus:
        sys.exit(f"--concurrent {args.concurrent} x --cpus-per-trial {args.cpus_per_trial} does not fit in "
                 f"{args.head_cpus} + {args.worker_cpus} CPUs")
    lc = _local_cluster()
    work = Path(args.work or tempfile.mkdtemp(prefix="dsc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        source = tiny_space(work, args.tiny_steps)
    else:
        from search.space import space_file

        source = space_file(args.space)
    space = pinned_space(source, work / "pinned.yaml")
    cluster_dir = args.dir or tempfile.mkdtemp(prefix="dsc-", dir="/tmp")
    storage = work / "exp"
    cluster = lc.start(cluster_dir, head_cpus=args.head_cpus, worker_cpus=args.worker_cpus, dashboard=False,
                       timeout=150)
    try:
        rounds = []
        for i in range(args.rounds):
            stamp = time.strftime("%H%M%S")
            rounds.append((run(cluster, args, space, storage, f"alone-{stamp}", 1),
                           run(cluster, args, space, storage, f"concurrent-{stamp}", args.concurrent)))
        nodes = {n["node_id"]: ("worker" if n["resources"].get(lc.WORKER_RESOURCE) else "head")
                 for n in lc.wait_for_nodes(cluster, 2)}
    finally:
        cluster.stop()
        shutil.rmtree(cluster_dir, ignore_errors=True)

    def show(label: str, r: dict) -> None:
        last = r["last_result"]
        print(f"  {label:<11} {r['trial_id']:<16} {nodes.get(last.get('node_id'), '?'):<6} "
              f"{last['examples_seen']:>7} examples in {last['train_seconds']:6.2f}s train "
              f"({r['trial_seconds']:6.1f}s trial): {throughput(r):8.1f} examples/s")

    results, warn = [], False
    for i, (alone, together) in enumerate(rounds, 1):
        print(f"round {i}:")
        for r in alone:
            show("alone", r)
        for r in together:
            show("concurrent", r)
        windows = [(r["last_result"]["started_at"], r["last_result"]["started_at"] + r["trial_seconds"])
                   for r in together]
        overlap = min(b for _, b in windows) - max(a for a, _ in windows)
        warn |= overlap < 0.5 * min(b - a for a, b in windows)
        base = throughput(alone[0])
        mean = sum(throughput(r) for r in together) / len(together)
        results.append({"alone_examples_per_s": base, "concurrent_examples_per_s": [throughput(r) for r in together],
                        "all_overlapped_s": max(0.0, overlap), "ratio": mean / base,
                        "nodes": sorted(nodes.get(r["last_result"].get("node_id"), "?") for r in together)})
        print(f"  ratio {mean:.1f} / {base:.1f} = {mean / base:.2f}; side by side for {max(0.0, overlap):.1f}s "
              f"(on {', '.join(results[-1]['nodes'])})")
    if warn:
        print("warning: in some round the trials overlapped for less than half their run: the ratio hardly "
              "measures contention; make trials longer (more steps; --tiny-steps)")
    ratio = statistics.median(r["ratio"] for r in results)
    (work / "cluster_throughput.json").write_text(json.dumps({"rounds": results, "median_ratio": ratio}, indent=2))
    print(f"per-trial throughput, {args.concurrent} at once / alone, median of {len(results)} round(s): "
          f"{ratio:.2f} (target >= 0.9) {'OK' if ratio >= 0.9 else 'BELOW TARGET'}")
    print(f"results: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
