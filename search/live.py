"""The live view of a running search: finished / running / pruned / failed trials and the best so far.

A Tune callback in the driver. On a terminal it redraws one rich table; elsewhere (CI, logs) it
prints one line per finished trial. It keeps no unpicklable state, since Tune pickles callbacks with
the experiment and a restored search brings them back.
"""
from __future__ import annotations

import time
from typing import Any

from ray import tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

_live: Live | None = None  # the one redrawn table of this driver process


def trial_status(trial) -> str:
    if trial.status == "TERMINATED" and not (trial.last_result or {}).get("is_final"):
        return "PRUNED"
    return trial.status


class LiveView(tune.Callback):
    def __init__(self, meta: dict[str, Any], enabled: bool = True):
        self.metric = meta["main_metric"]
        self.total = meta["tune"]["num_samples"]
        self.teacher = meta["teacher"]["metrics"].get(self.metric)
        self.enabled = enabled
        self.started = time.time()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        global _live
        if _live is not None:
            _live.stop()
            _live = None

    def _render(self, trials) -> Table:
        counts: dict[str, int] = {}
        for t in trials:
            counts[trial_status(t)] = counts.get(trial_status(t), 0) + 1
        scored = [(t.last_result.get("main"), t) for t in trials if (t.last_result or {}).get("main") is not None]
        table = Table(title=f"distil-search: {len(trials)}/{self.total} trials, {time.time() - self.started:.0f}s",
                      title_justify="left")
        for col in ("finished", "running", "pruned", "failed", "pending", f"best dev {self.metric}", "teacher"):
            table.add_column(col)
        best = max(scored, key=lambda x: x[0]) if scored else None
        best_text = f"{best[0]:.4f} ({best[1].trial_id})" if best else "-"
        teacher = f"{self.teacher:.4f}" if self.teacher is not None else "-"
        table.add_row(*(str(counts.get(s, 0)) for s in ("TERMINATED", "RUNNING", "PRUNED", "ERROR", "PENDING")),
                      best_text, teacher)
        return table

    def _update(self, trials, line: str | None = None) -> None:
        global _live
        if not self.enabled:
            return
        console = Console(stderr=True)
        if console.is_terminal:
            if _live is None:
                _live = Live(self._render(trials), console=console, refresh_per_second=2, transient=False)
                _live.start()
            _live.update(self._render(trials))
        elif line:
            console.print(line, highlight=False, soft_wrap=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        value = last.get("main")
        shown = f"{value:.4f}" if value is not None else "-"
        # Tune calls this before the trial's status turns TERMINATED: judge by the last result
        state = "finished" if last.get("is_final") else "pruned by ASHA"
        n = last.get("training_iteration", 0)
        self._update(trials, f"trial {trial.trial_id} {state}: dev {self.metric} {shown} "
                             f"after {n} evaluation{'' if n == 1 else 's'}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trials, f"trial {trial.trial_id} failed: see {trial.path}")
