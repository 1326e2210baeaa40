"""Ctrl-C a running search as soon as one more of its trials (search or confirmation) ends.

A long search is carried from one working session to the next with `glue_results.py pack`, which leaves
checkpoints out and so refuses an experiment stopped mid-trial. Stopped here, right after a trial ends,
the next trial has not reached its first checkpoint, and the pack goes through:

    python bench/stop_between_trials.py PID STORAGE/glue-small-stsb [--after 23:00]

PID is the `python -m search.cli` process (`pgrep -f "search.cli .*glue-small-stsb"`), not glue_results.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import sys
import time
from pathlib import Path

from search.run import _saved_statuses, tune_state_file

ENDED = ("TERMINATED", "ERROR")


def ended_trials(exp: Path) -> set[str]:
    """Ids of the trials Tune has saved as ended, in the search and in its confirmation."""
    ended = set()
    for folder in (exp, exp / "confirm"):
        state = tune_state_file(folder) if folder.is_dir() else None
        try:
            statuses = _saved_statuses(state) if state else {}
        except ValueError:  # Tune rewrites its state in place: caught half-written, read it next time
            continue
        ended |= {f"{folder.name}/{t}" for t, s in statuses.items() if s in ENDED}
    return ended


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pid", type=int, help="the search.cli process")
    ap.add_argument("experiment", type=Path, help="its experiment folder")
    ap.add_argument("--after", help="HH:MM (today, local time): trials ending before it do not count")
    args = ap.parse_args()
    if not (args.experiment / "distil_search.json").is_file():
        print(f"{args.experiment}: not a distil-search experiment folder", file=sys.stderr)
        return 2
    start = dt.datetime.combine(dt.date.today(), dt.time.fromisoformat(args.after)) if args.after else None
    while start and dt.datetime.now() < start:
        time.sleep(10)
    seen = ended_trials(args.experiment)
    while alive(args.pid):
        new = ended_trials(args.experiment) - seen
        if new:
            print(f"{time.strftime('%H:%M:%S')} ended: {', '.join(sorted(new))}; sending SIGINT to {args.pid}", flush=True)
            os.kill(args.pid, signal.SIGINT)
            while alive(args.pid):
                time.sleep(2)
            break
        time.sleep(5)
    print(f"{time.strftime('%H:%M:%S')} process {args.pid} has exited", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
