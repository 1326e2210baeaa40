"""The CLI as a user meets it: a real subprocess, clear one-line errors, no tracebacks."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tiny import write_sst2, write_tiny_teacher

ROOT = Path(__file__).parents[1]


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def write_config(tmp_path, **extra):
    glue = write_sst2(tmp_path / "glue")
    teacher = write_tiny_teacher(tmp_path / "teacher")
    raw = {
        "cache_dir": str(tmp_path / "cache"),
        "data": {"task": "sst2", "data_dir": str(glue), "max_length": 16},
        "teacher": {"name": str(teacher), "finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 16}},
        "student": {"num_layers": 1},
        "optim": {"lr": 1e-3, "batch_size": 16, "max_steps": 4, "eval_every": 2},
        "output": {"dir": str(tmp_path / "out")},
        **extra,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def main_error(capsys, *args) -> subprocess.CompletedProcess:
    """search.cli.main in this process (a subprocess costs ~10 s of imports): its exit code and stderr.
    An unexpected exception propagates and fails the test, as a traceback would."""
    from search.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_train_cli_end_to_end(tmp_path):
    proc = cli("train", str(write_config(tmp_path)), "--no-progress", "--set", "student.num_layers=2")
    assert proc.returncode == 0, proc.stderr
    assert "student dev/accuracy" in proc.stdout and "retention" in proc.stdout
    assert "majority class 0.5000" in proc.stdout  # balanced labels
    assert (tmp_path / "out" / "student" / "config.json").is_file()
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["student"]["num_layers"] == 2


def test_search_summary_lines_are_whole(capsys, monkeypatch):
    """rich wraps at 80 columns when piped: the summary's lines must come out whole, paths included."""
    from search.cli import _print_summary

    monkeypatch.setenv("COLUMNS", "80")
    exp = "/a/very/long/storage/path/that/goes/on/and/on/experiments/quickstart-sst2-20261127-154751"
    best = {"overrides": {"loss.temperature": 2.0, "student.num_layers": 3}, "main": 0.79, "params": 17_390_594,
            "latency_ms": 137.3, "teacher_latency_ms": 240.0, "speedup": 1.748}
    summary = {"trials": 10, "counts": {"TERMINATED": 3, "PRUNED": 7, "ERROR": 0}, "wall_seconds": 2087.2,
               "main_metric": "accuracy", "teacher": {"metrics": {"accuracy": 0.8}, "params": 22_713_986},
               "majority_class": {"accuracy": 0.515}, "best": best, "experiment": exp,
               "defaults_trial": {"main": 0.79, "status": "TERMINATED"}, "confirm": []}
    capsys.readouterr()
    _print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "10 trials: 3 finished, 7 pruned by ASHA, 0 failed; 2087s",
        "best configuration:",
        "  loss.temperature: 2",
        "  student.num_layers: 3",
        "dev accuracy: 0.7900 = 98.8% of the teacher's 0.8000",
        "majority-class baseline: dev accuracy 0.5150",
        "size: 17,390,594 parameters vs teacher 22,713,986 (77%)",
        "latency: 137.3 ms vs 240.0 ms, 1.7x faster (batch 1, in turn)",
        "DistilBERT defaults (first trial, terminated): dev accuracy 0.7900",
        f"results: {exp} (summary.json, optuna.db, trials)",
    ]
    assert all(len(line) <= 80 for line in lines[:-1])


def test_bad_inputs_give_one_clear_message(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert_clean_error(cli("train", str(tmp_path / "nope.yaml")), "nope.yaml", "not found")  # the real entry point
    assert_clean_error(main_error(capsys, "train", str(cfg), "--set", "loss.temperature=-1"), "loss.temperature")
    assert_clean_error(main_error(capsys, "train", str(cfg), "--set", "data.task=sst3"), "sst3")
    assert_clean_error(main_error(capsys, "train", str(cfg), "--set", f"teacher.name={tmp_path}"), "config.json")
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine movie\tmaybe\n")
    assert_clean_error(main_error(capsys, "train", str(cfg)), "maybe")
    assert not (tmp_path / "out" / "student").exists()
    # run --set: the space's base config, checked before anything runs
    e = str(tmp_path / "e")
    assert_clean_error(main_error(capsys, "run", "quickstart", "--set", "optim.lr", "--storage", e), "KEY=VALUE")
    assert_clean_error(main_error(capsys, "run", "quickstart", "--set", "loss.temperature=-1", "--storage", e),
                       "quickstart.yaml", "loss.temperature")
    assert_clean_error(main_error(capsys, "run", "quickstart", "--set", "student.num_heads=4", "--storage", e),
                       "quickstart.yaml", "student.num_heads", "derived")
    assert not (tmp_path / "e").exists()
