"""The strategy's round methods (Flower's shape) and the typed records the round loop keeps."""

from __future__ import annotations

import json

import pytest
import torch

from server_sdk.method import aggregation as agg
from server_sdk.method.records import RoundRecord
from server_sdk.method.strategies import make_strategy
from server_sdk.method.strategies.base import ClientResult, client_seed, sample_clients
from server_sdk.method.submodel import StagePlan, identity_plan


def test_configure_train_draws_the_clients_and_seeds_of_the_stages_key(tiny_cfg):
    cfg = tiny_cfg(num_clients=6, clients_per_round=3, seed=5)
    plan = StagePlan(1, 4, [[0, 1], [2, 3], [4], [5]], [0, 2, 4, 5])
    lora = {"a.lora_A": torch.zeros(2), "a.lora_B": torch.ones(2)}
    train = make_strategy(cfg).configure_train(plan, 2, lora, None)
    assert train.clients == sample_clients(cfg, plan.draw_key, 2) and len(train.clients) == 3
    assert train.seeds == {c: client_seed(5, plan.draw_key, 2, c) for c in train.clients}
    assert train.global_lora is lora and train.is_trainable("a.lora_A")
    narrowed = make_strategy(cfg).configure_train(plan, 2, lora, [1, 4])  # the executor's eligible clients
    assert narrowed.clients == [1, 4] and set(narrowed.seeds) == {1, 4}
    ffa = make_strategy(tiny_cfg(strategy="ffa-lora", stages=None)).configure_train(identity_plan(6, 0), 0, lora, None)
    assert not ffa.is_trainable("a.lora_A") and ffa.is_trainable("a.lora_B")  # FFA-LoRA trains only B


@pytest.mark.parametrize("every, want", [("never", [False, False, False]), ("round", [True, True, True]),
                                         ("stage", [False, True, True]), ("end", [False, False, True])])
def test_configure_evaluate_every_eval_every_rounds_and_each_stages_end(tiny_cfg, every, want):
    strategy = make_strategy(tiny_cfg(eval_every=2, accuracy_every=every))
    # rounds 0..4 of a 5-round stage: evaluated after rounds 1 and 3 (eval_every) and 4 (the stage's end)
    assert [strategy.configure_evaluate(r, 5, False) is not None for r in range(5)] == [False, True, False, True, True]
    generate = [strategy.configure_evaluate(1, 5, True).generate, strategy.configure_evaluate(4, 5, False).generate,
                strategy.configure_evaluate(4, 5, True).generate]
    assert generate == want


def test_the_strategy_aggregates_and_evaluates_with_the_configs_rule(tiny_cfg):
    results = [ClientResult(c, 4, {"w": torch.tensor([float(c), 100.0 * (c == 2)])}, 1.0, 0.0) for c in range(3)]
    glob = {"w": torch.zeros(2)}
    median = make_strategy(tiny_cfg(aggregation="median"))
    assert isinstance(median.aggregator, agg.Clipped) and isinstance(median.aggregator.rule, agg.FedMedian)
    assert torch.equal(median.aggregate_train(glob, results)["w"], agg.aggregate("median", glob, results)["w"])
    fedavg = make_strategy(tiny_cfg())
    assert torch.equal(fedavg.aggregate_train(glob, results)["w"], torch.tensor([1.0, 100 / 3]))
    plan = identity_plan(6, 0)
    seen = []
    metrics = fedavg.evaluate(glob, {"w": torch.ones(2)}, glob, plan, lambda lora: seen.append(lora) or {"ok": 1})
    assert metrics == {"ok": 1} and torch.equal(seen[0]["w"], fedavg.finish_stage(glob, {"w": torch.ones(2)},
                                                                                  glob, plan)["w"])


def test_round_records_become_report_rows_and_come_back_from_old_checkpoints():
    """Rows as report.json and meta.json hold them: optional fields only when set, `rolled_back` only when true;
    a checkpoint written before records were typed (dict rows, `rolled_back` added) loads."""
    base = RoundRecord.base_model(6, {"eval_loss": 5.0, "accuracy": None, "per_task": {"x": 1}})
    row = RoundRecord(0, 1, 0, 2, [0, 1], 3.5, 10, 20, 30, [0.1, 0.2], 1.0, [4, 4], eval_loss=4.9,
                      client_cpu_seconds=[0.1, 0.2], stage_new_devices=2, rolled_back=True)
    assert "client_cpu_seconds" not in base.to_dict() and "rolled_back" not in base.to_dict()
    assert list(row.to_dict())[-1] == "rolled_back" and "telemetry" not in row.to_dict()
    for rec in (base, row):
        assert RoundRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    old = {"stage": 0, "round": 1, "stage_round": 0, "layers": 2, "clients": [0, 1], "train_loss": 3.5,
           "bytes_down": 10, "bytes_up": 20, "stage_download_bytes": 30, "client_seconds": [0.1, 0.2],
           "wall_seconds": 1.0, "client_samples": [4, 4], "eval_loss": 4.9, "accuracy": None, "per_task": None,
           "client_cpu_seconds": [0.1, 0.2], "stage_new_devices": 2, "rolled_back": True}
    assert RoundRecord.from_dict(old) == row and RoundRecord.from_dict(old).to_dict() == old
    with pytest.raises(ValueError, match="'loss'"):
        RoundRecord.from_dict({**old, "loss": 1.0})
