"""`devft rig`: emulated phones (headless Chromium, a phone's viewport and user agent, DevTools CPU
throttling, a profile directory each) join a real fleet run through one-time join links, and what the rig
saw lands in the run's report, labelled emulated. The `--adb` path needs a phone and is not run here;
its battery arithmetic is.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"

needs_browser = pytest.mark.skipif(
    shutil.which("node") is None or not (WEB / "node_modules").is_dir() or shutil.which("chromium") is None
    or shutil.which("websockify") is None, reason="the rig needs Node.js, web/node_modules, Debian's chromium and "
    "websockify: run scripts/setup.sh")


@needs_browser
def test_rig_of_emulated_phones_joins_a_real_fleet_run_and_reports_them_as_emulated(tmp_path, capsys):
    """2 devft-edge devices and 2 emulated phones started by `devft rig` (join links, throttled 2x, Pixel 5):
    every phone update is accepted, each phone ran in its own browser profile with a phone's user agent,
    and report.json (and add_fleet_summary's rewrite of it) carries the rig's section, marked emulated."""
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.local_fleet import add_fleet_summary
    from server_sdk.fleet.settings import FleetSettings
    from server_sdk.fleet.web_join import _load
    from tests.test_fleet import accepted_by_round, events, fleet_cfg
    from tests.web_helpers import DriverRun

    phones = ("dev-002", "dev-003")

    def rig(job: DriverRun) -> list[str]:
        return [sys.executable, "-m", "server_sdk.cli.main", "rig", str(job.fleet.dir), "--run", job.run_dir.name,
                "--run-dir", str(job.run_dir), "--devices", ",".join(phones), "--throttle", "2", "--timeout", "600"]

    cfg = fleet_cfg(num_clients=4, clients_per_round=4, stages=[4], rounds_per_stage=[2])
    # after the run the rig adds its section once the coordinator has written report.json
    job = DriverRun(tmp_path / "rig", cfg, tiny_random_model(n_layers=4, hidden=32, seed=0), 4,
                    FleetSettings(round_timeout_s=240), driven=phones, command=rig, cwd=REPO,
                    log=tmp_path / "rig.log", key="rig", wait_s=180)
    job.finish(900)
    log = (tmp_path / "rig.log").read_text()
    assert job.codes["rig"] == 0, log
    rounds = accepted_by_round(job.run_dir)
    assert len(rounds) == 2 and all(sorted(v) == ["dev-000", "dev-001", *phones] for v in rounds.values()), (rounds, log)
    assert not [e for e in events(job.run_dir) if e["event"] == "rejected"]
    report = json.loads((job.run_dir / "report.json").read_text())
    rig = report["rig"]
    assert rig["mode"] == "emulated" and rig["phone"] == "Pixel 5" and rig["cpu_throttle"] == 2
    for name in phones:
        d = rig["devices"][name]
        assert d["kind"] == "emulated" and d["measured"] is False and "emulated" in d["note"], d
        assert d["done"] is True and d["error"] is None and d["enrolled"] == name, d
        assert d["cpu_throttle"] == 2 and d["viewport"]["isMobile"] is True and "Mobile" in d["user_agent"], d
        assert [r["round"] for r in d["rounds"]] == [0, 1] and d["renderer_peak_rss_bytes"] > 0, d
        assert all(len(r["losses"]) == cfg.local_steps for r in d["rounds"]), d
        # DevTools throttling slows no worker: a throttled phone trains on its page's thread, with one WASM thread
        assert d["trains_on_page_thread"] is True and "1 thread(s)" in d["runtime"] and "worker" not in d["runtime"], d
        assert (Path(d["profile_dir"]) / "Default").is_dir()  # its own Chromium profile, kept on disk
        for rec in (r for r in report["records"] if r["stage"] >= 0):  # its own telemetry, as every device's
            tel = rec["telemetry"][name]
            assert tel["runtime"].startswith("onnxruntime-web") and tel["steps"] == cfg.local_steps
    assert all(j["used_unix"] for j in _load(job.fleet.dir).values())  # each link enrolled its phone once
    assert add_fleet_summary(job.run_dir, report)["rig"] == rig  # the fleet summary keeps the section
    from server_sdk.cli.main import main

    capsys.readouterr()
    assert main(["report", str(job.run_dir), "--no-plots"]) == 0
    shown = capsys.readouterr().out
    for name in phones:  # `devft report` says which devices were emulated
        assert f"{name}: EMULATED phone (Pixel 5, CPU 2x throttled" in shown, shown


def test_adb_battery_energy_is_current_times_voltage_over_time():
    """The --adb path's arithmetic (the phone part cannot run here): trapezoidal |I| x V, sysfs units (µA, µV),
    dumpsys's millivolts as fallback; no current exposed, no energy claimed."""
    from server_sdk.fleet.rig import energy_j

    sysfs = [{"t": 0.0, "current_now": -500_000, "voltage_now": 4_000_000},
             {"t": 10.0, "current_now": -300_000, "voltage_now": 4_000_000}]
    assert energy_j(sysfs) == pytest.approx(10 * (2.0 + 1.2) / 2)
    dumpsys = [{"t": 0.0, "current_now": 250_000, "voltage_mv": 3800}, {"t": 2.0, "current_now": 250_000,
                                                                         "voltage_mv": 3800}]
    assert energy_j(dumpsys) == pytest.approx(2 * 0.25 * 3.8)
    assert energy_j([{"t": 0.0, "level": 80, "voltage_mv": 3800}, {"t": 5.0, "level": 80, "voltage_mv": 3800}]) is None


def test_report_labels_rig_devices_emulated_or_measured():
    from server_sdk.cli.report import rig_lines

    lines = rig_lines({"devices": {
        "dev-004": {"kind": "emulated", "profile": "Pixel 5", "cpu_throttle": 4, "chromium": "Chrome/156",
                    "renderer_peak_rss_bytes": 300 * 2**20},
        "dev-005": {"kind": "android", "serial": "R58M", "battery": {"energy_j": 12.34}},
        "dev-006": {"kind": "android", "serial": "X1", "battery": {"energy_j": None}}}})
    assert "dev-004: EMULATED phone (Pixel 5, CPU 4x throttled, Chrome/156), renderer peak RSS 300 MiB" in lines[1]
    assert "dev-005: phone R58M over adb, battery energy MEASURED: 12.3 J" in lines[2]
    assert "not exposed by this phone" in lines[3]
    assert rig_lines(None) == [] and rig_lines({"devices": "x"}) == []
