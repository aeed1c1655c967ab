"""Stage graphs traced ahead of need (server_sdk/engine/warm.py): the shapes it traces are the real
stages' shapes, the background process fills the template cache, and a stage start then
only restamps weights."""

from __future__ import annotations

import threading

import pytest

from export import onnx as ox
from server_sdk.config import LoraSettings
from server_sdk.disk import cleanable
from server_sdk.engine.warm import TemplateWarmer, shaped_submodel

LORA = LoraSettings(r=2, alpha=4)


def _stage_submodel(tiny_base, tiny_cfg, stage: int, n_layers: int):
    from server_sdk.method.lora import attach_lora, read_lora
    from server_sdk.method.strategies import make_strategy
    from server_sdk.method.submodel import share_model

    cfg = tiny_cfg(lora=LORA)
    strategy = make_strategy(cfg)
    full_lora = read_lora(attach_lora(share_model(tiny_base.model), cfg.lora, seed=0))
    plan, _ = strategy.configure_stage(stage, tiny_base.model, full_lora, n_layers)
    return strategy.build_submodel(tiny_base.model, full_lora, plan)[0]


@pytest.mark.parametrize("n_layers", [2, 6])  # a fused stage and the full model's
def test_the_traced_shape_is_the_real_stage_submodels(tiny_base, tiny_cfg, n_layers):
    real = _stage_submodel(tiny_base, tiny_cfg, 0, n_layers)
    shaped = shaped_submodel(tiny_base.model.config.to_dict(), n_layers, LORA)
    assert ox.template_key(shaped, seq_len=64) == ox.template_key(real, seq_len=64)
    assert ox.template_key(shaped, seq_len=64) != ox.template_key(shaped, seq_len=32)


def test_the_warm_up_process_fills_the_cache_and_stages_then_only_restamp(tiny_base, tiny_cfg, tmp_path,
                                                                          monkeypatch):
    warmer = TemplateWarmer(tiny_base.model.config.to_dict(), [2, 4], LORA, 64, tmp_path).start()
    warmer.process.join(300)
    assert warmer.process.exitcode == 0
    assert len([d for d in (tmp_path / "onnx-templates").iterdir() if d.is_dir()]) == 2
    # `devft clean --all` frees the folder the tracer really filled (issue 26: it named ort-templates and left
    # the portable format's onnx-templates, 1.3 GB after a SmolLM2 quickstart, behind)
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path))
    assert ("onnx export templates", tmp_path / "onnx-templates") in cleanable([], include_caches=True)

    def no_trace(*args, **kwargs):
        raise AssertionError("traced although the warm-up process had cached this shape")

    monkeypatch.setattr(ox, "export_template", no_trace)
    sub = _stage_submodel(tiny_base, tiny_cfg, 0, 2)
    out = ox.export_onnx_artifacts(sub, tmp_path / "stage0", tmp_path / "onnx-templates", seq_len=64)
    # the graph traced from zero weights computes this submodel: loss and gradients as eager torch's
    from edge_runtime.backends.onnx_backend import OnnxTrainer
    from tests.export_helpers import make_batch, torch_loss_and_grads

    ids, labels = make_batch(tiny_base.model.config.vocab_size, 2, 16)
    ref_loss, ref_grads = torch_loss_and_grads(sub, ids, labels)
    loss, grads = OnnxTrainer(out).loss_and_grads(ids, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert max(abs(grads[k] - ref_grads[k]).max() / (abs(ref_grads[k]).max() + 1e-12) for k in ref_grads) < 1e-4


def test_concurrent_callers_trace_a_shape_once(tiny_base, tmp_path, monkeypatch):
    traced = []
    real = ox.export_template

    def counting(*args, **kwargs):
        traced.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ox, "export_template", counting)
    config = tiny_base.model.config.to_dict()
    threads = [threading.Thread(target=ox.ensure_template, args=(shaped_submodel(config, 2, LORA), tmp_path),
                                kwargs={"seq_len": 64}) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert traced == [1]
