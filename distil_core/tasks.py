"""The GLUE task registry: text columns, labels, metrics.

Column names and label orders follow the hub's `nyu-mll/glue` configs, so integer labels
mean the same thing whether the data came from the hub or from GLUE's original TSV files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import pearsonr, spearmanr
from scipy.special import softmax
from sklearn.dummy import DummyClassifier
from sklearn.metrics import accuracy_score, f1_score, log_loss, matthews_corrcoef, mean_squared_error

from distil_core.errors import UserInputError


@dataclass(frozen=True)
class Task:
    """One GLUE task. `label_names is None` means regression (STS-B)."""

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    num_labels: int
    main_metric: str
    dev_splits: tuple[str, ...] = ("dev",)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


def _task(
    name: str,
    text_columns: tuple[str, ...],
    label_names: tuple[str, ...] | None,
    main_metric: str = "accuracy",
    dev_splits: tuple[str, ...] = ("dev",),
) -> Task:
    num_labels = 1 if label_names is None else len(label_names)
    return Task(name, text_columns, label_names, num_labels, main_metric, dev_splits)


# Label orders are the hub's ClassLabel orders (note MNLI: entailment, neutral, contradiction).
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _task("cola", ("sentence",), ("unacceptable", "acceptable"), "matthews_correlation"),
        _task("sst2", ("sentence",), ("negative", "positive")),
        _task("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1"),
        _task("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "f1"),
        # STS-B's main metric is Pearson alone (GLUE reports Pearson/Spearman; we pick one).
        _task("stsb", ("sentence1", "sentence2"), None, "pearson"),
        _task(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            dev_splits=("dev_matched", "dev_mismatched"),
        ),
        _task("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
        _task("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
        _task("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    )
}


def get_task(name: str | Task) -> Task:
    """Look a task up by name, forgiving case and separators ("SST-2", "sts_b", "CoLA")."""
    if isinstance(name, Task):
        return name
    key = "".join(ch for ch in str(name).lower() if ch.isalnum())
    if key not in TASKS:
        raise UserInputError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}")
    return TASKS[key]


def compute_metrics(task: str | Task, predictions, labels) -> dict[str, float]:
    """Official GLUE metrics from logits (argmax for classification, squeezed for regression)."""
    task = get_task(task)
    preds = np.asarray(predictions)
    labels = np.asarray(labels)
    if task.is_regression:
        preds = preds.reshape(-1).astype(np.float64)
        labels = labels.reshape(-1).astype(np.float64)
        return {
            "pearson": float(pearsonr(preds, labels)[0]),
            "spearman": float(spearmanr(preds, labels)[0]),
        }
    # 1-D input is taken as already-decided class ids; 2-D as logits.
    preds = preds.argmax(axis=-1) if preds.ndim > 1 else preds.astype(np.int64)
    labels = labels.reshape(-1)
    if task.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    out = {"accuracy": float(accuracy_score(labels, preds))}
    if task.name in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(labels, preds))
    return out


def majority_baseline(task: str | Task, train_labels, dev_labels) -> dict[str, float] | None:
    """Dev metrics of always predicting the train split's most frequent class: the score a student must
    beat to have learnt anything (MRPC's F1 of it is 0.81). None for regression, where a constant has no
    correlation."""
    task = get_task(task)
    if task.is_regression:
        return None
    always = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(train_labels), 1)), train_labels)
    return compute_metrics(task, always.predict(np.zeros((len(dev_labels), 1))), dev_labels)


def prediction_loss(task: str | Task, logits, labels) -> float:
    """The dev loss matching the task's head: cross-entropy of the logits, or MSE for regression."""
    task = get_task(task)
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if task.is_regression:
        return float(mean_squared_error(labels.astype(np.float64), logits.reshape(-1)))
    return float(log_loss(labels, softmax(logits, axis=-1), labels=list(range(logits.shape[-1]))))
