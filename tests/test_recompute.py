"""Activation recomputation (export --recompute, export/recompute.py): the training graph's backward reads copies
of each decoder layer's forward, made when the backward reaches the layer, so the step keeps only the layers'
inputs; losses, gradients and eval losses are those of the graph without it, bit for bit, in fp32 and with
quantized weights; the manifest says so and the device runs it in the default order."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

from edge_runtime.backends.onnx_backend import QUANTIZED_ORDER, OnnxTrainer
from edge_runtime.manifest import ManifestError, load_manifest
from export.memory import activation_bytes, predicted_peak_mb
from export.onnx import TRAIN_GRAPH, export_onnx_artifacts
from export.options import GraphOptions
from export.recompute import PREFIX, _Plan, recompute_layers
from tests.export_helpers import ALL_TARGETS, make_batch, make_peft_model
from tests.test_web_device import needs_web
from tests.test_web_quantized import GRAD_RTOL, LOSS_RTOL, web_step

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime.training") is not None,
    reason="this environment has onnxruntime-training, which replaces plain onnxruntime's module")

LAYERS = 3


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("recompute")
    model = make_peft_model(0, targets=ALL_TARGETS, num_hidden_layers=LAYERS)
    out = {(w, rc): export_onnx_artifacts(model, root / f"{w}-{rc}", root / "templates", seq_len=48,
                                          graph=GraphOptions(w, rc))
           for w in ("fp32", "int4") for rc in (False, True)}
    return model, out


def _layer_tensors_read_by_the_backward(graph) -> dict[int, list[str]]:
    plan = _Plan(graph, list(graph.node), "loss")
    saved = plan.saved()
    return {layer: saved.get(layer, []) for layer in range(plan.n_layers)}


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_recomputed_graph_gives_the_same_loss_and_gradients_bit_for_bit(exports, weights):
    _, out = exports
    ids, labels = make_batch(256, 3, 40, seed=5)
    kept, recomputed = OnnxTrainer(out[(weights, False)]), OnnxTrainer(out[(weights, True)])
    loss0, grads0 = kept.loss_and_grads(ids, labels)
    loss, grads = recomputed.loss_and_grads(ids, labels)
    assert loss == loss0 and grads.keys() == grads0.keys()
    assert all(np.array_equal(grads[k], grads0[k]) for k in grads0)
    assert recomputed.eval_loss(ids, labels) == kept.eval_loss(ids, labels)
    assert recomputed.session_choices.order == QUANTIZED_ORDER  # the copies run when the backward reaches them


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_backward_reads_only_each_layers_input_from_the_forward(exports, weights):
    """Without the pass the backward reads dozens of each layer's forward tensors (what a step holds between
    the two); with it, at most the two [rows, seq, hidden] tensors a layer hands on, and each copy waits for
    its layer's backward (a copied node's inputs depend on that layer's gate)."""
    _, out = exports
    before = _layer_tensors_read_by_the_backward(
        onnx.load(str(out[(weights, False)] / TRAIN_GRAPH), load_external_data=False).graph)
    graph = onnx.load(str(out[(weights, True)] / TRAIN_GRAPH), load_external_data=False).graph
    after = _layer_tensors_read_by_the_backward(graph)
    assert len(before) == len(after) == LAYERS
    assert all(len(before[k]) >= 10 for k in before)
    assert all(len(after[k]) <= 2 for k in after), after
    copies = [n for n in graph.node if n.name.startswith(PREFIX) and "/" in n.name and "/in/" not in n.name]
    assert copies
    waits: set[str] = {n.output[0] for n in graph.node if n.name.startswith(PREFIX) and n.name.endswith("_zero")}
    for n in graph.node:  # graph order is topological: a tensor's wait is known before its readers
        if any(i in waits for i in n.input):
            waits.update(n.output)
    matmuls = [n for n in copies if n.op_type in ("MatMul", "FusedMatMul", "Gemm", "Softmax")]
    assert matmuls and all(n.output[0] in waits for n in matmuls)
    assert recompute_layers(graph) == 0  # idempotent


def test_manifest_records_recompute_and_refuses_an_unknown_value(exports, tmp_path):
    """The manifest says "activations": "recompute" (absent when kept), validates against the documented schema
    (docs/protocol.schema.json, with its weights format), and a value the runtime does not know is refused."""
    from tests.test_schema import errors

    _, out = exports
    assert load_manifest(out[("fp32", True)]).activations == "recompute"
    for key, art in out.items():
        assert errors("Manifest", json.loads((art / "manifest.json").read_text())) == [], key
    plain = load_manifest(out[("fp32", False)])
    assert plain.activations == "keep" and "activations" not in plain.to_dict()  # older runtimes still read it
    d = load_manifest(out[("fp32", True)]).to_dict()
    d["activations"] = "offload"
    from edge_runtime.manifest import Manifest

    with pytest.raises(ManifestError, match="activations"):
        Manifest.from_dict(d)


def test_predicted_need_shrinks_with_recompute():
    cfg = {"hidden_size": 576, "intermediate_size": 1536, "vocab_size": 49152, "num_attention_heads": 9,
           "num_key_value_heads": 3, "num_hidden_layers": 30}
    kept = activation_bytes(cfg, 1, 128, 127)["decoder"]
    recomputed = activation_bytes(cfg, 1, 128, 127, recompute=True)["decoder"]
    assert recomputed < kept / 6  # two [seq, hidden] tensors a layer + one layer, against every layer's
    a, b = (predicted_peak_mb(cfg, 30, batch=4, seq=128, graph=GraphOptions("int4", rc), micro_batch=1)["need_mb"]
            for rc in (False, True))
    assert b < a


@needs_web
def test_web_wasm_step_on_the_recomputed_int4_graph_equals_native(exports, tmp_path):
    """onnxruntime-web (WASM, through the web device's code) runs the recomputed graph: one step's loss and
    gradients equal native onnxruntime's within the bounds of the plain graphs (tests/test_web_quantized.py)."""
    _, out = exports
    art = out[("int4", True)]
    ids, labels = make_batch(256, 3, 40, seed=7)
    loss, grads = OnnxTrainer(art).loss_and_grads(ids, labels)
    web = web_step(art, ids, labels, tmp_path / "cache")
    assert sorted(web["grads"]) == sorted(grads)
    assert abs(web["loss"] - loss) <= LOSS_RTOL * abs(loss)
    for k, g in grads.items():
        assert np.abs(web["grads"][k] - g.ravel()).max() <= GRAD_RTOL * np.abs(g).max(), k


def test_fleet_run_with_recomputed_activations_ends_on_the_same_adapter(tmp_path):
    """Real Mosquitto, two devft-edge devices, int4 weights: a run with -o recompute=true exports recomputing graphs
    (the devices' cached manifests say so) and ends on the adapter of the same run without it, bit for bit (the
    graphs compute the same numbers)."""
    import torch
    from safetensors.torch import load_file

    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.settings import FleetSettings
    from tests.test_fleet import FleetRun, events, fleet_cfg

    adapters = {}
    for recompute in (False, True):
        cfg = fleet_cfg(num_clients=2, clients_per_round=2, rounds_per_stage=[1, 1], weights="int4",
                        recompute=recompute, torch_threads=1, seed=4)
        job = FleetRun(tmp_path / f"recompute-{recompute}", cfg, tiny_random_model(n_layers=4, hidden=32, seed=0), 2,
                       FleetSettings(round_timeout_s=120))
        job.finish()
        assert not [e for e in events(job.run_dir) if e["event"] == "rejected"]
        manifests = sorted(job.fleet.device_dir("dev-000").glob("cache/stages/*/stage*/manifest.json"))
        assert manifests and all(json.loads(p.read_text()).get("activations", "keep") ==
                                 ("recompute" if recompute else "keep") for p in manifests)
        adapters[recompute] = load_file(job.run_dir / "adapter" / "adapter_model.safetensors")
    assert set(adapters[True]) == set(adapters[False])
    for k, want in adapters[False].items():
        assert torch.equal(adapters[True][k], want), (k, (adapters[True][k] - want).abs().max())
