"""`devft export` and export_stage on a tiny simulated run: the right stage, plan and LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.manifest import load_manifest
from server_sdk.cli.export import ExportError, export_stage
from server_sdk.cli.main import main
from server_sdk.engine import checkpoint
from server_sdk.method.lora import to_peft_key


def _artifact_lora(out) -> dict[str, np.ndarray]:
    from edge_runtime.backends.onnx_backend import OnnxTrainer

    return OnnxTrainer(out, threads=1).get_lora()


def _same(canonical: dict, artifact: dict) -> float:
    assert set(artifact) == {to_peft_key(k) for k in canonical}
    return max(float(np.abs(artifact[to_peft_key(k)] - v.numpy()).max()) for k, v in canonical.items())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cfg):
    """A finished 2-stage run on tiny-random-L4 and one stopped inside stage 0."""
    from server_sdk.engine.rounds import run

    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_cfg(model="tiny-random-L4", stages=[2, 4], rounds_per_stage=2, num_clients=2, local_steps=1)
    run(cfg, root / "done", progress=False)
    run(cfg, root / "cut", progress=False, stop_after_rounds=1)
    return root


def test_stage_in_progress_uses_its_plan_and_starting_lora(runs, tmp_path):
    meta, tensors = checkpoint.load(runs / "cut")
    assert (meta["stage"], meta["next_round"]) == (0, 1)
    out = export_stage(runs / "cut", 0, "onnx", tmp_path / "s0", seq_len=32)
    m = load_manifest(out)
    assert (m.backend, m.stage, m.run_id, m.seq_len) == ("onnx", 0, "cut", 32)
    assert m.groups == meta["plan"]["groups"] and m.anchors == meta["plan"]["anchors"] and len(m.groups) == 2
    assert m.tokenizer_file == "tokenizer.json"
    # the submodel's LoRA is the stage's fused starting LoRA, not the round's aggregate
    assert _same(tensors["initial"], _artifact_lora(out)) < 1e-7


def test_finished_run_exports_last_stage_with_final_lora(runs, tmp_path):
    meta, tensors = checkpoint.load(runs / "done")
    report = json.loads((runs / "done" / "report.json").read_text())
    out = export_stage(runs / "done", 1, "onnx", tmp_path / "last", final=True, seq_len=32)
    m = load_manifest(out)
    assert m.groups == [[0], [1], [2], [3]] == report["stage_plans"][1]["groups"]
    assert _same(tensors["full"], _artifact_lora(out)) < 1e-7


def test_every_stage_of_a_finished_run_exports_with_its_starting_lora(runs, tmp_path):
    from server_sdk.config import RunConfig
    from server_sdk.method.submodel import StagePlan, fuse_lora

    cfg = RunConfig.from_file(runs / "done" / "config.json")
    report = json.loads((runs / "done" / "report.json").read_text())
    for stage in (0, 1):
        plan, full = checkpoint.load_stage_start(runs / "done", stage)
        assert plan["groups"] == report["stage_plans"][stage]["groups"]
        out = export_stage(runs / "done", stage, "onnx", tmp_path / f"s{stage}", seq_len=32)
        assert load_manifest(out).groups == plan["groups"]
        want = fuse_lora(full, StagePlan(**plan), cfg.beta, cfg.fusion)
        assert _same(want, _artifact_lora(out)) < 1e-7


def _without_stage_records(runs, tmp_path):
    import shutil

    copy = tmp_path / "done-old"
    shutil.copytree(runs / "done", copy)
    shutil.rmtree(copy / "stages")  # a run made before stage starts were kept
    return copy


def test_stage_whose_starting_lora_is_gone_is_refused(runs, tmp_path):
    old = _without_stage_records(runs, tmp_path)
    with pytest.raises(ExportError, match="stage 0 is not kept.*--stage 1"):
        export_stage(old, 0, "onnx", tmp_path / "x")
    with pytest.raises(ExportError, match="--final exports the last stage"):
        export_stage(runs / "done", 0, "onnx", tmp_path / "x", final=True)
    with pytest.raises(ExportError, match="stages 0..1"):
        export_stage(runs / "done", 2, "onnx", tmp_path / "x")
    with pytest.raises(ExportError, match="not a devft run directory"):
        export_stage(tmp_path, 0, "onnx", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_export_and_error_exit(runs, tmp_path, capsys):
    assert main(["export", "--run", str(runs / "cut"), "--stage", "0", "--out",
                 str(tmp_path / "cli"), "--seq-len", "32", "--optimizer", "sgd"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["backend"] == "onnx" and summary["layers"] == 2 and "train.onnx" in summary["files"]
    assert load_manifest(tmp_path / "cli").optimizer == "sgd"
    old = _without_stage_records(runs, tmp_path)
    assert main(["export", "--run", str(old), "--stage", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "not kept" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_executorch_backend_from_base_model(tmp_path, capsys):
    pytest.importorskip("executorch", reason="executorch is not installed")
    assert main(["export", "--model", "tiny-random-L4", "--layers", "2", "--backend", "executorch", "--out",
                 str(tmp_path / "et"), "--seq-len", "16", "--max-batch", "1"]) == 0
    m = load_manifest(tmp_path / "et")
    assert m.backend == "executorch" and len(m.groups) == 2 and set(m.files) >= {"model.pte", "lora.ptd"}


@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_submodel_over_the_size_limit_fails_before_export(backend, tmp_path, monkeypatch):
    from tests.export_helpers import make_peft_model

    if backend == "ort":
        from export import ort as module

        limit, export = "MAX_PROTO_BYTES", module.export_ort_artifacts
    else:
        module = pytest.importorskip("export.executorch", reason="executorch is not installed")
        limit, export = "MAX_PTE_BYTES", module.export_executorch_artifacts
    monkeypatch.setattr(module, limit, 1000)
    with pytest.raises(ValueError, match="GiB of weights"):
        export(make_peft_model(num_hidden_layers=1), tmp_path / "big")
    assert not (tmp_path / "big").exists()
