"""`--model PATH`: a local Hugging Face directory (a LlamaForCausalLM with tied embeddings, saved with
save_pretrained) goes through `devft export` with int4 frozen weights, a step on plain onnxruntime, and a
simulated `devft run`, the way a real model of SmolLM2-1.7B's size would be loaded (issue 24)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from edge_runtime.bench import load_trainer, random_batch
from edge_runtime.manifest import load_manifest
from server_sdk.cli.main import main
from server_sdk.engine.model import tiny_random_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime.training") is not None,
    reason="this environment has onnxruntime-training, which replaces plain onnxruntime's module")

RUN = ["-o", "stages=[2, 4]", "-o", "rounds_per_stage=1", "-o", "schedule=fixed", "-o", "num_clients=2",
       "-o", "local_steps=1", "-o", "batch_size=2", "-o", "seq_len=64", "-o", "lora.r=2", "-o", "weights=int4",
       "-o", "data.examples_per_client=4", "-o", "data.eval_examples_per_task=1", "-o", "accuracy_every=never"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tiny_random_model(n_layers=4, hidden=64, seed=1)
    assert base.model.config.tie_word_embeddings
    assert base.model.lm_head.weight is base.model.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    base.model.save_pretrained(path)
    base.tokenizer.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    return path


def test_export_of_a_model_directory_with_int4_weights_trains_on_onnxruntime(model_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["export", "--model", str(model_dir), "--layers", "2", "--weights", "int4", "--out", str(out),
                 "--seq-len", "32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == 2 and summary["source"].startswith("fresh 2-layer first-stage submodel")
    m = load_manifest(out)
    assert m.weights == "int4-asym" and m.model_config["num_hidden_layers"] == 2
    assert sorted(i for g in m.groups for i in g) == [0, 1, 2, 3]  # the 4 layers fused into 2
    # the tied embedding / LM head is stored once, quantized (int8 under int4: export/quant.py), no float copy
    cfg = m.model_config
    tied = [f for f in m.files if f.startswith("weights/") and ("embed_tokens" in f or "lm_head" in f)]
    assert sorted(f.rsplit(".", 2)[-2] for f in tied) == ["qscale", "qweight"], tied
    qweight = next(f for f in tied if f.endswith(".qweight.bin"))
    assert m.files[qweight].size == cfg["vocab_size"] * cfg["hidden_size"]
    trainer = load_trainer("onnx", out, lr=1e-2, threads=1)
    before = {k: v.copy() for k, v in trainer.get_lora().items()}
    ids, labels = random_batch(int(m.model_config["vocab_size"]), 2, 32)
    losses = [trainer.train_step(ids, labels) for _ in range(2)]
    assert np.isfinite(losses).all() and losses[1] < losses[0]
    after = trainer.get_lora()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    # --recompute: the same submodel, a graph that recomputes its layers' activations, the same steps bit for bit
    assert main(["export", "--model", str(model_dir), "--layers", "2", "--weights", "int4", "--recompute", "--out",
                 str(tmp_path / "q4rc"), "--seq-len", "32"]) == 0
    capsys.readouterr()
    assert load_manifest(tmp_path / "q4rc").activations == "recompute"
    again = load_trainer("onnx", tmp_path / "q4rc", lr=1e-2, threads=1)
    assert [again.train_step(ids, labels) for _ in range(2)] == losses


def test_simulated_run_on_a_model_directory_writes_an_adapter_for_it(model_dir, tmp_path, capsys):
    from peft import PeftModel

    from server_sdk.engine.model import load_base_model

    assert main(["run", "--model", str(model_dir), *RUN, "--name", "r", "--runs-dir", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["config"]["model"] == str(model_dir) and report["model"]["n_layers"] == 4
    assert report["stages"] == [2, 4] and [p["n_layers"] for p in report["stage_plans"]] == [2, 4]
    assert np.isfinite(report["after"]["eval_loss"]) and report["after"]["eval_loss"] != report["before"]["eval_loss"]
    adapted = PeftModel.from_pretrained(load_base_model(str(model_dir)).model, tmp_path / "r" / "adapter")
    assert adapted.peft_config["default"].r == 2
