"""The quantized portable graphs (export --weights int8|int4; int4 is the int4-asym format, an opset-21 blockwise
int4's nibble split and DequantizeLinear) in onnxruntime-web's WASM build under Node, through the web device's own code
(web/test/train-step.mjs: its blob store, checkManifest, Device.trainerFor, Trainer.lossAndGrads): one training
step's loss and LoRA gradients equal native onnxruntime's (devft-edge's OnnxTrainer) on the same batch, as for
fp32; and the web device declares and accepts exactly the weight formats devft-edge does."""

from __future__ import annotations

import base64
import json
import subprocess

import numpy as np
import onnx
import pytest

from edge_runtime.backends import runtime_versions
from edge_runtime.backends.onnx_backend import OnnxTrainer
from edge_runtime.manifest import WEIGHT_FORMATS
from export.onnx import TRAIN_GRAPH
from tests.export_helpers import make_batch
from tests.test_quantized_weights import exports  # noqa: F401 (a fixture: fp32, int8 and int4 exports of one model)
from tests.test_quantized_weights import pytestmark as quantized_marks
from tests.test_web_device import WEB, needs_web

pytestmark = [quantized_marks, needs_web]

# WASM's SIMD kernels sum in another order than native MLAS. Measured on 5 batches (1x8 to 4x64 tokens) per format:
# the loss differs by 0 to 7 float32 ulps (relative <= 6.0e-7), each gradient tensor by at most 1.1e-6 of its largest
# value, int8 and int4 no more than fp32 (dequantizing adds no difference of its own). The bounds leave a factor of 3
# and 9, and stay far below what a wrong dequantization would move: on the test's batch the int8 graph's mere
# rounding of the fp32 weights moves the loss by 6.5e-5 and a gradient by 2.0e-2 of its largest value, int4 (against
# int8) by 9.5e-5 and 0.22.
LOSS_RTOL = 2e-6
GRAD_RTOL = 1e-5


def web_step(artifacts, ids, labels, cache) -> dict:
    """train-step.mjs on onnxruntime-web's WASM build: its JSON, gradients decoded to float32 arrays."""
    batch = cache.with_suffix(".batch.json")
    batch.write_text(json.dumps({"input_ids": ids.tolist(), "labels": labels.tolist()}))
    run = subprocess.run(["node", "test/train-step.mjs", "--artifacts", str(artifacts), "--batch", str(batch),
                          "--cache", str(cache), "--engine", "web"], cwd=WEB, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    out["grads"] = {k: np.frombuffer(base64.b64decode(v), dtype="<f4") for k, v in out["grads"].items()}
    return out


def int4_dequantized(directory) -> set[str]:
    """The DequantizeLinear nodes of the train graph that read int4 codes: a Concat of a BitwiseAnd and a BitShift
    (the two nibbles of each byte)."""
    graph = onnx.load(str(directory / TRAIN_GRAPH), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    return {n.name for n in graph.node if n.op_type == "DequantizeLinear"
            and (c := producer.get(n.input[0])) is not None and c.op_type == "Concat"
            and sorted(producer[i].op_type for i in c.input) == ["BitShift", "BitwiseAnd"]}


@pytest.mark.parametrize("weights", ["fp32", "int8", "int4"])
def test_web_wasm_step_equals_native_onnxruntime(exports, tmp_path, weights):  # noqa: F811
    """Loss and every LoRA gradient of one step: onnxruntime-web (WASM, through the device's code) vs native."""
    _, out = exports
    art = out[weights]
    native = OnnxTrainer(art)
    assert native.manifest.weights == WEIGHT_FORMATS[weights]
    if weights == "int4":  # the graph really is int4-asym: WASM must run the bit operations and DequantizeLinear
        assert len(int4_dequantized(art)) >= 14  # 2 layers x 7 decoder Linears, forward and backward uses
        assert native.manifest.versions["opset"] == 21 and native.manifest.versions["min_onnxruntime"] == "1.20.0"
    else:
        assert not int4_dequantized(art)
    ids, labels = make_batch(256, 3, 40, seed=7)
    loss, grads = native.loss_and_grads(ids, labels)
    web = web_step(art, ids, labels, tmp_path / "cache")
    assert web["runtime"].startswith("onnxruntime-web ") and web["manifest_weights"] == WEIGHT_FORMATS[weights]
    assert sorted(web["grads"]) == sorted(grads)
    assert all(np.abs(g).max() > 0 for g in grads.values())  # every gradient carries signal (lora_B is nonzero)
    loss_diff = abs(web["loss"] - loss) / abs(loss)
    worst = {k: float(np.abs(web["grads"][k] - g.ravel()).max() / np.abs(g).max()) for k, g in grads.items()}
    print(f"{weights}: loss {loss:.6f}, web-native relative {loss_diff:.2e}; gradients worst relative "
          f"{max(worst.values()):.2e} ({max(worst, key=worst.get)})")
    assert loss_diff < LOSS_RTOL
    assert max(worst.values()) < GRAD_RTOL, worst


CHECK = """import { checkManifest, weightFormats } from './src/device.js';
const [manifest, versions] = JSON.parse(process.argv[1]), got = {};
for (const v of versions) {
  got[v] = { declares: weightFormats(v).join(','), checks: {} };
  for (const w of ['fp32', 'int8-asym', 'int4-asym', 'int8', 'int4']) {
    try { checkManifest({ ...manifest, weights: w }, v); got[v].checks[w] = 'ok'; } catch (e) { got[v].checks[w] = e.message; }
  }
}
console.log(JSON.stringify(got));
"""


def js_checks(manifest: dict, versions: list[str]) -> dict:
    """For each onnxruntime version: the web device's hello `weights` and what its checkManifest says of `manifest`
    with each weight format name ('ok' or the error)."""
    run = subprocess.run(["node", "--input-type=module", "-e", CHECK, json.dumps([manifest, versions])], cwd=WEB,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_web_device_declares_and_accepts_devft_edges_weight_formats(exports):  # noqa: F811
    """The web device's hello declares devft-edge's `weights` with the onnxruntime-web its package.json pins, so a
    quantized run samples it (the coordinator refused it before); a manifest naming a format it does not run, or
    graphs for a newer onnxruntime (the quantized graphs' 1.20.0), is refused with the reason; before 1.20 fp32 only."""
    _, out = exports
    shipped = json.loads((WEB / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    int8 = json.loads((out["int8"] / "manifest.json").read_text())
    int4 = json.loads((out["int4"] / "manifest.json").read_text())
    assert int8["versions"]["min_onnxruntime"] == int4["versions"]["min_onnxruntime"] == "1.20.0"
    got = js_checks({**int8, "versions": {**int8["versions"], "min_onnxruntime": "1.17.0"}}, [shipped, "1.19.2"])
    assert got[shipped]["declares"] == runtime_versions()["weights"] == ",".join(WEIGHT_FORMATS.values())
    assert got["1.19.2"]["declares"] == "fp32"
    assert [w for w, c in got[shipped]["checks"].items() if c == "ok"] == ["fp32", "int8-asym", "int4-asym"]
    for older in ("int8", "int4"):  # the symmetric formats' names: other bytes
        assert f'frozen weights are "{older}"; this device (onnxruntime ' in got[shipped]["checks"][older]
    assert 'frozen weights are "int4-asym"' in got["1.19.2"]["checks"]["int4-asym"]
    assert 'frozen weights are "int8-asym"' in got["1.19.2"]["checks"]["int8-asym"]
    got = js_checks(int4, [shipped, "1.19.2"])
    assert got[shipped]["checks"]["int4-asym"] == "ok"
    assert "too old for these graphs: they need 1.20.0" in got["1.19.2"]["checks"]["int4-asym"]


def test_web_wasm_device_trains_an_int4_fleet_run(tmp_path):
    """An int4 run (int4-asym files), real Mosquitto: a Node device on onnxruntime-web's WASM beside a devft-edge
    device is not refused at hello (before its hello declared `weights` it was, reason weights_scheme), trains every
    round, and each of its rounds is what devft-edge's code computes from the same global adapter, seed and shard:
    step losses within the WASM bound above, deltas as test_browser_devices_train_in_a_real_fleet_within_1e5_of_native
    compares them (AdamW turns last-bit gradient differences at near-zero coordinates into steps of up to lr)."""
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.settings import FleetSettings
    from tests.test_fleet import FleetRun, accepted_by_round, events, fleet_cfg
    from tests.test_web_device import layout, replay_round, start_node_device

    web_name = "dev-001"

    class WebRun(FleetRun):
        def start_device(self, name: str, code: str | None = None):
            if name != web_name:
                return super().start_device(name, code)
            return start_node_device(self.fleet, name, self.shards[name], self.run_dir.name, "web", "--keep-blobs")

    cfg = fleet_cfg(num_clients=2, clients_per_round=2, weights="int4")
    job = WebRun(tmp_path / "int4", cfg, tiny_random_model(n_layers=4, hidden=32, seed=0), 2,
                 FleetSettings(round_timeout_s=120))
    report = job.finish()
    assert not [e for e in events(job.run_dir) if e["event"] == "rejected"]
    rounds = accepted_by_round(job.run_dir)
    assert len(rounds) == 3 and all(sorted(v) == ["dev-000", web_name] for v in rounds.values())
    assert job.codes == {"dev-000": 0, web_name: 0}, job.codes
    assert all(r["telemetry"][web_name]["runtime"].startswith("onnxruntime-web ") for r in report["records"]
               if r["stage"] >= 0)
    ddir = job.fleet.device_dir(web_name)
    worst_loss = worst_delta = 0.0
    records = sorted((ddir / "record").glob("round-*.json"))
    for record in records:
        ctrl = json.loads(record.read_text())["control"]
        art_dir = layout(ctrl["artifacts"]["onnx"], ddir / "cache" / "blobs", tmp_path / "replay" / record.stem)
        assert json.loads((art_dir / "manifest.json").read_text())["weights"] == "int4-asym"
        assert int4_dequantized(art_dir)  # the stage's decoder Linears are int4 codes
        delta, losses, update = replay_round(record.with_suffix(""), art_dir, job.shards[web_name], web_name)
        web_losses = json.loads(record.read_text())["losses"]
        assert len(web_losses) == len(losses) == cfg.local_steps
        worst_loss = max(worst_loss, *(abs(w - n) / abs(n) for w, n in zip(web_losses, losses)))
        assert sorted(update.tensors) == sorted(delta)
        for k, want in delta.items():
            diff = np.abs(update.tensors[k] - want)
            worst_delta = max(worst_delta, float(np.linalg.norm(diff) / np.linalg.norm(want)))
            assert (diff >= 1e-5).sum() <= max(1, 0.005 * diff.size), (record.stem, k, int((diff >= 1e-5).sum()))
    print(f"int4 fleet run, {len(records)} web rounds: step losses worst relative {worst_loss:.2e}, "
          f"deltas worst relative L2 {worst_delta:.2e}")
    assert len(records) == 3 and worst_loss < LOSS_RTOL and worst_delta <= 1e-3
