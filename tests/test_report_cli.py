"""`devft report`: per-device, per-stage telemetry table and plots from a run's report.json."""

import json

import numpy as np
import pytest

from edge_runtime.telemetry import TelemetryRecorder
from server_sdk.cli.main import main
from server_sdk.cli.report import PLOTS, device_stages


def _real_telemetry(profile: str, steps: int, include_all: bool = False) -> dict:
    """A TelemetryRecorder report from a real (tiny) workload, as a device would send it."""
    a = np.random.default_rng(0).standard_normal((256, 256))
    with TelemetryRecorder(device_profile=profile, carbon_intensity="DEU", include_all_latencies=include_all) as rec:
        for _ in range(steps):
            with rec.step(tokens=8 * 16):
                a = np.tanh(a @ a.T / 256)
    return json.loads(json.dumps(rec.report()))  # exactly what travels in report.json


def _record(stage: int, rnd: int, layers: int, telemetry: dict | None) -> dict:
    rec = {"stage": stage, "round": rnd, "stage_round": 0, "layers": layers, "clients": [0, 1], "train_loss": 2.0,
           "bytes_down": 1, "bytes_up": 1, "stage_download_bytes": 0, "client_seconds": [1.0, 1.0],
           "wall_seconds": 1.0, "client_samples": [4, 4], "eval_loss": None, "accuracy": None, "per_task": None}
    if telemetry is not None:
        rec["telemetry"] = telemetry
    return rec


def _write_run(tmp_path, records):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"strategy": "devft", "stages": [4, 30], "records": records}))
    return run


@pytest.fixture(scope="module")
def telemetry():
    return {
        "pi5": [_real_telemetry("raspberry-pi-5-8gb", 3) for _ in range(2)],
        "jetson": [_real_telemetry("jetson-orin-nano-8gb", 4, include_all=True) for _ in range(2)],
    }


@pytest.fixture
def fleet_run(tmp_path, telemetry):
    records = [_record(-1, 0, 30, None)]  # the base-model evaluation before training: no telemetry
    records.append(_record(0, 1, 4, {"pi5": telemetry["pi5"][0], "jetson": telemetry["jetson"][0]}))
    records.append(_record(0, 2, 4, {"pi5": telemetry["pi5"][1]}))
    records.append(_record(1, 3, 30, {"jetson": telemetry["jetson"][1]}))
    return _write_run(tmp_path, records)


def test_rows_fold_rounds_per_device_and_stage(fleet_run, telemetry):
    rows = device_stages(json.loads((fleet_run / "report.json").read_text()))
    assert [(r.device, r.stage, r.layers) for r in rows] == [("jetson", 0, 4), ("pi5", 0, 4), ("jetson", 1, 30)]
    pi5 = rows[1]
    tel = telemetry["pi5"]
    assert pi5.rounds == 2 and pi5.steps == 6
    assert pi5.peak_rss_bytes == max(t["peak_rss_bytes"] for t in tel)
    assert pi5.energy_j == pytest.approx(sum(t["energy_j"] for t in tel))
    assert pi5.carbon_g == pytest.approx(sum(t["carbon_g"] for t in tel))
    assert pi5.energy_sources == ["estimated:raspberry-pi-5"] or pi5.energy_sources[0].startswith("measured:")
    assert pi5.device_profiles == ["raspberry-pi-5-8gb"] and pi5.fits is True
    # the Jetson sent every latency, so its percentiles come from the steps themselves
    assert len(rows[0].latencies_s) == 4
    assert rows[0].latency_p50_p95()[0] == pytest.approx(float(np.percentile(rows[0].latencies_s, 50)))


def test_report_prints_table_and_writes_plots(fleet_run, capsys):
    assert main(["report", str(fleet_run)]) == 0
    out = capsys.readouterr().out
    assert "pi5" in out and "jetson" in out and "raspberry-pi-5-8gb" in out
    assert "estimated:" in out or "measured:" in out
    for name in PLOTS:
        assert (fleet_run / name).stat().st_size > 0


def test_report_json(fleet_run, capsys):
    assert main(["report", str(fleet_run), "--json", "--no-plots"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["device"] for r in rows} == {"pi5", "jetson"}
    assert all(r["p50_s"] is not None and r["energy_j_per_step"] > 0 for r in rows)
    assert not any((fleet_run / name).exists() for name in PLOTS)


def test_simulation_run_without_telemetry_says_so(tmp_path, capsys):
    run = _write_run(tmp_path, [_record(-1, 0, 30, None), _record(0, 1, 4, None)])
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "no device telemetry" in out and "simulation" in out
    assert not any((run / name).exists() for name in PLOTS)


def test_missing_report_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no report.json" in capsys.readouterr().err


def test_devices_are_named_by_their_own_name_even_in_old_reports(tmp_path, telemetry):
    tel = {**telemetry["pi5"][0], "device": "dev-003"}
    run = _write_run(tmp_path, [_record(0, 1, 4, {"3": tel})])  # an older run keyed telemetry by client index
    assert [r.device for r in device_stages(json.loads((run / "report.json").read_text()))] == ["dev-003"]


def test_report_help_explains_the_columns_and_how_to_set_a_profile(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert '"-" = it declared none' in out and '"n/a" = no profile' in out
    assert "DEVFT_DEVICE_PROFILE=<name>" in out and "raspberry-pi-5-8gb" in out


def test_device_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DEVFT_DEVICE_PROFILE", "android-6gb")
    with TelemetryRecorder() as rec:
        with rec.step():
            pass
    assert rec.report()["device_profile"] == "android-6gb" and rec.report()["fits_device_profile"] is not None
    monkeypatch.setenv("DEVFT_DEVICE_PROFILE", "toaster")
    with pytest.raises(ValueError, match="unknown device profile 'toaster'"):
        TelemetryRecorder()


def test_profile_labels_do_not_overlap_and_groups_get_distinct_colours():
    from matplotlib.colors import Normalize

    from server_sdk.cli.report import profile_label_positions
    from server_sdk.engine.report import N_GROUP_COLOURS, group_colours

    heights = profile_label_positions([3.0, 3.2, 6.0, 7.2], min_gap=0.4)
    assert heights[0] == 3.0 and all(b - a >= 0.4 - 1e-9 for a, b in zip(heights, heights[1:]))
    cmap, norm = group_colours(), Normalize(-0.5, N_GROUP_COLOURS - 0.5)
    for n_groups in (4, 8, 16, 30):
        colours = {cmap(norm(g)) for g in range(n_groups)}
        assert len(colours) == n_groups
