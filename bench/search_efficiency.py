"""TPE + ASHA against random search + FIFO, the same number of trials, on an SST-2 subset.

For each search: the training steps (summed over all trials, in the order results arrived) it spent
until some trial first reached random+FIFO's best dev accuracy; then their ratio (target <= 1/3).

    GLUE_DIR=../shared/data/glue python bench/search_efficiency.py [--space bench/efficiency.yaml] [--num-samples N]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ray.tune import ExperimentAnalysis

from search.cli import _space_path
from search.run import SearchOptions, run_search


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default=str(Path(__file__).with_name("efficiency.yaml")))
    ap.add_argument("--num-samples", type=int, default=None, help="default: the space's tune.num_samples")
    ap.add_argument("--storage", default=None)
    ap.add_argument("--no-defaults-first", action="store_true",
                    help="neither search starts with the DistilBERT defaults: compares the searchers alone")
    args = ap.parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="distil-bench-")
    runs = {}
    for label, sampler, scheduler in (("random+FIFO", "random", "fifo"), ("TPE+ASHA", "tpe", "asha")):
        s = run_search(SearchOptions(space=_space_path(args.space), name=label.replace("+", "-"), storage=storage,
                                     num_samples=args.num_samples, sampler=sampler, scheduler=scheduler, live=False,
                                     defaults_first=not args.no_defaults_first))
        rows = results_in_order(s["experiment"])
        last_step = {r["trial"]: r["step"] for r in rows}
        runs[label] = {"rows": rows, "best": max(r["main"] for r in rows), "total_steps": sum(last_step.values()),
                       "pruned": s["counts"]["PRUNED"], "wall_s": s["wall_seconds"]}
    target = runs["random+FIFO"]["best"]
    out = {}
    for label, r in runs.items():
        out[label] = {"best": r["best"], "steps_to_target": steps_to_reach(r["rows"], target),
                      "steps_total": r["total_steps"], "pruned": r["pruned"], "wall_s": round(r["wall_s"])}
    base, ours = out["random+FIFO"]["steps_to_target"], out["TPE+ASHA"]["steps_to_target"]
    out["target"] = target
    out["ratio"] = (ours / base) if ours is not None and base else None
    print(json.dumps(out, indent=2))
    Path(storage, "search_efficiency.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
