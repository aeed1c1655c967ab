"""Issue #27: the fleet-scale harness's fast version (50 devices with their own TLS logins, a real mosquitto, the
real coordinator, 10% sampled per round) runs every round to its quorum and reports every measurement."""

import importlib
import json


def test_fleet_scale_smoke_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVFT_BENCH_RESULTS", str(tmp_path))
    import benchmarks.fleet_scale as bench

    bench = importlib.reload(bench)
    assert bench.main(["--profile", "smoke"]) == 0
    (row,) = json.loads((tmp_path / "fleet-scale-smoke.json").read_text())["rows"]
    assert row["devices"] == 50 and row["sampled_per_round"] == 5 and row["hellos_seen"] == 50 and row["edges"] == 0
    assert [r["accepted"] for r in row["per_round"]] == [5, 5]  # quorum 1.0: every sampled device answered
    assert row["per_round"][0]["overhead_s"] is not None and row["per_round"][1]["overhead_s"] is None  # no next round
    assert row["devices_reporting"] == 50 and row["device_reconnects"] == 0
    # every device got at least the stage's idle control and both train controls, and both rounds' globals
    assert row["device_messages_received"]["min"] >= 5
    assert row["coordinator_rss_bytes_max"] > 0 and row["broker_rss_bytes_end"] > 0
    assert (tmp_path / "fleet-scale-smoke.png").exists()
    monkeypatch.delenv("DEVFT_BENCH_RESULTS")
    importlib.reload(bench)


def test_fleet_scale_through_two_edge_brokers(tmp_path, monkeypatch):
    """The same 50 devices split over two edge brokers bridged to the fleet's broker (server_sdk/fleet/bridge.py)."""
    monkeypatch.setenv("DEVFT_BENCH_RESULTS", str(tmp_path))
    import benchmarks.fleet_scale as bench

    bench = importlib.reload(bench)
    assert bench.main(["--profile", "smoke", "--devices", "50", "--edges", "2", "--globals", "sampled",
                       "--rounds", "2"]) == 0
    (row,) = json.loads((tmp_path / "fleet-scale-smoke.json").read_text())["rows"]
    assert row["edges"] == 2 and len(row["edge_brokers"]) == 2 and row["hellos_seen"] == 50
    assert [r["accepted"] for r in row["per_round"]] == [5, 5]
    # only the sampled devices received a global adapter: 10 of 50 devices, one each
    assert row["device_messages_received"]["min"] < row["device_messages_received"]["max"]
    monkeypatch.delenv("DEVFT_BENCH_RESULTS")
    importlib.reload(bench)


def test_fleet_scale_broker_restart_mid_round_loses_no_update(tmp_path, monkeypatch):
    """Issue #27 faults at scale, small: the broker restarts while round 1's devices compute; all 50 devices come
    back and round 1 closes with every sampled update (quorum 1.0)."""
    monkeypatch.setenv("DEVFT_BENCH_RESULTS", str(tmp_path))
    import benchmarks.fleet_scale as bench

    bench = importlib.reload(bench)
    assert bench.main(["--profile", "smoke", "--devices", "50", "--restart", "--rounds", "2"]) == 0
    (row,) = json.loads((tmp_path / "fleet-scale-smoke.json").read_text())["rows"]
    assert row["restart"] and row["broker_restart"]["devices_back"] == 50 and row["broker_restart"]["all_back_by_end"]
    assert row["broker_restart"]["round_accepted"] == row["broker_restart"]["round_sampled"] == 5
    assert [r["accepted"] for r in row["per_round"]] == [5, 5]
    monkeypatch.delenv("DEVFT_BENCH_RESULTS")
    importlib.reload(bench)


def test_fleet_scale_sampled_devices_dying_mid_round_close_it_on_their_wills(tmp_path, monkeypatch):
    """Issue #27 faults at scale, small: one of round 1's 5 sampled devices crashes while computing (its connection
    drops without a DISCONNECT); the round closes on its will with the other 4 (quorum 0.8), not at the deadline,
    not at the deadline."""
    monkeypatch.setenv("DEVFT_BENCH_RESULTS", str(tmp_path))
    import benchmarks.fleet_scale as bench

    bench = importlib.reload(bench)
    assert bench.main(["--profile", "smoke", "--devices", "50", "--fault", "deaths", "--rounds", "2"]) == 0
    (row,) = json.loads((tmp_path / "fleet-scale-smoke.json").read_text())["rows"]
    deaths = row["device_deaths"]
    assert deaths["killed"] == 1 and deaths["round_missing"] == deaths["round_offline"] == deaths["devices"]
    assert [r["accepted"] for r in row["per_round"]] == [5, 4] and row["rounds_failed"] == 0
    # closed on the will: the round ended before its deadline (120 s; it takes about a second)
    assert deaths["closed_after_deaths_s"] < deaths["deadline_s"]
    monkeypatch.delenv("DEVFT_BENCH_RESULTS")
    importlib.reload(bench)


def test_fleet_scale_coordinator_killed_mid_round_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Issue #27 faults at scale, small: the coordinator process is SIGKILLed while round 1's devices compute; a
    resumed one (from the round-0 checkpoint) reopens round 1 without waiting for stage-ready statuses (every
    device's retained status names its files), and every sampled device trains it again."""
    monkeypatch.setenv("DEVFT_BENCH_RESULTS", str(tmp_path))
    import benchmarks.fleet_scale as bench

    bench = importlib.reload(bench)
    assert bench.main(["--profile", "smoke", "--devices", "50", "--fault", "coordinator", "--rounds", "2"]) == 0
    (row,) = json.loads((tmp_path / "fleet-scale-smoke.json").read_text())["rows"]
    crash = row["coordinator_crash"]
    assert crash["round_accepted"] == crash["round_sampled"] == 5 and crash["not_ready"] == 0
    assert [r["accepted"] for r in row["per_round"]] == [5, 5] and row["rounds_failed"] == 0
    assert crash["restart_to_first_round_s"] > 0 and row["hellos_seen"] == 50
    monkeypatch.delenv("DEVFT_BENCH_RESULTS")
    importlib.reload(bench)
