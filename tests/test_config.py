import json

import pytest

from server_sdk.config import ConfigError, RunConfig
from server_sdk.engine.model import ModelError, load_base_model
from server_sdk.method.strategies import make_strategy


@pytest.mark.parametrize("overrides, match", [
    ({"stages": [4, 4, 30]}, r"stages=\[4, 4, 30\] must be strictly increasing"),
    ({"stages": [8, 4, 30]}, "strictly increasing"),
    ({"beta": 1.5}, r"beta=1.5 must lie in \[0, 1\]"),
    ({"beta": -0.1}, "beta=-0.1"),
    ({"lora": {"target_modules": ["q_proj", "qkv"]}}, "unknown target module 'qkv'"),
    ({"rounds_per_stage": 0}, "rounds_per_stage=0: every stage needs at least 1 round"),
    ({"rounds_per_stage": [1, 0]}, "every stage needs at least 1 round"),
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
    ({"precision": "fp16"}, r"precision='fp16' is not valid; choose one of \['fp32', 'bf16'\]"),
    ({"micro_batch": 5, "batch_size": 4}, "micro_batch=5 exceeds batch_size=4"),
    ({"micro_batch": 0}, "micro_batch=0 must be an integer >= 1"),
])
def test_bad_values_are_rejected_naming_field_and_value(overrides, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(overrides).validate()


def test_unknown_strategy_is_rejected_with_the_registered_names():
    # strategy names live in one registry (server_sdk.method.strategies.STRATEGIES); make_strategy checks them
    with pytest.raises(ConfigError, match=r"strategy='fedprox' is not valid; choose one of \['devft', 'fedit', 'ffa-lora'\]"):
        make_strategy(RunConfig(strategy="fedprox").validate())


def test_option_names_come_from_the_rule_registries():
    from server_sdk.method.fusion import ANCHORS, FOLD_BACKS, FUSIONS
    from server_sdk.method.grouping import GROUPINGS

    for field, registry in (("grouping", GROUPINGS), ("fusion", FUSIONS), ("anchor", ANCHORS),
                            ("transfer", FOLD_BACKS)):
        for name in registry:
            RunConfig.from_dict({field: name}).validate()
        with pytest.raises(ConfigError, match=f"choose one of {list(registry)}".replace("[", r"\[")):
            RunConfig.from_dict({field: "nope"}).validate()


def test_stage_schedule_checked_against_the_model():
    # the schedule is the strategy's (DEVFT's `stages`; FedIT trains the full model in one stage)
    with pytest.raises(ConfigError, match="larger than the model's 30 layers"):
        make_strategy(RunConfig(stages=[4, 8, 32])).stage_sizes(30)
    with pytest.raises(ConfigError, match="last stage must be the full model"):
        make_strategy(RunConfig(stages=[4, 8, 16])).stage_sizes(30)
    with pytest.raises(ConfigError, match="rounds_per_stage has 2 entries but there are 4 stages"):
        RunConfig(rounds_per_stage=[1, 2]).resolve_rounds_per_stage(len(make_strategy(RunConfig()).stage_sizes(30)))
    assert make_strategy(RunConfig()).stage_sizes(30) == [4, 8, 16, 30]
    assert make_strategy(RunConfig(strategy="fedit")).stage_sizes(30) == [30]


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


def test_accuracy_only_at_the_end_is_a_valid_choice():
    from server_sdk.config import ConfigError, RunConfig

    RunConfig(accuracy_every="end").validate()
    with pytest.raises(ConfigError, match="accuracy_every"):
        RunConfig(accuracy_every="sometimes").validate()


def test_every_named_config_loads_validates_and_ships():
    """Each file in server_sdk/configs is a valid run config, reachable by name, and matched by the package data
    of pyproject.toml (so a plain `pip install .` has it too); its first line says what it is for."""
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    from server_sdk.config import CONFIG_DIR, named_configs

    names = named_configs()
    assert {"quickstart", "fedit", "convergence", "convergence-smoke", "transport"} <= set(names)
    assert sorted(p.stem for p in CONFIG_DIR.iterdir()) == sorted(names)  # nothing else in the folder
    shipped = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = shipped["tool"]["setuptools"]["package-data"]["server_sdk"]
    for name, about in names.items():
        cfg = RunConfig.load(name).validate()
        assert RunConfig.load(CONFIG_DIR / f"{name}.yaml") == cfg and about, name
        assert any(fnmatch(f"configs/{name}.yaml", p) for p in patterns), name
    assert RunConfig.load("fedit").strategy == "fedit"
    with pytest.raises(ConfigError, match="config file nope.yaml does not exist"):
        RunConfig.load("nope.yaml")
