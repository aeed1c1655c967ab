"""`devft-edge bench` (edge_runtime/bench.py): one benchmark row per run, torch-free for the portable onnx format."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import export
from edge_runtime.backends import onnx_runtime_problem
from edge_runtime.bench import append_rows, process_peak_rss_bytes, random_batch
from edge_runtime.telemetry import DEVICE_PROFILES
from server_sdk.engine.model import cache_root
from tests.test_export_onnx import make_peft_model

REPO = Path(__file__).resolve().parents[1]
needs_plain_onnxruntime = pytest.mark.skipif(
    onnx_runtime_problem() is not None or importlib.util.find_spec("onnxruntime.training") is not None,
    reason="needs plain onnxruntime (onnxruntime-training replaces its module)")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    # graphs cached per shape under DEVFT_CACHE/onnx-templates: only the first run on a machine traces (~1 min)
    return export.export_artifacts("onnx", make_peft_model(), tmp_path_factory.mktemp("bench") / "stage",
                                   export.StageInfo(stage=2), seq_len=32, template_root=cache_root())


def _bench(artifacts: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edge_runtime.bench", str(artifacts), "--batch", "2", "--seq", "16", "--steps", "2",
           "--warmup", "1", "--threads", "1", "--device-profile", "raspberry-pi-4-4gb", "--note", "test",
           "--out", str(out), *extra]
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(REPO)]  # keep its onnxruntime
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(path)})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@needs_plain_onnxruntime
def test_bench_appends_a_complete_row_without_importing_torch(artifacts, tmp_path):
    out = tmp_path / "rows.json"
    _bench(artifacts, out)
    _bench(artifacts, out, "--prompt-fraction", "0.5")
    _bench(artifacts, out, "--micro-batch", "1")
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3
    # the whole batch (micro_batch = batch) and one row per graph run: the same first loss to float32 rounding
    assert (rows[0]["micro_batch"], rows[2]["micro_batch"]) == (2, 1)
    assert rows[2]["losses"]["first_warmup"] == pytest.approx(rows[0]["losses"]["first_warmup"], rel=1e-6)
    row = rows[0]
    assert (row["backend"], row["stage"], row["stage_layers"], row["batch"], row["seq"], row["steps"]) == ("onnx", 2, 2, 2, 16, 2)
    assert row["torch_imported"] is False
    assert row["step_latency_s"]["p50"] > 0 and row["tokens_per_s"] > 0
    assert row["energy_source"].split(":")[0] in ("measured", "estimated")
    assert row["peak_rss_bytes"] > 0 and row["process_peak_rss_bytes"] >= row["peak_rss_bytes"] // 2
    assert 0 < row["rss_after_load_bytes"] <= row["process_peak_rss_bytes"]
    assert set(row["fits"]) == set(DEVICE_PROFILES)
    assert row["measured_on"]["machine"] and row["measured_on"]["note"] == "test"
    assert row["telemetry"]["device_profile"] == "raspberry-pi-4-4gb"
    assert np.isfinite([row["losses"]["first"], row["losses"]["last"]]).all()
    # every next-token position supervised, then the first half of each row masked as prompt
    assert (row["supervised_positions"], rows[1]["supervised_positions"]) == (2 * 15, 2 * 8)


@needs_plain_onnxruntime
def test_bench_refuses_a_backend_the_artifacts_are_not(artifacts, tmp_path):
    proc = _bench(artifacts, tmp_path / "rows.json", "--backend", "ort", check=False)
    assert proc.returncode != 0
    assert "holds 'onnx' artifacts, not 'ort'" in proc.stderr
    assert not (tmp_path / "rows.json").exists()


@needs_plain_onnxruntime
def test_bench_refuses_a_micro_batch_larger_than_its_batch(artifacts, tmp_path):
    proc = _bench(artifacts, tmp_path / "rows.json", "--micro-batch", "3", check=False)
    assert proc.returncode != 0 and "micro_batch must be in [1, batch=2], got 3" in proc.stderr
    assert not (tmp_path / "rows.json").exists()


def test_random_batch_masks_the_prompt_and_keeps_a_target():
    ids, labels = random_batch(100, 3, 10, prompt_fraction=0.5)
    assert ids.dtype == labels.dtype == np.int64 and ids.shape == labels.shape == (3, 10)
    assert (labels[:, :5] == -100).all() and (labels[:, 5:] == ids[:, 5:]).all()
    _, almost_all = random_batch(100, 1, 10, prompt_fraction=0.99)
    assert (almost_all[:, 1:] != -100).sum() == 1  # a row never loses every target (its loss would be NaN)
    with pytest.raises(ValueError, match="prompt_fraction"):
        random_batch(100, 1, 10, prompt_fraction=1.0)


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
