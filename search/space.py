"""Search spaces: a YAML file = a base run config + the dotted keys to search + Tune settings.

    description: one line
    base: {...}                 # a distil_core run config; or base_config: PATH (relative to this file),
                                # which `base` then overrides key by key
    search:                     # dotted config key -> distribution
      loss.temperature: {log_uniform: [1.0, 8.0]}
      optim.lr: {log_uniform: [1.0e-5, 1.0e-3]}
      student.num_layers: {int: [1, 4], step: 1}
      student.hidden_size: {choice: [128, 256, 384]}
      student.num_heads: derived          # the default when hidden_size is searched: teacher's head size
      student.init: {choice: [teacher-layers, teacher-slice, random]}
      student.layer_pick: {choice: [spread, bottom]}   # which teacher layers a teacher init copies
    normalize_alphas: true      # searched loss.alpha_* are divided by their sum (needs >= 2 searched)
    tune: {num_samples: 8, max_concurrent: 2, ...}   # see TuneSettings

`load_space` validates everything that does not depend on the teacher; `compile_space` checks the
student part against the teacher's config and returns an Optuna define-by-run function whose
trials can only produce valid students:

- Students are sampled hidden -> layers -> ffn_ratio -> heads -> init. Heads searched as a choice use
  one parameter per hidden size (``student.num_heads|h256``) holding the values that divide it (and,
  when ``random`` is not an allowed init, that leave a teacher init possible).
- ``student.init`` only offers what is valid for the sampled student: ``teacher-layers`` needs the
  teacher's hidden size, heads and FFN size and at most its layers; ``teacher-slice`` a hidden size
  <= the teacher's with its head size (at full width it is offered only where teacher-layers is not,
  since it would copy the same weights); ``random`` always. The parameter name encodes the offered
  set (``student.init|layers-slice-random``) so one name always has the same choices; a set of
  one is resolved without a parameter. A student for which no listed init is valid is an error at
  compile time, naming the keys.
- ``student.layer_pick`` is a parameter only where it changes the student: a teacher init with fewer
  layers than the teacher (else it is resolved to its first choice without a parameter).
- Alphas: if normalize_alphas, searched alphas are divided by their sum. In the measure-zero case
  where every alpha draws exactly 0, the searched alphas are set to 1/n (deterministic, documented).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from distil_core.config import Config, LossConfig, StudentConfig, apply_overrides, config_from_dict
from distil_core.errors import UserInputError

TOP_KEYS = ("description", "base", "base_config", "search", "normalize_alphas", "tune")
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "choice")
OBJECTIVES = ("main", "latency", "params")
ALPHAS = ("loss.alpha_kd", "loss.alpha_hard", "loss.alpha_cos", "loss.alpha_mse")
# Fixed per run (data identity, seeds, output, teacher choice): set them in base or on the command line.
# Any key named `seed` (seed, data.seed, teacher.finetune.seed, ...) is not searchable either.
NOT_SEARCHABLE = ("objective", "cache_dir", "data.task", "data.data_dir", "data.train_file",
                  "data.dev_file", "data.corpus", "teacher.name", "output.")
HIDDEN, LAYERS, FFN, HEADS, INIT, PICK = ("student.hidden_size", "student.num_layers", "student.ffn_ratio",
                                          "student.num_heads", "student.init", "student.layer_pick")
STUDENT_KEYS = (HIDDEN, LAYERS, FFN, HEADS, INIT, PICK)
INIT_TAGS = {"teacher-layers": "layers", "teacher-slice": "slice", "random": "random"}
# DistilBERT's loss settings (Sanh et al., 2019; LossConfig's defaults), the first point of every search.
DISTILBERT_LOSS = {f"loss.{f.name}": f.default for f in dataclasses.fields(LossConfig)}


@dataclass
class TuneSettings:
    num_samples: int = 8
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    grace_period: int = 1  # ASHA: evaluations before a trial can be stopped
    reduction_factor: int = 3
    seed: int = 0
    # TPE's random start-up trials; None: a third of num_samples, between 4 and Optuna's default 10
    startup_trials: int | None = None
    objectives: tuple[str, ...] = ("main",)  # ("main",), ("main", "latency"), ("main", "params")


@dataclass(frozen=True)
class ParamSpec:
    """One searched key. kind: uniform | log_uniform | int | choice | derived (student.num_heads only)."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: int = 1
    choices: tuple = ()

    def values(self) -> tuple | None:
        """All values of a discrete distribution; None for continuous ones."""
        if self.kind == "choice":
            return self.choices
        if self.kind == "int":
            return tuple(range(self.low, self.high + 1, self.step))
        return None

    def suggest(self, trial, name: str | None = None) -> Any:
        name = name or self.key
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, step=self.step)
        return trial.suggest_float(name, self.low, self.high, log=self.kind == "log_uniform")


@dataclass
class SearchSpace:
    path: Path | None
    base: dict  # raw run-config dict (base_config merged with base), validated
    params: dict[str, ParamSpec]
    normalize_alphas: bool = False
    tune: TuneSettings = field(default_factory=TuneSettings)
    description: str = ""
    raw: dict = field(default_factory=dict)  # the space as written (for experiment metadata)


def _searchable(key: str) -> bool:
    return not key.startswith(NOT_SEARCHABLE) and key.split(".")[-1] != "seed"


def _where(path: Path | None) -> str:
    return f"space file {path}" if path else "space"


def _leaf_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out.update(_leaf_types(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else {prefix + f.name: tp})
    return out


def _unwrap(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner, True
    return tp, False


def _is_num(v: Any, tp: Any = float) -> bool:
    ok = (int,) if tp is int else (int, float)
    return isinstance(v, ok) and not isinstance(v, bool)


def dotted_get(raw: dict, key: str) -> Any:
    """raw["a"]["b"] for key "a.b"; None where a part is missing."""
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_param(key: str, spec: Any, base: dict, where: str) -> ParamSpec:
    def bad(expected: str, got: Any = spec) -> UserInputError:
        return UserInputError(f"{where}: search key '{key}': expected {expected}, got {got!r}")

    leaf = _leaf_types()
    if key not in leaf:
        raise UserInputError(f"{where}: search key '{key}': not a config key; searchable keys: "
                             f"{[k for k in leaf if _searchable(k)]}")
    if not _searchable(key):
        raise UserInputError(f"{where}: search key '{key}': not searchable (fixed per run; set it in base "
                             "or on the command line)")
    if spec == "derived":
        if key != HEADS:
            raise bad("a distribution; 'derived' is only for student.num_heads")
        return ParamSpec(key, "derived")
    dists = [d for d in DISTRIBUTIONS if isinstance(spec, dict) and d in spec]
    if len(dists) != 1:
        raise bad("one distribution: {uniform: [lo, hi]}, {log_uniform: [lo, hi]}, {int: [lo, hi]}, "
                  "{choice: [...]}" + (" or derived" if key == HEADS else ""))
    kind, args = dists[0], spec[dists[0]]
    extra = set(spec) - {kind} - ({"step"} if kind == "int" else set())
    if extra:
        raise bad(f"no other keys next to '{kind}'" + (" than 'step'" if kind == "int" else ""), sorted(extra))
    tp, optional = _unwrap(leaf[key])
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise bad("choice: a non-empty list", args)
        for v in args:
            none_ok = optional and key not in (HIDDEN, HEADS)
            if not ((v is None and none_ok) or (tp in (int, float) and _is_num(v, tp))
                    or (tp in (str, bool) and type(v) is tp)):
                raise bad(f"choice values of type {tp.__name__}{' or null' if none_ok else ''}", v)
        if len(set(args)) != len(args):
            raise bad("distinct choice values", args)
        p = ParamSpec(key, kind, choices=tuple(args))
    else:
        num = int if kind == "int" else float
        if tp not in (int, float) or (tp is int and kind != "int"):
            raise bad("{int: [lo, hi]} or {choice: [...]} for an integer key" if tp is int
                      else "{choice: [...]} for a key of type " + tp.__name__, kind)
        if not (isinstance(args, list) and len(args) == 2 and all(_is_num(v, num) for v in args)):
            raise bad(f"{kind}: [lo, hi] with two {'integers' if num is int else 'numbers'}", args)
        lo, hi = args
        if lo >= hi:
            raise bad(f"{kind}: lo < hi", args)
        if kind == "log_uniform" and lo <= 0:
            raise bad("log_uniform: lo > 0", args)
        step = spec.get("step", 1)
        if kind == "int" and not (_is_num(step, int) and step >= 1 and (hi - lo) % step == 0):
            raise bad(f"step: an integer >= 1 that divides hi - lo ({hi - lo})", step)
        p = ParamSpec(key, kind, low=lo if num is int else float(lo), high=hi if num is int else float(hi), step=step)
    checks = p.choices if kind == "choice" else (p.low, p.high)
    for v in checks:
        if key in (HIDDEN, HEADS, LAYERS):
            if v < 1:
                raise bad("values >= 1", v)
        else:  # each value alone must make a valid run config with the base
            try:
                config_from_dict(apply_overrides(base, {key: v}))
            except UserInputError as e:
                raise UserInputError(f"{where}: search key '{key}': value {v!r} is not valid ({e})") from None
    return p


def _parse_tune(raw: Any, where: str) -> TuneSettings:
    if raw is None:
        return TuneSettings()
    if not isinstance(raw, dict):
        raise UserInputError(f"{where}: tune: expected a mapping, got {raw!r}")
    names = [f.name for f in dataclasses.fields(TuneSettings)]
    rules = {"num_samples": (int, 1, "an integer >= 1"), "max_concurrent": (int, 1, "an integer >= 1"),
             "cpus_per_trial": (float, 1e-9, "a number > 0"), "gpus_per_trial": (float, 0, "a number >= 0"),
             "grace_period": (int, 1, "an integer >= 1"), "reduction_factor": (int, 2, "an integer >= 2"),
             "seed": (int, 0, "an integer >= 0"), "startup_trials": (int, 1, "an integer >= 1")}
    out = {}
    for k, v in raw.items():
        if k not in names:
            raise UserInputError(f"{where}: unknown key 'tune.{k}'; expected one of {names}")
        if k == "objectives":
            if not (isinstance(v, list) and v and v[0] == "main" and len(set(v)) == len(v)
                    and all(o in OBJECTIVES for o in v)):
                raise UserInputError(f"{where}: tune.objectives: expected a list starting with 'main', then "
                                     f"distinct values of {list(OBJECTIVES)}, e.g. [main, latency]; got {v!r}")
            out[k] = tuple(v)
            continue
        tp, lo, expected = rules[k]
        if not (_is_num(v, tp) and v >= lo):
            raise UserInputError(f"{where}: tune.{k}: expected {expected}, got {v!r}")
        out[k] = float(v) if tp is float else v
    return TuneSettings(**out)


def space_from_dict(raw: Any, path: str | Path | None = None) -> SearchSpace:
    path = Path(path) if path is not None else None
    where = _where(path)
    if not isinstance(raw, dict):
        raise UserInputError(f"{where}: expected a mapping with 'base' and 'search', got {raw!r}")
    unknown = sorted(set(raw) - set(TOP_KEYS), key=str)
    if unknown:
        raise UserInputError(f"{where}: unknown top-level key {unknown[0]!r}; expected one of {list(TOP_KEYS)}")
    base: dict = {}
    if raw.get("base_config") is not None:
        ref = raw["base_config"]
        ref_path = (path.parent if path else Path.cwd()) / str(ref)
        if not isinstance(ref, str) or not ref_path.is_file():
            raise UserInputError(f"{where}: base_config: expected a config file path relative to the space "
                                 f"file, {ref_path} not found")
        try:
            base = yaml.safe_load(ref_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserInputError(f"{where}: base_config: {ref_path} is not valid YAML ({e})") from None
        if not isinstance(base, dict):
            raise UserInputError(f"{where}: base_config: {ref_path} is not a mapping")
    if not isinstance(raw.get("base") or {}, dict):
        raise UserInputError(f"{where}: base: expected a mapping (a run config), got {raw['base']!r}")
    base = _merge(base, raw.get("base") or {})
    try:
        config_from_dict(base)
    except UserInputError as e:
        raise UserInputError(f"{where}: base: {e}") from None
    search = raw.get("search")
    if not isinstance(search, dict) or not search:
        raise UserInputError(f"{where}: search: expected a mapping of dotted config keys to distributions, "
                             f"got {search!r}")
    params = {str(k): _parse_param(str(k), v, base, where) for k, v in search.items()}
    if HIDDEN in params and HEADS not in params:  # default: keep the teacher's head size (listed after hidden)
        items = list(params.items())
        items.insert(list(params).index(HIDDEN) + 1, (HEADS, ParamSpec(HEADS, "derived")))
        params = dict(items)
    normalize = raw.get("normalize_alphas", False)
    if not isinstance(normalize, bool):
        raise UserInputError(f"{where}: normalize_alphas: expected true or false, got {normalize!r}")
    alphas = [k for k in ALPHAS if k in params]
    if normalize and len(alphas) < 2:
        raise UserInputError(f"{where}: normalize_alphas: expected at least 2 searched loss.alpha_* keys, "
                             f"got {alphas}")

    full = config_from_dict(base).to_dict()

    def can_be_zero(k: str) -> bool:
        vals = params[k].values() if k in params else (dotted_get(full, k),)
        return vals is not None and 0 in vals
    if all(can_be_zero(k) for k in ALPHAS):
        raise UserInputError(f"{where}: search keys {alphas}: every loss.alpha_* can be 0 at once; expected at "
                             "least one to stay > 0")
    heads, hidden = params.get(HEADS), params.get(HIDDEN)
    hidden_vals = hidden.values() if hidden else (dotted_get(base, HIDDEN),)
    if heads and heads.kind != "derived" and hidden_vals and None not in hidden_vals:
        for h in hidden_vals:
            if not any(h % a == 0 for a in heads.values()):
                raise UserInputError(f"{where}: search key '{HEADS}': expected a value that divides "
                                     f"student.hidden_size {h}, got {list(heads.values())}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise UserInputError(f"{where}: description: expected a string, got {description!r}")
    return SearchSpace(path, base, params, normalize, _parse_tune(raw.get("tune"), where), description,
                       yaml.safe_load(yaml.safe_dump(raw)))


def presets() -> dict[str, Path]:
    """{name: file} of the preset spaces: spaces/ beside the package in a source tree or editable install,
    else the copy a wheel ships as search/spaces (pyproject maps one onto the other)."""
    from importlib.resources import files

    folder = Path(__file__).resolve().parents[1] / "spaces"
    if (folder.parent / "pyproject.toml").is_file() and folder.is_dir():  # the repo, not site-packages
        found = list(folder.glob("*.yaml"))
    else:
        try:
            found = [Path(str(f)) for f in files("search.spaces").iterdir() if f.name.endswith(".yaml")]
        except ModuleNotFoundError:
            found = []
    return {p.stem: p for p in sorted(found)}


def space_file(ref: str | Path) -> Path:
    """REF as a space file: an existing path, or the name of a preset (quickstart, sst2, ...)."""
    path = Path(ref)
    if path.exists():
        return path
    found = presets().get(str(ref))
    return found if found is not None else path


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        names = ", ".join(presets()) or "none installed"
        raise UserInputError(f"space file {path}: not found (a path to a YAML file, or a preset: {names})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserInputError(f"space file {path}: not valid YAML ({e})") from None
    return space_from_dict(raw, path)


def fix_keys(space: SearchSpace, values: dict[str, Any]) -> SearchSpace:
    """The space with the searched keys among `values` (dotted, from --set) taken out of the search and set in
    its base: `--set student.num_layers=3` searches 3-layer students. Other keys are left to base_config."""
    fixed = {k: v for k, v in values.items() if k in space.params}
    if not fixed:
        return space
    if HEADS in fixed and space.params[HEADS].kind == "derived" and HIDDEN not in fixed:
        raise UserInputError(f"{_where(space.path)}: --set {HEADS}: it is derived from the searched {HIDDEN} "
                             f"(the teacher's head size); set {HIDDEN} too, or search {HEADS} as a choice")
    raw = yaml.safe_load(yaml.safe_dump(space.raw))
    raw["search"] = {k: v for k, v in (raw.get("search") or {}).items() if k not in fixed}
    if not raw["search"]:
        raise UserInputError(f"{_where(space.path)}: --set {', '.join(fixed)}: that leaves no key to search")
    raw["base"] = apply_overrides(raw.get("base") or {}, fixed)
    try:
        return space_from_dict(raw, space.path)
    except UserInputError as e:
        raise UserInputError(f"{e} (after --set {', '.join(f'{k}={v}' for k, v in fixed.items())})") from None


def base_config(space: SearchSpace, overrides: dict | None = None) -> Config:
    """The base run config with CLI-level overrides (dotted keys) applied."""
    try:
        return config_from_dict(apply_overrides(space.base, overrides or {}))
    except UserInputError as e:
        raise UserInputError(f"{_where(space.path)}: {e}") from None


def searched_keys(space: SearchSpace) -> list[str]:
    """The dotted config keys a trial's overrides set (derived num_heads included)."""
    return list(space.params)


class _Students:
    """The student part of a space checked against one teacher: what each trial may pick."""

    def __init__(self, space: SearchSpace, teacher: Any, base: dict | Config | None):
        self.where, P = _where(space.path), space.params
        self.tH, self.tA = teacher.hidden_size, teacher.num_attention_heads
        self.tL, self.tI = teacher.num_hidden_layers, teacher.intermediate_size
        self.head = self.tH // self.tA
        raw = base.to_dict() if isinstance(base, Config) else (space.base if base is None else base)
        self.cfg = config_from_dict(raw)
        s: StudentConfig = self.cfg.student
        self.P, self.s = P, s
        self.inits = P[INIT].choices if INIT in P else (s.init,)
        H_vals = P[HIDDEN].values() if HIDDEN in P else (s.hidden_size or self.tH,)
        L_vals = P[LAYERS].values() if LAYERS in P else (s.num_layers,)
        f = P.get(FFN)
        ratios = [(r, True) for r in f.values()] if f and f.values() else \
            [(f.high, False), (f.low, False)] if f else [(s.ffn_ratio, True)]
        self.heads = {H: self._heads_for(H) for H in H_vals}
        for H in H_vals:
            for r, _ in ratios:
                if round((self.tI / self.tH if r is None else r) * H) < 1:
                    raise UserInputError(f"{self.where}: student.ffn_ratio: {r} gives an FFN size < 1 for "
                                         f"student.hidden_size {H}")
            for A in self.heads[H]:
                for L in L_vals:
                    for r, exact in ratios:
                        if not self.allowed(H, A, L, r, exact):
                            raise self._no_init(H, A, L, r)

    def _heads_for(self, H: int) -> list[int]:
        hp = self.P.get(HEADS)
        if hp is None and self.s.num_heads is not None:
            cands, what = [self.s.num_heads], f"the base config's student.num_heads {self.s.num_heads}"
        elif hp is None or hp.kind == "derived":
            if H % self.head:
                raise UserInputError(f"{self.where}: student.hidden_size: {H} is not a multiple of the teacher's "
                                     f"head size {self.head} (student.num_heads is derived; search it as a choice)")
            return [H // self.head]
        else:
            cands, what = list(hp.values()), f"search key '{HEADS}' {list(hp.values())}"
        teacher_init = lambda A: ("teacher-layers" in self.inits and H == self.tH and A == self.tA) or (
            "teacher-slice" in self.inits and H <= self.tH and H // A == self.head)
        out = [A for A in cands if H % A == 0 and ("random" in self.inits or teacher_init(A))]
        if not out:
            raise UserInputError(f"{self.where}: student.num_heads: none of {what} divides student.hidden_size {H}"
                                 + ("" if "random" in self.inits else f" and allows an init in {list(self.inits)}"))
        return out

    def allowed(self, H: int, A: int, L: int, r: float | None, exact: bool = True) -> list[str]:
        I = round((self.tI / self.tH if r is None else r) * H)
        layers = exact and H == self.tH and A == self.tA and L <= self.tL and I == self.tI
        full_dup = H == self.tH and layers and "teacher-layers" in self.inits
        sliced = H <= self.tH and H // A == self.head and L <= self.tL and I <= self.tI and not full_dup
        ok = {"teacher-layers": layers, "teacher-slice": sliced, "random": True}
        return [i for i in self.inits if ok[i]]

    def _no_init(self, H: int, A: int, L: int, r: float | None) -> UserInputError:
        if L > self.tL:
            return UserInputError(f"{self.where}: student.num_layers: {L} is more than the teacher's {self.tL} "
                                  f"layers, which only 'random' init allows; student.init offers {list(self.inits)}")
        return UserInputError(
            f"{self.where}: student.init: none of {list(self.inits)} is valid for student.hidden_size={H}, "
            f"student.num_heads={A}, student.num_layers={L}, student.ffn_ratio={r} (teacher: hidden {self.tH}, "
            f"{self.tA} heads of size {self.head}, {self.tL} layers, FFN {self.tI}; teacher-layers needs the "
            f"teacher's width, teacher-slice a width <= it with head size {self.head}; add 'random' to allow any)")

    def sample(self, trial) -> dict[str, Any]:
        P, s, out = self.P, self.s, {}
        H = P[HIDDEN].suggest(trial) if HIDDEN in P else (s.hidden_size or self.tH)
        L = P[LAYERS].suggest(trial) if LAYERS in P else s.num_layers
        r = P[FFN].suggest(trial) if FFN in P else s.ffn_ratio
        A = _pick(trial, f"{HEADS}|h{H}", self.heads[H])
        inits = self.allowed(H, A, L, r)
        init = _pick(trial, INIT + "|" + "-".join(INIT_TAGS[i] for i in inits), inits)
        picks = list(P[PICK].choices) if PICK in P else [s.layer_pick]
        pick = _pick(trial, PICK, picks) if init != "random" and L < self.tL else picks[0]
        for key, value in ((HIDDEN, H), (LAYERS, L), (FFN, r), (HEADS, A), (INIT, init), (PICK, pick)):
            if key in P:
                out[key] = value
        return out


def _pick(trial, name: str, options: list) -> Any:
    return options[0] if len(options) == 1 else trial.suggest_categorical(name, options)


class CompiledSpace:
    """The define-by-run function compile_space returns; a plain object so Ray can pickle the searcher."""

    def __init__(self, space: SearchSpace, teacher_config: Any, base: dict | Config | None = None):
        self.params, self.normalize = space.params, space.normalize_alphas
        self.students = _Students(space, teacher_config, base)
        self.alphas = [k for k in ALPHAS if k in space.params]
        self.fixed_alphas = sum(getattr(self.students.cfg.loss, k.split(".")[1]) for k in ALPHAS if k not in self.alphas)

    def __call__(self, trial) -> dict:
        overrides = {k: p.suggest(trial) for k, p in self.params.items() if k not in STUDENT_KEYS}
        alphas, total = self.alphas, sum(overrides[k] for k in self.alphas)
        if alphas and total == 0 and (self.normalize or self.fixed_alphas == 0):
            overrides.update({k: 1.0 / len(alphas) for k in alphas})  # every searched alpha drew exactly 0
        elif self.normalize:
            overrides.update({k: overrides[k] / total for k in alphas})
        overrides.update(self.students.sample(trial))
        return {"overrides": overrides}


def compile_space(space: SearchSpace, teacher_config: Any,
                  base: dict | Config | None = None) -> Callable[[Any], dict]:
    """An Optuna define-by-run function: trial -> {"overrides": {dotted key: value}} (complete, resolved).

    teacher_config: the teacher's BertConfig. base: the resolved base (base_config(space, cli_overrides))
    when the CLI changes student.* keys; default space.base. The result pickles (Ray saves its searcher).
    """
    return CompiledSpace(space, teacher_config, base)


class _DefaultsTrial:
    """Answers suggest_* with preferred values (in order), recording them as Optuna params."""

    def __init__(self, prefs: dict[str, list], loose: set[str]):
        self.prefs, self.loose, self.params = prefs, loose, {}

    def _choose(self, name: str, valid: Callable[[Any], bool], fallback: Any, nearest: Callable | None) -> Any:
        key = name.split("|")[0]
        cands = self.prefs.get(key, [])
        value = next((c for c in cands if valid(c)), None)
        if value is None and key in self.loose and cands and _is_num(cands[0]) and nearest:
            value = nearest(cands[0])
        self.params[name] = fallback if value is None else value
        return self.params[name]

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return self._choose(name, lambda v: _is_num(v) and low <= v <= high,
                            math.sqrt(low * high) if log else (low + high) / 2, lambda v: float(v))

    def suggest_int(self, name, low, high, *, step=1, log=False):
        grid = range(low, high + 1, step)
        return self._choose(name, lambda v: v in grid and float(v).is_integer(), grid[len(grid) // 2],
                            lambda v: min(grid, key=lambda g: abs(g - v)))

    def suggest_categorical(self, name, choices):
        nums = [c for c in choices if _is_num(c)]
        return self._choose(name, lambda v: v in choices, choices[0],
                            (lambda v: min(nums, key=lambda c: abs(c - v))) if nums else None)


def defaults_point(space: SearchSpace, teacher_config: Any, base: dict | Config | None = None) -> dict:
    """Optuna params (compile_space's names) for the DistilBERT defaults, for points_to_evaluate.

    Loss: T=2, alpha kd/hard/cos = 5/2/1 (normalized over the searched alphas if normalize_alphas).
    A loss default outside a uniform/log_uniform range is still returned (Optuna warns and uses it);
    on an int or choice it snaps to the nearest value. Student: teacher-layers init at the teacher's
    width and heads with half its layers, spread (every other layer), where the space allows; otherwise,
    like every other key: the base config's value if the distribution holds it, else the (log-)midpoint
    or the first choice.
    """
    raw = base.to_dict() if isinstance(base, Config) else (space.base if base is None else base)
    full = config_from_dict(raw).to_dict()
    prefs = {k: [dotted_get(full, k)] for k in space.params}
    loss = {k: v for k, v in DISTILBERT_LOSS.items() if k in space.params}
    alphas = [k for k in ALPHAS if k in loss]
    total = sum(loss[k] for k in alphas)
    if space.normalize_alphas and total > 0:
        loss.update({k: loss[k] / total for k in alphas})
    for k, v in loss.items():
        prefs[k] = [v]
    student = {HIDDEN: teacher_config.hidden_size, LAYERS: max(1, teacher_config.num_hidden_layers // 2),
               HEADS: teacher_config.num_attention_heads, INIT: "teacher-layers", PICK: "spread"}
    for k, v in student.items():
        prefs[k] = [v] + prefs.get(k, [])
    return _params_for(space, teacher_config, base, prefs, loose=set(loss))


def config_point(space: SearchSpace, teacher_config: Any, base: dict | Config | None, values: dict) -> dict:
    """Optuna params (compile_space's names) that make this space run a given config (dotted key -> value),
    for points_to_evaluate: a searched key takes the config's value where its distribution holds it, else the
    nearest number (a float outside its range as is), else the (log-)midpoint or the first choice."""
    prefs = {k: [values[k]] for k in space.params if values.get(k) is not None}
    return _params_for(space, teacher_config, base, prefs, loose=set(prefs))


def config_of_params(space: SearchSpace, teacher_config: Any, base: dict | Config | None, params: dict) -> dict:
    """The overrides (dotted key -> value) compile_space makes of a trial's Optuna params."""
    from optuna.trial import FixedTrial

    return compile_space(space, teacher_config, base)(FixedTrial(params))["overrides"]


def _params_for(space: SearchSpace, teacher_config: Any, base: dict | Config | None, prefs: dict[str, list],
                loose: set[str]) -> dict:
    trial = _DefaultsTrial(prefs, loose)
    compile_space(space, teacher_config, base)(trial)
    return trial.params
