"""The portable format: a LoRA training step as a plain ONNX graph, trained by plain onnxruntime.

Parity is against eager torch running the server trainer's loss (answer positions only) on the
same weights and batches: loss, gradients, and ten AdamW steps with the optimiser in numpy.
Numbers are printed (run with -s to see them).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_runtime.backends.onnx_backend import OnnxTrainer, RuntimeTooOld, check_runtime
from edge_runtime.manifest import MANIFEST_NAME, ManifestError, load_manifest
from edge_runtime.optim import AdamW
from export import StageInfo, naming
from export.memory import LM_HEAD_CHUNKS
from export.onnx import (
    CHAIN_PREFIX,
    EVAL_GRAPH,
    TRAIN_GRAPH,
    WEIGHTS_DIR,
    chain_head_slices,
    export_onnx_artifacts,
    template_key,
)
from server_sdk.engine.trainer import token_losses
from tests.export_helpers import ALL_TARGETS, make_batch
from tests.export_helpers import make_peft_model as _make_peft_model

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime.training") is not None,
    reason="this environment has onnxruntime-training, which replaces plain onnxruntime's module")


def make_peft_model(seed: int = 0, **shape) -> torch.nn.Module:
    """LoRA on every projection, lora_B nonzero (so gradients w.r.t. lora_A are too)."""
    return _make_peft_model(seed, targets=ALL_TARGETS, **shape)


def torch_loss_and_grads(peft_model, ids, labels) -> tuple[float, dict[str, np.ndarray]]:
    peft_model.zero_grad()
    for name, p in peft_model.named_parameters():
        p.requires_grad_(naming.is_lora(name))
    loss = token_losses(peft_model, torch.from_numpy(ids), torch.from_numpy(labels))[0].mean()
    loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in peft_model.named_parameters() if naming.is_lora(n)}
    return float(loss.detach()), grads


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_peft_model()
    root = tmp_path_factory.mktemp("onnx")
    out = export_onnx_artifacts(model, root / "stage0", root / "templates",
                                StageInfo(run_id="r", stage=0, groups=[[0], [1]], anchors=[0, 1]), seq_len=64)
    return model, out, root


def test_graph_is_standard_onnx_with_lora_inputs_and_gradient_outputs(exported):
    model, out, _ = exported
    graph = onnx.load(str(out / TRAIN_GRAPH), load_external_data=False)
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)
    manifest = load_manifest(out)
    lora = [t.name for t in manifest.trainable]  # the graph's order, which the manifest records
    assert sorted(naming.to_peft_name(n) for n in lora) == naming.lora_peft_names(model.state_dict())
    assert [i.name for i in graph.graph.input] == ["input_ids", "labels"] + lora
    assert [o.name for o in graph.graph.output] == ["loss"] + ["grad." + n for n in lora]
    # LoRA never baked in; every model weight lives in its own external file (tied embedding once)
    assert not any(naming.is_lora(i.name) for i in graph.graph.initializer)
    external = [i for i in graph.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    locations = [next(e.value for e in i.external_data if e.key == "location") for i in external]
    assert len(set(locations)) == len(locations) and all(loc.startswith(WEIGHTS_DIR + "/") for loc in locations)
    assert sum("lm_head" in loc or "embed_tokens" in loc for loc in locations) == 1
    assert manifest.backend == "onnx" and manifest.versions["min_onnxruntime"]
    assert set(manifest.files) >= {TRAIN_GRAPH, EVAL_GRAPH, "lora.safetensors", *locations}
    eval_graph = onnx.load(str(out / EVAL_GRAPH), load_external_data=False)
    assert [o.name for o in eval_graph.graph.output] == ["loss"]
    assert len(eval_graph.graph.node) < len(graph.graph.node) / 2  # the backward is gone


def test_loss_and_gradients_match_eager_torch(exported):
    model, out, _ = exported
    trainer = OnnxTrainer(out)
    for shape in ((2, 16), (1, 9), (3, 40)):  # dynamic batch and length
        ids, labels = make_batch(256, *shape, seed=shape[1])
        ref_loss, ref_grads = torch_loss_and_grads(model, ids, labels)
        loss, grads = trainer.loss_and_grads(ids, labels)
        assert abs(loss - ref_loss) / abs(ref_loss) < 1e-5, (shape, loss, ref_loss)
        worst = max(np.abs(grads[k] - ref_grads[k]).max() / (np.abs(ref_grads[k]).max() + 1e-12) for k in ref_grads)
        print(f"{shape}: loss rel {abs(loss - ref_loss) / abs(ref_loss):.2e}, grad rel {worst:.2e}")
        assert worst < 1e-4
        assert trainer.eval_loss(ids, labels) == pytest.approx(loss, rel=1e-6)


def test_ten_adamw_steps_track_torch(exported):
    model, out, _ = exported
    model = copy.deepcopy(model)
    trainer = OnnxTrainer(out, lr=1e-2)
    params = [p for n, p in model.named_parameters() if naming.is_lora(n)]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    diffs = []
    for step in range(10):
        ids, labels = make_batch(256, 2, 16, seed=100 + step)
        ref_loss, _ = torch_loss_and_grads(model, ids, labels)
        opt.step()
        diffs.append(abs(trainer.train_step(ids, labels) - ref_loss))
    lora = trainer.get_lora()
    state = model.state_dict()
    worst = max(np.abs(lora[k] - state[k].numpy()).max() for k in lora)
    print(f"10 AdamW steps: max loss diff {max(diffs):.2e}, max LoRA diff {worst:.2e}")
    assert max(diffs) < 1e-4 and worst < 1e-4


def test_numpy_adamw_matches_torch_exactly_on_given_gradients():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((4, 8)).astype(np.float32)
    t = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch.optim.AdamW([t], lr=3e-3, weight_decay=0.01)
    mine = AdamW(3e-3, weight_decay=0.01)
    params = {"w": p0.copy()}
    for _ in range(20):
        g = rng.standard_normal((4, 8)).astype(np.float32)
        t.grad = torch.from_numpy(g.copy())
        opt.step()
        mine.step(params, {"w": g})
    assert np.abs(params["w"] - t.detach().numpy()).max() < 1e-6


def test_frozen_tensors_keep_their_values(exported):
    """FFA-LoRA: only B trains; A stays exactly as received."""
    model, out, _ = exported
    b_only = [n for n in naming.lora_peft_names(model.state_dict()) if "lora_B" in n]
    trainer = OnnxTrainer(out, lr=1e-2, trainable=b_only)
    before = trainer.get_lora()
    ids, labels = make_batch(256)
    trainer.train_step(ids, labels)
    after = trainer.get_lora()
    assert all(np.array_equal(before[k], after[k]) for k in before if "lora_A" in k)
    assert all(not np.array_equal(before[k], after[k]) for k in b_only)


def test_batch_without_targets_is_refused_not_nan(exported):
    _, out, _ = exported
    trainer = OnnxTrainer(out)
    ids, labels = make_batch(256)
    labels[:] = -100
    with pytest.raises(ValueError, match="nothing to learn"):
        trainer.train_step(ids, labels)


def test_cached_template_restamps_new_weights(exported, tmp_path):
    """A second submodel of the same shape reuses the traced graphs; only weight files change."""
    model, out, root = exported
    other = make_peft_model(seed=7)
    assert template_key(other, seq_len=64) == template_key(model, seq_len=64)
    out2 = export_onnx_artifacts(other, tmp_path / "stage1", root / "templates", StageInfo(run_id="r", stage=1),
                                 seq_len=64)
    assert (out2 / TRAIN_GRAPH).read_bytes() == (out / TRAIN_GRAPH).read_bytes()
    manifest = load_manifest(out2)
    assert manifest.stage == 1
    ids, labels = make_batch(256)
    ref_loss, _ = torch_loss_and_grads(other, ids, labels)
    assert OnnxTrainer(out2).loss_and_grads(ids, labels)[0] == pytest.approx(ref_loss, rel=1e-5)
    # frozen tensors equal between the two models (none here) would share files; all differ -> new hashes
    changed = [f for f in manifest.files if f.startswith(WEIGHTS_DIR)
               if manifest.files[f].sha256 != load_manifest(out).files[f].sha256]
    assert changed


def _head_slices(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "Slice" and n.input[0].endswith("lm_head.weight")]


def _unchained(graph: onnx.GraphProto) -> onnx.GraphProto:
    """The graph as templates traced before chain_head_slices were: its nodes and initializer removed."""
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    adds = {n.output[0]: n.input[0] for n in out.node if n.name.startswith(CHAIN_PREFIX) and n.op_type == "Add"}
    kept = [n for n in out.node if not n.name.startswith(CHAIN_PREFIX)]
    for n in kept:
        n.input[:] = [adds.get(x, x) for x in n.input]
    del out.node[:]
    out.node.extend(kept)
    inits = [i for i in out.initializer if not i.name.startswith(CHAIN_PREFIX)]
    del out.initializer[:]
    out.initializer.extend(inits)
    return out


def test_the_head_slices_wait_for_each_other_in_both_graphs(exported):
    """Each vocabulary slice of the LM head starts only after the previous one's last use (a Slice of an
    initializer would otherwise run at the step's start and all LM_HEAD_CHUNKS copies would be held at once)."""
    _, out, _ = exported
    for name in (TRAIN_GRAPH, EVAL_GRAPH):
        graph = onnx.load(str(out / name), load_external_data=False).graph
        slices = _head_slices(graph)
        assert len(slices) == LM_HEAD_CHUNKS, name
        producer = {o: n for n in graph.node for o in n.output}
        for k, s in enumerate(slices[1:], start=1):
            add = producer[s.input[1]]
            assert add.name == f"{CHAIN_PREFIX}{k}_start" and add.op_type == "Add", (name, k)
        assert not chain_head_slices(graph)  # idempotent
        bare = _unchained(graph)
        assert chain_head_slices(bare) and bare == graph


def test_a_template_traced_before_the_chain_publishes_chained_graphs(exported, tmp_path):
    """Cached templates keep working (no retrace): the stage's graphs get the chain when they are published, the
    same bytes as a fresh trace gives."""
    import shutil

    model, out, root = exported
    key = template_key(model, seq_len=64)
    old = tmp_path / "templates" / key
    shutil.copytree(root / "templates" / key, old)
    for name in (TRAIN_GRAPH, EVAL_GRAPH):
        graph = onnx.load(str(old / name), load_external_data=False)
        graph.graph.CopyFrom(_unchained(graph.graph))
        onnx.save(graph, str(old / name))
        assert not _head_slices(graph.graph)[1].input[1].startswith(CHAIN_PREFIX)
    again = export_onnx_artifacts(model, tmp_path / "stage", tmp_path / "templates", StageInfo(run_id="r", stage=0,
                                  groups=[[0], [1]], anchors=[0, 1]), seq_len=64)
    for name in (TRAIN_GRAPH, EVAL_GRAPH):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_tampered_weight_is_refused_before_training(exported, tmp_path):
    import shutil

    _, out, _ = exported
    copy_dir = tmp_path / "copy"
    shutil.copytree(out, copy_dir)
    victim = sorted((copy_dir / WEIGHTS_DIR).iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        OnnxTrainer(copy_dir)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["trainable"] = manifest["trainable"][1:]  # a graph/manifest mismatch
    shutil.rmtree(copy_dir)
    shutil.copytree(out, copy_dir)
    (copy_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises((ValueError, ManifestError)):
        OnnxTrainer(copy_dir)


def test_too_old_runtime_is_named():
    with pytest.raises(RuntimeTooOld, match=r"onnxruntime>=99\.0"):
        check_runtime("99.0.0")


DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from edge_runtime.backends.onnx_backend import OnnxTrainer
    t = OnnxTrainer(sys.argv[1], lr=1e-2)
    ids = np.arange(32, dtype=np.int64).reshape(2, 16) % 256
    print(t.train_step(ids, ids.copy()))
    bad = [m for m in ("torch", "transformers", "peft", "onnxruntime.training") if m in sys.modules]
    assert not bad, bad
""")


def test_device_loop_is_torch_free(exported):
    _, out, _ = exported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert np.isfinite(float(done.stdout.strip().splitlines()[-1]))


def test_device_with_too_old_onnxruntime_refuses_at_startup(monkeypatch):
    """`devft-edge --backend onnx` on onnxruntime 1.16 stops before connecting, naming the version needed."""
    from edge_runtime import backends, client

    monkeypatch.setattr(backends, "runtime_versions", lambda: {"onnxruntime": "1.16.3"})
    assert "onnx" not in backends.available_formats()
    with pytest.raises(client.DeviceError, match=r"onnxruntime 1\.16\.3 is too old .* onnxruntime>=1\.17"):
        client.pick_formats("onnx")


def test_template_from_an_older_manifest_format_is_traced_again(exported, tmp_path):
    """A graph cache written by an older devft must not break (or be trusted by) a newer one."""
    model, out, root = exported
    template = root / "templates" / template_key(model, seq_len=64)
    manifest_path = template / MANIFEST_NAME
    old = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**old, "format_version": 1}))
    again = export_onnx_artifacts(model, tmp_path / "again", root / "templates", seq_len=64)
    assert load_manifest(again).format_version == load_manifest(out).format_version
    assert json.loads(manifest_path.read_text())["format_version"] == old["format_version"]
