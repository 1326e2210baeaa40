import pytest

from distil_core.config import Config, config_from_dict, load_config, parse_override
from distil_core.errors import UserInputError


def test_defaults_are_distilbert():
    cfg = config_from_dict({})
    assert (cfg.loss.temperature, cfg.loss.alpha_kd, cfg.loss.alpha_hard, cfg.loss.alpha_cos) == (2.0, 5.0, 2.0, 1.0)
    assert cfg.student.init == "teacher-layers"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  task: mrpc\n  train_limit: 100\nloss:\n  temperature: 4\n")
    cfg = load_config(p, ["optim.lr=3e-5", "student.num_layers=2", "student.hidden_size=null"])
    assert isinstance(cfg, Config)
    assert cfg.data.task == "mrpc" and cfg.data.train_limit == 100
    assert cfg.loss.temperature == 4.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.optim.lr == 3e-5 and cfg.student.num_layers == 2 and cfg.student.hidden_size is None


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"loss": {"alpha_kd": -1}}, "loss.alpha_kd"),
        ({"loss": {"alpha_kd": 0, "alpha_hard": 0, "alpha_cos": 0}}, "loss"),
        ({"student": {"init": "copy"}}, "student.init"),
        ({"student": {"layer_pick": "top"}}, "student.layer_pick"),
        ({"student": {"hidden_size": 100, "num_heads": 3}}, "student.num_heads"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"optim": {"batch_size": 1.5}}, "optim.batch_size"),
        ({"data": {"tokens": 3}}, "data.tokens"),
        ({"objective": "mlm"}, "data.corpus"),
        ({"teacher": {"finetune": {"epochs": 0}}}, "teacher.finetune.epochs"),
        ({"loss": 3}, "loss"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(UserInputError, match=f"'{key}'"):
        config_from_dict(raw)


def test_file_errors(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(UserInputError, match="bad.yaml.*YAML"):
        load_config(bad)
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        parse_override("optim.lr")


def test_shipped_configs_are_valid():
    from pathlib import Path

    shipped = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        load_config(path)
