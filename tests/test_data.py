"""Tests for distil_core.data and distil_core.tasks on small GLUE-format fixtures (CPU, offline)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from datasets.exceptions import DatasetNotFoundError
from transformers import AutoTokenizer, BertTokenizer

from distil_core import data
from distil_core.data import (load_corpus, load_glue, mlm_collator, task_collator, tokenize_corpus, tokenize_task,
                              train_subset)
from distil_core.errors import UserInputError
from distil_core.tasks import TASKS, compute_metrics, get_task, majority_baseline, prediction_loss

WORDS = "the a cat dog sat on mat is good bad movie he said hi she runs fast slow question answer why what".split()


def make_tokenizer() -> BertTokenizer:
    """A word-level BERT tokenizer built offline (transformers 5: pass `vocab`, not `vocab_file`)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, '"', ".", "?"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    # Keep datasets' own cache (load_dataset of local files) inside the test's folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("GLUE_DIR", raising=False)


def tsv(*rows: tuple) -> str:
    return "".join("\t".join(map(str, r)) + "\n" for r in rows)


MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
                     "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label").split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()


def mnli_rows(header: list[str], pairs: list[tuple[str, str, str]]) -> str:
    rows = []
    for i, (s1, s2, gold) in enumerate(pairs):
        row = [str(i), "p", "q", "fiction", "(b1)", "(b2)", "(p1)", "(p2)", s1, s2] + [gold] * (len(header) - 10)
        rows.append(row)
    return tsv(header, *rows)


# Each task: files to write, and expected (first text column values, labels) per split.
GLUE_FILES = {
    "CoLA/train.tsv": tsv(("gj04", 1, "", "The cat sat."), ("gj04", 0, "*", 'He said "hi.'), ("cj99", 1, "", "A dog.")),
    # CoLA dev: no header and no final newline.
    "CoLA/dev.tsv": tsv(("gj04", 0, "*", "Cat the sat."), ("gj04", 1, "", "She runs.")).rstrip("\n"),
    # SST-2: an unbalanced literal quote that would swallow the following rows with csv quoting on.
    "SST-2/train.tsv": tsv(("sentence", "label"), ('" the movie is good ', 1), ("bad movie ", 0), ("a cat", 1)),
    "SST-2/dev.tsv": tsv(("sentence", "label"), ("good", 1), ("bad", 0)),
    "MRPC/train.tsv": "\ufeff" + tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                                     (1, 11, 12, "He said hi.", 'He said "hi".'), (0, 13, 14, "A cat.", "A dog.")),
    "MRPC/dev.tsv": "\ufeff" + tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), (1, 1, 2, "a", "b")),
    "QQP/train.tsv": tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                         (0, 1, 2, "Why?", "Why so?", 1), (1, 3, 4, "What?", "Who?", 0),
                         (2, 5, "a malformed row"), (3, 7, 8, "A?", "B?", 0)),
    "QQP/dev.tsv": tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), (0, 1, 2, "x?", "y?", 1)),
    "STS-B/train.tsv": tsv(STSB_HEADER, (0, "captions", "MSRvid", "2012", 1, "n", "n", "A cat.", "A dog.", "2.500"),
                           (1, "main-news", "x", "2012", 2, "n", "n", "He runs.", "He runs fast.", "4.75")),
    "STS-B/dev.tsv": tsv(STSB_HEADER, (0, "g", "f", "y", 0, "n", "n", "a", "b", "0.000")),
    "MNLI/train.tsv": mnli_rows(MNLI_TRAIN_HEADER, [("A cat sat.", "A cat.", "entailment"), ("A dog.", "No dog.",
                                                    "contradiction"), ("He runs.", "Fast.", "neutral")]),
    "MNLI/dev_matched.tsv": mnli_rows(MNLI_DEV_HEADER, [("m1", "h1", "neutral"), ("m2", "h2", "entailment")]),
    "MNLI/dev_mismatched.tsv": mnli_rows(MNLI_DEV_HEADER, [("mm1", "h1", "contradiction")]),
    "QNLI/train.tsv": tsv(("index", "question", "sentence", "label"), (0, "Why?", "Because.", "entailment"),
                          (1, "What?", "Nothing.", "not_entailment")),
    "QNLI/dev.tsv": tsv(("index", "question", "sentence", "label"), (0, "q", "s", "not_entailment")),
    "RTE/train.tsv": tsv(("index", "sentence1", "sentence2", "label"), (0, "A b.", "A.", "not_entailment"),
                         (1, "C d.", "C.", "entailment")),
    "RTE/dev.tsv": tsv(("index", "sentence1", "sentence2", "label"), (0, "x", "y", "entailment")),
    "WNLI/train.tsv": tsv(("index", "sentence1", "sentence2", "label"), (0, "s1", "s2", 1), (1, "s3", "s4", 0)),
    "WNLI/dev.tsv": tsv(("index", "sentence1", "sentence2", "label"), (0, "s5", "s6", 0)),
}

EXPECTED = {  # task -> split -> (first text column, labels)
    "cola": {"train": (["The cat sat.", 'He said "hi.', "A dog."], [1, 0, 1]),
             "dev": (["Cat the sat.", "She runs."], [0, 1])},
    "sst2": {"train": (['" the movie is good ', "bad movie ", "a cat"], [1, 0, 1]), "dev": (["good", "bad"], [1, 0])},
    "mrpc": {"train": (["He said hi.", "A cat."], [1, 0]), "dev": (["a"], [1])},
    "qqp": {"train": (["Why?", "What?", "A?"], [1, 0, 0]), "dev": (["x?"], [1])},
    "stsb": {"train": (["A cat.", "He runs."], [2.5, 4.75]), "dev": (["a"], [0.0])},
    # hub label order for MNLI: entailment=0, neutral=1, contradiction=2
    "mnli": {"train": (["A cat sat.", "A dog.", "He runs."], [0, 2, 1]), "dev": (["m1", "m2"], [1, 0]),
             "dev_matched": (["m1", "m2"], [1, 0]), "dev_mismatched": (["mm1"], [2])},
    "qnli": {"train": (["Why?", "What?"], [0, 1]), "dev": (["q"], [1])},
    "rte": {"train": (["A b.", "C d."], [1, 0]), "dev": (["x"], [0])},
    "wnli": {"train": (["s1", "s3"], [1, 0]), "dev": (["s5"], [0])},
}


@pytest.fixture
def glue_dir(tmp_path) -> Path:
    root = tmp_path / "glue"
    for rel, text in GLUE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode("utf-8"))  # bytes: exact content, no newline translation
    return root


# --- tasks -----------------------------------------------------------------------------------


def test_registry_shape():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3 and get_task("mnli").dev_splits == ("dev_matched", "dev_mismatched")
    assert get_task("mnli").text_columns == ("premise", "hypothesis")
    assert {t.main_metric for t in TASKS.values()} == {"matthews_correlation", "pearson", "f1", "accuracy"}


@pytest.mark.parametrize("spelling,name", [("SST-2", "sst2"), ("sts-b", "stsb"), ("CoLA", "cola"), ("QQP", "qqp"),
                                           ("mnli", "mnli"), ("STS_B", "stsb")])
def test_get_task_spellings(spelling, name):
    assert get_task(spelling).name == name


def test_get_task_unknown_lists_valid_names():
    with pytest.raises(UserInputError, match="'sst3'.*sst2.*wnli"):
        get_task("sst3")


def test_metrics_perfect_and_hand_computed():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # argmax: 0 1 1 0
    assert compute_metrics("sst2", logits, [0, 1, 1, 0]) == {"accuracy": 1.0}
    assert compute_metrics("cola", logits, [0, 1, 1, 0]) == {"matthews_correlation": 1.0}
    # preds 0 1 1 0 vs labels 0 1 0 0: tp=1 fp=1 fn=0 tn=2 -> f1 = 2/3, acc = 3/4
    m = compute_metrics("mrpc", logits, [0, 1, 0, 0])
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.75)
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 2 / sqrt(2*1*3*2) = 0.57735
    assert compute_metrics("cola", logits, [0, 1, 0, 0])["matthews_correlation"] == pytest.approx(2 / np.sqrt(12))
    assert set(compute_metrics("qqp", logits, [0, 1, 0, 0])) == {"accuracy", "f1"}
    assert compute_metrics("mnli", np.eye(3), [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}


def test_metrics_regression_squeezes():
    preds = np.array([[1.0], [2.0], [3.0], [4.0]])
    m = compute_metrics("stsb", preds, [1.0, 2.0, 3.0, 4.0])
    assert m == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    # x = 1 2 3, y = 1 3 2: pearson = 0.5, spearman = 0.5
    m = compute_metrics("stsb", torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 3.0, 2.0]))
    assert m["pearson"] == pytest.approx(0.5) and m["spearman"] == pytest.approx(0.5)


def test_prediction_loss_matches_torch():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.5, 3.0]])
    labels = [0, 0, 1]
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    assert prediction_loss("sst2", logits, labels) == pytest.approx(expected)
    assert prediction_loss("mnli", np.eye(3), [0, 1, 1]) == pytest.approx(
        torch.nn.functional.cross_entropy(torch.eye(3), torch.tensor([0, 1, 1])).item())
    assert prediction_loss("stsb", np.array([[1.0], [2.0]]), [1.5, 2.0]) == pytest.approx(0.125)


# --- load_glue: GLUE's original layout --------------------------------------------------------


@pytest.mark.parametrize("task,split", [(t, s) for t, splits in EXPECTED.items() for s in splits])
def test_load_glue_all_tasks(glue_dir, task, split):
    ds = load_glue(task, split, data_dir=str(glue_dir))
    texts, labels = EXPECTED[task][split]
    t = get_task(task)
    assert ds.column_names == [*t.text_columns, "label"]
    assert ds[t.text_columns[0]][:] == texts
    if t.is_regression:
        assert ds["label"][:] == pytest.approx(labels)
        assert ds.features["label"].dtype == "float32"
    else:
        assert ds["label"][:] == labels
        assert ds.features["label"].names == list(t.label_names)


def test_quotes_are_literal_and_pairs_kept(glue_dir):
    mrpc = load_glue("mrpc", "train", data_dir=str(glue_dir))
    assert mrpc["sentence2"][:] == ['He said "hi".', "A dog."]
    mnli = load_glue("MNLI", "train", data_dir=str(glue_dir))
    assert mnli[0] == {"premise": "A cat sat.", "hypothesis": "A cat.", "label": 0}


def test_qqp_skips_malformed_rows_and_says_how_many(glue_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="distil_core.data"):
        ds = load_glue("qqp", "train", data_dir=str(glue_dir))
    assert len(ds) == 3
    assert "skipped 1 malformed" in caplog.text


def test_malformed_row_in_other_task_is_an_error(glue_dir):
    (glue_dir / "RTE" / "dev.tsv").write_text(tsv(("index", "sentence1", "sentence2", "label"), (0, "x", "entailment")))
    with pytest.raises(UserInputError, match=r"RTE/dev.tsv: line 2: 3 tab-separated fields, expected 4"):
        load_glue("rte", "dev", data_dir=str(glue_dir))


def test_glue_dir_from_env(glue_dir, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    assert len(load_glue("sst2", "train")) == 3


def test_fingerprint_follows_content(glue_dir):
    a = load_glue("sst2", "train", data_dir=str(glue_dir))
    b = load_glue("sst2", "train", data_dir=str(glue_dir))
    assert a._fingerprint == b._fingerprint
    assert load_glue("sst2", "dev", data_dir=str(glue_dir))._fingerprint != a._fingerprint
    (glue_dir / "SST-2" / "train.tsv").write_text(tsv(("sentence", "label"), ("other", 0)))
    assert load_glue("sst2", "train", data_dir=str(glue_dir))._fingerprint != a._fingerprint


# --- load_glue: user files and the hub --------------------------------------------------------


def test_files_csv_with_text_labels(tmp_path):
    path = tmp_path / "mnli.csv"
    pd.DataFrame({"premise": ['p "1", quoted', "p2"], "hypothesis": ["h1", "h2"], "extra": [1, 2],
                  "label": ["contradiction", "neutral"]}).to_csv(path, index=False)
    ds = load_glue("mnli", "dev", files={"dev": str(path)})
    assert ds.column_names == ["premise", "hypothesis", "label"]
    assert ds[:] == {"premise": ['p "1", quoted', "p2"], "hypothesis": ["h1", "h2"], "label": [2, 1]}
    assert load_glue("mnli", "dev", files={"dev": str(path)})._fingerprint == ds._fingerprint


@pytest.mark.parametrize("suffix", ["json", "jsonl", "parquet"])
def test_files_json_jsonl_parquet(tmp_path, suffix):
    df = pd.DataFrame({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]})
    path = tmp_path / f"train.{suffix}"
    if suffix == "parquet":
        df.to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in df.to_dict("records")) + "\n")
    ds = load_glue("sst2", "train", files={"train": str(path)})
    assert ds["sentence"][:] == ["good", "bad", "fine"] and ds["label"][:] == [1, 0, 1]


def test_files_stsb_float_labels(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text("sentence1,sentence2,label\na,b,3.2\nc,d,0\n")
    ds = load_glue("stsb", "dev", files={"dev": str(path)})
    assert ds["label"][:] == pytest.approx([3.2, 0.0])


def test_hub_source_names_and_columns(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        if name == "sst2":
            return Dataset.from_dict({"sentence": ["s"], "label": [1], "idx": [0]})
        return Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]})

    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    ds = load_glue("mnli", "dev")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert ds.column_names == ["premise", "hypothesis", "label"] and ds[0]["label"] == 2
    assert ds.features["label"].names == ["entailment", "neutral", "contradiction"]
    assert load_glue("sst2", "dev").column_names == ["sentence", "label"]
    load_glue("mnli", "dev_mismatched")
    assert calls[1:] == [("nyu-mll/glue", "sst2", "validation"), ("nyu-mll/glue", "mnli", "validation_mismatched")]


# --- user errors ------------------------------------------------------------------------------


def test_hub_unreachable_is_one_message_naming_glue_dir(monkeypatch):
    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(data, "load_dataset", offline)
    with pytest.raises(UserInputError, match=r"GLUE sst2: .*nyu-mll/glue could not be loaded \(Couldn't reach.*GLUE_DIR.*SST-2/train.tsv"):
        load_glue("sst2", "train")


def test_error_missing_glue_file(tmp_path):
    with pytest.raises(UserInputError, match=r"CoLA/train.tsv: GLUE file not found"):
        load_glue("cola", "train", data_dir=str(tmp_path))


def test_error_missing_user_file(tmp_path):
    with pytest.raises(UserInputError, match=r"nope.csv: data file not found"):
        load_glue("sst2", "train", files={"train": str(tmp_path / "nope.csv")})


def test_error_missing_column(tmp_path, glue_dir):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello,1\n")
    found = r"t.csv: missing column\(s\) \['sentence'\]; found columns \['text', 'label'\]"
    with pytest.raises(UserInputError, match=found):
        load_glue("sst2", "train", files={"train": str(path)})
    (glue_dir / "QNLI" / "dev.tsv").write_text(tsv(("index", "question", "text", "label"), (0, "q", "s", "entailment")))
    with pytest.raises(UserInputError, match=r"QNLI/dev.tsv: missing column\(s\) \['sentence'\]"):
        load_glue("qnli", "dev", data_dir=str(glue_dir))


def test_error_unknown_label(tmp_path, glue_dir):
    (glue_dir / "RTE" / "dev.tsv").write_text(tsv(("index", "sentence1", "sentence2", "label"),
                                                  (0, "x", "y", "entailment"), (1, "x", "y", "maybe")))
    expected = r"RTE/dev.tsv: line 3: unknown label 'maybe' .*'entailment', 'not_entailment'"
    with pytest.raises(UserInputError, match=expected):
        load_glue("rte", "dev", data_dir=str(glue_dir))
    path = tmp_path / "w.csv"
    path.write_text("sentence1,sentence2,label\na,b,1\nc,d,7\n")
    with pytest.raises(UserInputError, match=r"w.csv: row 2: unknown label 7"):
        load_glue("wnli", "train", files={"train": str(path)})
    (glue_dir / "STS-B" / "dev.tsv").write_text(tsv(STSB_HEADER, (0, "g", "f", "y", 0, "n", "n", "a", "b", "high")))
    with pytest.raises(UserInputError, match=r"line 2: unknown label 'high' for task stsb; expected a number"):
        load_glue("stsb", "dev", data_dir=str(glue_dir))


def test_error_unknown_task_and_split(glue_dir, tmp_path):
    with pytest.raises(UserInputError, match="unknown task 'glue'"):
        load_glue("glue", "train", data_dir=str(glue_dir))
    with pytest.raises(UserInputError, match="unknown split 'dev_matched' for task sst2"):
        load_glue("sst2", "dev_matched", data_dir=str(glue_dir))
    with pytest.raises(UserInputError, match="files has no entry for split 'dev'"):
        load_glue("sst2", "dev", files={"train": str(tmp_path / "x.csv")})


# --- subsets, tokenization, collators ---------------------------------------------------------


def test_train_subset_seeded():
    ds = Dataset.from_dict({"x": list(range(100))})
    a, b = train_subset(ds, 10, seed=1), train_subset(ds, 10, seed=1)
    assert a["x"][:] == b["x"][:] and len(a) == 10 and a["x"][:] != list(range(10))
    assert train_subset(ds, 10, seed=2)["x"][:] != a["x"][:]
    assert train_subset(ds, None, seed=1) is ds and train_subset(ds, 100, seed=1) is ds


def test_tokenize_task_pairs_columns_and_no_padding(glue_dir):
    tok = make_tokenizer()
    ds = tokenize_task(load_glue("mrpc", "train", data_dir=str(glue_dir)), tok, "mrpc", max_length=64)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert ds["idx"][:] == [0, 1] and ds["labels"][:] == [1, 0]
    assert 1 in ds[0]["token_type_ids"]  # second sentence is segment 1
    assert len(ds[0]["input_ids"]) != len(ds[1]["input_ids"])  # unpadded
    short = tokenize_task(load_glue("sst2", "train", data_dir=str(glue_dir)), tok, "sst2", max_length=4)
    assert max(len(x) for x in short["input_ids"][:]) == 4


def test_tokenize_task_idx_is_row_position_after_subset(glue_dir):
    ds = train_subset(load_glue("cola", "train", data_dir=str(glue_dir)), 2, seed=0)
    assert tokenize_task(ds, make_tokenizer(), "cola", 32)["idx"][:] == [0, 1]


def test_tokenize_task_cache_reused(glue_dir, tmp_path, monkeypatch):
    cache, tok = tmp_path / "tok_cache", make_tokenizer()
    first = tokenize_task(load_glue("rte", "train", data_dir=str(glue_dir)), tok, "rte", 32, cache_dir=str(cache))
    files = sorted(cache.glob("tokenize-*.arrow"))
    assert len(files) == 1 and first.cache_files[0]["filename"] == str(files[0])

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the tokenizer was called although the cache should be used")

    monkeypatch.setattr(BertTokenizer, "__call__", no_tokenizing)
    second = tokenize_task(load_glue("rte", "train", data_dir=str(glue_dir)), make_tokenizer(), "rte", 32,
                           cache_dir=str(cache))
    assert second[:] == first[:] and second._fingerprint == first._fingerprint
    monkeypatch.undo()
    # The same (already used) tokenizer instance keeps its identity: truncation state is not part of it.
    again = tokenize_task(load_glue("rte", "train", data_dir=str(glue_dir)), tok, "rte", 32, cache_dir=str(cache))
    assert again._fingerprint == first._fingerprint
    tokenize_task(load_glue("rte", "train", data_dir=str(glue_dir)), tok, "rte", 16, cache_dir=str(cache))
    assert len(list(cache.glob("tokenize-*.arrow"))) == 2  # max_length is part of the key


def test_tokenize_task_cache_reused_in_new_process(glue_dir, tmp_path):
    tok_dir, cache = tmp_path / "tok", tmp_path / "tok_cache"
    make_tokenizer().save_pretrained(tok_dir)
    here = tokenize_task(load_glue("wnli", "train", data_dir=str(glue_dir)), AutoTokenizer.from_pretrained(tok_dir),
                         "wnli", 32, cache_dir=str(cache))
    script = textwrap.dedent(f"""
        import json, transformers
        from distil_core.data import load_glue, tokenize_task
        tok = transformers.AutoTokenizer.from_pretrained({str(tok_dir)!r})
        def boom(*a, **k): raise SystemExit("tokenizer called: cache not reused")
        type(tok).__call__ = boom
        ds = load_glue("wnli", "train", data_dir={str(glue_dir)!r})
        out = tokenize_task(ds, tok, "wnli", 32, cache_dir={str(cache)!r})
        print(json.dumps([ds._fingerprint, out._fingerprint, out.cache_files[0]["filename"]]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw_fp, out_fp, filename = json.loads(proc.stdout.strip().splitlines()[-1])
    assert raw_fp == load_glue("wnli", "train", data_dir=str(glue_dir))._fingerprint
    assert (out_fp, filename) == (here._fingerprint, here.cache_files[0]["filename"])


def test_task_collator_pads_and_passes_labels_idx(glue_dir):
    tok = make_tokenizer()
    ds = tokenize_task(load_glue("stsb", "train", data_dir=str(glue_dir)), tok, "stsb", 32)
    batch = task_collator(tok)([ds[0], ds[1]])
    width = max(len(ds[0]["input_ids"]), len(ds[1]["input_ids"]))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape == (2, width)
    assert batch["attention_mask"].sum().item() == len(ds[0]["input_ids"]) + len(ds[1]["input_ids"])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx([2.5, 4.75])
    assert batch["idx"].tolist() == [0, 1]
    ds_cls = tokenize_task(load_glue("sst2", "train", data_dir=str(glue_dir)), tok, "sst2", 32)
    ds_cls.set_format("torch")
    assert task_collator(tok)([ds_cls[i] for i in range(3)])["labels"].tolist() == [1, 0, 1]


# --- general distillation corpus --------------------------------------------------------------


def test_load_corpus_file_folder_and_errors(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("the cat sat\n\n   \nthe dog\n")
    (tmp_path / "c" / "b.txt").write_text("a mat")  # no final newline
    assert load_corpus(str(tmp_path / "c" / "a.txt"))["text"][:] == ["the cat sat", "the dog"]
    assert sorted(load_corpus(str(tmp_path / "c"))["text"][:]) == ["a mat", "the cat sat", "the dog"]
    with pytest.raises(UserInputError, match="missing.txt: corpus file or folder not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no .txt files"):
        load_corpus(str(tmp_path / "empty"))


def test_load_corpus_hub_renames_text_column(monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda path, split=None, **kw: Dataset.from_dict(
        {"content": ["a b", "", "c"], "meta": [1, 2, 3]}))
    assert load_corpus("someone/corpus", text_column="content")[:] == {"text": ["a b", "c"]}
    with pytest.raises(UserInputError, match=r"someone/corpus: missing column\(s\) \['body'\]"):
        load_corpus("someone/corpus", text_column="body")


@pytest.mark.parametrize("error", [ConnectionError("Couldn't reach 'someone/corpus' on the Hub"),
                                   DatasetNotFoundError("Dataset 'someone/corpus' doesn't exist on the Hub")])
def test_load_corpus_hub_unreachable_or_missing_is_one_message(monkeypatch, error):
    def fail(*a, **kw):
        raise error

    monkeypatch.setattr(data, "load_dataset", fail)
    with pytest.raises(UserInputError, match=r"corpus 'someone/corpus': .*could not be loaded \(.*someone/corpus.*\.txt file"):
        load_corpus("someone/corpus")


def test_tokenize_corpus_and_mlm_collator(tmp_path):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=30)) for _ in range(64)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines[:32] + ["", "  "] + lines[32:]) + "\n")
    tok, cache = make_tokenizer(), tmp_path / "tok_cache"
    ds = tokenize_corpus(load_corpus(str(tmp_path / "corpus.txt")), tok, max_length=24, cache_dir=str(cache))
    assert len(ds) == 64 and ds["idx"][:] == list(range(64))
    assert {"input_ids", "attention_mask", "special_tokens_mask", "idx"} <= set(ds.column_names)
    assert max(len(x) for x in ds["input_ids"][:]) == 24
    assert list(cache.glob("corpus-*.arrow"))

    batch = mlm_collator(tok, seed=0)([ds[i] for i in range(64)])
    labels, special = batch["labels"], torch.tensor(ds["special_tokens_mask"][:])
    masked = labels != -100
    assert not masked[special.bool()].any()  # [CLS]/[SEP] never chosen
    rate = masked.sum().item() / (special == 0).sum().item()
    assert 0.11 < rate < 0.19, rate
    assert (batch["input_ids"][masked] == tok.mask_token_id).float().mean().item() == pytest.approx(0.8, abs=0.08)
    assert (batch["input_ids"][~masked] != tok.mask_token_id).all()
    assert batch["idx"].tolist() == list(range(64))


def test_majority_baseline_is_the_constant_predictor_of_the_train_majority():
    # train is mostly 1, dev mostly 0: the baseline predicts train's majority, not dev's
    train, dev = [1, 1, 1, 0], [0, 0, 0, 1]
    assert majority_baseline("mrpc", train, dev) == {"accuracy": 0.25, "f1": pytest.approx(0.4)}
    assert majority_baseline("sst2", [0, 0, 1], dev) == {"accuracy": 0.75}
    assert majority_baseline("cola", train, dev) == {"matthews_correlation": 0.0}
    assert majority_baseline("stsb", [0.5, 4.0], [1.0, 2.0]) is None
