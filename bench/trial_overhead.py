"""Trial overhead of a finished search: (trial wall time - training time) / trial wall time.

Training time is the time spent in optimizer steps. Trial wall time runs from the trainable's start to
its last report. What is not training is broken down from what each trial reports: setup (caches
loaded, student built, latencies timed), dev evaluations, checkpoint saves, tune.report (Tune's copy of
the checkpoint into the trial folder, and the wait for the driver to take the result), and the rest.
Target <= 10% on the quickstart.

    python bench/trial_overhead.py EXPERIMENT_PATH
"""
import sys
from pathlib import Path

from ray.tune import ExperimentAnalysis

from search.results import trial_rows, tune_state_file

PARTS = ("setup", "eval", "checkpoint", "report")

exp = Path(sys.argv[1])
rows = [r for r in trial_rows(exp) if r["trial_seconds"]]
frames = ExperimentAnalysis(str(tune_state_file(exp))).trial_dataframes
total = {"wall": 0.0, "train": 0.0, **{p: 0.0 for p in PARTS}}
for r in rows:
    df = frames[r["trial_id"]]
    parts = {p: float(df[f"{p}_seconds"].sum()) if f"{p}_seconds" in df else float("nan")
             for p in ("eval", "checkpoint", "report")}
    parts["setup"] = float(df["setup_seconds"].iloc[-1]) if "setup_seconds" in df else float("nan")
    wall, train = r["trial_seconds"], r["train_seconds"]
    for key, value in (("wall", wall), ("train", train), *parts.items()):
        total[key] += value
    print(f"{r['trial_id']} {r['status']:<10} evals {len(df):2d} wall {wall:6.1f}s train {train:6.1f}s "
          f"overhead {1 - train / wall:5.1%}: " + " ".join(f"{p} {parts[p]:5.1f}s" for p in PARTS))
wall, train = total["wall"], total["train"]
rest = wall - train - sum(total[p] for p in PARTS)
print(f"trials: {len(rows)}; overhead fraction (all trials): {(wall - train) / wall:.1%}")
print("of trial wall time: " + ", ".join(f"{p} {total[p] / wall:.1%}" for p in PARTS) + f", other {rest / wall:.1%}")
