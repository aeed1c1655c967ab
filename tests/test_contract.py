"""The device contract (docs/device-client.md, docs/protocol.md, the JSON Schema) holds in the code.

Each test pins one point a device author relies on: the optimiser a run chooses reaches the
device, seeds stay exact in every language, operators get a login from the command line, and a
batch without targets is skipped the same way by devices and simulated clients.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import protocol as P
from server_sdk.config import ConfigError, RunConfig

pytest_plugins = ("tests.broker_fixtures",)  # fleet, broker, clients


def test_run_config_chooses_the_optimizer_and_refuses_an_unknown_one():
    assert RunConfig().optimizer == "adamw"
    assert RunConfig().with_overrides({"optimizer": "sgd"}).validate().optimizer == "sgd"
    with pytest.raises(ConfigError, match="optimizer='adam' is not valid; choose one of"):
        RunConfig(optimizer="adam").validate()


def test_a_run_saved_before_the_optimizer_field_reads_as_adamw(tmp_path):
    raw = RunConfig().to_dict()
    del raw["optimizer"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert RunConfig.of_run(tmp_path).optimizer == "adamw"
    assert "optimizer" not in RunConfig().identity()  # a default adds nothing to cache keys


def _settings(seed) -> dict:
    return {"lr": 1e-3, "local_steps": 1, "batch_size": 1, "trainable": ["a"], "seeds": {"dev-000": seed},
            "session": "s"}


def test_seeds_are_bounded_to_what_a_json_number_holds_exactly():
    assert P.TrainSettings.from_json(_settings(2**53 - 1)).seeds["dev-000"] == 2**53 - 1
    for bad in (2**53, 2**64 - 1, -1, True, 1.0):
        with pytest.raises(P.ProtocolError, match=r"seed of dev-000 must be an integer in \[0, 2\^53 - 1\]"):
            P.TrainSettings.from_json(_settings(bad))


def test_coordinator_seeds_are_32_bit():
    from server_sdk.method.strategies.base import client_seed

    seeds = [client_seed(s, k, r, c) for s in (0, 2**31, 2**63) for k in range(3) for r in range(3) for c in range(4)]
    assert max(seeds) < 2**32 <= P.MAX_SEED


def test_add_operator_from_the_command_line_gives_a_login_that_reads_every_device(fleet, clients, capsys):
    from server_sdk.cli.main import main
    from server_sdk.fleet.broker import BrokerProcess, Credentials
    from server_sdk.fleet.broker import main as broker_main

    assert main(["fleet", "add-operator", str(fleet.dir), "monitor1"]) == 0
    assert broker_main(["add-operator", str(fleet.dir), "monitor2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    paths = [Path(line) for line in out]
    assert paths == [fleet.dir / "credentials" / "monitor1.json", fleet.dir / "credentials" / "monitor2.json"]
    assert main(["fleet", "add-operator", str(fleet.dir), "dev1"]) == 2  # a device's name: refused, clearly
    assert "is a device" in capsys.readouterr().err
    broker = BrokerProcess(fleet.dir, fleet.port).start()
    try:
        monitor = clients(Credentials.load(paths[0]))
        monitor.subscribe("devft/run1/update/+")
        device = clients(fleet.devices["dev1"])
        device.publish("devft/run1/update/dev1", b"frame", wait_s=10)
        msg = monitor.get("devft/run1/update/+", timeout_s=10)
        assert (msg.topic, msg.payload) == ("devft/run1/update/dev1", b"frame")
    finally:
        broker.stop()


def test_a_batch_without_targets_is_skipped_by_simulated_clients_as_by_devices(tiny_base):
    """docs/device-client.md section 4: no graph run, no optimiser step (AdamW's step count stays), no
    replacement draw. The reference is the loop as the docs write it, on the same drawn batches."""
    import torch

    from edge_runtime.batching import IGNORE_INDEX, collate
    from edge_runtime.sampler import round_draws
    from server_sdk.data import Example, encode, render
    from server_sdk.engine.trainer import local_train, token_losses, trainable_params
    from server_sdk.method.lora import attach_lora, read_lora, write_lora

    tok = tiny_base.tokenizer
    long_prompt, long_completion = render(tok, "word " * 200, "answer")  # no target within seq_len
    shard = [Example("t", "q", "a", long_prompt, long_completion, {})] * 2
    shard += [Example("t", q, a, *render(tok, q, a), {}) for q, a in (("1+1?", "2"), ("2+2?", "4"))]
    seed, steps, seq_len = 5, 6, 48
    encoded = [encode(tok, ex, seq_len) for ex in shard]
    draws = list(round_draws(seed, len(shard), 1, steps))
    empty = [all(y == IGNORE_INDEX for y in encoded[i[0]][1][1:]) for i in draws]
    assert any(empty[:-1]) and not all(empty), draws  # an empty batch before a trained one: the step count matters

    model = attach_lora(copy.deepcopy(tiny_base.model), RunConfig().lora, seed=0)
    start = read_lora(model)
    result = local_train(model, tok, shard, steps=steps, batch_size=1, lr=1e-2, seq_len=seq_len, seed=seed,
                         is_trainable=lambda name: True)

    reference = attach_lora(copy.deepcopy(tiny_base.model), RunConfig().lora, seed=0)
    write_lora(reference, start)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(trainable_params(reference, lambda name: True), lr=1e-2, weight_decay=0.0)
    reference.train()
    losses = []
    for idx, skip in zip(draws, empty):
        if skip:
            continue
        ids, labels = collate([encoded[i] for i in idx], tok.pad_token_id)
        loss = token_losses(reference, torch.from_numpy(ids), torch.from_numpy(labels))[0].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    want = read_lora(reference)
    assert result.train_loss == pytest.approx(float(np.mean(losses)), rel=0, abs=0)
    for name, delta in result.delta.items():
        assert torch.equal(delta, want[name] - start[name]), name


def test_an_outside_device_joins_a_local_fleet_run_as_the_docs_say(tmp_path):
    """docs/device-client.md section 8: a prepared runs/RUN/fleet and a device_names override put an
    outside device (here devft-edge started by hand, as js-001) in client 1's place."""
    import os
    import subprocess
    import sys
    import time

    from server_sdk.cli.main import main
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.broker import MosquittoNotFound, free_port, require_mosquitto
    from server_sdk.fleet.local_fleet import REPO_ROOT
    from tests.test_fleet import fleet_cfg

    try:
        require_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    base = tiny_random_model(n_layers=4, hidden=32, seed=0)
    base.model.save_pretrained(tmp_path / "model")
    base.tokenizer.save_pretrained(tmp_path / "model")
    fleet_cfg(model=str(tmp_path / "model"), stages=[4], rounds_per_stage=[2], num_clients=2, clients_per_round=2,
              torch_threads=1).to_json(tmp_path / "cfg.json")
    run = tmp_path / "runs" / "RUN"
    assert main(["fleet", "init", str(run / "fleet"), "--hostname", "localhost", "--hostname", "127.0.0.1",
                 "--bind", "127.0.0.1", "--port", str(free_port())]) == 0
    assert main(["fleet", "add-device", str(run / "fleet"), "js-001"]) == 0
    (run / "fleet.json").write_text(json.dumps({"device_names": {"1": "js-001"}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    coordinator = subprocess.Popen([sys.executable, "-m", "server_sdk.cli.main", "run", "--fleet", "local:2", "--config",
                                    str(tmp_path / "cfg.json"), "--name", "RUN", "--runs-dir", str(tmp_path / "runs"),
                                    "--quiet", "--round-timeout", "90"], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    shard = run / "data" / "client_001.jsonl"
    deadline = time.monotonic() + 120
    while not shard.exists() and time.monotonic() < deadline and coordinator.poll() is None:
        time.sleep(0.2)
    device = subprocess.Popen([sys.executable, "-m", "edge_runtime.client", "run", "--credentials",
                               str(run / "fleet" / "credentials" / "js-001.json"), "--data", str(shard), "--cache",
                               str(tmp_path / "js-cache"), "--run", "RUN"], env=env)
    try:
        out, err = coordinator.communicate(timeout=400)
        assert coordinator.returncode == 0, err[-3000:]
        assert device.wait(60) == 0
    finally:
        for proc in (coordinator, device):
            if proc.poll() is None:
                proc.kill()
    report = json.loads((run / "report.json").read_text())
    assert [sorted(r["telemetry"]) for r in report["records"] if r["stage"] >= 0] == [["dev-000", "js-001"]] * 2
