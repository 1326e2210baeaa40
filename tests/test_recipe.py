"""End to end on tiny random BERTs: fine-tune + cache the teacher, distil, resume exactly, seeds, NaN, MLM."""
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from distil_core.config import Config, config_from_dict
from distil_core.recipe import distill, prepare, seeded_student
from distil_core.student import measure_latency_ms
from tiny import sentence, write_corpus, write_sst2, write_tiny_teacher


def make_cfg(tmp_path: Path, out: str = "run", **over) -> Config:
    glue = write_sst2(tmp_path / "glue")
    teacher = tmp_path / "teacher"
    if not teacher.exists():
        write_tiny_teacher(teacher)
    raw = {
        "seed": 7,
        "cache_dir": str(tmp_path / "cache"),
        "data": {"task": "sst2", "data_dir": str(glue), "max_length": 16},
        "teacher": {"name": str(teacher), "finetune": {"epochs": 2, "lr": 1e-3, "batch_size": 16}},
        "student": {"num_layers": 2, "init": "teacher-layers"},
        "optim": {"lr": 1e-3, "batch_size": 16, "max_steps": 8, "eval_every": 4, "warmup_ratio": 0.1},
        "output": {"dir": str(tmp_path / out)},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw)


def test_end_to_end_task_distillation(tmp_path):
    cfg = make_cfg(tmp_path)
    summary = distill(cfg, progress=False)
    out = Path(cfg.output.dir)
    assert summary["status"] == "completed" and summary["step"] == 8
    assert [h["step"] for h in summary["history"]] == [4, 8]
    assert "dev/accuracy" in summary["metrics"] and "dev/accuracy" in summary["teacher_metrics"]
    assert summary["majority_class_metrics"] == {"dev/accuracy": 0.5}  # balanced labels
    assert summary["student"]["total"] < summary["teacher"]["total"]
    # the exported student is a plain transformers folder
    model = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 2
    assert (out / "student" / "model.safetensors").is_file() and (out / "student" / "tokenizer_config.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["status"] == "completed"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert len(list((out / "checkpoints").glob("step-*"))) == 2
    # teacher fine-tuned once, and its outputs cached with hidden states (alpha_cos > 0)
    teachers = list((tmp_path / "cache" / "teachers").iterdir())
    assert len(teachers) == 1 and (teachers[0] / "teacher.json").is_file()
    outputs = [p for p in (tmp_path / "cache" / "teacher_outputs").iterdir() if (p / "hidden.npy").exists()]
    assert len(outputs) == 1


def test_second_run_reuses_teacher_and_outputs(tmp_path):
    distill(make_cfg(tmp_path, "a"), progress=False)
    cache = tmp_path / "cache"
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    prep = prepare(make_cfg(tmp_path, "b"), progress=False)
    assert prep.teacher_identity.startswith("finetuned:")
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == stamps  # nothing rewritten
    assert prep.timings["teacher_s"] < 30


def test_the_majority_class_floor_is_train_s_most_frequent_label_scored_on_dev(tmp_path):
    cfg = make_cfg(tmp_path)
    rng = random.Random(0)
    for split, positive in (("train", lambda i: i % 4 != 0), ("dev", lambda i: i % 4 == 0)):  # 3/4 vs 1/4 positive
        rows = [(sentence(rng, positive(i)), int(positive(i))) for i in range(32)]
        (Path(cfg.data.data_dir) / "SST-2" / f"{split}.tsv").write_text(
            "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    assert prepare(cfg, progress=False).majority_baseline() == {"accuracy": 0.25}


def test_same_seed_same_metrics(tmp_path):
    a = distill(make_cfg(tmp_path, "a"), progress=False)
    b = distill(make_cfg(tmp_path, "b"), progress=False)
    assert [h["metrics"] for h in a["history"]] == [h["metrics"] for h in b["history"]]
    assert [h["train"]["loss/total"] for h in a["history"]] == [h["train"]["loss/total"] for h in b["history"]]
    # a student built beforehand (as a trial does, to time it first) trains the same
    cfg = make_cfg(tmp_path, "c")
    prep = prepare(cfg, progress=False)
    student = seeded_student(prep)
    assert measure_latency_ms(student[0], cfg.data.max_length, repeats=2) > 0
    c = distill(cfg, prep, progress=False, student=student)
    assert [h["metrics"] for h in a["history"]] == [h["metrics"] for h in c["history"]]
    assert [h["train"]["loss/total"] for h in a["history"]] == [h["train"]["loss/total"] for h in c["history"]]


class StopAfterFirstEval:
    def on_evaluate(self, event):
        raise KeyboardInterrupt  # as if the process were killed right after the checkpoint


@pytest.mark.parametrize("over", [{}, {"student__hidden_size": 16, "student__init": "teacher-slice", "optim__grad_accum": 2}])
def test_resume_is_exact(tmp_path, over):
    full = distill(make_cfg(tmp_path, "full", **over), progress=False)
    cfg = make_cfg(tmp_path, "cut", **over)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, callbacks=(StopAfterFirstEval(),), progress=False)
    assert not (Path(cfg.output.dir) / "student").exists()
    resumed = distill(cfg, resume=True, progress=False)
    a = load_file(tmp_path / "full" / "student" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["metrics"] == full["metrics"]


def test_existing_output_needs_resume_or_overwrite(tmp_path):
    from distil_core.errors import UserInputError

    cfg = make_cfg(tmp_path)
    distill(cfg, progress=False)
    with pytest.raises(UserInputError, match="already holds a run"):
        distill(cfg, progress=False)
    assert distill(cfg, overwrite=True, progress=False)["status"] == "completed"


def test_non_finite_loss_stops_with_status(tmp_path):
    from distil_core.trainer import Trainer

    cfg = make_cfg(tmp_path)
    prep = prepare(cfg, progress=False)

    class NaNTeacher:
        def outputs(self, batch, need_hidden):
            logits, hidden = prep.signal.outputs(batch, need_hidden)
            return logits * float("nan"), hidden

    from distil_core.recipe import build_run_student, task_evaluator

    student, projection = build_run_student(prep)
    trainer = Trainer(student, task_kind="classification", train_data=prep.train, collate_fn=prep.collate,
                      optim=cfg.optim, loss=cfg.loss, seed=1, teacher=NaNTeacher(), projection=projection,
                      evaluate=task_evaluator(prep.task, prep.dev, prep.collate, 64, prep.device),
                      main_metric="accuracy", progress=False, tensorboard=False)
    result = trainer.train()
    assert result.status == "diverged" and result.step == 0
    assert "nan" in result.message.lower() and "loss/kd" in result.message


def test_the_cpu_optimizer_is_torchs_fused_adamw(tmp_path):
    """Not torch's CPU default, a per-tensor loop about 6x slower (bench/optimizer.py)."""
    from distil_core.recipe import build_run_student
    from distil_core.trainer import Trainer

    cfg = make_cfg(tmp_path)
    prep = prepare(cfg, progress=False)
    student, projection = build_run_student(prep)
    trainer = Trainer(student, task_kind="classification", train_data=prep.train, collate_fn=prep.collate,
                      optim=cfg.optim, loss=cfg.loss, seed=1, teacher=prep.signal, projection=projection,
                      evaluate=lambda model: {}, main_metric="accuracy", progress=False, tensorboard=False)
    assert type(trainer.optimizer) is torch.optim.AdamW and trainer.optimizer.defaults["fused"] is True
    assert trainer.optimizer.param_groups[0]["weight_decay"] == cfg.optim.weight_decay


def test_regression_task_stsb(tmp_path):
    folder = tmp_path / "glue" / "STS-B"
    folder.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    import random

    rng = random.Random(0)
    words = ["good", "bad", "movie", "film", "plot", "the"]
    for split, n in (("train", 48), ("dev", 16)):
        rows = [f"{i}\tg\tf\ty\t{i}\ts\ts\t{' '.join(rng.sample(words, 3))}\t{' '.join(rng.sample(words, 3))}\t{rng.uniform(0, 5):.3f}\n"
                for i in range(n)]
        (folder / f"{split}.tsv").write_text(header + "".join(rows))
    teacher = write_tiny_teacher(tmp_path / "teacher", num_labels=1)
    cfg = make_cfg(tmp_path, data__task="stsb", loss__alpha_mse=0.5)
    assert str(teacher) == cfg.teacher.name
    summary = distill(cfg, progress=False)
    assert summary["status"] == "completed"
    assert {"dev/pearson", "dev/spearman"} <= set(summary["metrics"])


def test_mlm_general_distillation(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = make_cfg(tmp_path, data__corpus=str(corpus), student__hidden_size=16, student__init="teacher-slice",
                   probe__steps=4, probe__train_limit=32)
    cfg.objective = "mlm"
    summary = distill(cfg, progress=False)
    assert summary["status"] == "completed"
    # judged by a GLUE probe: a copy of the student fine-tuned briefly on data.task at each evaluation
    assert summary["main_metric"] == "probe_accuracy"
    assert {"dev/mlm_loss", "dev/mlm_accuracy", "dev/probe_accuracy"} <= set(summary["metrics"])
    assert len(summary["history"]) == 2
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(Path(cfg.output.dir) / "student").config.hidden_size == 16


def test_prepared_artifacts_load_by_path_and_give_the_same_run(tmp_path):
    from distil_core.recipe import load_prepared

    cfg = make_cfg(tmp_path, "a")
    prep = prepare(cfg, progress=False)
    art = prep.artifacts()
    assert art and Path(art["train"]).is_file() and (Path(art["outputs"]) / "hidden.npy").is_file()
    loaded = load_prepared(make_cfg(tmp_path, "b"), art)
    assert len(loaded.train) == len(prep.train) and loaded.teacher_metrics == prep.teacher_metrics
    a = distill(cfg, prep, progress=False)
    b = distill(make_cfg(tmp_path, "b"), loaded, progress=False)
    assert [h["metrics"] for h in a["history"]] == [h["metrics"] for h in b["history"]]
    with pytest.raises(ValueError, match="another data/teacher"):
        load_prepared(make_cfg(tmp_path, "c", data__max_length=12), art)


def test_teacher_fine_tuning_is_reproducible(tmp_path):
    import random

    a = prepare(make_cfg(tmp_path, "a"), progress=False)
    torch.manual_seed(random.randrange(10**6))  # whatever the global RNG holds before preparing
    cfg_b = make_cfg(tmp_path, "b")
    cfg_b.cache_dir = str(tmp_path / "cache-b")
    b = prepare(cfg_b, progress=False)
    assert a.teacher_metrics == b.teacher_metrics
    for (name, p), q in zip(a.teacher.named_parameters(), b.teacher.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("how,picked", [("spread", [0, 3]), ("bottom", [0, 1]), ("bottom", [0]), ("spread", [3])])
def test_run_student_copies_the_configured_teacher_layers(tmp_path, how, picked):  # of 4
    from distil_core.recipe import build_run_student

    prep = prepare(make_cfg(tmp_path, student__layer_pick=how, student__num_layers=len(picked)))
    student, _ = build_run_student(prep)
    t_state, s_state = prep.teacher.state_dict(), student.state_dict()
    key = "attention.self.query.weight"
    for i, j in enumerate(picked):
        assert torch.equal(s_state[f"bert.encoder.layer.{i}.{key}"].cpu(), t_state[f"bert.encoder.layer.{j}.{key}"].cpu())


def test_progress_bar_ends_on_the_final_dev_metric(tmp_path, capsys):
    summary = distill(make_cfg(tmp_path), progress=True)
    err = capsys.readouterr().err
    final = f"accuracy={summary['metrics']['dev/accuracy']:.4f}"
    assert final in err.rsplit("distil", 1)[-1] and "nan" not in err, err[-500:]
