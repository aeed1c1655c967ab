"""`devft-edge bench` (edge_runtime/bench.py): one benchmark row per run, torch-free for ORT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.bench import append_rows, process_peak_rss_bytes
from edge_runtime.telemetry import DEVICE_PROFILES
from export.ort import export_ort_artifacts
from tests.test_export_ort import make_peft_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return export_ort_artifacts(make_peft_model(), tmp_path_factory.mktemp("bench") / "stage", stage=2, max_seq_len=32)


def _bench(artifacts: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edge_runtime.bench", str(artifacts), "--batch", "2", "--seq", "16", "--steps", "2",
           "--warmup", "1", "--threads", "1", "--device-profile", "raspberry-pi-4-4gb", "--note", "test", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_appends_a_complete_row_without_importing_torch(artifacts, tmp_path):
    out = tmp_path / "rows.json"
    _bench(artifacts, out)
    _bench(artifacts, out)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    row = rows[0]
    assert (row["backend"], row["stage"], row["stage_layers"], row["batch"], row["seq"], row["steps"]) == ("ort", 2, 2, 2, 16, 2)
    assert row["torch_imported"] is False
    assert row["step_latency_s"]["p50"] > 0 and row["tokens_per_s"] > 0
    assert row["energy_source"].split(":")[0] in ("measured", "estimated")
    assert row["peak_rss_bytes"] > 0 and row["process_peak_rss_bytes"] >= row["peak_rss_bytes"] // 2
    assert set(row["fits"]) == set(DEVICE_PROFILES)
    assert row["measured_on"]["machine"] and row["measured_on"]["note"] == "test"
    assert row["telemetry"]["device_profile"] == "raspberry-pi-4-4gb"


def test_append_keeps_other_keys_and_rejects_foreign_files(tmp_path):
    path = tmp_path / "device.json"
    path.write_text(json.dumps({"meta": {"x": 1}, "rows": [{"a": 1}]}))
    append_rows(path, [{"b": 2}])
    assert json.loads(path.read_text()) == {"meta": {"x": 1}, "rows": [{"a": 1}, {"b": 2}]}
    path.write_text(json.dumps({"rows": {"not": "a list"}}))
    with pytest.raises(ValueError, match="not a list"):
        append_rows(path, [{"b": 2}])


def test_process_peak_is_this_process_not_an_inherited_one():
    peak = process_peak_rss_bytes()
    assert peak is not None and peak > 0
