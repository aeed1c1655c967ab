"""The fleet coordinator and devft-edge devices against a real mosquitto (TLS, passwords, ACL).

The first tests drive FleetExecutor with hand-made updates (no training, seconds).
The run tests train a tiny random LLaMA on device processes in the portable onnx format;
its traced graphs are cached per model shape under DEVFT_CACHE/onnx-templates, so only the
first run on a machine pays the export (~1 min per stage shape).
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime import protocol as P
from edge_runtime.mqtt import MqttClient, MqttConnectError
from server_sdk.config import RunConfig
from server_sdk.engine.executor import QuorumNotReached
from server_sdk.fleet.broker import BrokerProcess, Credentials, add_device, add_operator
from server_sdk.fleet.coordinator import FleetExecutor
from server_sdk.fleet.registry import client_index, device_name
from server_sdk.fleet.settings import FleetSettings
from server_sdk.method.aggregation import aggregate, update_norm
from tests.broker_fixtures import settings_for
from tests.serve_helpers import wait_for

pytest_plugins = ("tests.broker_fixtures",)  # fleet, clients

RUN = "fleetrun"
HAS_ORT_TRAINING = importlib.util.find_spec("onnxruntime.training") is not None
A, B = "layers.0.self_attn.q_proj.lora_A", "layers.0.self_attn.q_proj.lora_B"
PA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
PB = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "fleet_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_device_names_map_to_shards():
    assert device_name(3) == "dev-003" and client_index("dev-003") == 3 and client_index("dev7") == 7
    with pytest.raises(ValueError, match="trailing shard number"):
        client_index("phone")


# --------------------------------------------------------------------------- coordinator, hand-made updates


@pytest.fixture
def coordinator(fleet, tmp_path):
    """A FleetExecutor on a broker with dev1, dev2 (sampled as clients 1, 2), dev3 (an intruder), dev4, dev5."""
    for name in ("dev3", "dev4", "dev5"):
        add_device(fleet.dir, name)
        fleet.devices[name] = Credentials.load(fleet.dir / "credentials" / f"{name}.json")
    broker = BrokerProcess(fleet.dir, fleet.port).start()
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    settings = FleetSettings(run_id=RUN, round_timeout_s=20, max_update_norm=10.0, artifact_bytes_per_s=None,
                             device_names={"1": "dev1", "2": "dev2"})
    # lr 2e-2 over 2 steps: the hand-made deltas below (norm ~0.06) are what AdamW could produce (bound 0.23)
    ex = FleetExecutor(RunConfig(lr=2e-2, local_steps=2, batch_size=2), tmp_path / "run", fleet.server, [3],
                       settings, host="localhost")
    ex.serve_stage(0, {"onnx": tmp_path / "art"})
    yield ex
    ex.close()
    broker.stop()


def _update(device: str, rnd: int, tensors: dict, **kw) -> P.UpdateMessage:
    fields = dict(run_id=RUN, stage=0, round=rnd, device_id=device, nonce=secrets.token_hex(16), num_samples=4,
                  tensors=tensors, metrics={"train_loss": 1.5}, telemetry={"peak_rss_bytes": 123})
    fields.update(kw)
    return P.UpdateMessage(**fields)


def _good(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {PA: rng.normal(0, 0.01, (2, 8)).astype(np.float32), PB: rng.normal(0, 0.01, (8, 2)).astype(np.float32)}


def test_coordinator_refuses_bad_updates_and_aggregates_each_device_once(coordinator, fleet, clients):
    ex = coordinator
    global_lora = {A: torch.zeros(2, 8), B: torch.zeros(8, 2)}
    dev1, dev2 = clients(fleet.devices["dev1"]), clients(fleet.devices["dev2"])
    intruder = clients(fleet.devices["dev3"])
    control: queue.Queue = queue.Queue()
    dev1.subscribe(P.control_topic(RUN), control.put)

    with pytest.raises(MqttConnectError, match="refused|not authori"):  # bad credentials: the broker refuses
        clients(fleet.devices["dev1"], password="wrong", client_id="dev1-bad")

    ex.shard_sizes = {1: 4, 2: 16}  # claims up to the shard the coordinator wrote count in full
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(results=ex.train_round(
        0, 1, [1, 2], global_lora, lambda k: True, {1: 11, 2: 22})))
    worker.start()
    ctrl = wait_for(lambda: next((c for c in iter(lambda: _get(control), None) if c.state == "train"), None), 20,
                    "the train control message")
    assert ctrl.round == 1 and ctrl.sampled_clients == ("dev1", "dev2")
    assert ctrl.hyperparams.seeds == {"dev1": 11, "dev2": 22} and ctrl.hyperparams.trainable == (PA, PB)

    good = _good(1)
    bad = {
        "malformed": b"\x00\x00\x00\x05{not json",
        "non_finite": P.encode_update(_update("dev1", 1, {**good, PA: np.full((2, 8), np.nan, np.float32)})),
        "missing_tensors": P.encode_update(_update("dev1", 1, {PA: good[PA], "other": good[PB]})),
        "wrong_shape": P.encode_update(_update("dev1", 1, {**good, PB: np.zeros((2, 8), np.float32)})),
        "wrong_dtype": P.encode_update(_update("dev1", 1, {k: v.astype(np.float64) for k, v in good.items()})),
        "oversized": P.encode_update(_update("dev1", 1, {**good, "padding": np.zeros(400_000, np.float32)})),
        "wrong_run": P.encode_update(_update("dev1", 1, good, run_id="otherrun")),
        "stale_round": P.encode_update(_update("dev1", 0, good)),
        "future_round": P.encode_update(_update("dev1", 2, good)),
        "norm_exceeded": P.encode_update(_update("dev1", 1, {k: v + 100 for k, v in good.items()})),
    }
    for payload in bad.values():
        dev1.publish(P.update_topic(RUN, "dev1"), payload, wait_s=10)
    # another device's topic: the broker's ACL drops it (its PUBACK carries MQTT 5 reason code 0x87)
    forged = P.encode_update(_update("dev1", 1, {k: v + 0.05 for k, v in good.items()}))
    intruder.publish(P.update_topic(RUN, "dev1"), forged, wait_s=10)
    accepted = P.encode_update(_update("dev1", 1, good, nonce="a" * 32))
    dev1.publish(P.update_topic(RUN, "dev1"), accepted, wait_s=10)
    dev1.publish(P.update_topic(RUN, "dev1"), accepted, wait_s=10)  # a QoS 1 redelivery: counted once
    replay = P.encode_update(_update("dev1", 1, _good(5), nonce="a" * 32))
    dev1.publish(P.update_topic(RUN, "dev1"), replay, wait_s=10)
    wait_for(lambda: any(e.get("reason") == "replayed_nonce" for e in events(ex.run_dir)), 20, "the replay refusal")
    second = _good(2)
    dev2.publish(P.update_topic(RUN, "dev2"), P.encode_update(_update("dev2", 1, second, num_samples=12)), wait_s=10)
    worker.join(30)

    results = box["results"]
    assert [r.client for r in results] == [1, 2] and [r.num_samples for r in results] == [4, 12]
    np.testing.assert_array_equal(results[0].delta[A].numpy(), good[PA])  # not the forged one
    np.testing.assert_array_equal(results[1].delta[B].numpy(), second[PB])
    assert results[0].payload_bytes == len(accepted) and results[0].telemetry["peak_rss_bytes"] == 123
    log = events(ex.run_dir)
    refused = [e["reason"] for e in log if e["event"] == "rejected"]
    assert sorted(refused) == sorted([*bad, "replayed_nonce"]), refused
    assert [e["device"] for e in log if e["event"] == "accepted"] == ["dev1", "dev2"]
    assert sum(e["event"] == "duplicate" for e in log) == 1
    assert ex.rejections["malformed"] == 1


def test_a_stage_whose_update_burst_overflows_the_brokers_queue_is_warned_about(coordinator, fleet, caplog):
    """Issue #27: at Mosquitto's queue bound a burst of full-model updates overflowed the coordinator's queue and
    rounds waited out their deadline. The coordinator now says so at the stage's start, from the bound that
    fleet.json sets (the one the generated mosquitto.conf uses)."""
    from server_sdk.fleet.broker_config import MAX_QUEUED_BYTES, fleet_queue_bound, write_config

    assert fleet_queue_bound(fleet.dir) == MAX_QUEUED_BYTES
    settings = json.loads((fleet.dir / "fleet.json").read_text())
    (fleet.dir / "fleet.json").write_text(json.dumps({**settings, "max_queued_bytes": 300}))
    assert fleet_queue_bound(fleet.dir) == 300
    assert "max_queued_bytes 300" in write_config(fleet.dir).read_text()

    sub = torch.nn.Module()
    sub.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 8)))
    sub.register_parameter("lora_B", torch.nn.Parameter(torch.zeros(8, 2)))  # 128 bytes an update
    burst = 128 * coordinator.cfg.clients_per_round
    for bound, warned in ((None, False), (burst, False), (burst - 1, True)):
        coordinator.settings.broker_queue_bytes = bound
        caplog.clear()
        with caplog.at_level("WARNING"):
            coordinator._check_update_burst(0, sub)
        said = [e for e in events(coordinator.run_dir) if e["event"] == "update_burst_over_broker_queue"]
        assert ("raise max_queued_bytes" in caplog.text) == warned and len(said) == (1 if warned else 0)
    assert said[0]["update_bytes"] == 128 and said[0]["max_queued_bytes"] == burst - 1


def test_round_without_quorum_fails_clearly(coordinator):
    coordinator.settings.round_timeout_s = 1.0
    with pytest.raises(QuorumNotReached, match=r"0 of 2 sampled devices .* quorum is 2 .* --resume"):
        coordinator.train_round(0, 0, [1, 2], {A: torch.zeros(2, 8), B: torch.zeros(8, 2)}, lambda k: True,
                                {1: 1, 2: 2})
    assert events(coordinator.run_dir)[-1]["missing"] == ["dev1", "dev2"]


def _run_round(ex, rnd: int, sampled: list[int], stage: int = 0) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["results"] = ex.train_round(stage, rnd, sampled, {A: torch.zeros(2, 8), B: torch.zeros(8, 2)},
                                            lambda k: True, {c: c for c in sampled})
        except BaseException as exc:  # re-raised by the test
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    wr = ex.wire_round(stage, rnd)
    wait_for(lambda: any(e["event"] == "round_start" and e["round"] == wr for e in events(ex.run_dir)), 20,
             f"round {rnd} of stage {stage} to start")
    return worker, box


def _lora(delta: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {A: torch.from_numpy(delta[PA]), B: torch.from_numpy(delta[PB])}


def test_num_samples_poisoning_moves_the_model_less_than_one_honest_update(coordinator, fleet, clients):
    """The attack from issue 13: 10^12 claimed samples and norm 990 (under the fixed bound of 1000). The AdamW
    bound (issue 27) would refuse it outright: off here, so the weight cap, the adaptive bound and the median
    are what is tested."""
    ex = coordinator
    ex.settings.max_update_norm = 1e3
    ex.settings.adamw_norm_bound = False
    ex.settings.device_names.update({"3": "dev3", "4": "dev4", "5": "dev5"})
    ex.shard_sizes = {c: 4 for c in range(1, 6)}  # what the coordinator wrote for each client
    honest = {f"dev{c}": _good(c) for c in (1, 2, 4, 5)}
    direction = _good(99)
    scale = 990 / update_norm(_lora(direction))
    attack = {k: v * scale for k, v in direction.items()}
    conns = {name: clients(fleet.devices[name]) for name in ("dev1", "dev2", "dev3", "dev4", "dev5")}
    glob = {A: torch.zeros(2, 8), B: torch.zeros(8, 2)}
    honest_results = list(_honest_results(honest))
    honest_shift = aggregate("fedavg", glob, honest_results)
    smallest = min(update_norm(_lora(d)) for d in honest.values())

    for rnd, (k, method) in enumerate([(5.0, "fedavg"), (None, "median")], start=1):
        ex.settings.norm_bound_k = k  # round 2: the adaptive bound is off, the weight cap and the median remain
        worker, box = _run_round(ex, rnd, [1, 2, 3, 4, 5])
        for name, conn in conns.items():
            delta, n = (attack, 10**12) if name == "dev3" else (honest[name], 4)
            conn.publish(P.update_topic(RUN, name), P.encode_update(_update(name, rnd, delta, num_samples=n)),
                         wait_s=10)
        worker.join(30)
        assert "error" not in box, box.get("error")
        new = aggregate(method, glob, box["results"])
        moved = update_norm({key: new[key] - honest_shift[key] for key in new})
        assert moved < smallest, (rnd, method, moved, smallest)
        log = events(ex.run_dir)
        arrival = next(e for e in log if e["event"] == "accepted" and e["device"] == "dev3" and e["round"] == rnd)
        assert arrival["weight"] == 4 and arrival["claimed_samples"] == 10**12  # never more than its shard
    refused = [e for e in events(ex.run_dir) if e["event"] == "rejected"]
    assert [(e["device"], e["reason"]) for e in refused] == [("dev3", "norm_outlier")]  # round 1 only


def _honest_results(honest: dict[str, dict[str, np.ndarray]]):
    from server_sdk.method.strategies.base import ClientResult

    for name, delta in sorted(honest.items()):
        yield ClientResult(client=client_index(name), num_samples=4, delta=_lora(delta), train_loss=0.0, seconds=0.0)


def test_status_must_name_the_device_of_its_topic(coordinator, fleet, clients):
    ex = coordinator
    dev1 = clients(fleet.devices["dev1"])
    forged = P.StatusMessage(device_id="dev2", state="offline", timestamp=time.time())
    dev1.publish(P.status_topic(RUN, "dev1"), P.encode_status(forged), wait_s=10)
    own = P.StatusMessage(device_id="dev1", state="busy", timestamp=time.time())
    dev1.publish(P.status_topic(RUN, "dev1"), P.encode_status(own), wait_s=10)
    wait_for(lambda: ex.device_status.get("dev1", {}).get("state") == "busy", 10, "dev1's own status")
    refused = [e for e in events(ex.run_dir) if e["event"] == "rejected"]
    assert [(e["device"], e["reason"], e["message"]) for e in refused] == [("dev1", "device_mismatch", "status")]
    assert "dev2" not in ex.device_status and "dev2" not in ex._offline_now()


DEVICE_WITH_WILL = """
import sys, time
from edge_runtime import protocol as P
from edge_runtime.mqtt import MqttClient, MqttSettings
name, port, password, ca, run = sys.argv[1:6]
offline = P.encode_status(P.StatusMessage(device_id=name, state="offline", timestamp=time.time()))
c = MqttClient(MqttSettings(host="localhost", port=int(port), username=name, password=password, ca_file=ca,
                            client_id=name, will_topic=P.status_topic(run, name), will_payload=offline))
c.connect()
c.publish(P.status_topic(run, name), P.encode_status(P.StatusMessage(name, "busy", time.time())), retain=True,
          wait_s=5)
print("training", flush=True)
time.sleep(120)
"""


def test_a_killed_device_costs_seconds_not_the_deadline(coordinator, fleet, clients):
    """dev2 is SIGKILLed mid-round: its will arrives and the round closes without waiting 40 s."""
    ex = coordinator
    ex.settings.round_timeout_s = 40.0
    ex.settings.quorum = 0.5
    creds = fleet.devices["dev2"]
    proc = subprocess.Popen([sys.executable, "-c", DEVICE_WITH_WILL, "dev2", str(creds.port), creds.password,
                             creds.ca_file, RUN], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "training"
        wait_for(lambda: ex.device_status.get("dev2", {}).get("state") == "busy", 10, "dev2's busy status")
        worker, box = _run_round(ex, 1, [1, 2])
        clients(fleet.devices["dev1"]).publish(P.update_topic(RUN, "dev1"), P.encode_update(_update("dev1", 1,
                                               _good(1))), wait_s=10)
        wait_for(lambda: any(e["event"] == "accepted" for e in events(ex.run_dir)), 10, "dev1's update")
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        worker.join(45)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert "error" not in box, box.get("error")
    assert [r.client for r in box["results"]] == [1]
    log = events(ex.run_dir)
    end = next(e for e in log if e["event"] == "round_end")
    assert end["missing"] == ["dev2"] and end["offline"] == ["dev2"]
    assert end["t"] - killed_at < 5.0, f"the round waited {end['t'] - killed_at:.1f}s after the kill"
    assert any(e["event"] == "status" and e["device"] == "dev2" and e["state"] == "offline" for e in log)


def _get(q: queue.Queue):
    try:
        return P.decode_control(q.get(timeout=0.2).payload)
    except queue.Empty:
        return None


# --------------------------------------------------------------------------- whole runs on device processes

DEVICE_WRAPPER = """
import json, sys
if {block!r}:
    for name in ("torch", "transformers", "peft"):
        sys.modules[name] = None  # `import torch` now raises ImportError
from edge_runtime.client import main
rc = main(sys.argv[1:])
heavy = sorted({{m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}} & {{"torch", "transformers", "peft"}})
open("modules.json", "w").write(json.dumps({{"rc": rc, "heavy": heavy}}))
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def tiny4():
    from server_sdk.engine.model import tiny_random_model

    return tiny_random_model(n_layers=4, hidden=32, seed=0)


def fleet_cfg(**kw) -> RunConfig:
    from server_sdk.config import DataSettings, LoraSettings

    base = dict(model="tiny-random-L4", stages=[2, 4], rounds_per_stage=[2, 1], num_clients=3, clients_per_round=3,
                local_steps=2, batch_size=2, seq_len=64, lr=5e-3, accuracy_every="never",
                lora=LoraSettings(r=2, alpha=4), schedule="fixed",  # every stage runs: these test stage starts
                data=DataSettings(tasks=["chain_sum", "basic_arithmetic"], tasks_per_client=1, examples_per_client=6,
                                  eval_examples_per_task=2))
    base.update(kw)
    return RunConfig(**base)


class FleetRun:
    """rounds.run over a LocalFleet in a background thread, so a test can break things meanwhile."""

    def __init__(self, run_dir: Path, cfg: RunConfig, base, n: int, settings: FleetSettings,
                 device_code: dict[str, str] | None = None, resume: bool = False):
        from server_sdk.engine.rounds import run
        from server_sdk.fleet.coordinator import fleet_executor_factory
        from server_sdk.fleet.local_fleet import LocalFleet

        self.run_dir = run_dir
        self.fleet = LocalFleet(run_dir / "fleet", n)
        self.observer_creds = add_operator(self.fleet.dir, "observer")  # every connection needs its own login
        self.fleet.start_broker()
        self.shards: dict[str, Path] = {}

        def start_devices(executor) -> None:
            for c, name in enumerate(self.fleet.names):
                self.shards[name] = run_dir / "data" / f"client_{c:03d}.jsonl"
                self.start_device(name, (device_code or {}).get(name))

        factory = fleet_executor_factory(run_dir, self.fleet.server, settings, host="localhost",
                                         on_ready=start_devices)
        self.result: dict = {}

        def target() -> None:
            try:
                self.result["report"] = run(cfg, run_dir, base=base, resume=resume, progress=False,
                                            executor_factory=factory).to_dict()
            except BaseException as exc:  # re-raised in the test thread by finish()
                self.result["error"] = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def start_device(self, name: str, code: str | None = None):
        return self.fleet.start_device(name, self.shards[name], self.run_dir.name, python_code=code)

    def observer(self) -> tuple[MqttClient, queue.Queue]:
        """A server-side MQTT connection that sees every control message of the run."""
        client = MqttClient(settings_for(self.observer_creds, port=self.fleet.port))
        controls: queue.Queue = queue.Queue()
        client.subscribe(P.control_topic(self.run_dir.name), lambda m: controls.put(P.decode_control(m.payload)))
        client.connect(10)
        return client, controls

    def finish(self, timeout_s: float = 600) -> dict:
        self.thread.join(timeout_s)
        try:
            assert not self.thread.is_alive(), "the run did not finish in time"
            if "error" in self.result:
                raise self.result["error"]
            self.codes = self.fleet.wait_devices(30)
            return self.result["report"]
        finally:
            self.fleet.close()


def wait_control(controls: queue.Queue, pred, timeout_s: float = 120) -> P.ControlMessage:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ctrl = controls.get(timeout=0.2)
        except queue.Empty:
            continue
        if pred(ctrl):
            return ctrl
    raise AssertionError("the expected control message never came")


def accepted_by_round(run_dir: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in events(run_dir):
        if e["event"] == "accepted":
            out.setdefault(e["round"], []).append(e["device"])
    return out


def test_fleet_run_end_to_end_with_torch_free_devices(tiny4, tmp_path):
    from server_sdk.fleet.local_fleet import add_fleet_summary

    code = {"dev-000": DEVICE_WRAPPER.format(block=True), "dev-001": DEVICE_WRAPPER.format(block=False)}
    job = FleetRun(tmp_path / "e2e", fleet_cfg(), tiny4, 3, FleetSettings(round_timeout_s=120), device_code=code)
    report = add_fleet_summary(job.run_dir, job.finish())
    recs = [r for r in report["records"] if r["stage"] >= 0]
    assert [r["layers"] for r in recs] == [2, 2, 4] and all(r["clients"] == [0, 1, 2] for r in recs)
    for rec in recs:
        assert sorted(rec["telemetry"]) == ["dev-000", "dev-001", "dev-002"]  # keyed by device name
        for tel in rec["telemetry"].values():
            assert tel["peak_rss_bytes"] > 0 and tel["steps"] == 2 and tel["step_latency_s"]["p50"] > 0
            assert tel["energy_source"] and tel["backend"] == "onnx"
            # timing a transport benchmark splits rounds by: fetch inside the round, and when training began
            assert 0 <= tel["fetch_s"] <= tel["stage_fetch_s"] and 0 < tel["started_unix"] <= time.time()
            assert tel["mqtt_payload_bytes_received"] >= tel["cache_bytes_downloaded_total"] > 0
    # stage 1 shares tokenizer.json with stage 0: its blob is not downloaded again ...
    stage_bytes = [e["artifacts"]["onnx"]["bytes"] for e in events(job.run_dir) if e["event"] == "stage"]
    for dev in report["fleet"]["devices"].values():
        assert dev["rounds"] == 3
    downloads = {name: max(rec["telemetry"][name]["stage_download_bytes"] for rec in recs if rec["stage"] == 1)
                 for name in job.fleet.names}
    # ... nor is the embedding, whose tensor file is the same in both stages
    assert all(0 < b < 0.25 * stage_bytes[1] for b in downloads.values()), (downloads, stage_bytes)
    assert job.codes == {"dev-000": 0, "dev-001": 0, "dev-002": 0}
    for name in ("dev-000", "dev-001"):  # torch blocked, and torch available but never imported
        assert json.loads((job.fleet.device_dir(name) / "modules.json").read_text()) == {"rc": 0, "heavy": []}
    assert (job.run_dir / "adapter").exists() and report["fleet"]["rejected"] == {}


DELAY_ROUND_1 = """
import sys, time
from edge_runtime import client
train = client.Device.train_round
def slow(self, ctrl):
    if ctrl.round == 1:
        print("training round 1", flush=True)
        time.sleep(120)  # killed meanwhile
    return train(self, ctrl)
client.Device.train_round = slow
sys.exit(client.main(sys.argv[1:]))
"""


def test_killed_devices_do_not_stall_the_round_and_rejoin_with_a_repaired_cache(tiny4, tmp_path):
    """A device SIGKILLed mid-round costs seconds (its will closes the round), not the 40 s deadline."""
    settings = FleetSettings(round_timeout_s=40, artifact_bytes_per_s=None)
    job = FleetRun(tmp_path / "kill", fleet_cfg(rounds_per_stage=[3, 1]), tiny4, 3, settings,
                   device_code={"dev-002": DELAY_ROUND_1})
    log_path = job.fleet.device_dir("dev-002") / "device.log"
    observer, controls = job.observer()
    try:
        wait_control(controls, lambda c: c.state == "train" and c.round == 1)
        wait_for(lambda: log_path.exists() and "training round 1" in log_path.read_text(), 60,
                 "dev-002 to start round 1")
        killed_at = time.time()
        job.fleet.kill_device("dev-002")  # 1 of 3 devices, mid-round
        wait_for(lambda: any(e["event"] == "round_end" and e["round"] == 1 for e in events(job.run_dir)), 60,
                 "round 1 to end")
        blobs = job.fleet.device_dir("dev-002") / "cache" / "blobs"
        big = [p for p in blobs.iterdir() if p.stat().st_size > 1_000_000]  # the embedding's file, the tokenizer
        assert len(big) == 2
        for blob in big:
            # local devices hard-link one shared copy (server_sdk/fleet/local_fleet.py); bit rot on this device's own
            # disk is a private copy going bad, so break the link first
            data = bytearray(blob.read_bytes())
            data[100:106] = b"bitrot"
            blob.unlink()
            blob.write_bytes(bytes(data))
        job.start_device("dev-002")
        report = job.finish()
    finally:
        observer.close()
    log = events(job.run_dir)
    end1 = next(e for e in log if e["event"] == "round_end" and e["round"] == 1)
    last_answer = max([killed_at] + [e["t"] for e in log if e["event"] == "accepted" and e["round"] == 1])
    assert end1["offline"] == ["dev-002"]
    assert end1["t"] - last_answer < 5.0, f"round 1 waited {end1['t'] - last_answer:.1f}s for the dead device"
    by_round = accepted_by_round(job.run_dir)
    assert sorted(by_round[1]) == ["dev-000", "dev-001"]
    # round 2 may close before the restarted device is back (it was seen offline); round 3 waits for it
    assert {"dev-000", "dev-001"} <= set(by_round[2])
    assert sorted(by_round[3]) == ["dev-000", "dev-001", "dev-002"]
    recs = [r for r in report["records"] if r["stage"] >= 0]  # in wire-round order
    back = next(r for r in recs[2:] if "dev-002" in (r.get("telemetry") or {}))  # its first round after the kill
    # the rotten bytes were fetched again by the new process, never trained on (at least the damaged chunk)
    assert back["telemetry"]["dev-002"]["stage_download_bytes"] >= P.DEFAULT_CHUNK_BYTES
    rec2 = [r for r in report["records"] if r["stage"] == 0][2]
    assert rec2["telemetry"]["dev-000"]["download_bytes"] == 0
    log = (job.fleet.device_dir("dev-002") / "device.log").read_text()
    assert "corrupt" in log


def test_broker_restart_mid_stage_loses_and_duplicates_no_update(tiny4, tmp_path):
    job = FleetRun(tmp_path / "brk", fleet_cfg(rounds_per_stage=[3, 1]), tiny4, 3,
                   FleetSettings(round_timeout_s=90, artifact_bytes_per_s=None))
    observer, controls = job.observer()
    try:
        wait_control(controls, lambda c: c.state == "train" and c.round == 1)
        restarted_at = time.time()
        job.fleet.restart_broker()  # the devices are training round 1 now
        report = job.finish()
    finally:
        observer.close()
    by_round = accepted_by_round(job.run_dir)
    assert {r: sorted(d) for r, d in by_round.items()} == {r: ["dev-000", "dev-001", "dev-002"] for r in range(4)}
    assert all(len(r["client_samples"]) == 3 for r in report["records"] if r["stage"] >= 0)
    assert not [e for e in events(job.run_dir) if e["event"] == "rejected"]
    round1 = [e["t"] for e in events(job.run_dir) if e["event"] == "accepted" and e["round"] == 1]
    assert min(round1) > restarted_at  # these updates crossed the restarted broker


def test_coordinator_killed_after_a_round_resumes_to_the_same_adapter(tiny4, tmp_path):
    import subprocess

    from safetensors.torch import load_file

    from server_sdk.engine.model import load_base_model
    from server_sdk.fleet.local_fleet import LocalFleet
    from tests.serve_helpers import serve_command, serve_until_killed

    model_dir = tmp_path / "model"  # both coordinators load the same weights by path
    tiny4.model.save_pretrained(model_dir)
    tiny4.tokenizer.save_pretrained(model_dir)
    cfg = fleet_cfg(model=str(model_dir), rounds_per_stage=[2, 1], clients_per_round=2, seed=3, torch_threads=1)
    settings = FleetSettings(round_timeout_s=60, artifact_bytes_per_s=None)

    reference = FleetRun(tmp_path / "ref", cfg, load_base_model(str(model_dir)), 3, settings).finish()
    assert len(reference["records"]) == 4

    cfg.to_json(tmp_path / "cfg.json")
    run_dir = tmp_path / "killed"
    with LocalFleet(tmp_path / "fleet2", 3) as fleet:
        fleet.start_broker()
        serve, env = serve_command(fleet, 60)
        with open(tmp_path / "serve.log", "ab") as logf:
            meta = run_dir / "checkpoint" / "meta.json"
            serve_until_killed(fleet, serve, env, tmp_path / "cfg.json", run_dir, logf, wait_for, shards_s=120,
                               until=lambda: meta.exists() and len(json.loads(meta.read_text())["records"]) >= 2,
                               until_s=180, what="the first round's checkpoint")
            assert len(json.loads(meta.read_text())["records"]) < 4, "the run finished before it was killed"
            resumed = subprocess.run([*serve, "--resume", str(run_dir)], stdout=logf, stderr=subprocess.STDOUT,
                                     env=env, timeout=300)
        assert resumed.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert set(fleet.wait_devices(30).values()) == {0}

    want = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    got = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["clients"] for r in report["records"]] == [r["clients"] for r in reference["records"]]


def test_cli_fleet_init_and_add_device_print_what_a_device_needs(tmp_path, capsys):
    from server_sdk.cli.main import main
    from server_sdk.fleet.broker import MosquittoNotFound, require_mosquitto

    try:
        require_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    assert main(["fleet", "init", str(tmp_path / "f"), "--hostname", "broker.lan", "--port", "9883"]) == 0
    assert main(["fleet", "add-device", str(tmp_path / "f"), "dev-007", "--out", str(tmp_path / "d7.json")]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip().splitlines()[-1])  # the credentials file, never the password itself
    assert path == tmp_path / "d7.json" and path.stat().st_mode & 0o777 == 0o600
    creds = json.loads(path.read_text())
    assert creds["password"] not in out + err
    assert creds["username"] == "dev-007" and creds["host"] == "broker.lan" and creds["port"] == 9883
    assert "BEGIN CERTIFICATE" in creds["ca_pem"] and "devft-edge run --credentials" in err
    assert json.loads((tmp_path / "f" / "credentials" / "dev-007.json").read_text()) == creds
    assert main(["run", "--fleet", "cloud:3"]) == 2  # a clear error, not a traceback


def test_local_fleet_gives_devices_an_absolute_shard_path(tmp_path, monkeypatch):
    """Devices run in their own directory, so `devft run --fleet` with a relative runs dir must still work."""
    from server_sdk.fleet.broker import MosquittoNotFound, require_mosquitto
    from server_sdk.fleet.local_fleet import LocalFleet

    try:
        require_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    monkeypatch.chdir(tmp_path)
    fleet = LocalFleet("runs/r/fleet", 1)
    argv_dump = "import json, sys; open('argv.json', 'w').write(json.dumps(sys.argv[1:]))"
    fleet.start_device("dev-000", Path("runs/r/data/client_000.jsonl"), "r", python_code=argv_dump)
    assert fleet.wait_devices(30) == {"dev-000": 0}
    argv = json.loads((fleet.device_dir("dev-000") / "argv.json").read_text())
    assert argv[argv.index("--data") + 1] == str(tmp_path / "runs/r/data/client_000.jsonl")


def test_cli_run_fleet_local_reports_per_device_telemetry(tiny4, tmp_path):
    import subprocess
    import sys

    from server_sdk.fleet.local_fleet import REPO_ROOT

    tiny4.model.save_pretrained(tmp_path / "model")
    tiny4.tokenizer.save_pretrained(tmp_path / "model")
    fleet_cfg(model=str(tmp_path / "model"), rounds_per_stage=[1, 1], num_clients=2, clients_per_round=2,
              torch_threads=1).to_json(tmp_path / "cfg.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "server_sdk.cli.main", "run", "--fleet", "local:2", "--config",
                           str(tmp_path / "cfg.json"), "--name", "cli", "--runs-dir", str(tmp_path), "--quiet",
                           "--round-timeout", "90"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dev-000: 2 rounds" in done.stdout and "dev-001: 2 rounds" in done.stdout
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert set(report["fleet"]["devices"]) == {"dev-000", "dev-001"}
    assert all(d["stage_download_bytes"]["0"] > 0 for d in report["fleet"]["devices"].values())
    assert report["fleet"]["exit_codes"] == {"dev-000": 0, "dev-001": 0}


@pytest.mark.skipif(not HAS_ORT_TRAINING, reason="legacy ort format: needs onnxruntime-training (x86_64)")
def test_checkpoint_travels_as_tensor_files_and_is_rebuilt_byte_for_byte(tiny4, tmp_path):
    import hashlib
    import shutil

    from edge_runtime.checkpoint_blobs import RECIPE, assemble_checkpoint
    from export.cached import export_stage_cached
    from server_sdk.config import LoraSettings
    from server_sdk.engine.model import cache_root
    from server_sdk.fleet.checkpoint_split import split_checkpoint
    from server_sdk.method.lora import attach_lora
    from server_sdk.method.submodel import share_model

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    layouts = []
    for seed in (0, 1):  # two "stages": different LoRA, same embedding
        model = attach_lora(share_model(tiny4.model), LoraSettings(r=2, alpha=4), seed=seed)
        art = export_stage_cached(model, tmp_path / f"art{seed}", cache_root() / "ort-templates", seq_len=64)
        files = split_checkpoint(art, tmp_path / f"split{seed}")
        assert "checkpoint" not in files and RECIPE in files
        device = tmp_path / f"device{seed}"
        for rel, src in files.items():
            (device / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, device / rel)
        assert assemble_checkpoint(device, device / "checkpoint") == sha(art / "checkpoint")
        assert (device / "checkpoint").read_bytes() == (art / "checkpoint").read_bytes()
        layouts.append({rel: sha(p) for rel, p in files.items()})
    shared = {rel for rel in layouts[0] if layouts[1].get(rel) == layouts[0][rel]}
    assert any("embed_tokens" in rel or "lm_head" in rel for rel in shared), sorted(shared)
    assert "tensors/rest.safetensors" not in shared  # the LoRA tensors differ


def test_device_batches_match_the_simulations(tiny4, tmp_path):
    from tokenizers import Tokenizer

    from edge_runtime import client
    from server_sdk import data
    from server_sdk.fleet.serving import tokenizer_dir_of

    examples = []
    for q, a in (("What is 3 + 4?", "7"), ("Spell 'cat' backwards.", "tac"), ("x" * 300, "long")):
        prompt, completion = data.render(tiny4.tokenizer, q, a)
        examples.append(data.Example("t", q, a, prompt, completion, {}))
    data.write_jsonl(tmp_path / "shard.jsonl", examples)
    shard = client.read_shard(tmp_path / "shard.jsonl")
    tok = Tokenizer.from_file(str(tokenizer_dir_of(tiny4) / "tokenizer.json"))
    device = client.encode(tok, shard, seq_len=48)
    assert device == [data.encode(tiny4.tokenizer, ex, 48) for ex in examples]  # batching.collate is shared


def test_device_refuses_artifacts_in_another_format_than_announced(tmp_path):
    from edge_runtime import client

    (tmp_path / "manifest.json").write_text(json.dumps({"backend": "ort"}))
    client.check_artifact_format("ort", tmp_path)
    with pytest.raises(client.DeviceError, match="announced 'onnx' artifacts but their manifest says 'ort'"):
        client.check_artifact_format("onnx", tmp_path)
    with pytest.raises(client.DeviceError, match="not one of"):
        client.pick_formats("tflite")
    assert client.pick_formats("auto")[0] == "onnx"


def test_mixed_fleet_each_device_trains_a_format_it_declared(tmp_path):
    """The coordinator serves the formats it was started with (default the portable one), whatever devices
    declare; a mixed fleet is an explicit choice, and each device takes the first served one it runs."""
    ex = FleetExecutor.__new__(FleetExecutor)  # only the format choice: no broker needed
    ex.settings = FleetSettings().validate()
    ex.device_status = {"dev-000": {"formats": ["onnx", "ort"]}, "dev-001": {"formats": ["ort"]},
                        "dev-002": {"formats": ["executorch"]}, "dev-003": {}}
    assert ex.stage_formats() == ["onnx"]  # issue 27: a device's hello never adds an export
    ex.settings = FleetSettings(formats=["onnx", "ort", "executorch"]).validate()
    assert ex.stage_formats() == ["onnx", "ort", "executorch"]
    assert FleetSettings(formats=["auto"]).validate().formats == ["onnx"]  # fleet.json of older runs
    for bad in (["tflite"], [], ["auto", "ort"]):
        with pytest.raises(ValueError, match="formats"):
            FleetSettings(formats=bad).validate()
    ctrl = P.ControlMessage("r", 0, 0, "idle", artifacts={"onnx": P.ArtifactDescriptor("a", ()),
                                                          "ort": P.ArtifactDescriptor("b", ())})
    back = P.decode_control(P.encode_control(ctrl))
    assert back.artifact_for(["ort"])[0] == "ort" and back.artifact_for(["onnx", "ort"])[0] == "onnx"
    assert back.artifact_for(["executorch"]) is None


def test_a_fleet_serving_legacy_formats_refuses_micro_batches(tmp_path):
    """Only the portable format trains in micro-batches (ort and executorch devices abandon such a round):
    the coordinator refuses the combination before it starts, naming both ways out."""
    from server_sdk.config import ConfigError
    from server_sdk.fleet.coordinator import fleet_executor_factory

    make = fleet_executor_factory(tmp_path, creds=None, settings=FleetSettings(formats=["onnx", "ort"]))
    with pytest.raises(ConfigError, match=r"only the portable onnx format.*\['ort'\].*formats \['onnx'\]"):
        make(fleet_cfg(micro_batch=1), None, [[]])


def test_ffa_lora_over_the_fleet_trains_only_B(tiny4, tmp_path):
    from safetensors.torch import load_file

    from server_sdk.method.lora import attach_lora, read_lora
    from server_sdk.method.submodel import share_model

    cfg = fleet_cfg(strategy="ffa-lora", stages=None, rounds_per_stage=2, num_clients=2, clients_per_round=2,
                    lr=2e-2)
    job = FleetRun(tmp_path / "ffa", cfg, tiny4, 2, FleetSettings(round_timeout_s=120, artifact_bytes_per_s=None))
    report = job.finish()
    assert all(r["clients"] == [0, 1] for r in report["records"] if r["stage"] >= 0)
    ckpt = load_file(job.run_dir / "checkpoint" / "state.safetensors")
    final = {k.split("/", 1)[1]: v for k, v in ckpt.items() if k.startswith("full/")}
    initial = read_lora(attach_lora(share_model(tiny4.model), cfg.lora, seed=cfg.seed))
    assert set(final) == set(initial)
    for k in final:
        assert torch.equal(final[k], initial[k]) == ("lora_A" in k), k


ORPHAN_PARENT = """
import sys, time
from server_sdk.fleet.local_fleet import LocalFleet
fleet = LocalFleet(sys.argv[1], 1)
broker = fleet.start_broker()
device = fleet.start_device("dev-000", sys.argv[2], "orphanrun")
print(device.pid, broker.proc.pid, flush=True)
time.sleep(600)
"""


def test_local_fleet_devices_stop_when_their_coordinator_is_killed(tmp_path):
    """`kill -9` of the coordinator must not leave device processes waiting for control messages forever."""
    import signal
    import subprocess
    import sys

    shard = tmp_path / "shard.jsonl"
    shard.write_text(json.dumps({"prompt": "Q: 1+1?", "completion": "2"}) + "\n")
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_PARENT, str(tmp_path / "fleet"), str(shard)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    device_pid, broker_pid = map(int, parent.stdout.readline().split())
    try:
        log = tmp_path / "fleet" / "devices" / "dev-000" / "device.log"
        wait_for(lambda: log.exists() and "connected" in log.read_text(), 60, "the device to connect")
        parent.kill()
        parent.wait(10)

        def gone() -> bool:
            try:
                os.kill(device_pid, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{device_pid}/stat").read_text().split()[2] == "Z"

        wait_for(gone, 15, "the orphaned device to stop")
        assert "coordinator process" in log.read_text()
    finally:
        for pid in (device_pid, broker_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
