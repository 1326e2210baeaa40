"""After a search: TensorBoard HParams for every trial, and the export of the winner (one tiny search shared)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import accuracy_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from distil_core.errors import UserInputError
from test_search import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture
def search(tiny_search):
    return tiny_search


def hparams_content(folder: Path) -> tuple[EventAccumulator, dict[str, plugin_data_pb2.HParamsPluginData]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    try:
        content = acc.PluginTagToContent("hparams")
    except KeyError:  # no hparams summaries in this folder
        content = {}
    return acc, {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}


def test_root_hparams_config_lists_every_searched_parameter_and_metric(search):
    _, content = hparams_content(search["exp"])
    experiment = content["_hparams_/experiment"].experiment
    # every searched key, plus the heads the space derives from the sampled width
    assert {h.name for h in experiment.hparam_infos} == set(search["space"]["search"]) | {"student.num_heads"}
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"dev/accuracy", "loss/total", "search/params", "search/latency_ms"} <= metrics
    groups = {m.name.tag: m.name.group for m in experiment.metric_infos}
    assert groups["dev/accuracy"] == "run/tb" and groups["search/params"] == ""


def test_every_trial_has_its_hparams_session_and_final_metrics(search):
    for row in search["rows"]:
        session, content = hparams_content(Path(row["path"]))
        acc, _ = hparams_content(Path(row["path"]) / "run" / "tb")  # the trainer's run: the metric group
        hparams = content["_hparams_/session_start_info"].session_start_info.hparams
        assert content["_hparams_/session_start_info"].session_start_info.group_name == row["trial_id"]
        for key, value in row["overrides"].items():
            got = hparams[key]
            assert (got.string_value if isinstance(value, str) else got.number_value) == pytest.approx(value)
        # the last dev evaluation in TensorBoard is the trial's last reported result
        assert acc.Scalars("dev/accuracy")[-1].value == pytest.approx(row["last_result"]["dev_accuracy"], abs=1e-6)
        assert session.Scalars("search/params")[-1].value == pytest.approx(row["params"], rel=1e-6)
        assert acc.Scalars("loss/total") and acc.Scalars("train/examples_per_s")
    # Tune's own TBX logger (one hparams experiment per trial) is off: one session file per trial folder
    for row in search["rows"]:
        assert len(list(Path(row["path"]).glob("events.out.tfevents*"))) == 1


def test_export_loads_with_from_pretrained_and_reproduces_the_metric(search):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from search.export import export

    out = search["tmp"] / "export"
    summary = export(str(search["exp"]), out)
    best = search["summary"]["best"]
    assert summary["trial_id"] == best["trial_id"]
    # a user's own evaluation of the exported folder: tokenizer + model from DIR/student, sklearn accuracy
    model = AutoModelForSequenceClassification.from_pretrained(out / "student").eval()
    tok = AutoTokenizer.from_pretrained(out / "student")
    lines = (search["tmp"] / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]
    texts, labels = zip(*(line.split("\t") for line in lines))
    with torch.no_grad():
        enc = tok(list(texts), padding=True, truncation=True, max_length=16, return_tensors="pt")
        preds = model(**enc).logits.argmax(-1).numpy()
    accuracy = accuracy_score(np.array(labels, dtype=int), preds)
    assert abs(accuracy - best["main"]) <= 0.005
    assert abs(summary["reevaluated"]["dev_accuracy"] - best["main"]) <= 0.005
    saved = json.loads((out / "summary.json").read_text())
    assert saved["teacher"]["identity"] and saved["code"]["git_commit"]
    assert saved["majority_class"] == {"accuracy": 0.5}  # balanced labels
    assert saved["size_and_speed"]["params"] == best["params"] and saved["seeds"]["seed"] == 42
    assert set(saved["space"]["search"]) == set(search["space"]["search"])


def test_train_yaml_round_trips_through_distil_search_train(search):
    from search.export import export

    out = search["tmp"] / "export2"
    export(str(search["exp"]), out)
    train = yaml.safe_load((out / "train.yaml").read_text())
    best = search["summary"]["best"]["overrides"]
    assert train["loss"]["temperature"] == pytest.approx(best["loss.temperature"])
    assert train["student"]["num_layers"] == best["student.num_layers"]
    assert train["data"]["train_limit"] is None and train["optim"]["max_steps"] is None  # the full-data schedule
    run = subprocess.run([sys.executable, "-m", "search.cli", "train", str(out / "train.yaml"), "--no-progress",
                          "--set", f"output.dir={search['tmp'] / 'full'}"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    metrics = json.loads((search["tmp"] / "full" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["student"]["layers"] == best["student.num_layers"]


def test_export_rejects_bad_input_and_leaves_nothing(search):
    from search.export import export

    with pytest.raises(UserInputError, match="--trial nope"):
        export(str(search["exp"]), search["tmp"] / "bad", trial_id="nope")
    assert not (search["tmp"] / "bad").exists()
    busy = search["tmp"] / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty"):
        export(str(search["exp"]), busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not [p for p in search["tmp"].iterdir() if p.name.startswith(".busy-")]


def test_tensorboard_command_serves_one_hparams_table_of_all_trials(search):
    """`distil-search tensorboard` on loopback; its HParams API lists every trial with its metrics."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "tensorboard", str(search["exp"]), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        body = json.dumps({"experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
                           "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/data/plugin/hparams/session_groups",
                                         data=body.encode(), headers={"Content-Type": "application/json"})
        deadline, groups = time.time() + 120, None
        while time.time() < deadline:
            try:
                groups = json.loads(urllib.request.urlopen(request, timeout=10).read())["sessionGroups"]
                if len(groups) == len(search["rows"]):
                    break
            except OSError:
                pass
            time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert {g["name"] for g in groups} == {r["trial_id"] for r in search["rows"]}
    for g in groups:
        values = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
        assert {"dev/accuracy", "loss/total", "search/params", "search/latency_ms"} <= set(values)
        assert set(g["hparams"]) == set(search["space"]["search"]) | {"student.num_heads"}
