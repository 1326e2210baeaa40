"""Datasets for task distillation (GLUE) and general distillation (MLM on a text corpus).

Every returned Dataset has a deterministic fingerprint (same input content -> same
fingerprint, in any process), and tokenization with `cache_dir` set writes an Arrow file
named after that fingerprint, so a second run loads the tokens instead of re-tokenizing.
Formats are left untouched (plain Python); set `ds.set_format("torch")` if needed —
the collators below accept either.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Value, load_dataset
from datasets.exceptions import DatasetNotFoundError
from datasets.fingerprint import Hasher
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

from distil_core.config import DataConfig
from distil_core.errors import UserInputError
from distil_core.tasks import Task, get_task

logger = logging.getLogger(__name__)

# Part of every fingerprint: bump when parsing or tokenization output changes.
_FORMAT_VERSION = "distil-data-v1"
HUB_GLUE = "nyu-mll/glue"
_FILE_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE}),
                  ".json": ("json", {}), ".jsonl": ("json", {}), ".parquet": ("parquet", {})}


@dataclass(frozen=True)
class _Layout:
    """A task in GLUE's original layout: folder, file columns (in Task.text_columns order), label column."""

    folder: str
    text: tuple[str, ...]
    label: str
    names: tuple[str, ...] | None = None  # column names for a file with no header row


_GLUE_LAYOUT = {
    "cola": _Layout("CoLA", ("sentence",), "label", names=("source", "label", "original_label", "sentence")),
    "sst2": _Layout("SST-2", ("sentence",), "label"),
    "mrpc": _Layout("MRPC", ("#1 String", "#2 String"), "Quality"),
    "qqp": _Layout("QQP", ("question1", "question2"), "is_duplicate"),
    "stsb": _Layout("STS-B", ("sentence1", "sentence2"), "score"),
    "mnli": _Layout("MNLI", ("sentence1", "sentence2"), "gold_label"),
    "qnli": _Layout("QNLI", ("question", "sentence"), "label"),
    "rte": _Layout("RTE", ("sentence1", "sentence2"), "label"),
    "wnli": _Layout("WNLI", ("sentence1", "sentence2"), "label"),
}


def _features(task: Task) -> Features:
    cols = {c: Value("string") for c in task.text_columns}
    cols["label"] = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    return Features(cols)


def _parse_label(task: Task, value, where: str) -> int | float:
    """Text label name or integer id -> integer id (float score for regression)."""
    try:
        if task.is_regression:
            return float(value)
        if str(value).strip() in task.label_names:
            return task.label_names.index(str(value).strip())
        number = float(str(value).strip())  # 1, "1", or 1.0 (pandas reads an int column with gaps as float)
        if number.is_integer() and 0 <= number < task.num_labels:
            return int(number)
    except (TypeError, ValueError):
        pass
    expected = "a number" if task.is_regression else f"one of {list(task.label_names)} or 0..{task.num_labels - 1}"
    raise UserInputError(f"{where}: unknown label {value!r} for task {task.name}; expected {expected}")


def _check_columns(found: list[str], needed: list[str], path: Path) -> None:
    missing = [c for c in needed if c not in found]
    if missing:
        raise UserInputError(f"{path}: missing column(s) {missing}; found columns {found}")


def _read_glue_tsv(path: Path, task: Task, split: str) -> Dataset:
    """Read one GLUE TSV the way GLUE's own readers do: tab-separated, quotes are literal text.

    QQP's real train file has malformed rows: QQP rows with the wrong number of fields are
    skipped and counted (a warning says how many). For every other task such a row is an error.
    """
    if not path.is_file():
        raise UserInputError(f"{path}: GLUE file not found (task {task.name}, split {split}); expected "
                             f"GLUE's original layout <GLUE_DIR>/{_GLUE_LAYOUT[task.name].folder}/{split}.tsv")
    layout, raw = _GLUE_LAYOUT[task.name], path.read_bytes()
    try:  # utf-8-sig drops MRPC's byte-order mark
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    # newline="" keeps csv in charge of line ends; QUOTE_NONE: quote characters are literal text.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = list(layout.names) if layout.names else next(reader, [])
    _check_columns(header, [*layout.text, layout.label], path)
    *text_pos, label_pos = [header.index(c) for c in (*layout.text, layout.label)]
    columns: dict[str, list] = {c: [] for c in (*task.text_columns, "label")}
    skipped = 0
    for row in reader:
        if not row:
            continue  # blank line, e.g. a trailing one
        if len(row) != len(header):
            if task.name == "qqp":
                skipped += 1
                continue
            raise UserInputError(f"{path}: line {reader.line_num}: {len(row)} tab-separated fields, "
                                 f"expected {len(header)}")
        for name, i in zip(task.text_columns, text_pos):
            columns[name].append(row[i])
        columns["label"].append(_parse_label(task, row[label_pos], f"{path}: line {reader.line_num}"))
    if skipped:
        logger.warning("%s: skipped %d malformed rows (wrong number of fields)", path, skipped)
    ds = Dataset.from_dict(columns, features=_features(task))
    # Set it from the file content (datasets<5 gives from_dict a random one), versioned with our parser.
    ds._fingerprint = Hasher.hash([_FORMAT_VERSION, task.name, split, hashlib.sha256(raw).hexdigest()])
    return ds


def _load_file(path: Path, task: Task, split: str) -> Dataset:
    """A csv/tsv/json/jsonl/parquet file with the task's hub column names and `label`."""
    if not path.is_file():
        raise UserInputError(f"{path}: data file not found (files[{split!r}], task {task.name})")
    if path.suffix.lower() not in _FILE_BUILDERS:
        raise UserInputError(f"{path}: unsupported file type; expected one of {sorted(_FILE_BUILDERS)}")
    builder, kwargs = _FILE_BUILDERS[path.suffix.lower()]
    ds = load_dataset(builder, data_files=str(path), split="train", **kwargs)  # datasets caches it
    needed = [*task.text_columns, "label"]
    _check_columns(ds.column_names, needed, path)

    def convert(batch: dict, idx: list[int]) -> dict:
        labels = [_parse_label(task, v, f"{path}: row {i + 1}") for v, i in zip(batch["label"], idx)]
        return {**batch, "label": labels}

    return ds.select_columns(needed).map(
        convert, batched=True, with_indices=True, features=_features(task),
        new_fingerprint=Hasher.hash([_FORMAT_VERSION, ds._fingerprint, task.name, "labels"]),
    )


def _load_hub(what: str, fix: str, *args, **kwargs) -> Dataset:
    """`load_dataset(*args, **kwargs)`; offline or no such dataset is one UserInputError: `what` ... `fix`."""
    try:
        return load_dataset(*args, **kwargs)
    except (OSError, DatasetNotFoundError) as e:  # offline (ConnectionError is an OSError), or no such dataset
        raise UserInputError(f"{what} could not be loaded ({str(e).splitlines()[0]}); {fix}") from None


def load_glue(task: str | Task, split: str, data_dir: str | None = None,
              files: dict[str, str] | None = None) -> Dataset:
    """Load a GLUE split with the task's text column(s) and `label` (ClassLabel ints; float32 for stsb).

    Source, first that applies: `files` (split -> local csv/tsv/json/jsonl/parquet with the task's
    hub column names and `label`, as names or ids); `data_dir` or $GLUE_DIR (GLUE's original
    layout, e.g. <dir>/SST-2/dev.tsv); else the hub dataset `nyu-mll/glue`.
    Splits: train, dev; MNLI also dev_matched / dev_mismatched ("dev" means matched).
    GLUE TSVs: QQP rows with the wrong number of fields are skipped and counted (a logged warning);
    in other tasks such a row is a UserInputError naming the file and line.
    """
    task = get_task(task)
    allowed = list(dict.fromkeys(("train", "dev", *task.dev_splits)))
    if split not in allowed:
        raise UserInputError(f"unknown split {split!r} for task {task.name}; expected one of {allowed}")
    resolved = task.dev_splits[0] if split == "dev" else split  # MNLI: dev means dev_matched
    if files is not None:
        path = files.get(resolved) or (files.get("dev") if resolved == task.dev_splits[0] else None)
        if path is None:
            raise UserInputError(f"files has no entry for split {split!r} of task {task.name}; keys: {sorted(files)}")
        return _load_file(Path(path).expanduser(), task, resolved)
    root = data_dir or os.environ.get("GLUE_DIR")
    if root:
        folder = Path(root).expanduser() / _GLUE_LAYOUT[task.name].folder
        return _read_glue_tsv(folder / f"{resolved}.tsv", task, resolved)
    ds = _load_hub(f"GLUE {task.name}: no data.data_dir or GLUE_DIR set, and the hub dataset {HUB_GLUE}",
                   f"set GLUE_DIR to a folder in GLUE's layout (<dir>/{_GLUE_LAYOUT[task.name].folder}/train.tsv) "
                   "or give data.train_file / data.dev_file",
                   HUB_GLUE, task.name, split=resolved.replace("dev", "validation"))
    ds = ds.select_columns([*task.text_columns, "label"])
    return ds if ds.features == _features(task) else ds.cast(_features(task))


def train_subset(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of `limit` rows; the dataset itself when limit is None or >= len(ds)."""
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def load_run_split(data: DataConfig, split: str, limit: int | None) -> Dataset:
    """A GLUE split as a run sees it: its files, GLUE folder or hub, then its seeded subset of `limit` rows."""
    files = {k: v for k, v in (("train", data.train_file), ("dev", data.dev_file)) if v} or None
    return train_subset(load_glue(data.task, split, data.data_dir, files), limit, data.seed)


def _tokenizer_id(tokenizer) -> str:
    """A hash of what determines the tokenizer's output (not its name alone: it may be empty)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Calls with truncation=True leave truncation/padding settings on the backend: not identity.
        state.pop("truncation", None), state.pop("padding", None)
        spec = json.dumps(state, sort_keys=True)
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    return Hasher.hash([type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
                        tokenizer.truncation_side, spec])


def _cached(ds: Dataset, key: list, cache_dir: str | None, prefix: str) -> dict:
    """map/filter kwargs: a fingerprint from (input fingerprint, key), and a cache file under cache_dir."""
    fingerprint = Hasher.hash([_FORMAT_VERSION, ds._fingerprint, *key])
    if cache_dir is None:
        return {"new_fingerprint": fingerprint}
    os.makedirs(cache_dir, exist_ok=True)
    return {"new_fingerprint": fingerprint, "load_from_cache_file": True,
            "cache_file_name": os.path.join(cache_dir, f"{prefix}-{fingerprint}.arrow")}


def tokenize_task(ds: Dataset, tokenizer, task: str | Task, max_length: int, cache_dir: str | None = None) -> Dataset:
    """Tokenize (pairs for two-column tasks), truncating to max_length, with no padding.

    Output columns: input_ids, attention_mask, token_type_ids (if the tokenizer makes them),
    labels, and idx (row position, used to look up cached teacher outputs).
    """
    task = get_task(task)

    def encode(batch: dict, idx: list[int]) -> dict:
        enc = tokenizer(*(batch[c] for c in task.text_columns), truncation=True, max_length=max_length)
        return {**enc, "labels": batch["label"], "idx": idx}

    key = ["tokenize_task", task.name, max_length, _tokenizer_id(tokenizer)]
    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names,
                  desc=f"Tokenizing {task.name}", **_cached(ds, key, cache_dir, "tokenize"))


def task_collator(tokenizer) -> DataCollatorWithPadding:
    """Dynamic padding per batch; labels (int or float) and idx pass through as tensors."""
    return DataCollatorWithPadding(tokenizer)


def _non_empty(texts: list[str]) -> list[bool]:
    return [bool(t and t.strip()) for t in texts]


def load_corpus(source: str, text_column: str = "text") -> Dataset:
    """A text corpus with one `text` column: a .txt file or folder of .txt files (one example per
    non-empty line), or a hub dataset id (its train split; `text_column` is renamed to `text`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        txt = sorted(str(p) for p in path.rglob("*.txt"))
        if not txt:
            raise UserInputError(f"{path}: corpus folder has no .txt files")
        ds = load_dataset("text", data_files=txt, split="train")
    elif path.is_file():
        ds = load_dataset("text", data_files=str(path), split="train")
    # Hub ids are "name" or "org/name"; anything else path-like is a missing local path.
    elif source.startswith((".", "/", "~")) or source.endswith(".txt") or source.count("/") > 1:
        raise UserInputError(f"{source}: corpus file or folder not found")
    else:
        ds = _load_hub(f"corpus {source!r}: not a local path, and the hub dataset",
                       "give data.corpus as a .txt file or a folder of .txt files", source, split="train")
        _check_columns(ds.column_names, [text_column], Path(source))
        ds = ds.select_columns([text_column])
        if text_column != "text":
            ds = ds.rename_column(text_column, "text")
    return ds.filter(_non_empty, input_columns="text", batched=True)


def tokenize_corpus(ds: Dataset, tokenizer, max_length: int, cache_dir: str | None = None) -> Dataset:
    """Tokenize a `text` column for MLM: truncate, drop empty texts, add idx; cached like tokenize_task.

    Output columns: input_ids, attention_mask, token_type_ids (if any), special_tokens_mask, idx.
    """
    ds = ds.filter(_non_empty, input_columns="text", batched=True, **_cached(ds, ["non_empty"], cache_dir, "nonempty"))

    def encode(batch: dict, idx: list[int]) -> dict:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length, return_special_tokens_mask=True)
        return {**enc, "idx": idx}

    key = ["tokenize_corpus", max_length, _tokenizer_id(tokenizer)]
    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names,
                  desc="Tokenizing corpus", **_cached(ds, key, cache_dir, "corpus"))


def mlm_collator(tokenizer, mlm_probability: float = 0.15, seed: int | None = None) -> DataCollatorForLanguageModeling:
    """transformers' MLM collator: mask mlm_probability of tokens (80% [MASK], 10% random, 10% kept);
    labels are -100 on unmasked positions."""
    if tokenizer.mask_token is None:
        raise UserInputError(f"tokenizer {tokenizer.name_or_path!r} has no mask token; MLM needs one")
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)
