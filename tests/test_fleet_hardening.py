"""Fleet hardening (issue #13): devices that lie in their status and updates, against a real mosquitto.

The coordinator tests drive FleetExecutor with hand-made updates and statuses (seconds); the run
tests train the tiny random LLaMA on device processes (tests/test_fleet.py's FleetRun).
"""

from __future__ import annotations

import math
import time

import pytest

from edge_runtime import protocol as P
from server_sdk.fleet import FleetSettings
from tests import test_fleet as fleet_tests
from tests.test_fleet import (
    PA,
    RUN,
    FleetRun,
    _good,
    _run_round,
    _update,
    accepted_by_round,
    events,
    fleet_cfg,
    wait_for,
)

pytest_plugins = ("tests.broker_fixtures",)  # fleet, clients
coordinator = fleet_tests.coordinator  # the fixture: a FleetExecutor on a broker with devices dev1 .. dev5


@pytest.fixture(scope="module")
def tiny4():
    from server_sdk.model import tiny_random_model

    return tiny_random_model(n_layers=4, hidden=32, seed=0)


def test_a_status_with_a_timestamp_too_large_for_a_float_is_malformed_not_a_crash():
    raw = b'{"version": 2, "device_id": "dev1", "state": "hello", "timestamp": 1' + b"0" * 400 + b"}"
    with pytest.raises(P.ProtocolError, match="timestamp.* too large"):
        P.decode_status(raw)  # was an OverflowError, which the coordinator's status handler does not expect


# --------------------------------------------------------------------------- coordinator, hand-made messages


def _status(conn, name: str, state: str = "hello", info: dict | None = None) -> None:
    msg = P.StatusMessage(name, state, time.time(), info or {})
    conn.publish(P.status_topic(RUN, name), P.encode_status(msg), retain=True, wait_s=10)


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
    lies = {"train_s": "fast", "cpu_time_s": 10**400, "device": "dev1", "peak_rss_bytes": -1}
    dev3.publish(P.update_topic(RUN, "dev3"), P.encode_update(_update(
        "dev3", 1, _good(3), telemetry=lies, metrics={"train_loss": 10**400})), wait_s=10)
    wait_for(lambda: any(e["event"] == "accepted" for e in events(ex.run_dir)), 10, "dev3's second update")
    conns["dev1"].publish(P.update_topic(RUN, "dev1"), P.encode_update(_update("dev1", 1, _good(1))), wait_s=10)
    worker.join(20)
    assert not worker.is_alive() and "error" not in box, box.get("error")
    one, three = box["results"]
    assert (one.client, three.client) == (1, 3)
    assert three.telemetry["device"] == "dev3"  # it cannot pose as another device in the report
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
