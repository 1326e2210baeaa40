"""TPE + ASHA against random search + FIFO, the same number of trials, on an SST-2 subset.

For each sampler seed, one search of each kind. For each search: the training steps (summed over all
trials, in the order results arrived) it spent until some trial first reached that seed's random+FIFO best
dev accuracy; then their ratio (target <= 1/3). One pair is within seed noise (400 dev examples), so the
verdict is the median ratio over the seeds; a TPE + ASHA search that never reaches the target counts as an
infinite ratio. A search already finished under --storage is read back, not run again, so an interrupted
bench continues where it stopped.

    GLUE_DIR=../shared/data/glue python bench/search_efficiency.py --storage S [--seeds 0 1 2] [--space bench/efficiency.yaml]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from ray.tune import ExperimentAnalysis

from search.run import SearchOptions, resume_search, run_search
from search.space import space_file

SEARCHES = (("random+FIFO", "random", "fifo"), ("TPE+ASHA", "tpe", "asha"))


def results_in_order(exp: str) -> list[dict]:
    analysis = ExperimentAnalysis(exp)
    rows = []
    for trial_id, df in analysis.trial_dataframes.items():
        for rec in df.to_dict("records"):
            rows.append({"trial": trial_id, "time": rec["timestamp"], "step": rec["step"], "main": rec["main"]})
    return sorted(rows, key=lambda r: (r["time"], r["step"]))


def steps_to_reach(rows: list[dict], target: float) -> int | None:
    """Training steps spent by all trials together when a result first reaches target."""
    spent: dict[str, int] = {}
    for r in rows:
        spent[r["trial"]] = r["step"]
        if r["main"] >= target - 1e-12:
            return sum(spent.values())
    return None


def one_search(args, label: str, sampler: str, scheduler: str, seed: int) -> dict:
    """Run the search, resume it if a previous bench was cut off, or read it back if it finished."""
    name = f"{label.replace('+', '-')}-seed{seed}"
    exp = Path(args.storage, name)
    summary_file = exp / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    finished = summary and not (summary["counts"]["RUNNING"] or summary["counts"]["PENDING"])
    if not (exp / "distil_search.json").is_file():
        summary = run_search(SearchOptions(space=str(space_file(args.space)), name=name, storage=args.storage,
                                           num_samples=args.num_samples, sampler=sampler, scheduler=scheduler,
                                           seed=seed, live=False, defaults_first=not args.no_defaults_first))
    elif not finished:
        summary = resume_search(str(exp), live=False)
    rows = results_in_order(str(exp))
    last_step = {r["trial"]: r["step"] for r in rows}
    return {"rows": rows, "best": max(r["main"] for r in rows), "total_steps": sum(last_step.values()),
            "pruned": summary["counts"]["PRUNED"], "wall_s": summary["wall_seconds"], "trials": summary["trials"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default=str(Path(__file__).with_name("efficiency.yaml")))
    ap.add_argument("--num-samples", type=int, default=None, help="default: the space's tune.num_samples")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds (default 0 1 2)")
    ap.add_argument("--storage", default=None, help="experiments folder; re-using one skips finished searches")
    ap.add_argument("--no-defaults-first", action="store_true",
                    help="neither search starts with the DistilBERT defaults: compares the searchers alone")
    args = ap.parse_args()
    args.storage = str(Path(args.storage or tempfile.mkdtemp(prefix="distil-bench-")).resolve())
    Path(args.storage).mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in args.seeds:
        runs = {label: one_search(args, label, sampler, scheduler, seed) for label, sampler, scheduler in SEARCHES}
        target = runs["random+FIFO"]["best"]
        out = {label: {"best": r["best"], "steps_to_target": steps_to_reach(r["rows"], target),
                       "steps_total": r["total_steps"], "trials": r["trials"], "pruned": r["pruned"],
                       "wall_s": round(r["wall_s"])} for label, r in runs.items()}
        base, ours = out["random+FIFO"]["steps_to_target"], out["TPE+ASHA"]["steps_to_target"]
        out["target"] = target
        out["ratio"] = ours / base if ours is not None else math.inf
        per_seed[seed] = out
        print(f"seed {seed}: target {target:.4f} (random+FIFO's best, at {base} steps); TPE+ASHA best "
              f"{out['TPE+ASHA']['best']:.4f}, reached the target at {ours} steps "
              f"({out['TPE+ASHA']['steps_total']} in all, {out['TPE+ASHA']['pruned']} pruned): ratio {out['ratio']:.2f}",
              flush=True)
    median = statistics.median(o["ratio"] for o in per_seed.values())
    result = {"seeds": per_seed, "median_ratio": median}
    text = json.dumps(result, indent=2).replace("Infinity", '"inf"')
    print(text)
    print(f"median ratio over {len(per_seed)} seed(s): {median:.2f} (target <= 1/3) {'OK' if median <= 1 / 3 else 'NOT MET'}")
    Path(args.storage, "search_efficiency.json").write_text(text)


if __name__ == "__main__":
    main()
