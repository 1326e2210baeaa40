"""The run config: YAML -> typed dataclasses, validated once, with errors that name the key.

The same schema describes a single run, the base of a search space and an exported winner.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserInputError
from .tasks import get_task

OBJECTIVES = ("task", "mlm")
INITS = ("teacher-layers", "teacher-slice", "random")
LAYER_PICKS = ("spread", "bottom")  # which teacher layers a teacher init copies (distil_core.student)


@dataclass
class DataConfig:
    task: str = "sst2"
    data_dir: str | None = None  # GLUE folder; falls back to $GLUE_DIR, then the hub
    train_file: str | None = None  # local csv/json/parquet instead of the GLUE folder
    dev_file: str | None = None
    max_length: int = 128
    train_limit: int | None = None  # seeded subset of the train split
    dev_limit: int | None = None
    seed: int = 0  # seeds the subsets; apart from the run's seed so seed re-runs see the same data
    corpus: str | None = None  # objective mlm: text file, folder of .txt, or hub id
    mlm_probability: float = 0.15


@dataclass
class FinetuneConfig:
    """How a teacher without a trained task head is fine-tuned first."""

    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_steps: int | None = None
    seed: int = 42
    train_limit: int | None = None  # None: data.train_limit (the students' subset); may be larger


@dataclass
class TeacherConfig:
    name: str = "minilm-l6"  # hub id, local folder, or "minilm-l6" (the packaged offline model)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class StudentConfig:
    num_layers: int = 3
    hidden_size: int | None = None  # None: the teacher's
    num_heads: int | None = None  # None: keep the teacher's head size
    ffn_ratio: float | None = None  # None: the teacher's intermediate/hidden
    init: str = "teacher-layers"
    layer_pick: str = "spread"  # spread: evenly, first and last included (DistilBERT); bottom: the first L


@dataclass
class LossConfig:
    # DistilBERT's defaults (Sanh et al., 2019).
    temperature: float = 2.0
    alpha_kd: float = 5.0
    alpha_hard: float = 2.0
    alpha_cos: float = 1.0
    alpha_mse: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 5e-5
    batch_size: int = 32
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 200  # optimizer steps; the run also evaluates at its end
    # rows go shortest first: on a CPU a bigger batch pads more than it saves (bench/eval_batch.py)
    eval_batch_size: int = 32


@dataclass
class ProbeConfig:
    """Objective mlm: at each evaluation a copy of the student is fine-tuned briefly on data.task and
    scored on its dev split, so general distillation is judged by a GLUE dev metric too."""

    steps: int = 100  # 0 turns the probe off (then the main metric is masked-LM accuracy)
    lr: float = 1e-4
    batch_size: int = 32
    train_limit: int = 2000


@dataclass
class OutputConfig:
    dir: str = "runs/example"
    keep_checkpoints: int = 2
    tensorboard: bool = True


@dataclass
class Config:
    objective: str = "task"
    seed: int = 42  # student init, data order, dropout
    cache_dir: str | None = None  # None: $DISTIL_SEARCH_CACHE or ~/.cache/distil-search
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cache_root(self) -> Path:
        root = self.cache_dir or os.environ.get("DISTIL_SEARCH_CACHE") or Path.home() / ".cache" / "distil-search"
        return Path(root).expanduser()


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise UserInputError(f"config key '{key}': expected {expected}, got {value!r}")


def _validate(cfg: Config) -> None:
    _check(cfg.objective in OBJECTIVES, "objective", f"one of {list(OBJECTIVES)}", cfg.objective)
    try:
        get_task(cfg.data.task)
    except UserInputError as e:
        raise UserInputError(f"config key 'data.task': {e}") from None
    _check(cfg.data.max_length >= 8, "data.max_length", "an integer >= 8", cfg.data.max_length)
    for key in ("train_limit", "dev_limit"):
        v = getattr(cfg.data, key)
        _check(v is None or v >= 1, f"data.{key}", "null or an integer >= 1", v)
    _check(0 < cfg.data.mlm_probability < 1, "data.mlm_probability", "a number in (0, 1)", cfg.data.mlm_probability)
    if cfg.objective == "mlm":
        _check(cfg.data.corpus is not None, "data.corpus", "a text file, folder or hub id for objective mlm", None)
    s = cfg.student
    _check(s.num_layers >= 1, "student.num_layers", "an integer >= 1", s.num_layers)
    _check(s.hidden_size is None or s.hidden_size >= 1, "student.hidden_size", "null or an integer >= 1", s.hidden_size)
    _check(s.num_heads is None or s.num_heads >= 1, "student.num_heads", "null or an integer >= 1", s.num_heads)
    if s.hidden_size is not None and s.num_heads is not None:
        _check(s.hidden_size % s.num_heads == 0, "student.num_heads", f"a divisor of student.hidden_size ({s.hidden_size})", s.num_heads)
    _check(s.ffn_ratio is None or s.ffn_ratio > 0, "student.ffn_ratio", "null or a number > 0", s.ffn_ratio)
    _check(s.init in INITS, "student.init", f"one of {list(INITS)}", s.init)
    _check(s.layer_pick in LAYER_PICKS, "student.layer_pick", f"one of {list(LAYER_PICKS)}", s.layer_pick)
    lo = cfg.loss
    _check(lo.temperature > 0, "loss.temperature", "a number > 0", lo.temperature)
    alphas = {k: getattr(lo, k) for k in ("alpha_kd", "alpha_hard", "alpha_cos", "alpha_mse")}
    for k, v in alphas.items():
        _check(v >= 0, f"loss.{k}", "a number >= 0", v)
    _check(any(v > 0 for v in alphas.values()), "loss", "at least one alpha_* > 0", alphas)
    for name, o in (("optim", cfg.optim), ("teacher.finetune", cfg.teacher.finetune)):
        _check(o.lr > 0, f"{name}.lr", "a number > 0", o.lr)
        _check(o.batch_size >= 1, f"{name}.batch_size", "an integer >= 1", o.batch_size)
        _check(o.epochs > 0, f"{name}.epochs", "a number > 0", o.epochs)
        _check(o.max_steps is None or o.max_steps >= 1, f"{name}.max_steps", "null or an integer >= 1", o.max_steps)
        _check(0 <= o.warmup_ratio < 1, f"{name}.warmup_ratio", "a number in [0, 1)", o.warmup_ratio)
        _check(o.weight_decay >= 0, f"{name}.weight_decay", "a number >= 0", o.weight_decay)
    ft_limit = cfg.teacher.finetune.train_limit
    _check(ft_limit is None or ft_limit >= 1, "teacher.finetune.train_limit", "null or an integer >= 1", ft_limit)
    op = cfg.optim
    _check(op.grad_clip >= 0, "optim.grad_clip", "a number >= 0 (0 turns clipping off)", op.grad_clip)
    _check(op.grad_accum >= 1, "optim.grad_accum", "an integer >= 1", op.grad_accum)
    _check(op.eval_every >= 1, "optim.eval_every", "an integer >= 1", op.eval_every)
    _check(op.eval_batch_size >= 1, "optim.eval_batch_size", "an integer >= 1", op.eval_batch_size)
    p = cfg.probe
    _check(p.steps >= 0, "probe.steps", "an integer >= 0", p.steps)
    _check(p.lr > 0, "probe.lr", "a number > 0", p.lr)
    _check(p.batch_size >= 1, "probe.batch_size", "an integer >= 1", p.batch_size)
    _check(p.train_limit >= 1, "probe.train_limit", "an integer >= 1", p.train_limit)
    _check(cfg.output.keep_checkpoints >= 1, "output.keep_checkpoints", "an integer >= 1", cfg.output.keep_checkpoints)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check one YAML value against a field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise UserInputError(f"config key '{key}': expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserInputError(f"config key '{prefix or '<root>'}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise UserInputError(f"unknown config key {where}; valid keys here: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = _build(tp, value, key) if dataclasses.is_dataclass(tp) else _coerce(value, tp, key)
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw or {}, "")
    _validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """'optim.lr=3e-5' -> ('optim.lr', 3e-05); values are parsed as YAML scalars."""
    if "=" not in item:
        raise UserInputError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-5")
    key, text = item.split("=", 1)
    value = yaml.safe_load(text) if text != "" else None
    if isinstance(value, str):  # YAML 1.1 reads '3e-5' as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown keys are caught by validation."""
    out = yaml.safe_load(yaml.safe_dump(raw or {}))
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserInputError(f"config key '{key}': '{p}' is not a section")
        node[leaf] = value
    return out


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file {path}: not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserInputError(f"config file {path}: not valid YAML ({e})") from None
    raw = apply_overrides(raw, dict(parse_override(o) for o in overrides or []))
    try:
        return config_from_dict(raw)
    except UserInputError as e:
        raise UserInputError(f"config file {path}: {e}") from None


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
