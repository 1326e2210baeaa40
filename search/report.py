"""`distil-search report`: report.md and PNG plots of a search, written next to (or away from) its experiment.

Plots are drawn on bare matplotlib Figures (rendered by Agg, no pyplot, no display). The report folder is
built in a temporary folder beside it and renamed at the end: a failure leaves no half-written report.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure

from distil_core.errors import UserInputError

from .results import load_meta, majority_floor, pareto_front, trial_rows

STATUS = {"TERMINATED": "finished", "PRUNED": "pruned", "ERROR": "failed"}


def trial_histories(exp: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial's results (step, main, time) in the order it reported them."""
    from ray.tune import ExperimentAnalysis

    out = {}
    for trial_id, df in ExperimentAnalysis(str(exp)).trial_dataframes.items():
        recs = [] if df is None or "main" not in df else df.to_dict("records")
        # started_at + trial_seconds: sub-second wall clock of each result (timestamp is whole seconds)
        out[trial_id] = [{"trial": trial_id, "step": int(r["step"]), "main": float(r["main"]),
                          "time": (r.get("started_at") or r.get("timestamp", 0)) + (r.get("trial_seconds") or 0)}
                         for r in recs if r.get("main") is not None and not math.isnan(r["main"])]
    return out


def best_so_far(results: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(training steps spent by all trials together, best main so far) after each result, in arrival order."""
    spent: dict[str, int] = {}
    best, series = -math.inf, []
    for r in sorted(results, key=lambda r: (r["time"], r["step"])):
        spent[r["trial"]] = r["step"]
        best = max(best, r["main"])
        series.append((sum(spent.values()), best))
    return series


def top_trials(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Finished trials by main, then trials stopped early (their main is from fewer steps)."""
    scored = [r for r in rows if r["main"] is not None]
    return sorted(scored, key=lambda r: (r["status"] == "TERMINATED", r["main"]), reverse=True)[:k]


def importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances (seeded) for the main metric over finished trials; ValueError says why not."""
    done = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if t.values and math.isfinite(t.values[0])]
    if len(done) < 2:
        raise ValueError(f"{len(done)} finished trial(s) with a value; importances need at least 2 "
                         "(trials pruned by ASHA are left out: their values come from fewer steps)")
    if not any(len({repr(t.params.get(p)) for t in done}) > 1 for p in done[0].params):
        raise ValueError("no searched parameter took more than one value among the finished trials")
    if len({t.values[0] for t in done}) == 1:
        raise ValueError(f"all {len(done)} finished trials have the same value ({done[0].values[0]:.4g})")
    return optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=lambda t: t.values[0])


def plot_importance(imp: dict[str, float], path: Path, metric: str) -> None:
    fig = Figure(figsize=(6.4, 0.5 + 0.4 * len(imp)), layout="constrained")
    ax = fig.subplots()
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names], color="C0")
    ax.set(xlabel=f"importance for dev {metric} (fANOVA, normalised)", title="Parameter importances")
    fig.savefig(path, dpi=120)


def _majority_line(ax, floor: float | None) -> None:
    """The constant predictor's score: trials at or below it learnt nothing (MRPC's F1 of it is 0.81)."""
    if floor is not None:
        ax.axhline(floor, ls=":", color="0.4", label=f"majority class {floor:.4f}")


def plot_best_so_far(series: list[tuple[int, float]], teacher: float | None, path: Path, metric: str,
                     floor: float | None = None) -> None:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.step([s for s, _ in series], [b for _, b in series], where="post", marker=".", label="best trial so far")
    if teacher is not None:
        ax.axhline(teacher, ls="--", color="k", label=f"teacher {teacher:.4f}")
    _majority_line(ax, floor)
    ax.set(xlabel="training steps, all trials together (in arrival order)", ylabel=f"dev {metric}",
           title="Best so far")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)


# x of a Pareto plot: parameters, or latency as a fraction of the teacher's (1 / the side-by-side speed-up)
X_VALUES = {"params": lambda r: r["params"], "latency": lambda r: 1 / r["speedup"] if r.get("speedup") else None}


def plot_pareto(rows, x: str, defaults, teacher: tuple[float, float | None], path: Path, metric: str,
                xlabel: str, floor: float | None = None) -> list[dict[str, Any]]:
    """main against x (params or latency) for every trial, the Pareto front (max main, min x) over finished
    trials marked and connected, the defaults trial and the teacher marked; returns the front."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    value = X_VALUES[x]
    pts = [r for r in rows if r["main"] is not None and value(r) is not None]
    for done, color, label in ((False, "0.7", "pruned / failed"), (True, "C0", "finished")):
        sel = [r for r in pts if (r["status"] == "TERMINATED") == done]
        if sel:
            ax.scatter([value(r) for r in sel], [r["main"] for r in sel], s=25, color=color, label=label)
    front = sorted(pareto_front(pts, ["main", x]), key=value)
    ax.plot([value(r) for r in front], [r["main"] for r in front], "-o", color="C3", mfc="none", ms=9,
            label="Pareto front")
    if defaults and defaults in pts:
        ax.scatter([value(defaults)], [defaults["main"]], marker="*", s=220, color="C2", zorder=3,
                   label="DistilBERT defaults")
    if teacher[1] is not None:
        ax.scatter([teacher[0]], [teacher[1]], marker="X", s=90, color="k", zorder=3, label="teacher")
    _majority_line(ax, floor)
    ax.set(xlabel=xlabel, ylabel=f"dev {metric}", title=f"dev {metric} against {xlabel}")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)
    return front


def plot_curves(top, defaults, histories, teacher: float | None, path: Path, metric: str,
                floor: float | None = None) -> None:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    extra = [defaults] if defaults and defaults not in top else []
    for r in top + extra:
        h = histories.get(r["trial_id"], [])
        label = "defaults" if r is defaults else STATUS.get(r["status"], r["status"])
        ax.plot([p["step"] for p in h], [p["main"] for p in h], ":o" if r in extra else "-o", ms=3,
                label=f"{r['trial_id']} ({label})")
    if teacher is not None:
        ax.axhline(teacher, ls="--", color="k", label="teacher")
    _majority_line(ax, floor)
    ax.set(xlabel="training steps (trial)", ylabel=f"dev {metric}", title=f"Learning curves, top {len(top)} trials")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=120)


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else str(v) if isinstance(v, (bool, str)) else format(v, spec)


def trials_table(top, defaults, keys: list[str], metric: str) -> list[str]:
    head = ["rank", "trial", "status", f"dev {metric}", "params", "latency ms", "speedup", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranked = [(str(i + 1), r["trial_id"] + (" (defaults)" if r is defaults else ""), r) for i, r in enumerate(top)]
    for rank, tid, r in ranked + ([("**defaults**", f"**{defaults['trial_id']}**", defaults)] if defaults else []):
        cells = [rank, tid, STATUS.get(r["status"], r["status"]), _fmt(r["main"], ".4f"), _fmt(r["params"], ","),
                 _fmt(r["latency_ms"], ".1f"), _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else ""),
                 *(_fmt(r["overrides"].get(k)) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(exp: Path, out: Path | None = None, top_k: int = 5,
                 majority_class: dict[str, float] | None = None) -> Path:
    """Write report.md and its plots for the experiment folder exp (for one on object storage: its local
    mirror) into out (default exp/report); returns report.md. majority_class: the majority-class
    baseline's dev metrics for a search that did not record them (one begun before it did)."""
    exp = Path(exp).resolve()
    out = Path(out) if out else exp / "report"
    if top_k < 1:
        raise UserInputError(f"top-k {top_k}: expected at least 1")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").exists())):
        raise UserInputError(f"{out} exists and is not an earlier report: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        _write(exp, tmp, top_k, majority_class)
        old = out.with_name(f".{out.name}-old-{time.time_ns()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.md"


def _write(exp: Path, folder: Path, top_k: int, majority_class: dict[str, float] | None) -> None:
    meta, rows, histories = load_meta(exp), trial_rows(exp), trial_histories(exp)
    if majority_class and not meta.get("majority_class"):
        meta["majority_class"] = majority_class
    metric, t = meta["main_metric"], meta["teacher"]
    teacher = t["metrics"].get(metric)
    floor = majority_floor(meta)
    defaults = rows[0] if rows and meta["tune"].get("defaults_first", True) else None
    top = top_trials(rows, top_k)
    series = best_so_far([p for h in histories.values() for p in h])
    plot_best_so_far(series, teacher, folder / "best_so_far.png", metric, floor)
    fronts = {"params": plot_pareto(rows, "params", defaults, (t["params"], teacher), folder / "pareto_params.png",
                                    metric, "parameters", floor),
              "latency": plot_pareto(rows, "latency", defaults, (1.0, teacher), folder / "pareto_latency.png", metric,
                                     "latency / the teacher's (batch 1)", floor)}
    plot_curves(top, defaults, histories, teacher, folder / "curves.png", metric, floor)
    try:
        if not (exp / "optuna.db").is_file():
            raise ValueError("no optuna.db yet (saved when the search ends)")
        study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{exp / 'optuna.db'}")
        imp = importances(study)
        plot_importance(imp, folder / "importance.png", metric)
        done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        imp_md = ["![parameter importances](importance.png)", "", f"fANOVA (seed 0) over the {done} finished trials:",
                  ""] + [f"- `{k}`: {v:.3f}" for k, v in imp.items()]
    except (ValueError, RuntimeError) as e:  # RuntimeError: fANOVA found no variance to explain
        imp_md = [f"Not plotted: {e}."]
    (folder / "report.md").write_text("\n".join(report_lines(exp, meta, rows, top, defaults, fronts, imp_md)) + "\n")


def report_lines(exp, meta, rows, top, defaults, fronts, imp_md) -> list[str]:
    metric, t, tune_ = meta["main_metric"], meta["teacher"], meta["tune"]
    floor = majority_floor(meta)
    summary = json.loads((exp / "summary.json").read_text()) if (exp / "summary.json").is_file() else {}
    counts = Counter(STATUS.get(r["status"], r["status"].lower()) for r in rows)
    wall = summary.get("wall_seconds")
    front_ids = {x: ", ".join(r["trial_id"] for r in front) or "-" for x, front in fronts.items()}
    return [
        f"# Search report: {exp.name}", "",
        f"- space: `{meta['space_file']}`" + (f" ({desc})" if (desc := meta["space"].get("description")) else ""),
        f"- task: {meta['base']['data']['task']}, main metric: dev {metric}",
        f"- teacher: `{t['name']}`, dev {metric} {_fmt(t['metrics'].get(metric), '.4f')}, {t['params']:,} parameters",
        *([f"- majority-class baseline (always the most frequent train label): dev {metric} {floor:.4f}"]
          if floor is not None else []),
        f"- search: {tune_['num_samples']} trials planned, objectives {', '.join(tune_['objectives'])}, "
        f"sampler {tune_.get('sampler', 'tpe')}, scheduler {tune_.get('scheduler', 'asha')}, seed {tune_.get('seed')}",
        f"- trials: {len(rows)} ({', '.join(f'{n} {s}' for s, n in counts.items())})",
        f"- wall time: {_fmt(wall, '.0f')} s" + ("" if wall is not None else " (no summary.json: still running?)"),
        f"- experiment: `{summary.get('experiment') or exp}`; report written {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
        "## Best so far", "", "![best so far](best_so_far.png)", "",
        f"## dev {metric} against size and latency", "",
        "Pareto front (finished trials; highest metric, fewest parameters / lowest latency) marked and connected; "
        "pruned trials in grey; the star is the DistilBERT-defaults trial, the cross the teacher. Latency is the "
        "student's batch-1 time over the teacher's, both timed in the student's trial (milliseconds alone move "
        "with the machine's load).", "",
        "![against parameters](pareto_params.png)", "", f"Front by parameters: {front_ids['params']}", "",
        "![against latency](pareto_latency.png)", "", f"Front by latency: {front_ids['latency']}", "",
        "## Parameter importances", "", *imp_md, "",
        "## Learning curves", "", "![learning curves](curves.png)", "",
        f"## Top {len(top)} trials", "",
        *trials_table(top, defaults, meta["searched_keys"], metric), "",
        "Ranked by the last dev metric, finished trials before pruned ones; **defaults** is the first trial "
        "(the DistilBERT defaults)." if defaults else "Ranked by the last dev metric, finished trials first.",
    ]
