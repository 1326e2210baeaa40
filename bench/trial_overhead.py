"""Trial overhead of a finished search: (trial wall time - training time) / trial wall time.

Training time is the time spent in optimizer steps; the rest is start-up, cache reads, latency
measurement, dev evaluations and checkpoints. Target <= 10% on the quickstart.

    python bench/trial_overhead.py EXPERIMENT_PATH
"""
import sys

from search.run import trial_rows

rows = [r for r in trial_rows(sys.argv[1]) if r["trial_seconds"]]
wall = sum(r["trial_seconds"] for r in rows)
train = sum(r["train_seconds"] for r in rows)
for r in rows:
    print(f"{r['trial_id']} {r['status']:<10} wall {r['trial_seconds']:6.1f}s train {r['train_seconds']:6.1f}s "
          f"overhead {1 - r['train_seconds'] / r['trial_seconds']:.1%}")
print(f"trials: {len(rows)}; overhead fraction (all trials): {(wall - train) / wall:.1%}")
