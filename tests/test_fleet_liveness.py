"""Issue #27: silent devices, resumes, formats a device declares, and what one device can make the coordinator
write or broadcast, against a real mosquitto.

Hand-made statuses and updates drive FleetExecutor (tests/test_fleet.py's coordinator fixture); the resume test
runs a real devft-edge process; the artifact tests a real ArtifactServer.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime import protocol as P
from edge_runtime.fetch import ArtifactCache
from server_sdk.config import RunConfig
from server_sdk.fleet.artifact_server import ArtifactServer
from server_sdk.fleet.coordinator import FleetExecutor
from server_sdk.fleet.settings import FleetSettings
from tests import test_fleet as fleet_tests
from tests.test_fleet import RUN, _good, _run_round, _update, events, wait_for

pytest_plugins = ("tests.broker_fixtures",)  # fleet, broker, clients
coordinator = fleet_tests.coordinator  # the fixture: a FleetExecutor on a broker with devices dev1 .. dev5

REPO = Path(__file__).resolve().parents[1]


def _status(conn, name: str, state: str = "hello", info: dict | None = None, retain: bool = True) -> None:
    msg = P.StatusMessage(name, state, time.time(), info or {})
    conn.publish(P.status_topic(RUN, name), P.encode_status(msg), retain=retain, wait_s=10)


def _answer(conn, name: str, rnd: int) -> None:
    conn.publish(P.update_topic(RUN, name), P.encode_update(_update(name, rnd, _good(rnd))), wait_s=10)


def _last(log: list[dict], event: str, **match) -> dict:
    return [e for e in log if e["event"] == event and all(e.get(k) == v for k, v in match.items())][-1]


# --------------------------------------------------------------------------- hole 5: a silent device


def test_a_silent_device_costs_one_short_wait_then_no_round_or_stage_start_waits_for_it(coordinator, fleet, clients,
                                                                                        tmp_path):
    """dev3 says hello and nothing else. Sampled, it is lost after start_timeout_s (not the 60 s deadline) and
    marked unresponsive: the next round that samples it, and the next stage start, do not wait for it at all.
    dev4, silent too but never sampled, costs a stage start start_timeout_s, not its 60 s stage-ready timeout.
    A new status ends the mark."""
    ex = coordinator
    ex.settings.quorum, ex.settings.round_timeout_s, ex.settings.start_timeout_s = 0.5, 60.0, 2.0
    ex.settings.device_names.update({"0": "dev5", "3": "dev3"})
    conns = {name: clients(fleet.devices[name]) for name in ("dev1", "dev2", "dev3", "dev4", "dev5")}
    _status(conns["dev3"], "dev3", info={"formats": ["onnx"]})  # a raw login: hello, then silence
    wait_for(lambda: "dev3" in ex.device_status, 10, "dev3's hello")

    worker, box = _run_round(ex, 1, [1, 3])
    _answer(conns["dev1"], "dev1", 1)
    worker.join(70)
    assert not worker.is_alive() and "error" not in box, box.get("error")
    assert [r.client for r in box["results"]] == [1]
    log = events(ex.run_dir)
    start, end = _last(log, "round_start", round=1), _last(log, "round_end", round=1)
    assert end["t"] < start["deadline"] - 30, "the round waited for the silent device until its deadline"
    assert end["missing"] == ["dev3"] and end["unresponsive"] == ["dev3"] and end["offline"] == []
    assert _last(log, "unresponsive")["device"] == "dev3"

    # the next round samples it again: not waited for, even with a start timeout as long as the round
    ex.settings.start_timeout_s = 60.0
    worker, box = _run_round(ex, 2, [1, 3])
    _answer(conns["dev1"], "dev1", 2)
    worker.join(70)
    assert not worker.is_alive() and "error" not in box, box.get("error")
    log = events(ex.run_dir)
    start, end = _last(log, "round_start", round=2), _last(log, "round_end", round=2)
    assert end["t"] < start["deadline"] - 30, "the second round waited for the silent device"
    assert start["unresponsive"] == ["dev3"] and end["unresponsive"] == ["dev3"]

    # a stage start (its first round samples dev5, dev1, dev2, dev3; dev4 said hello before it) waits for the
    # files of those who answer only
    _status(conns["dev4"], "dev4", info={"formats": ["onnx"]})
    wait_for(lambda: "dev4" in ex.device_status, 10, "dev4's hello")
    ex.cfg = RunConfig(lr=1e-3, local_steps=2, batch_size=2, num_clients=4, clients_per_round=4)
    ex.settings.stage_ready_timeout_s, ex.settings.start_timeout_s = 60.0, 2.0
    ex.serve_stage(0, {"onnx": tmp_path / "art"})
    stage_id = ex._artifacts["onnx"].artifact_id
    for name in ("dev1", "dev2", "dev5"):
        _status(conns[name], name, info={"formats": ["onnx"], "ready": stage_id})
    wait_for(lambda: all(ex.device_status.get(d, {}).get("ready") == stage_id for d in ("dev1", "dev2", "dev5")),
             10, "the ready statuses")
    ex._await_ready(0, 0)
    ready = _last(events(ex.run_dir), "stage_ready")
    assert ready["not_ready"] == [] and ready["waited_s"] < 30
    assert _last(events(ex.run_dir), "unresponsive")["device"] == "dev4"

    _status(conns["dev3"], "dev3", info={"formats": ["onnx"]})  # it shows life again: waited for again
    wait_for(lambda: "dev3" not in ex._silent, 10, "dev3's mark to end")
    assert ex._not_ready({"dev3"}) == {"dev3"}
    assert _last(events(ex.run_dir), "status", device="dev3")["was"] == "unresponsive"


def test_a_device_that_acknowledges_the_round_is_waited_for(coordinator, fleet, clients):
    """A device that acknowledges the round (a status naming it) within start_timeout_s is not marked, however
    long it then trains."""
    ex = coordinator
    ex.settings.quorum, ex.settings.round_timeout_s, ex.settings.start_timeout_s = 1.0, 30.0, 1.0
    dev1, dev2 = clients(fleet.devices["dev1"]), clients(fleet.devices["dev2"])
    worker, box = _run_round(ex, 1, [1, 2])
    _status(dev2, "dev2", "busy", {"stage": 0, "round": 1})
    _answer(dev1, "dev1", 1)
    time.sleep(3 * ex.settings.start_timeout_s)  # dev2 trains past its start timeout
    assert worker.is_alive()
    _answer(dev2, "dev2", 1)
    worker.join(20)
    assert not worker.is_alive() and [r.client for r in box["results"]] == [1, 2]
    assert not [e for e in events(ex.run_dir) if e["event"] == "unresponsive"]


def test_a_silent_sampled_device_is_replaced_by_a_live_one(coordinator, fleet, clients):
    """quorum 1.0 and one replacement: dev3 (silent) is lost after start_timeout_s and dev4 (live, not silent)
    replaces it; dev5, silent too, is never drawn. The round closes on dev4's update."""
    ex = coordinator
    ex.settings.quorum, ex.settings.replacements, ex.settings.round_timeout_s = 1.0, 1, 60.0
    ex.settings.start_timeout_s = 2.0
    ex.settings.device_names.update({"3": "dev3", "4": "dev4", "5": "dev5"})
    conns = {name: clients(fleet.devices[name]) for name in ("dev1", "dev3", "dev4", "dev5")}
    for name in ("dev3", "dev4", "dev5"):
        _status(conns[name], name, info={"formats": ["onnx"]})
    wait_for(lambda: {"dev3", "dev4", "dev5"} <= set(ex.device_status), 10, "the hellos")
    ex._silent["dev5"] = time.time()  # marked in an earlier round
    worker, box = _run_round(ex, 1, [1, 3])
    _answer(conns["dev1"], "dev1", 1)
    wait_for(lambda: any(e["event"] == "replacement" for e in events(ex.run_dir)), 30, "a replacement")
    _answer(conns["dev4"], "dev4", 1)
    worker.join(30)
    assert not worker.is_alive() and "error" not in box, box.get("error")
    assert [r.client for r in box["results"]] == [1, 4]
    log = events(ex.run_dir)
    assert [(e["device"], e["replaces"]) for e in log if e["event"] == "replacement"] == [("dev4", "dev3")]
    end = _last(log, "round_end")
    assert end["missing"] == ["dev3"] and end["unresponsive"] == ["dev3"] and end["replacements"] == {"dev4": "dev3"}


def test_start_timeout_is_set_from_the_command_line_and_validated(tmp_path):
    from server_sdk.cli.fleet import _fleet_settings
    from server_sdk.cli.main import build_parser
    from server_sdk.config import ConfigError

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    run = sub.choices["run"]
    assert _fleet_settings(run.parse_args(["--fleet", "local:3"]), tmp_path).start_timeout_s == 10.0
    assert _fleet_settings(run.parse_args(["--fleet", "local:3", "--start-timeout", "4"]), tmp_path).start_timeout_s == 4
    assert _fleet_settings(run.parse_args(["--fleet", "local:3", "--start-timeout", "0"]), tmp_path).start_timeout_s \
        is None  # off
    with pytest.raises(ConfigError, match="start_timeout_s=-1"):
        _fleet_settings(run.parse_args(["--fleet", "local:3", "--start-timeout", "-1"]), tmp_path)


# --------------------------------------------------------------------------- hole 9 (and 12): formats


def _coordinator(fleet, run_dir: Path, art: Path, **settings) -> FleetExecutor:
    cfg = RunConfig(lr=2e-2, local_steps=2, batch_size=2, num_clients=1, clients_per_round=1)  # _good: AdamW-sized
    fs = FleetSettings(run_id=RUN, artifact_bytes_per_s=None, device_names={"0": "dev1"})
    for key, value in settings.items():
        setattr(fs, key, value)
    ex = FleetExecutor(cfg, run_dir, fleet.server, [3], fs, host="localhost")
    ex.serve_stage(0, {"onnx": art})
    return ex


def _art(root: Path, size: int = 200_000) -> Path:
    """A stage artifact a device accepts as onnx files (it cannot train on them: its rounds fail)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"backend": "onnx"}))
    (root / "weights.bin").write_bytes(os.urandom(size))
    return root


def test_a_device_offering_only_unserved_formats_is_refused_live_and_retained(fleet, broker, clients, tmp_path):
    """A hello declaring only `ort` (retained) or `executorch` changes nothing the coordinator exports; both are
    refused with a reason naming the flag, and no round waits for them. A resumed coordinator reading the
    retained hello does the same."""
    ex = _coordinator(fleet, tmp_path / "run", _art(tmp_path / "art"), quorum=0.5, round_timeout_s=60.0)
    try:
        ex.settings.device_names.update({"1": "dev1", "2": "dev2"})
        _status(clients(fleet.devices["dev2"]), "dev2", info={"formats": ["ort"]})  # retained
        wait_for(lambda: "dev2" in ex.device_status, 10, "dev2's hello")
        assert ex.stage_formats() == ["onnx"]  # was ["onnx", "ort"]: an export this environment cannot build
        wait_for(lambda: any(e["event"] == "refused" for e in events(ex.run_dir)), 10, "the refusal")
        refused = _last(events(ex.run_dir), "refused")
        assert (refused["device"], refused["offered"], refused["served"]) == ("dev2", ["ort"], ["onnx"])
        assert "--formats" in refused["fix"] and refused["reason"] == "format_not_served"
        assert ex._not_ready({"dev2"}) == set()

        worker, box = _run_round(ex, 1, [1, 2])  # dev2 cannot train the stage: the round does not wait for it
        _answer(clients(fleet.devices["dev1"]), "dev1", 1)
        worker.join(70)
        assert not worker.is_alive() and [r.client for r in box["results"]] == [1]
        start, end = _last(events(ex.run_dir), "round_start"), _last(events(ex.run_dir), "round_end")
        assert end["missing"] == ["dev2"] and end["t"] < start["deadline"] - 30
    finally:
        ex.close()
    again = _coordinator(fleet, tmp_path / "run", tmp_path / "art")  # a resume: the retained hello is read
    try:
        wait_for(lambda: "dev2" in again.device_status, 10, "dev2's retained hello")
        assert again.stage_formats() == ["onnx"]
        wait_for(lambda: sum(e["event"] == "refused" for e in events(again.run_dir)) == 2, 10, "the second refusal")
    finally:
        again.close()


# --------------------------------------------------------------------------- hole 11: resume


def _device(fleet, name: str, tmp_path: Path) -> subprocess.Popen:
    shard = tmp_path / f"{name}.jsonl"
    shard.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    cmd = [sys.executable, "-m", "edge_runtime.client", "run", "--credentials",
           str(fleet.dir / "credentials" / f"{name}.json"), "--data", str(shard), "--cache",
           str(tmp_path / f"cache-{name}"), "--run", RUN, "--host", "localhost"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "wb"),
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_resumed_coordinator_does_not_wait_for_files_its_devices_already_hold(fleet, broker, tmp_path):
    """A real devft-edge device answers a new stage at once (a 3 s start timeout, its download takes longer), reports
    the files ready, acknowledges a round at once (although it cannot train these files) and so overwrites its
    retained status. A new coordinator process (new session) serving the same stage finds the files ready in that
    retained status and opens the stage without waiting for its stage-ready timeout."""
    ex = _coordinator(fleet, tmp_path / "run", _art(tmp_path / "art0"), start_timeout_s=3.0, round_timeout_s=6.0,
                      quorum=1.0, stage_ready_timeout_s=60.0)
    proc = _device(fleet, "dev1", tmp_path)
    try:
        wait_for(lambda: not ex._not_ready({"dev1"}), 60, "dev1 to hold the first files")
        ex.artifacts.max_bytes_per_s = 200e3  # the next stage's 1 MB take dev1 about 5 s
        art = _art(tmp_path / "art", 1_000_000)
        ex.serve_stage(0, {"onnx": art})
        ex._await_ready(0, 0)
        assert _last(events(ex.run_dir), "stage_ready")["not_ready"] == []
        assert not [e for e in events(ex.run_dir) if e["event"] == "unresponsive"], "dev1 answered the stage"
        ex.artifacts.max_bytes_per_s = None
        worker, box = _run_round(ex, 1, [0])
        worker.join(30)
        assert "QuorumNotReached" in repr(box.get("error")), box  # its round fails: the files are not a model
        assert ex.device_status["dev1"]["state"] == "busy" and ex.device_status["dev1"]["round"] == 1
        assert not [e for e in events(ex.run_dir) if e["event"] == "unresponsive"], "dev1 acknowledged the round"
        ex.close()

        resumed = _coordinator(fleet, tmp_path / "run", art, stage_ready_timeout_s=30.0)
        try:
            resumed._await_ready(0, 0)
        finally:
            resumed.close()
        ready = _last(events(tmp_path / "run"), "stage_ready")
        assert ready["not_ready"] == [] and ready["waited_s"] < 15, ready
    finally:
        proc.terminate()
        proc.wait(20)


# --------------------------------------------------------------------------- hole 6: log amplification


def test_thousands_of_bad_statuses_from_one_login_leave_a_small_log_with_exact_counts(coordinator, fleet, clients,
                                                                                     caplog):
    ex = coordinator
    n = 3000
    dev1 = clients(fleet.devices["dev1"])
    forged = P.encode_status(P.StatusMessage("dev2", "hello", time.time(), {"pad": "x" * 500}))
    size_before = ex.events_path.stat().st_size
    with caplog.at_level(logging.WARNING, logger="server_sdk.fleet.coordinator"):
        for _ in range(n):
            dev1.publish(P.status_topic(RUN, "dev1"), forged)
        wait_for(lambda: ex.rejections["device_mismatch"] == n, 120, "every forged status to be refused")
        ex.close()  # writes what is still only counted
        ex.close = lambda: None  # the fixture's teardown
    grown = ex.events_path.stat().st_size - size_before
    assert grown < 4000, f"{n} refused statuses appended {grown} bytes"  # was n lines, about 600 kB
    log = [e for e in events(ex.run_dir) if e.get("device") == "dev1"]
    full = [e for e in log if e["event"] == "rejected"]
    summaries = [e for e in log if e["event"] == "suppressed"]
    assert len(full) == 5 and all(e["reason"] == "device_mismatch" for e in full)
    assert len(full) + sum(e["count"] for e in summaries) == n  # every refusal is counted
    assert all(e["reason"] == "device_mismatch" and e["of"] == "rejected" for e in summaries)
    assert sum("dev1" in r.getMessage() for r in caplog.records) <= len(full) + len(summaries)


# --------------------------------------------------------------------------- hole 7: fetch amplification

CHUNK = 64 * 1024


def test_a_flooding_device_cannot_make_the_server_broadcast_past_its_budget(tmp_path, fleet, broker, clients):
    """dev1 asks for every chunk of a 1 MiB file 10 times a second for 4 s (40 MiB asked for); dev2 downloads the
    file meanwhile. The server publishes at most dev1's budget (2 x the registered bytes + the floor) plus what
    dev2's download caused, and dev2 gets its file."""
    path = tmp_path / "frozen.bin"
    path.write_bytes(os.urandom(16 * CHUNK))
    server = ArtifactServer(clients(fleet.server, client_id="server-artifacts"), RUN, max_bytes_per_s=None).start()
    server.device_budget_floor = 4 * CHUNK
    try:
        desc = server.add_files({"frozen.bin": path}, chunk_size=CHUNK)
        entry = desc.files[0]
        flood = clients(fleet.devices["dev1"])
        ask = P.encode_chunk_request(P.ChunkRequest(RUN, "dev1", entry.sha256, tuple(range(16))))
        cache = ArtifactCache(tmp_path / "honest")
        t_end = time.monotonic() + 4
        fetched = {}
        honest = threading.Thread(target=lambda: fetched.update(cache.fetch(
            clients(fleet.devices["dev2"]), RUN, "dev2", desc, chunk_timeout_s=2.0, max_retries=5)))
        honest.start()
        while time.monotonic() < t_end:
            flood.publish(P.fetch_topic(RUN, "dev1"), ask)
            time.sleep(0.1)
        honest.join(60)
        assert fetched["frozen.bin"].read_bytes() == path.read_bytes()
        wait_for(lambda: server.queued == 0 and not getattr(server, "_deferred", None), 60, "the server to go idle")
        budget = 2 * entry.size + 4 * CHUNK
        assert server.bytes_sent <= budget + 2 * entry.size, f"{server.bytes_sent} bytes published"  # was ~40 MiB
        assert server.budget() == budget and server.charged["dev1"] <= budget and server.refused["dev1"] > 0
    finally:
        server.stop()


def test_a_device_whose_first_download_was_lost_still_gets_the_file(tmp_path, fleet, broker, clients):
    """An honest device asked for every chunk and lost them (its process died), then fetches the file with a
    retry or two: about 2 x the file, within its budget (2 x the files served + a floor), so it is served."""
    path = tmp_path / "frozen.bin"
    path.write_bytes(os.urandom(16 * CHUNK))
    server = ArtifactServer(clients(fleet.server, client_id="server-artifacts"), RUN, max_bytes_per_s=None).start()
    server.device_budget_floor = 4 * CHUNK
    try:
        desc = server.add_files({"frozen.bin": path}, chunk_size=CHUNK)
        dev = clients(fleet.devices["dev1"])
        lost = P.ChunkRequest(RUN, "dev1", desc.files[0].sha256, tuple(range(16)))
        dev.publish(P.fetch_topic(RUN, "dev1"), P.encode_chunk_request(lost), wait_s=10)  # nobody listens
        wait_for(lambda: server.chunks_sent == 16, 20, "the lost chunks to go out")
        time.sleep(server.republish_after_s)
        got = ArtifactCache(tmp_path / "cache").fetch(dev, RUN, "dev1", desc, chunk_timeout_s=1.0, max_retries=5)
        assert got["frozen.bin"].read_bytes() == path.read_bytes()
        assert server.refused["dev1"] == 0 and server.charged["dev1"] <= server.budget()
    finally:
        server.stop()
