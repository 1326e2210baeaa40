"""distil-search report: the pure helpers on hand-made rows, then a report of a tiny real search."""
import json
import shutil
from pathlib import Path

import optuna
import pytest
from PIL import Image

from distil_core.errors import UserInputError
from search.report import (best_so_far, importances, plot_importance, plot_pareto, top_trials, trials_table,
                           write_report)

PLOTS = ("best_so_far.png", "pareto_params.png", "pareto_latency.png", "importance.png", "curves.png")


def assert_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        im.verify()


def row(tid, main, params, latency, status="TERMINATED", **over):
    speedup = 10.0 / latency if latency else None  # a teacher timed at 10 ms beside each student
    last = {"main": main, "params": params, "latency_ms": latency, "speedup": speedup}
    return {"trial_id": tid, "status": status, "main": main, "params": params, "latency_ms": latency,
            "speedup": speedup, "overrides": over, "last_result": last}


def test_best_so_far_sums_every_trials_steps_in_arrival_order():
    results = [  # listed by trial, not by time
        {"trial": "a", "step": 10, "main": 0.6, "time": 1.0},
        {"trial": "a", "step": 20, "main": 0.7, "time": 3.0},
        {"trial": "b", "step": 10, "main": 0.8, "time": 2.0},
        {"trial": "b", "step": 20, "main": 0.5, "time": 4.0},
    ]
    # a@10 -> 10 steps; b@10 -> 20; a@20 -> 30; b@20 -> 40; the best never drops
    assert best_so_far(results) == [(10, 0.6), (20, 0.8), (30, 0.8), (40, 0.8)]
    assert best_so_far([]) == []


def test_pareto_front_keeps_finished_trials_nothing_beats(tmp_path):
    rows = [row("A", 0.80, 10, 5.0), row("B", 0.85, 20, 9.0), row("C", 0.70, 5, 6.0),
            row("D", 0.75, 15, 2.0),  # beaten by A on params, but the fastest
            row("E", 0.95, 1, 1.0, status="PRUNED"),  # would beat all, but stopped early: not on a front
            row("F", None, None, None, status="ERROR")]
    front = plot_pareto(rows, "params", rows[0], (30, 0.9), tmp_path / "p.png", "accuracy", "parameters")
    assert [r["trial_id"] for r in front] == ["C", "A", "B"]  # sorted by parameters, as connected
    front = plot_pareto(rows, "latency", None, (1.0, 0.9), tmp_path / "l.png", "accuracy", "latency")
    assert [r["trial_id"] for r in front] == ["D", "A", "B"]
    # latency is judged against the teacher timed beside each student: a student timed in a slow moment, its
    # teacher slow too, is as fast as it is
    busy = row("A", 0.80, 10, 50.0)  # A timed 10x slower, beside a teacher timed 10x slower
    busy["speedup"] = busy["last_result"]["speedup"] = 2.0
    front = plot_pareto([busy, *rows[1:]], "latency", None, (1.0, 0.9), tmp_path / "l.png", "accuracy", "latency")
    assert [r["trial_id"] for r in front] == ["D", "A", "B"]
    assert_png(tmp_path / "p.png")
    assert_png(tmp_path / "l.png")


def test_top_trials_rank_finished_before_pruned_and_table_marks_defaults():
    rows = [row("d0", 0.70, 10, 5.0, **{"loss.temperature": 2.0}), row("p1", 0.99, 10, 5.0, status="PRUNED"),
            row("f2", 0.80, 10, 5.0, **{"loss.temperature": 4.5}), row("e3", None, None, None, status="ERROR")]
    top = top_trials(rows, 2)
    assert [r["trial_id"] for r in top] == ["f2", "d0"]
    lines = trials_table(top, rows[0], ["loss.temperature"], "accuracy")
    assert lines[0].startswith("| rank | trial | status | dev accuracy |") and len(lines) == 2 + 3
    assert lines[2].startswith("| 1 | f2 | finished | 0.8000 | 10 | 5.0 | 2.00x | 4.5 |")
    assert "d0 (defaults)" in lines[3] and lines[4].startswith("| **defaults** | **d0** |")
    assert [r["trial_id"] for r in top_trials(rows, 5)] == ["f2", "d0", "p1"]


def test_importances_need_two_finished_trials_and_rank_what_matters(tmp_path):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    with pytest.raises(ValueError, match="at least 2"):
        importances(study)
    study.optimize(lambda t: 10 * t.suggest_float("x", 0, 1) + 0.01 * t.suggest_float("y", 0, 1), n_trials=30)
    imp = importances(study)
    assert set(imp) == {"x", "y"} and imp["x"] > 0.8 > imp["y"]
    assert imp == importances(study)  # seeded: the same importances every time
    plot_importance(imp, tmp_path / "i.png", "accuracy")
    assert_png(tmp_path / "i.png")
    same = optuna.create_study(direction="maximize")
    for _ in range(3):
        same.enqueue_trial({"x": 0.5})
    same.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    with pytest.raises(ValueError, match="more than one value"):
        importances(same)
    flat = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    flat.optimize(lambda t: t.suggest_float("x", 0, 1) * 0 + 0.5, n_trials=3)
    with pytest.raises(ValueError, match="same value"):
        importances(flat)


def test_report_refuses_a_folder_that_is_not_a_report(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="not an earlier report"):
        write_report(tmp_path, tmp_path / "mine")
    with pytest.raises(UserInputError, match="top-k"):
        write_report(tmp_path, tmp_path / "new", top_k=0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and not (tmp_path / "new").exists()


@pytest.mark.slow
def test_report_of_a_tiny_two_objective_search(tmp_path, capsys, tiny_search):
    from search.cli import main
    from search.report import trial_histories

    summary, exp, rows = tiny_search["summary"], tiny_search["exp"], tiny_search["rows"]
    md_path = write_report(exp, top_k=3)
    assert md_path == exp / "report" / "report.md"
    md = md_path.read_text()
    study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{exp / 'optuna.db'}")
    values = [t.values[0] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    for name in PLOTS:
        if name == "importance.png" and (len(values) < 2 or len(set(values)) == 1):  # nothing to explain
            assert "Not plotted:" in md and not (exp / "report" / name).exists()
            continue
        assert f"]({name})" in md
        assert_png(exp / "report" / name)
    # the table: the top 3 trials, then the defaults trial (the first) as its own marked row
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    top = top_trials(rows, 3)
    assert [line.split(" | ")[1].split(" ")[0] for line in table[:3]] == [r["trial_id"] for r in top]
    assert table[0].split(" | ")[1].startswith(summary["best"]["trial_id"])
    assert table[3].startswith(f"| **defaults** | **{rows[0]['trial_id']}** |") and len(table) == 4
    assert "objectives main, latency" in md and f"trials: {len(rows)} (" in md
    assert "- majority-class baseline (always the most frequent train label): dev accuracy 0.5000" in md
    # best so far: over all results, monotone in steps and in the best value, ending at the overall best
    series = best_so_far([p for h in trial_histories(exp).values() for p in h])
    assert len(series) == sum(r["evaluations"] for r in rows)
    assert all(s1 <= s2 and b1 <= b2 for (s1, b1), (s2, b2) in zip(series, series[1:]))
    assert series[-1] == (sum(r["step"] for r in rows), max(r["best_main"] for r in rows))
    # the CLI: by name under --storage, into --out; a second run replaces the first, no temp folders left
    for _ in range(2):
        assert main(["report", exp.name, "--storage", str(exp.parent), "--out", str(tmp_path / "r"),
                     "--top-k", "1"]) == 0
    assert f"wrote {tmp_path / 'r' / 'report.md'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert len([line for line in (tmp_path / "r" / "report.md").read_text().splitlines() if line.startswith("| ")]) == 3
    assert main(["report", "nope", "--storage", str(exp.parent)]) == 2
    # a search begun before distil_search.json recorded the majority-class baseline: the caller passes it
    old_exp = shutil.copytree(exp, tmp_path / "old", ignore=shutil.ignore_patterns("report"))
    meta = json.loads((old_exp / "distil_search.json").read_text())
    del meta["majority_class"]
    (old_exp / "distil_search.json").write_text(json.dumps(meta))
    assert "majority-class baseline" not in write_report(old_exp).read_text()
    md = write_report(old_exp, majority_class={"accuracy": 0.4}).read_text()
    assert "- majority-class baseline (always the most frequent train label): dev accuracy 0.4000" in md
