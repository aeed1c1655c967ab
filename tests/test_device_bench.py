"""benchmarks/device.py on a local Hugging Face directory (`--model PATH`): the same build, export and
measurement as for SmolLM2, with quantized portable rows and the memory floor beside each peak."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import device
from server_sdk.engine.model import tiny_random_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime.training") is not None,
    reason="this environment has onnxruntime-training, which replaces plain onnxruntime's module")


def test_model_path_measures_torch_and_quantized_portable_rows_with_their_floor(tmp_path, monkeypatch):
    base = tiny_random_model(n_layers=2, hidden=64)
    model_dir = tmp_path / "tiny-hf"
    base.model.save_pretrained(model_dir)
    base.tokenizer.save_pretrained(model_dir)
    monkeypatch.setattr(device, "CACHE", tmp_path / "cache")
    out, md = tmp_path / "device.json", tmp_path / "RESULTS.md"
    try:
        assert device.main(["--model", str(model_dir), "--stages", "2", "--backends", "torch,onnx,onnx-int4",
                            "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(out),
                            "--markdown", str(md)]) == 0
    finally:
        monkeypatch.setattr(device, "MODEL", "smollm2-135m")
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torch", "onnx", "onnx-int4"}
    assert all("error" not in r for r in rows.values()), rows
    for r in rows.values():
        f = r["floor"]
        assert f["total"] == f["weights"] + f["lora_state"] + f["activations"] + f["runtime"] > 0
    assert rows["onnx-int4"]["frozen_bytes"] < 0.3 * rows["onnx"]["frozen_bytes"]
    assert rows["onnx"]["stage_layers"] == 2 and rows["onnx-int4"]["versions"]["opset"]
    assert "peak / floor" in md.read_text() and "onnx-int4" in md.read_text()


def test_predicted_floor_of_smollm2_135m_weights_matches_its_parameter_count():
    cfg = dict(hidden_size=576, intermediate_size=1536, vocab_size=49152, num_attention_heads=9,
               num_key_value_heads=3)
    fp32 = device.weight_bytes_of(cfg, 30, "fp32")
    assert abs(fp32 - 4 * 134_515_008) < 4 * 30 * 2 * 576 + 4 * 576  # 134.5M parameters (norms aside)
    # int4: the decoder's 106.2M values at 5/8 byte, the tied embedding's 28.3M at int8's 9/8 (export/quant.py)
    assert device.weight_bytes_of(cfg, 30, "int4") == 106_168_320 * 5 // 8 + 28_311_552 * 9 // 8 + 4 * 61 * 576  # + norms
