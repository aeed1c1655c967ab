"""Fleet hardening (issue #13): replacement devices (FleetSettings.replacements), and devices that lie in their
status and updates, against a real mosquitto.

The coordinator tests drive FleetExecutor with hand-made updates and statuses (seconds); the run
tests train the tiny random LLaMA on device processes (tests/test_fleet.py's FleetRun).
"""

from __future__ import annotations

import math
import queue
import time

import numpy as np
import pytest
import torch

from edge_runtime import protocol as P
from server_sdk.engine.executor import QuorumNotReached
from server_sdk.fleet.registry import choose_replacements, replacement_order
from server_sdk.fleet.settings import FleetSettings
from server_sdk.method.strategies.base import client_seed, sample_clients
from tests import test_fleet as fleet_tests
from tests.test_fleet import (
    PA,
    RUN,
    A,
    B,
    FleetRun,
    _good,
    _run_round,
    _update,
    accepted_by_round,
    events,
    fleet_cfg,
    wait_control,
    wait_for,
)

pytest_plugins = ("tests.broker_fixtures",)  # fleet, clients
coordinator = fleet_tests.coordinator  # the fixture: a FleetExecutor on a broker with devices dev1 .. dev5


@pytest.fixture(scope="module")
def tiny4():
    from server_sdk.engine.model import tiny_random_model

    return tiny_random_model(n_layers=4, hidden=32, seed=0)


def test_a_status_with_a_timestamp_too_large_for_a_float_is_malformed_not_a_crash():
    raw = b'{"version": %d, "device_id": "dev1", "state": "hello", "timestamp": 1' % P.PROTOCOL_VERSION + b"0" * 400 + b"}"
    with pytest.raises(P.ProtocolError, match="over the 40-digit limit"):
        P.decode_status(raw)  # was an OverflowError, which the coordinator's status handler does not expect


# --------------------------------------------------------------------------- the choice, without a broker


def test_replacement_choice_is_deterministic_and_never_takes_an_offline_or_sampled_device():
    order = replacement_order(0, 1, 3, 8)
    assert order == replacement_order(0, 1, 3, 8) and sorted(order) == list(range(8))
    assert order != replacement_order(1, 1, 3, 8) or order != replacement_order(0, 1, 4, 8)  # seeded per run, round
    names = [f"dev-{c:03d}" for c in order]
    live = {"dev-001", "dev-002", "dev-004", "dev-005", "dev-006"}  # the rest never said hello or went offline
    ready = {"dev-002", "dev-005", "dev-007"}  # dev-007 claims ready but is offline
    taken = {"dev-000", "dev-001", "dev-002"}  # already in the round (sampled, or an earlier replacement)
    for n in range(6):
        chosen = choose_replacements(names, taken, live, ready, n)
        assert chosen == choose_replacements(names, taken, live, ready, n)
        assert len(chosen) == min(n, 3) and len(set(chosen)) == len(chosen)
        assert set(chosen) <= live - taken  # never offline, unknown or already sampled
    # holding the stage's files first (dev-005), then the other live ones in the draw's order
    assert choose_replacements(names, taken, live, ready, 3) == \
        ["dev-005"] + [d for d in names if d in {"dev-004", "dev-006"}]
    assert choose_replacements(names, taken, set(), ready, 3) == []  # nobody live: no replacement


def test_replacements_setting_is_validated():
    assert FleetSettings(replacements=2).validate().replacements == 2
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="replacements=.* must be a whole number >= 0"):
            FleetSettings(replacements=bad).validate()


def test_cli_sets_replacements_and_refuses_a_negative_count(tmp_path):
    from server_sdk.cli.fleet import _fleet_settings
    from server_sdk.cli.main import build_parser
    from server_sdk.config import ConfigError

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    args = sub.choices["run"].parse_args(["--fleet", "local:3", "--replacements", "2"])
    assert _fleet_settings(args, tmp_path).replacements == 2
    serve = sub.choices["serve"].parse_args(["--broker-url", "mqtts://b:8883", "--fleet-dir", "f", "--replacements", "-1"])
    with pytest.raises(ConfigError, match="replacements=-1"):
        _fleet_settings(serve, tmp_path)
    assert _fleet_settings(sub.choices["run"].parse_args(["--fleet", "local:3"]), tmp_path).replacements == 0  # off


# --------------------------------------------------------------------------- coordinator, hand-made messages


def _status(conn, name: str, state: str = "hello", info: dict | None = None) -> None:
    msg = P.StatusMessage(name, state, time.time(), info or {})
    conn.publish(P.status_topic(RUN, name), P.encode_status(msg), retain=True, wait_s=10)


def _controls(conn) -> queue.Queue:
    got: queue.Queue = queue.Queue()
    conn.subscribe(P.control_topic(RUN), lambda m: got.put(P.decode_control(m.payload)))
    return got


def test_offline_devices_are_replaced_by_live_ones_that_pass_the_same_checks(coordinator, fleet, clients):
    """quorum 1.0, sampled dev1 and dev2; dev2 goes offline -> dev5 (live, holds the files) replaces it;
    dev5 goes offline too -> dev4 replaces dev5; dev4's bad update is refused like anyone's, its good one counts."""
    ex = coordinator
    ex.settings.quorum, ex.settings.replacements, ex.settings.round_timeout_s = 1.0, 2, 60.0
    ex.settings.device_names.update({"3": "dev3", "4": "dev4", "5": "dev5"})
    conns = {name: clients(fleet.devices[name]) for name in ("dev1", "dev2", "dev3", "dev4", "dev5")}
    controls = _controls(conns["dev1"])
    stage_id = ex._artifacts["onnx"].artifact_id
    _status(conns["dev3"], "dev3", "offline")  # gone before the round: never a replacement
    _status(conns["dev4"], "dev4", info={"formats": ["onnx"]})  # live, has not reported the files
    _status(conns["dev5"], "dev5", info={"formats": ["onnx"], "ready": stage_id})  # live and holds the stage's files
    wait_for(lambda: {"dev3", "dev4", "dev5"} <= set(ex.device_status), 10, "the statuses")

    worker, box = _run_round(ex, 1, [1, 2])
    conns["dev1"].publish(P.update_topic(RUN, "dev1"), P.encode_update(_update("dev1", 1, _good(1))), wait_s=10)
    wait_for(lambda: any(e["event"] == "accepted" for e in events(ex.run_dir)), 10, "dev1's update")
    went = time.time()
    _status(conns["dev2"], "dev2", "offline")  # what its will says when it dies
    first = wait_control(controls, lambda c: c.state == "train" and "dev5" in c.sampled_clients, 20)
    assert first.round == 1 and first.sampled_clients == ("dev1", "dev2", "dev5")
    assert first.hyperparams.seeds == {"dev1": 1, "dev2": 2, "dev5": client_seed(ex.cfg.seed, 0, 1, 5)}
    assert first.deadline_unix == next(e for e in events(ex.run_dir) if e["event"] == "round_start")["deadline"]
    assert time.time() - went < 5

    _status(conns["dev5"], "dev5", "offline")  # the replacement dies before answering: replaced in turn
    second = wait_control(controls, lambda c: c.state == "train" and "dev4" in c.sampled_clients, 20)
    assert second.sampled_clients == ("dev1", "dev2", "dev5", "dev4")
    dev4 = conns["dev4"]
    bad = {**_good(4), PA: np.full((2, 8), np.nan, np.float32)}
    dev4.publish(P.update_topic(RUN, "dev4"), P.encode_update(_update("dev4", 1, bad)), wait_s=10)
    dev4.publish(P.update_topic(RUN, "dev4"), P.encode_update(_update("dev4", 0, _good(4))), wait_s=10)
    wait_for(lambda: sum(e["event"] == "rejected" for e in events(ex.run_dir)) == 2, 10, "two refusals")
    assert worker.is_alive()  # refused updates do not count
    dev4.publish(P.update_topic(RUN, "dev4"), P.encode_update(_update("dev4", 1, _good(4),
                                                                      telemetry={"replaces": "dev1"})), wait_s=10)
    worker.join(20)
    assert not worker.is_alive() and "error" not in box, box.get("error")

    results = box["results"]
    assert [r.client for r in results] == [1, 4]
    np.testing.assert_array_equal(results[1].delta[A].numpy(), _good(4)[PA])
    assert results[1].telemetry["replaces"] == "dev5" and "replaces" not in results[0].telemetry
    log = events(ex.run_dir)
    assert [(e["reason"], e["device"]) for e in log if e["event"] == "rejected"] == \
        [("non_finite", "dev4"), ("stale_round", "dev4")]
    assert [(e["device"], e["replaces"], e["ready"]) for e in log if e["event"] == "replacement"] == \
        [("dev5", "dev2", True), ("dev4", "dev5", False)]
    end = next(e for e in log if e["event"] == "round_end")
    assert end["quorum"] == 2  # of the original sample
    assert end["accepted"] == ["dev1", "dev4"] and end["missing"] == ["dev2", "dev5"]
    assert end["replacements"] == {"dev5": "dev2", "dev4": "dev5"}
    assert end["t"] - went < 15, "the round should close on dev4's update, long before its 60 s deadline"


def test_replacements_stop_at_the_budget_and_the_round_fails_as_before(coordinator, fleet, clients):
    ex = coordinator
    ex.settings.quorum, ex.settings.replacements, ex.settings.round_timeout_s = 1.0, 1, 4.0
    ex.settings.device_names.update({"4": "dev4", "5": "dev5"})
    conns = {name: clients(fleet.devices[name]) for name in ("dev1", "dev2", "dev4", "dev5")}
    _status(conns["dev4"], "dev4")
    _status(conns["dev5"], "dev5")
    wait_for(lambda: {"dev4", "dev5"} <= set(ex.device_status), 10, "the statuses")
    _status(conns["dev1"], "dev1", "offline")
    _status(conns["dev2"], "dev2", "offline")
    wait_for(lambda: {"dev1", "dev2"} <= ex._offline_now(), 10, "dev1 and dev2 offline")
    with pytest.raises(QuorumNotReached, match=r"0 of 2 sampled devices answered by the deadline, 1 replacement"):
        ex.train_round(0, 0, [1, 2], {A: torch.zeros(2, 8), B: torch.zeros(8, 2)}, lambda k: True, {1: 1, 2: 2})
    log = events(ex.run_dir)
    drawn = [e["device"] for e in log if e["event"] == "replacement"]
    assert len(drawn) == 1 and drawn[0] in ("dev4", "dev5")  # the budget: one per round
    end = next(e for e in log if e["event"] == "round_end")
    assert end["replacements"] == {drawn[0]: "dev1"} and end["missing"] == sorted(["dev1", "dev2", drawn[0]])


def test_a_device_lying_in_its_status_and_update_cannot_break_the_coordinator(coordinator, fleet, clients):
    """dev3 claims the stage's files without holding them, and sends statuses and telemetry of the wrong types.
    The claims only steer waiting; its update passes the normal checks or is refused; the round closes."""
    ex = coordinator
    ex.settings.quorum, ex.settings.round_timeout_s = 0.5, 30.0
    ex.settings.device_names.update({"3": "dev3", "4": "dev4"})
    conns = {name: clients(fleet.devices[name]) for name in ("dev1", "dev3", "dev4")}
    stage_id = ex._artifacts["onnx"].artifact_id
    # ready for the stage without its files, formats not a list, a state and timestamp of its own in info
    _status(conns["dev3"], "dev3", info={"formats": 5, "ready": stage_id, "state": "offline", "timestamp": "soon"})
    _status(conns["dev4"], "dev4", info={"formats": ["onnx", {"x": 1}, ["ort"]], "ready": ["not", "an", "id"]})
    wait_for(lambda: {"dev3", "dev4"} <= set(ex.device_status), 10, "the statuses")
    assert ex.device_status["dev3"]["state"] == "hello" and isinstance(ex.device_status["dev3"]["timestamp"], float)
    assert "dev3" not in ex._offline_now()
    assert ex.stage_formats() == ["onnx"]  # formats=5 used to raise TypeError here, at the next stage's start
    assert ex._not_ready({"dev3", "dev4"}) == {"dev4"}  # the claim is believed: it only decides when to start
    _status(conns["dev4"], "dev4", info={"ready": "0" * 64})  # ready for files that are not the stage's
    wait_for(lambda: ex.device_status["dev4"].get("ready") == "0" * 64, 10, "dev4's claim")
    assert ex._not_ready({"dev3", "dev4"}) == {"dev4"}

    worker, box = _run_round(ex, 1, [1, 3])
    dev3 = conns["dev3"]
    # without the files it cannot know the tensors; then it sends the right ones with telemetry of the wrong types
    dev3.publish(P.update_topic(RUN, "dev3"), P.encode_update(_update("dev3", 1, {PA: _good(3)[PA]})), wait_s=10)
    # (a number of over 40 digits would make the whole update malformed: tests/test_fleet_attacks.py)
    lies = {"train_s": "fast", "cpu_time_s": 10**30, "device": "dev1", "replaces": "dev1", "peak_rss_bytes": -1}
    dev3.publish(P.update_topic(RUN, "dev3"), P.encode_update(_update(
        "dev3", 1, _good(3), telemetry=lies, metrics={"train_loss": 10**35})), wait_s=10)
    wait_for(lambda: any(e["event"] == "accepted" for e in events(ex.run_dir)), 10, "dev3's second update")
    conns["dev1"].publish(P.update_topic(RUN, "dev1"), P.encode_update(_update("dev1", 1, _good(1))), wait_s=10)
    worker.join(20)
    assert not worker.is_alive() and "error" not in box, box.get("error")
    one, three = box["results"]
    assert (one.client, three.client) == (1, 3)
    assert three.telemetry["device"] == "dev3" and "replaces" not in three.telemetry  # nor as a replacement
    assert three.seconds == 0.0 and three.cpu_seconds is None and math.isnan(three.train_loss)
    assert [e["reason"] for e in events(ex.run_dir) if e["event"] == "rejected"] == ["missing_tensors"]


def test_a_lying_device_that_never_answers_is_missing_per_the_quorum(coordinator, fleet, clients):
    ex = coordinator
    ex.settings.quorum, ex.settings.round_timeout_s = 0.5, 3.0
    ex.settings.device_names.update({"3": "dev3"})
    dev3 = clients(fleet.devices["dev3"])
    _status(dev3, "dev3", info={"ready": ex._artifacts["onnx"].artifact_id})  # claims the files, then never trains
    wait_for(lambda: "dev3" in ex.device_status, 10, "dev3's status")
    worker, box = _run_round(ex, 1, [1, 3])
    clients(fleet.devices["dev1"]).publish(P.update_topic(RUN, "dev1"), P.encode_update(_update("dev1", 1, _good(1))),
                                           wait_s=10)
    worker.join(20)
    assert not worker.is_alive() and [r.client for r in box["results"]] == [1]
    end = next(e for e in events(ex.run_dir) if e["event"] == "round_end")
    assert end["accepted"] == ["dev1"] and end["missing"] == ["dev3"] and end["offline"] == []


# --------------------------------------------------------------------------- whole runs on device processes


def test_a_device_killed_mid_round_is_replaced_and_the_round_closes_before_its_deadline(tiny4, tmp_path):
    """quorum 1.0 and 2 of 3 devices per round: a sampled device dies in round 1; the third device replaces
    it, trains the round exactly as if it had been sampled, and the round closes long before the deadline."""
    timeout = 120.0
    cfg = fleet_cfg(clients_per_round=2)
    sampled = sample_clients(cfg, 0, 1)  # stage 0, round 1 (a submodel stage draws by its index: key 0)
    victim, (spare,) = f"dev-{sampled[-1]:03d}", set(range(3)) - set(sampled)
    settings = FleetSettings(round_timeout_s=timeout, quorum=1.0, replacements=1, artifact_bytes_per_s=None)
    job = FleetRun(tmp_path / "repl", cfg, tiny4, 3, settings, device_code={victim: fleet_tests.DELAY_ROUND_1})
    log_path = job.fleet.device_dir(victim) / "device.log"
    observer, controls = job.observer()
    try:
        wait_control(controls, lambda c: c.state == "train" and c.round == 1)
        wait_for(lambda: log_path.exists() and "training round 1" in log_path.read_text(), 60,
                 f"{victim} to start round 1")
        killed_at = time.time()
        job.fleet.kill_device(victim)
        wait_for(lambda: any(e["event"] == "round_end" and e["round"] == 1 for e in events(job.run_dir)), timeout,
                 "round 1 to end")
        report = job.finish()  # the victim stays dead: a later round that samples it is short of it too
    finally:
        observer.close()
    from server_sdk.fleet.local_fleet import add_fleet_summary

    report = add_fleet_summary(job.run_dir, report)
    log = events(job.run_dir)
    end1 = next(e for e in log if e["event"] == "round_end" and e["round"] == 1)
    spare_name = f"dev-{spare:03d}"
    assert end1["replacements"] == {spare_name: victim} and end1["quorum"] == 2
    assert sorted(end1["accepted"]) == sorted([f"dev-{sampled[0]:03d}", spare_name]) and end1["missing"] == [victim]
    assert end1["t"] - killed_at < timeout / 3, f"round 1 took {end1['t'] - killed_at:.0f}s after the kill"
    drawn = next(e for e in log if e["event"] == "replacement")
    assert drawn["seed"] == client_seed(cfg.seed, 0, 1, spare)  # as if it had been sampled
    assert not [e for e in log if e["event"] == "rejected"]
    rec = next(r for r in report["records"] if r["stage"] == 0 and r["stage_round"] == 1)
    assert rec["clients"] == sampled and rec["telemetry"][spare_name]["replaces"] == victim
    assert report["fleet"]["replacements"][0] == {"stage": 0, "round": 1, "device": spare_name, "replaces": victim,
                                                  "accepted": True}
    assert set(accepted_by_round(job.run_dir)) == {0, 1, 2}  # the run went on to its end



LIAR = """
import sys
from edge_runtime import client
act = client.Device._act
def lying_act(self, ctrl):
    sampled = ctrl.state == "train" and self.device_id in ctrl.sampled_clients
    chosen = ctrl.artifact_for(self.formats)
    if not sampled and chosen is not None:  # claim the stage's files without fetching them
        self._status("hello", ready=chosen[1].artifact_id)
        print("claimed", chosen[1].artifact_id, flush=True)
        return
    return act(self, ctrl)
client.Device._act = lying_act
sys.exit(client.main(sys.argv[1:]))
"""


def test_a_device_claiming_files_it_does_not_hold_still_trains_correct_rounds(tiny4, tmp_path):
    """dev-001 says it holds each stage's files on the idle control but fetches them only when it trains: the
    stage starts do not wait for it, its rounds fetch in-round, and every update is accepted by the usual checks."""
    job = FleetRun(tmp_path / "liar", fleet_cfg(rounds_per_stage=[1, 1]), tiny4, 3,
                   FleetSettings(round_timeout_s=120, artifact_bytes_per_s=None), device_code={"dev-001": LIAR})
    report = job.finish()
    assert job.codes == {"dev-000": 0, "dev-001": 0, "dev-002": 0}
    log = events(job.run_dir)
    assert [e["not_ready"] for e in log if e["event"] == "stage_ready"] == [[], []]
    assert "claimed" in (job.fleet.device_dir("dev-001") / "device.log").read_text()
    assert not [e for e in log if e["event"] == "rejected"]
    assert {r: sorted(d) for r, d in accepted_by_round(job.run_dir).items()} == \
        {0: ["dev-000", "dev-001", "dev-002"], 1: ["dev-000", "dev-001", "dev-002"]}
    for rec in (r for r in report["records"] if r["stage"] >= 0):
        # the liar fetched files inside each round it trained (stage 1: those its prefetch could not guess);
        # its truthful peers held them all before the round opened
        tel = rec["telemetry"]
        assert tel["dev-001"]["download_bytes"] > 0 and tel["dev-000"]["download_bytes"] == 0, tel
