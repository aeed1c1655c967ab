"""Quantized frozen weights (export --weights int8|int4, RunConfig.weights): the portable graph on quantized
files computes exactly what the server computes on the dequantized weights, the files shrink, a manifest
whose scheme does not match its files is refused, and a device that does not declare the run's scheme is
refused at hello (real Mosquitto)."""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from collections import Counter

import numpy as np
import onnx
import pytest

from edge_runtime import protocol as P
from edge_runtime.backends import runtime_versions
from edge_runtime.backends.onnx_backend import OnnxTrainer
from edge_runtime.manifest import MANIFEST_NAME, WEIGHT_FORMATS, ManifestError, load_manifest
from export.naming import ARTIFACT_PREFIX
from export.onnx import EVAL_GRAPH, TRAIN_GRAPH, export_onnx_artifacts
from export.options import GraphOptions
from export.quant import TABLE_SCHEME, dequantize, fake_quantize_, quantize
from server_sdk.config import RunConfig
from server_sdk.engine.model import tiny_random_model
from server_sdk.engine.quantized import quantized_base
from tests.export_helpers import ALL_TARGETS, make_batch
from tests.export_helpers import make_peft_model as _make_peft_model
from tests.test_export_onnx import torch_loss_and_grads
from tests.test_fleet import RUN, coordinator, events, wait_for  # noqa: F401 (coordinator: a fixture)

pytest_plugins = ("tests.broker_fixtures",)
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime.training") is not None,
    reason="this environment has onnxruntime-training, which replaces plain onnxruntime's module")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model = _make_peft_model(0, targets=ALL_TARGETS)
    out = {w: export_onnx_artifacts(model, root / w, root / "templates", seq_len=64, graph=GraphOptions(w))
           for w in ("fp32", "int8", "int4")}
    return model, out


def weight_bytes(directory) -> int:
    return sum(p.stat().st_size for p in (directory / "weights").iterdir())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_graph_matches_torch_on_the_dequantized_weights(exports, scheme):
    model, out = exports
    reference = copy.deepcopy(model)
    assert fake_quantize_(reference, scheme) == 15  # 2 layers x 7 projections + the tied embedding
    trainer = OnnxTrainer(out[scheme])
    assert trainer.manifest.weights == WEIGHT_FORMATS[scheme]
    for shape in ((2, 16), (3, 40)):
        ids, labels = make_batch(256, *shape, seed=shape[1])
        ref_loss, ref_grads = torch_loss_and_grads(reference, ids, labels)
        loss, grads = trainer.loss_and_grads(ids, labels)
        assert abs(loss - ref_loss) / abs(ref_loss) < 1e-5
        worst = max(np.abs(grads[k] - ref_grads[k]).max() / (np.abs(ref_grads[k]).max() + 1e-12) for k in grads)
        assert worst < 1e-4
        fp32_loss, _ = torch_loss_and_grads(model, ids, labels)
        assert loss != fp32_loss  # the weights really are the quantized ones
    graph = onnx.load(str(out[scheme] / TRAIN_GRAPH), load_external_data=False)
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
    # the decoder: one per-block DequantizeLinear per use (on UINT8 codes; int4's split by bit operations),
    # not traced unpacking
    ops = Counter(n.op_type for n in graph.graph.node)
    fp32 = Counter(n.op_type for n in onnx.load(str(out["fp32"] / TRAIN_GRAPH), load_external_data=False).graph.node)
    assert ops["DequantizeLinear"] >= 14 and ops["Floor"] == fp32["Floor"] and ops["Div"] == fp32["Div"]
    assert trainer.manifest.versions["opset"] == 21 and trainer.manifest.versions["min_onnxruntime"] == "1.20.0"
    codes = {i.name: i.data_type for i in graph.graph.initializer  # the weight files' (not the graph's shapes)
             if i.name.startswith(ARTIFACT_PREFIX) and i.name.endswith(".qweight") and "proj" in i.name}
    assert len(codes) == 14 and set(codes.values()) == {onnx.TensorProto.UINT8}
    assert ops["BitShift"] == ops["BitwiseAnd"] and (ops["BitShift"] >= 14) == (scheme == "int4")


def _waiting_for_the_batch(graph) -> set[str]:
    """The tensors of `graph` computed (directly or not) from the batch's inputs."""
    found = {i.name for i in graph.input if i.name in ("input_ids", "labels")}
    for node in graph.node:  # topological order
        if any(i in found for i in node.input):
            found.update(node.output)
    return found


def _dequantizations(graph) -> list:
    return [n for n in graph.node if n.op_type == "DequantizeLinear"]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_dequantizations_wait_for_their_use_and_change_no_value(exports, tmp_path, monkeypatch, scheme):
    """defer_dequantization makes every dequantization wait for the step (none is ready when the step starts,
    to be run early and held), and lower_int8 turns the table's Cast/Mul into DequantizeLinear: neither
    changes a bit of the loss, the gradients or the eval loss (against an export without the two passes)."""
    import export.onnx as export_onnx

    model, out = exports
    for name in (TRAIN_GRAPH, EVAL_GRAPH):
        graph = onnx.load(str(out[scheme] / name), load_external_data=False).graph
        waiting = _waiting_for_the_batch(graph)
        assert _dequantizations(graph) and all(n.output[0] in waiting for n in _dequantizations(graph))
        inits = {i.name: i.data_type for i in graph.initializer}
        assert not [n for n in graph.node if n.op_type == "Cast" and inits.get(n.input[0]) == onnx.TensorProto.INT8]
    monkeypatch.setattr(export_onnx, "defer_dequantization", lambda graph: 0)
    monkeypatch.setattr(export_onnx, "lower_int8", lambda model: 0)
    plain = export_onnx_artifacts(model, tmp_path / "plain", tmp_path / "templates", seq_len=64,
                                  graph=GraphOptions(scheme))
    graph = onnx.load(str(plain / TRAIN_GRAPH), load_external_data=False).graph
    early = [n for n in graph.node if n.op_type in ("DequantizeLinear", "Cast") and n.output[0] not in
             _waiting_for_the_batch(graph)]
    assert early  # without the passes, dequantizations are ready at the step's start
    ids, labels = make_batch(256, 3, 40, seed=7)
    deferred, undeferred = OnnxTrainer(out[scheme]), OnnxTrainer(plain)
    loss, grads = deferred.loss_and_grads(ids, labels)
    loss0, grads0 = undeferred.loss_and_grads(ids, labels)
    assert loss == loss0 and all(np.array_equal(grads[k], grads0[k]) for k in grads0)
    assert deferred.eval_loss(ids, labels) == undeferred.eval_loss(ids, labels)


def test_quantized_files_are_smaller(exports):
    _, out = exports
    fp32, int8, int4 = (weight_bytes(out[w]) for w in ("fp32", "int8", "int4"))
    print(f"frozen weight bytes: fp32 {fp32}, int8 {int8} ({int8 / fp32:.2f}x), int4 {int4} ({int4 / fp32:.2f}x)")
    assert int8 < 0.35 * fp32 and int4 < 0.22 * fp32


@pytest.mark.parametrize("scheme", ["int8", "int4", TABLE_SCHEME["int8"]])
def test_quantization_is_exact_and_idempotent(scheme):
    """Quantizing dequantized values gives the same q, scales (and minimums): the export of a server-side
    (fake-quantized) submodel carries the values the server trained on. Every value is within half a step
    (int8: (max - min) / 255, int4: / 15) of its weight; the table's symmetric int8 (max |w| / 127) also loses
    what its float16-rounded scale clips off the block's largest value."""
    w = np.random.default_rng(1).normal(0, 0.05, (48, 96)).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block
    w[4, 32:64] = 0.25  # a constant block
    parts = quantize(w, scheme)
    dq = dequantize(parts, scheme)
    again = quantize(dq, scheme)
    assert parts.keys() == again.keys() and all(np.array_equal(parts[k], again[k]) for k in parts)
    assert np.array_equal(dequantize(again, scheme), dq)
    blocks = w.reshape(48, 3, 32)
    err = np.abs(dq - w).reshape(48, 3, 32).max(-1)
    if scheme == TABLE_SCHEME["int8"]:
        assert (err <= 0.51 * np.abs(blocks).max(-1) / 127 + np.abs(blocks).max(-1) / 2048).all()
    else:  # half a step, to float16's rounding of the scale (and of a minimum that lies above the block's)
        step = (blocks.max(-1) - blocks.min(-1)) / {"int8": 255, "int4": 15}[scheme]
        assert (err <= 0.5 * step * (1 + 2 ** -10) + np.abs(blocks.min(-1)) * 2 ** -11).all()
        assert (dq[4, 32:64] == 0.25).all()
        assert parts["qweight"].dtype == np.uint8 and parts["qweight"].size == w.size // (2 if scheme == "int4" else 1)
    assert (dq[3, :32] == 0).all()


@pytest.mark.parametrize("scheme", ["int8", "int4", TABLE_SCHEME["int8"]])
def test_numpy_and_onnxruntime_dequantize_bit_for_bit(scheme):
    """The server's dequantize() (numpy) and a device's graph (the lowered DequantizeLinear + Add on onnxruntime:
    the codes one block a row, int4's bytes split into the block's halves; the table's traced Cast/Mul lowered
    by lower_int8) give
    the same float32 bits, the simulation's values are the fleet's."""
    import onnxruntime as ort
    import torch
    from onnx import helper

    from export.quant_graph import DOMAIN, lower_int4, lower_int8

    rng = np.random.default_rng(3)
    w = (rng.normal(0, 0.05, (40, 128)) + rng.normal(0, 0.02, (40, 1))).astype(np.float32)
    parts = quantize(w, scheme)
    names = {k: f"t.{k}" for k in parts}
    inits = [onnx.numpy_helper.from_array(parts[k], names[k]) for k in parts]
    const = lambda name, v: onnx.numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    if scheme == TABLE_SCHEME["int8"]:  # as torch traces export.quant._dequantize_torch
        nodes = [helper.make_node("Cast", [names["qweight"]], ["f"], to=onnx.TensorProto.FLOAT),
                 helper.make_node("Reshape", ["f", "blocks"], ["fb"]),
                 helper.make_node("Unsqueeze", [names["qscale"], "axis"], ["s"]),
                 helper.make_node("Mul", ["fb", "s"], ["wb"]), helper.make_node("Reshape", ["wb", "rows"], ["weight"])]
        inits += [const("blocks", [40, 4, 32]), const("axis", [-1]), const("rows", [40, 128])]
    else:
        nodes = [helper.make_node("DequantizeInt4", [names[k] for k in ("qweight", "qscale", "qmin")], ["weight"],
                                  domain=DOMAIN)]
    graph = helper.make_graph(nodes, "dq", [], [helper.make_tensor_value_info("weight", onnx.TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    assert (lower_int8 if scheme == TABLE_SCHEME["int8"] else lower_int4)(model) == 1
    assert {n.domain for n in model.graph.node} == {""} and "Cast" not in {
        n.op_type for n in model.graph.node if n.input[0] == names["qweight"]}
    code_type = next(i.data_type for i in model.graph.initializer if i.name == names["qweight"])
    assert code_type == (onnx.TensorProto.INT8 if scheme == TABLE_SCHEME["int8"] else onnx.TensorProto.UINT8)
    (device,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    server = dequantize(parts, scheme)
    assert device.dtype == np.float32 and device.tobytes() == server.tobytes()
    if scheme != TABLE_SCHEME["int8"]:
        traced = torch.ops.devft.dequantize_int4(*(torch.from_numpy(parts[k]) for k in ("qweight", "qscale", "qmin")))
        assert traced.numpy().tobytes() == server.tobytes()
    assert not np.array_equal(server, w)


@pytest.mark.parametrize("levels", [15, 31])
def test_int8_keeps_a_ggml_q4_1_or_q5_1_grid_exactly(levels):
    """SmolLM2-135M's decoder weights are ggml Q4_1 (16 levels of step d per block, float16 d and m). int8-asym
    keeps such a block's grid (codes 0..15, scale d: no value moves), as it keeps Q5_1's 32 levels, so 8 bits
    never hold a model less exactly than 4 do. A block that misses its grid by one float32 ulp is requantized to
    256 levels, within half a step of every value."""
    rng = np.random.default_rng(4)
    rows, blocks = 64, 6
    d = rng.uniform(1e-3, 2e-2, (rows, blocks)).astype(np.float16)
    m = (-rng.uniform(0.5, 10, (rows, blocks)) * d).astype(np.float16)
    q = rng.integers(0, levels + 1, (rows, blocks, 32))
    q[..., 0], q[..., 1] = 0, levels  # ggml maps each block's minimum to 0 and its maximum to the top level
    w = (q.astype(np.float32) * d.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]).reshape(rows, -1)
    w[5, 7] = np.nextafter(w[5, 7], np.float32(1))  # block (5, 0) off its grid
    parts = quantize(w, "int8")
    codes = parts["qweight"].reshape(rows, blocks, 32)
    on_grid = np.ones((rows, blocks), bool)
    on_grid[5, 0] = False
    assert np.array_equal(parts["qmin"], m)
    assert np.array_equal(parts["qscale"][on_grid], d[on_grid]) and np.array_equal(codes[on_grid], q[on_grid])
    dq = dequantize(parts, "int8")
    assert np.array_equal(dq.reshape(rows, blocks, 32)[on_grid], w.reshape(rows, blocks, 32)[on_grid])
    assert codes[5, 0].max() == 255 and not np.array_equal(dq[5, :32], w[5, :32])
    step = (w[5, :32].max() - w[5, :32].min()) / 255
    assert np.abs(dq[5, :32] - w[5, :32]).max() <= 0.5 * step * (1 + 2 ** -10) + abs(w[5, :32].min()) * 2 ** -11
    assert np.array_equal(quantize(dq, "int8")["qweight"], parts["qweight"])  # idempotent on mixed grids too


def test_int4_reproduces_a_ggml_q4_1_grid_exactly():
    """SmolLM2-135M's packaged decoder weights are ggml Q4_1 (float16 d and m per 32 inputs, w = q * d + m):
    int4 stores them without loss, so an int4 run trains on the fp32 run's decoder weights (the symmetric
    15-level int4 before it requantized that grid and cost 0.65 of eval loss after training)."""
    rng = np.random.default_rng(2)
    rows, blocks = 64, 6
    d = rng.uniform(1e-3, 2e-2, (rows, blocks)).astype(np.float16)
    m = (-rng.uniform(0.5, 10, (rows, blocks)) * d).astype(np.float16)
    q = rng.integers(0, 16, (rows, blocks, 32))
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps each block's minimum to 0 and its maximum to 15
    w = (q.astype(np.float32) * d.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]).reshape(rows, -1)
    parts = quantize(w, "int4")
    assert np.array_equal(parts["qscale"], d) and np.array_equal(parts["qmin"], m)
    assert np.array_equal(dequantize(parts, "int4"), w)


def _rewrite_manifest(directory, **fields) -> None:
    path = directory / MANIFEST_NAME
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("source, claimed, problem", [
    ("int8", "fp32", "quantized"), ("int8", "int4-asym", "does not hold int4-asym"),
    ("int4", "int8-asym", "does not hold int8-asym"), ("fp32", "int8-asym", "no weight file is quantized"),
    ("int8", "int2", "weights must be one of"),
    # the symmetric int4 and int8 formats' names: files of another layout
    ("int4", "int4", "weights must be one of"), ("int8", "int8", "weights must be one of")])
def test_manifest_whose_scheme_does_not_match_its_files_is_refused(exports, tmp_path, source, claimed, problem):
    import shutil

    _, out = exports
    copy_dir = tmp_path / "art"
    shutil.copytree(out[source], copy_dir)
    _rewrite_manifest(copy_dir, weights=claimed)
    with pytest.raises(ManifestError, match=problem):
        load_manifest(copy_dir)
    with pytest.raises(ManifestError, match=problem):
        OnnxTrainer(copy_dir)


def test_server_base_for_a_quantized_run_is_a_dequantized_copy():
    base = tiny_random_model(n_layers=2)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    q = quantized_base(base, "int4")
    assert q.weights_file is None and q.model is not base.model
    assert all((base.model.state_dict()[k] == v).all() for k, v in before.items())  # the caller's base untouched
    changed = [k for k, v in q.model.state_dict().items() if not (v == before[k]).all()]
    assert any("embed_tokens" in k for k in changed) and any("q_proj" in k for k in changed)
    assert not any("norm" in k for k in changed)
    assert quantized_base(base, "fp32") is base
    with pytest.raises(Exception, match="weights"):
        RunConfig(weights="int3").validate()


def test_device_without_the_runs_scheme_is_refused_at_hello(coordinator, fleet, clients):  # noqa: F811
    ex = coordinator
    ex.cfg.weights = "int8"
    declared = runtime_versions()
    assert "int8-asym" in declared["weights"].split(",")  # this runtime's hello declares what it runs
    _only_the_older_is_refused(ex, fleet, clients, {"onnxruntime": "1.20.0"}, declared)  # declares no scheme


@pytest.mark.parametrize("weights, older", [("int4", "fp32,int8,int4"), ("int8", "fp32,int8,int4-asym")])
def test_device_with_the_older_symmetric_format_is_refused_at_hello(coordinator, fleet, clients, weights,  # noqa: F811
                                                                     older):
    """An int4 (int8) run serves int4-asym (int8-asym) files; a runtime whose hello declares only the symmetric
    format before it (`int4`, `int8`) cannot read them and is refused at hello, one that declares the asym is."""
    ex = coordinator
    ex.cfg.weights = weights
    declared = runtime_versions()
    assert WEIGHT_FORMATS[weights] in declared["weights"].split(",") and WEIGHT_FORMATS[weights] not in older
    _only_the_older_is_refused(ex, fleet, clients, {"onnxruntime": "1.31.0", "weights": older}, declared)


def _only_the_older_is_refused(ex, fleet, clients, older: dict, declared: dict) -> None:
    """dev1 says hello as an older runtime (`older`), dev2 as this one (`declared`): only dev1 is refused, at
    hello, for the weights scheme, and only dev2 is served the run's files."""
    for device, info in (("dev1", older), ("dev2", declared)):
        clients(fleet.devices[device]).publish(P.status_topic(RUN, device), P.encode_status(P.StatusMessage(
            device, "hello", time.time(), {"formats": ["onnx"], **info})), wait_s=10)
    wait_for(lambda: {"dev1", "dev2"} <= set(ex.device_status), 10, "both hellos")
    refused = [e for e in events(ex.run_dir) if e["event"] == "rejected"]
    assert [(e["device"], e["reason"], e["message"]) for e in refused] == [("dev1", "weights_scheme", "hello")]
    assert not ex._runs_served(ex.device_status["dev1"]) and ex._runs_served(ex.device_status["dev2"])


def test_quantized_run_trains_and_evaluates_on_dequantized_weights(tiny_base, tiny_cfg, tmp_path):
    """A DEVFT run with weights=int4 (fused stage submodels included) finishes on the dequantized values and
    leaves the caller's base model as it was; its losses are not the fp32 run's."""
    from server_sdk.engine.rounds import run

    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}

    def losses(weights: str) -> list[float]:
        records = run(tiny_cfg(weights=weights), tmp_path / weights, base=tiny_base, progress=False).records
        return [r.eval_loss for r in records if r.eval_loss is not None]

    fp32, int4 = losses("fp32"), losses("int4")
    assert len(int4) == len(fp32) and all(np.isfinite(int4)) and int4 != fp32
    assert all((tiny_base.model.state_dict()[k] == v).all() for k, v in before.items())
    assert json.loads((tmp_path / "int4" / "config.json").read_text())["weights"] == "int4"


def test_a_runtime_before_1_20_declares_fp32_only(exports):
    """Every quantized graph needs opset 21 (blockwise DequantizeLinear), so an older onnxruntime must not declare the
    quantized formats: it is refused at hello in a quantized run instead of failing to load its stage."""
    from edge_runtime.backends import weight_formats

    _, out = exports
    assert {load_manifest(out[w]).versions["min_onnxruntime"] for w in ("int8", "int4")} == {"1.20.0"}
    assert weight_formats("1.19.2") == ["fp32"]
    assert weight_formats("1.20.0") == weight_formats("1.32.0") == list(WEIGHT_FORMATS.values())
    assert runtime_versions()["weights"] == ",".join(weight_formats(runtime_versions()["onnxruntime"]))


def test_fp32_manifest_has_no_weights_field_so_older_runtimes_still_read_it(exports):
    _, out = exports
    assert "weights" not in json.loads((out["fp32"] / MANIFEST_NAME).read_text())
    assert json.loads((out["int8"] / MANIFEST_NAME).read_text())["weights"] == "int8-asym"
    assert load_manifest(out["fp32"]).weights == "fp32"
