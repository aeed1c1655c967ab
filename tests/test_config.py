import json

import pytest

from server_sdk.config import ConfigError, RunConfig
from server_sdk.model import ModelError, load_base_model


@pytest.mark.parametrize("overrides, match", [
    ({"stages": [4, 4, 30]}, r"stages=\[4, 4, 30\] must be strictly increasing"),
    ({"stages": [8, 4, 30]}, "strictly increasing"),
    ({"beta": 1.5}, r"beta=1.5 must lie in \[0, 1\]"),
    ({"beta": -0.1}, "beta=-0.1"),
    ({"lora": {"target_modules": ["q_proj", "qkv"]}}, "unknown target module 'qkv'"),
    ({"rounds_per_stage": 0}, "rounds_per_stage=0: every stage needs at least 1 round"),
    ({"rounds_per_stage": [1, 0]}, "every stage needs at least 1 round"),
    ({"strategy": "fedprox"}, "strategy='fedprox' is not valid"),
    ({"grouping": "kmeans"}, "grouping='kmeans'"),
    ({"fusion": "sum"}, "fusion='sum'"),
    ({"transfer": "move"}, "transfer='move'"),
    ({"clients_per_round": 9, "num_clients": 4}, "clients_per_round=9 exceeds num_clients=4"),
    ({"lr": 0}, "lr=0 must be"),
    ({"local_steps": 0}, "local_steps=0 must be an integer >= 1"),
    ({"data": {"tasks": ["chess"]}}, "unknown task 'chess'"),
    ({"data": {"partition": "zipf"}}, "data.partition='zipf'"),
    ({"data": {"dirichlet_alpha": 0}}, "dirichlet_alpha=0"),
    ({"lora": {"r": 0}}, "lora.r=0"),
])
def test_bad_values_are_rejected_naming_field_and_value(overrides, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(overrides).validate()


def test_stage_schedule_checked_against_the_model():
    with pytest.raises(ConfigError, match="larger than the model's 30 layers"):
        RunConfig(stages=[4, 8, 32]).validate(30)
    with pytest.raises(ConfigError, match="last stage must be the full model"):
        RunConfig(stages=[4, 8, 16]).validate(30)
    with pytest.raises(ConfigError, match="rounds_per_stage has 2 entries but there are 4 stages"):
        RunConfig(rounds_per_stage=[1, 2]).validate(30)
    assert RunConfig().resolved_stages(30) == [4, 8, 16, 30]
    assert RunConfig(strategy="fedit").resolved_stages(30) == [30]


def test_unknown_fields_and_roundtrip(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field"):
        RunConfig.from_dict({"learning_rate": 1e-3})
    cfg = RunConfig(beta=0.15, stages=[2, 4, 6])
    cfg.to_json(tmp_path / "c.json")
    assert RunConfig.from_file(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("beta: 0.5\nlora:\n  r: 4\n")
    y = RunConfig.from_file(tmp_path / "c.yaml")
    assert y.beta == 0.5 and y.lora.r == 4
    assert json.loads(json.dumps(y.to_dict()))["lora"]["r"] == 4
    assert cfg.with_overrides({"lora.r": 16}).lora.r == 16
    with pytest.raises(ConfigError, match="unknown field"):
        cfg.with_overrides({"lora.rank": 16})


def test_bad_model_path_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match="neither a known name"):
        load_base_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        load_base_model(str(tmp_path))
