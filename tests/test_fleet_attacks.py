"""Issue 27's holes on the update path: what one device's login could send to stop, freeze or fill a run, against
a real mosquitto (TLS, passwords, ACL) and the real coordinator. Each test failed on the code before the fix.

Hand-made updates on the `coordinator` fixture of tests/test_fleet.py (dev1 and dev2 sampled as clients 1 and 2;
lr 2e-2, 2 local steps, so AdamW could move the 32 trained coordinates by at most 0.23).
"""

from __future__ import annotations

import json
import math
import queue

import numpy as np
import pytest
import torch

from edge_runtime import protocol as P
from server_sdk.cli.report import device_stages
from server_sdk.config import RunConfig
from server_sdk.fleet.broker import BrokerProcess
from server_sdk.fleet.coordinator import FleetExecutor
from server_sdk.fleet.local_fleet import add_fleet_summary
from server_sdk.fleet.settings import FleetSettings
from server_sdk.method.aggregation import adamw_norm_bound
from tests import test_fleet as fleet_tests
from tests.test_fleet import PA, RUN, _good, _run_round, _update, events, wait_for

pytest_plugins = ("tests.broker_fixtures",)  # fleet, clients
coordinator = fleet_tests.coordinator

# 10 kB of JSON nested 5,000 deep: json.loads raised RecursionError, which escaped the update handler
DEEP = b'{"version": %d, "kind": "update", "x": ' % P.PROTOCOL_VERSION + b"[" * 5000 + b"]" * 5000 + b"}"
HUGE_INT = b'{"version": %d, "kind": "update", "num_samples": 1' % P.PROTOCOL_VERSION + b"0" * 5000 + b"}"


def _framed(header: bytes) -> bytes:
    return len(header).to_bytes(4, "big") + header


def _rejections(run_dir) -> list[tuple[str, str]]:
    return [(e["device"], e["reason"]) for e in events(run_dir) if e["event"] == "rejected"]


def test_a_kill_pill_header_is_refused_and_the_round_goes_on(coordinator, fleet, clients):
    ex = coordinator
    dev1, dev2 = clients(fleet.devices["dev1"]), clients(fleet.devices["dev2"])
    worker, box = _run_round(ex, 1, [1, 2])
    for pill in (DEEP, HUGE_INT):
        dev1.publish(P.update_topic(RUN, "dev1"), _framed(pill), wait_s=10)
        dev1.publish(P.status_topic(RUN, "dev1"), pill, wait_s=10)
        dev1.publish(P.fetch_topic(RUN, "dev1"), pill, wait_s=10)
    wait_for(lambda: len(_rejections(ex.run_dir)) >= 4, 20, "the four refusals")
    assert worker.is_alive(), box.get("error")  # the round did not die on them
    for name, conn in (("dev1", dev1), ("dev2", dev2)):
        conn.publish(P.update_topic(RUN, name), P.encode_update(_update(name, 1, _good(int(name[-1])))), wait_s=10)
    worker.join(30)
    assert "error" not in box, box.get("error")
    assert [r.client for r in box["results"]] == [1, 2]
    details = [e["detail"] for e in events(ex.run_dir) if e["event"] == "rejected"]
    assert sum("deeper than" in d or "recursion" in d for d in details) == 2, details
    assert sum("digit limit" in d for d in details) == 2, details


def test_a_retained_update_planted_before_the_run_is_refused_and_deleted(fleet, clients, tmp_path):
    """Hole 12: a retained kill pill on devft/<run>/update/dev1 before the run exists crashed it at round 0, and
    again on every resume. Now it is refused as `retained` and deleted from the broker."""
    broker = BrokerProcess(fleet.dir, fleet.port).start()
    try:
        conns = {name: clients(fleet.devices[name]) for name in ("dev1", "dev2")}
        conns["dev1"].publish(P.update_topic(RUN, "dev1"), _framed(DEEP), retain=True, wait_s=10)
        for attempt in range(2):  # a first start, then a "resume" of the same run
            (tmp_path / "art").mkdir(exist_ok=True)
            (tmp_path / "art" / "manifest.json").write_text("{}")
            ex = FleetExecutor(RunConfig(lr=2e-2, local_steps=2, batch_size=2), tmp_path / f"run{attempt}",
                               fleet.server, [3], FleetSettings(run_id=RUN, round_timeout_s=20, artifact_bytes_per_s=None,
                                                                device_names={"1": "dev1", "2": "dev2"}),
                               host="localhost")
            try:
                ex.serve_stage(0, {"onnx": tmp_path / "art"})
                if attempt == 0:
                    wait_for(lambda ex=ex: _rejections(ex.run_dir), 10, "the retained update's refusal")
                    assert _rejections(ex.run_dir) == [("dev1", "retained")]
                worker, box = _run_round(ex, 0, [1, 2])
                for name, conn in conns.items():
                    conn.publish(P.update_topic(RUN, name), P.encode_update(_update(name, 0, _good(int(name[-1])))),
                                 wait_s=10)
                worker.join(30)
                assert "error" not in box and [r.client for r in box["results"]] == [1, 2], box.get("error")
                if attempt == 1:
                    assert _rejections(ex.run_dir) == []  # deleted: nothing came back on the resume
            finally:
                ex.close()
        seen: queue.Queue = queue.Queue()
        observer = clients(fleet.server)
        observer.subscribe(P.update_topic(RUN, "+"), seen.put)
        with pytest.raises(queue.Empty):
            seen.get(timeout=2.0)  # the broker no longer holds it
    finally:
        broker.stop()


def test_an_all_zero_or_tiny_update_cannot_get_the_honest_update_refused(coordinator, fleet, clients):
    """Hole 2: with two devices sampled, a zero delta made the round's lower median norm 0, so the honest update
    was refused as a norm outlier every round (the global model froze, or the quorum failed)."""
    ex = coordinator
    ex.settings.quorum = 1.0
    dev1, dev2 = clients(fleet.devices["dev1"]), clients(fleet.devices["dev2"])
    honest = _good(2)
    for rnd, scale in ((1, 0.0), (2, 1e-12)):
        worker, box = _run_round(ex, rnd, [1, 2])
        dev1.publish(P.update_topic(RUN, "dev1"), P.encode_update(_update(
            "dev1", rnd, {k: v * np.float32(scale) for k, v in _good(1).items()})), wait_s=10)
        dev2.publish(P.update_topic(RUN, "dev2"), P.encode_update(_update("dev2", rnd, honest)), wait_s=10)
        worker.join(30)
        assert "error" not in box, box.get("error")
        assert [r.client for r in box["results"]] == [1, 2]
        np.testing.assert_array_equal(box["results"][1].delta[fleet_tests.A].numpy(), honest[PA])
    assert _rejections(ex.run_dir) == []


def test_an_update_longer_than_adamw_can_move_is_refused_whoever_else_answers(coordinator, fleet, clients):
    """A sign-flipped, boosted delta (issue 27, hole 13) inside the fixed bound and alone with one honest update:
    no median can tell which of two is wrong, but AdamW cannot move 32 coordinates by more than 0.23 in 2 steps."""
    ex = coordinator
    ex.settings.quorum = 0.5
    bound = adamw_norm_bound(2e-2, 2, 32)
    assert 0.2 < bound < 0.25
    dev1, dev2 = clients(fleet.devices["dev1"]), clients(fleet.devices["dev2"])
    honest = _good(2)
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in honest.values()))
    flipped = {k: v * np.float32(-1.2 * bound / norm) for k, v in honest.items()}  # 1.2 x the bound
    worker, box = _run_round(ex, 1, [1, 2])
    dev1.publish(P.update_topic(RUN, "dev1"), P.encode_update(_update("dev1", 1, flipped)), wait_s=10)
    dev2.publish(P.update_topic(RUN, "dev2"), P.encode_update(_update("dev2", 1, honest)), wait_s=10)
    worker.join(30)
    assert "error" not in box and [r.client for r in box["results"]] == [2], box.get("error")
    (refusal,) = [e for e in events(ex.run_dir) if e["event"] == "rejected"]
    assert refusal["device"] == "dev1" and refusal["reason"] == "norm_exceeded" and "AdamW" in refusal["detail"]


def test_telemetry_of_the_wrong_types_reaches_neither_the_report_nor_the_summary(coordinator, fleet, clients):
    """Hole 12: `process: [1, 2]` in telemetry crashed the end of `devft serve` (the fleet summary) and
    `devft report`. The coordinator keeps checked fields only."""
    ex = coordinator
    ex.settings.quorum = 0.5
    lies = {"process": [1, 2], "steps": "many", "step_latency_s": {"p50": "x", "all": [0.1, "y", None, 1e300]},
            "energy_j": {"a": 1}, "stage_download_bytes": -5, "backend": "onnx", "peak_rss_bytes": 2**20,
            "fits_device_profile": "yes", "my_extra": 3, "x" * 100: 1}
    worker, box = _run_round(ex, 1, [1, 2])
    clients(fleet.devices["dev1"]).publish(P.update_topic(RUN, "dev1"), P.encode_update(
        _update("dev1", 1, _good(1), telemetry=lies)), wait_s=10)
    worker.join(30)
    assert "error" not in box, box.get("error")
    (result,) = box["results"]
    tel = result.telemetry
    assert tel == {"step_latency_s": {"p50": None, "p95": None, "mean": None, "all": [0.1]}, "backend": "onnx",
                   "peak_rss_bytes": 2**20, "my_extra": 3, "device": "dev1"}
    dropped = next(e for e in events(ex.run_dir) if e["event"] == "telemetry_dropped")
    assert set(dropped["keys"]) == {"process", "steps", "energy_j", "stage_download_bytes", "fits_device_profile",
                                    "x" * 64}
    record = {"stage": 0, "round": 1, "layers": 2, "telemetry": {"dev1": tel, "dev2": lies}}  # dev2: an old report
    report = add_fleet_summary(ex.run_dir, {"records": [record]})
    assert report["fleet"]["devices"]["dev1"]["peak_rss_bytes"] == 2**20
    assert json.loads((ex.run_dir / "report.json").read_text())["fleet"]["devices"].keys() == {"dev1", "dev2"}
    assert {r.device for r in device_stages(report)} == {"dev1", "dev2"}


def test_updates_no_open_round_can_use_never_wait_in_the_coordinator(coordinator, fleet, clients):
    """Hole 12: 20 x 60 MB on a device's own update topic while no round was open grew the coordinator from 512 to
    1,930 MB. Now an update waits in memory only if the open round sampled its sender and it fits the round."""
    ex = coordinator
    big = b"\0" * (4 << 20)
    dev1, dev3 = clients(fleet.devices["dev1"]), clients(fleet.devices["dev3"])
    for _ in range(5):
        dev1.publish(P.update_topic(RUN, "dev1"), big, wait_s=10)  # no round is open
    wait_for(lambda: len(_rejections(ex.run_dir)) == 5, 20, "five refusals")
    assert ex._inbox.qsize() == 0
    worker, box = _run_round(ex, 1, [1, 2])
    dev3.publish(P.update_topic(RUN, "dev3"), P.encode_update(_update("dev3", 1, _good(3))), wait_s=10)
    dev1.publish(P.update_topic(RUN, "dev1"), big, wait_s=10)  # sampled, but larger than any update of the round
    wait_for(lambda: len(_rejections(ex.run_dir)) == 7, 20, "two more refusals")
    assert ex._inbox.qsize() == 0
    for name, conn in (("dev1", dev1), ("dev2", clients(fleet.devices["dev2"]))):
        conn.publish(P.update_topic(RUN, name), P.encode_update(_update(name, 1, _good(int(name[-1])))), wait_s=10)
    worker.join(30)
    assert "error" not in box and [r.client for r in box["results"]] == [1, 2], box.get("error")
    assert _rejections(ex.run_dir) == [("dev1", "stale_round")] * 5 + [("dev3", "not_sampled"), ("dev1", "oversized")]


def test_fedavg_rounds_keep_one_running_sum_not_the_updates(coordinator, fleet, clients):
    """Issue 27, streaming aggregation: with every client's weight known and the AdamW bound on, a FedAvg round sums
    each accepted delta on arrival and keeps none; the aggregate is FedAvg's over the updates sent."""
    from server_sdk.method.aggregation import FedAvg, aggregate
    from server_sdk.method.strategies.base import ClientResult

    ex = coordinator
    ex.shard_sizes = {c: 4 + c for c in range(ex.cfg.num_clients)}
    worker, box = _run_round(ex, 1, [1, 2])
    for name in ("dev2", "dev1"):
        clients(fleet.devices[name]).publish(P.update_topic(RUN, name), P.encode_update(
            _update(name, 1, _good(int(name[-1])), num_samples=100)), wait_s=10)
    worker.join(30)
    assert "error" not in box, box.get("error")
    results = box["results"]
    assert results.folded is not None and results.folded.count == 2
    assert [r.client for r in results] == [1, 2] and all(r.delta == {} for r in results)
    assert [r.num_samples for r in results] == [5, 6]  # capped by the shards
    glob = {fleet_tests.A: torch.zeros(2, 8), fleet_tests.B: torch.zeros(8, 2)}
    sent = [ClientResult(c, 4 + c, {fleet_tests.A: torch.from_numpy(_good(c)[PA]),
                                    fleet_tests.B: torch.from_numpy(_good(c)[fleet_tests.PB])}, 0.0, 0.0) for c in (1, 2)]
    got, want = aggregate("fedavg", glob, results), FedAvg().aggregate(glob, sent)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_replanned_schedule_never_reuses_a_wire_round_or_clears_the_global_it_just_published(fleet, clients,
                                                                                              tmp_path):
    """Issue 25's latent fault: wire rounds were the stage's offset in the *initial* schedule plus the round, so
    when `schedule=auto` moved a stage's leftover rounds to the next stage (stages [2, 2, 2]; stage 0 ends after
    one round, stage 1 runs three), stage 1's third round and stage 2's first shared global/4, and publishing
    stage 2's global cleared it again as "the previous round's" (devices that subscribe find none)."""
    broker = BrokerProcess(fleet.dir, fleet.port).start()
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    ex = FleetExecutor(RunConfig(lr=2e-2, local_steps=2, batch_size=2), tmp_path / "run", fleet.server, [2, 2, 2],
                       FleetSettings(run_id=RUN, round_timeout_s=20, quorum=0.5, artifact_bytes_per_s=None,
                                     stage_ready_timeout_s=0, device_names={"1": "dev1"}), host="localhost")
    schedule = [2, 2, 2]
    ex.follow_rounds_per_stage(schedule)  # the round loop's list
    dev1 = clients(fleet.devices["dev1"])
    try:
        seen = []
        for stage, rnd in ((0, 0), (1, 0), (1, 1), (1, 2), (2, 0)):
            if rnd == 0:
                ex.serve_stage(stage, {"onnx": tmp_path / "art"})
            if (stage, rnd) == (1, 0):
                schedule[:] = [1, 3, 2]  # as rounds.py replans: stage 0 ended after one round, stage 1 takes it
            worker, box = _run_round(ex, rnd, [1], stage=stage)
            wr = next(e["round"] for e in reversed(events(ex.run_dir)) if e["event"] == "round_start")
            seen.append(wr)
            dev1.publish(P.update_topic(RUN, "dev1"), P.encode_update(_update("dev1", wr, _good(1), stage=stage)),
                         wait_s=10)
            worker.join(30)
            assert "error" not in box and [r.client for r in box["results"]] == [1], box.get("error")
            got: queue.Queue = queue.Queue()
            probe = clients(fleet.devices["dev2"])  # a device subscribing now must find the round's global
            probe.subscribe(P.global_topic(RUN, wr), got.put)
            assert P.decode_global(got.get(timeout=10).payload).stage == stage
            probe.close()
        assert seen == [0, 1, 2, 3, 4], seen  # as report.json counts the run's rounds
    finally:
        ex.close()
        broker.stop()
