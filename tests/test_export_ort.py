"""ORT Training export of a PEFT-LoRA Llama submodel and the torch-free device loop.

Parity is against eager torch on the same weights and batch; numbers are printed
(run with -s to see them).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_runtime.backends.ort_backend import OrtTrainer
from edge_runtime.manifest import (
    MANIFEST_NAME,
    ManifestError,
    load_manifest,
)
from export import StageInfo, naming
from export.ort import export_ort_artifacts, import_trained_lora
from tests.export_helpers import (
    ALL_TARGETS,
    REPO,
    lora_shapes,
    make_batch,
    make_peft_model,
    save_tiny_tokenizer,
    torch_loss_and_grads,
)

pytest.importorskip("onnxruntime.training", reason="legacy ort format: needs onnxruntime-training in its own "
                    "environment (bash scripts/setup_legacy.sh; .venv-legacy/bin/python -m pytest tests/test_export_ort.py)")

def hf_adamw_step(p, g, m, v, t, lr, beta1=0.9, beta2=0.999, eps=1e-6):
    """Hugging Face AdamW (ORT adam_mode=1): eps added to sqrt(v), bias correction folded into the step."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
    p.sub_(step_size * m / (v.sqrt() + eps))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    peft_model = make_peft_model()
    tokenizer_dir = save_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")
    out = export_ort_artifacts(
        peft_model,
        tmp_path_factory.mktemp("tiny") / "stage1",
        StageInfo(run_id="run-test", stage=1, groups=[[0], [1]], anchors=[0, 1], tokenizer_dir=tokenizer_dir),
        seq_len=64,
    )
    return peft_model, out


# --- manifest of real artifacts ------------------------------------------------------------------


def test_manifest_describes_artifacts(tiny):
    peft_model, out = tiny
    m = load_manifest(out, expected_trainable=lora_shapes(peft_model))
    assert (m.format_version, m.backend, m.run_id, m.stage) == (2, "ort", "run-test", 1)
    assert m.groups == [[0], [1]] and m.anchors == [0, 1]
    assert m.tokenizer_file == "tokenizer.json" and m.chat_template.startswith("{% for m in messages %}")
    assert {t.peft_name for t in m.trainable} == set(lora_shapes(peft_model))
    assert all(naming.to_artifact_name(t.peft_name) == t.name and t.dtype == "float32" for t in m.trainable)
    assert set(m.files) == {
        "training_model.onnx",
        "eval_model.onnx",
        "optimizer_model.onnx",
        "checkpoint",
        "tokenizer.json",
    }
    assert [(i.name, i.shape) for i in m.inputs] == [("input_ids", ("batch", "seq")), ("labels", ("batch", "seq"))]
    assert m.model_config["num_hidden_layers"] == 2 and m.versions["opset"] == 18
    assert onnx.load(str(out / "optimizer_model.onnx")).ir_version <= 10
    assert peft_model.get_base_model().config._attn_implementation == "sdpa"  # restored after export


def _copy(out: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(out, tmp_path / "copy"))


def test_tampered_byte_is_rejected(tiny, tmp_path):
    d = _copy(tiny[1], tmp_path)
    raw = bytearray((d / "eval_model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / "eval_model.onnx").write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"eval_model.onnx has sha256 .* fetch it again"):
        load_manifest(d)


def test_wrong_format_version_is_rejected(tiny, tmp_path):
    d = _copy(tiny[1], tmp_path)
    raw = json.loads((d / MANIFEST_NAME).read_text())
    raw["format_version"] = 2
    (d / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"format_version 2.*devft export"):
        load_manifest(d)


def test_missing_file_and_size_mismatch_are_rejected(tiny, tmp_path):
    d = _copy(tiny[1], tmp_path)
    with open(d / "training_model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"training_model.onnx has \d+ bytes"):
        load_manifest(d)
    (d / "checkpoint").unlink()
    with pytest.raises(ManifestError, match=r"checkpoint is listed in the manifest but missing"):
        load_manifest(d, verify_hashes=False)


def test_trainable_mismatch_is_rejected(tiny):
    peft_model, out = tiny
    shapes = lora_shapes(peft_model)
    first = next(iter(shapes))
    with pytest.raises(ManifestError, match="missing .*extra.lora_A"):
        load_manifest(out, expected_trainable={**shapes, "extra.lora_A.weight": (4, 64)})
    with pytest.raises(ManifestError, match="mismatched"):
        load_manifest(out, expected_trainable={**shapes, first: (1, 1)})


# --- what trains -------------------------------------------------------------------------------


def test_only_lora_trainable_and_frozen_weights_unchanged(tiny):
    peft_model, out = tiny
    trainer = OrtTrainer(out, lr=1e-2)
    params = dict(trainer.state.parameters)
    trainable = {naming.to_peft_name(n) for n, p in params.items() if p.requires_grad}
    assert trainable == set(lora_shapes(peft_model))
    frozen_before = {n: p.data.copy() for n, p in params.items() if not p.requires_grad}
    state = {**peft_model.state_dict(), **dict(peft_model.named_buffers())}  # inv_freq is not persistent
    for n, value in frozen_before.items():  # the checkpoint holds the model's own weights
        np.testing.assert_array_equal(value, state[naming.to_peft_name(n)].numpy())
    lora_before = trainer.get_lora()
    ids, labels = make_batch(256)
    for _ in range(10):
        trainer.train_step(ids, labels)
    for n, p in trainer.state.parameters:
        if not p.requires_grad:
            assert np.array_equal(p.data, frozen_before[n]), n
    assert all(not np.array_equal(v, lora_before[k]) for k, v in trainer.get_lora().items())


# --- parity with eager torch --------------------------------------------------------------------


def test_first_step_loss_and_grads_match_torch(tiny):
    peft_model, out = tiny
    ids, labels = make_batch(256)
    trainer = OrtTrainer(out)
    ort_loss, ort_grads = trainer.loss_and_grads(ids, labels)
    ref_loss, ref_grads = torch_loss_and_grads(copy.deepcopy(peft_model), ids, labels)
    assert abs(trainer.eval_loss(ids, ids) - ort_loss) > 1e-3  # the -100 labels do change the loss
    rel = abs(ort_loss - ref_loss) / abs(ref_loss)
    worst = max(np.abs(ort_grads[k] - ref_grads[k]).max() for k in ref_grads)
    scale = max(np.abs(g).max() for g in ref_grads.values())
    print(
        f"\ntiny: loss ort {ort_loss:.7f} torch {ref_loss:.7f} rel {rel:.2e}; grad max abs diff {worst:.2e} "
        f"(max |grad| {scale:.2e})"
    )
    assert rel < 1e-5
    assert worst < 1e-6 and scale > 1e-4
    assert all(np.abs(ref_grads[k]).max() > 0 for k in ref_grads if "lora_A" in k)


def test_ten_adamw_steps_match_torch(tiny):
    peft_model, out = tiny
    lr = 1e-3
    ids, labels = make_batch(256)
    trainer = OrtTrainer(out, lr=lr)
    ort_losses = [trainer.train_step(ids, labels) for _ in range(10)]

    ref = copy.deepcopy(peft_model)
    lora = {n: p for n, p in ref.named_parameters() if naming.is_lora(n)}
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in lora.items()}
    ref_losses = []
    for t in range(1, 11):
        loss, grads = torch_loss_and_grads(ref, ids, labels)
        ref_losses.append(loss)
        with torch.no_grad():
            for n, p in lora.items():
                hf_adamw_step(p, torch.from_numpy(grads[n]), *moments[n], t, lr)
    trained = trainer.get_lora()
    worst = max(np.abs(trained[n] - p.detach().numpy()).max() for n, p in lora.items())
    loss_diff = max(abs(a - b) for a, b in zip(ort_losses, ref_losses))
    print(
        f"\n10 AdamW steps: LoRA max abs diff {worst:.2e}; loss max abs diff {loss_diff:.2e}; "
        f"loss {ort_losses[0]:.4f} -> {ort_losses[-1]:.4f}"
    )
    assert worst < 1e-5
    assert loss_diff < 1e-5 * abs(ref_losses[0])
    assert ort_losses[-1] < ort_losses[0]


def test_trained_lora_imported_into_peft_reproduces_ort_logits(tiny):
    peft_model, out = tiny
    ids, labels = make_batch(256)
    trainer = OrtTrainer(out, lr=1e-2)
    for _ in range(3):
        trainer.train_step(ids, labels)
    ort_loss, ort_logits = trainer.evaluate(ids, labels)

    model = copy.deepcopy(peft_model)
    import_trained_lora(model, trainer.get_lora())
    with torch.no_grad():
        result = model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels))
    ref_logits = result.logits[:, :-1].numpy()
    diff = np.abs(ort_logits - ref_logits).max()
    print(f"\nimport back: logits max abs diff {diff:.2e}; loss ort {ort_loss:.7f} torch {result.loss.item():.7f}")
    assert ort_logits.shape == ref_logits.shape
    assert diff < 1e-4
    assert abs(ort_loss - result.loss.item()) < 1e-5 * abs(ort_loss)


def test_dynamic_batch_and_sequence_length(tiny):
    peft_model, out = tiny
    trainer = OrtTrainer(out)
    ids, labels = make_batch(256, batch=3, seq=9, seed=5)
    loss, logits = trainer.evaluate(ids, labels)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss.item()
    assert logits.shape == (3, 8, 256)
    assert abs(loss - ref) < 1e-5 * ref
    assert np.isfinite(trainer.train_step(*make_batch(256, batch=1, seq=64)))
    with pytest.raises(ValueError, match="outside"):
        trainer.train_step(*make_batch(256, batch=1, seq=65))


def test_import_rejects_partial_or_foreign_lora(tiny):
    peft_model, out = tiny
    lora = OrtTrainer(out).get_lora()
    model = copy.deepcopy(peft_model)
    dropped = dict(list(lora.items())[1:])
    with pytest.raises(ValueError, match="missing"):
        import_trained_lora(model, dropped)
    with pytest.raises(ValueError, match="unknown"):
        import_trained_lora(model, {**lora, "base_model.model.lm_head.lora_A.default.weight": np.zeros((4, 64))})


def test_set_lora_round_trip_and_rejections(tiny):
    _, out = tiny
    trainer = OrtTrainer(out)
    lora = {k: v + 0.5 for k, v in trainer.get_lora().items()}
    trainer.set_lora(lora)
    assert all(np.array_equal(trainer.get_lora()[k], v) for k, v in lora.items())
    name = next(iter(lora))
    with pytest.raises(ValueError, match="unknown"):
        trainer.set_lora({**lora, "nope.lora_A.weight": lora[name]})
    with pytest.raises(ValueError, match="expected ndarray"):
        trainer.set_lora({**lora, name: lora[name].T.copy()})
    with pytest.raises(ValueError, match="float32"):
        trainer.set_lora({**lora, name: lora[name].astype(np.float64)})
    with pytest.raises(ValueError, match="int64"):
        trainer.train_step(*(a.astype(np.int32) for a in make_batch(256)))
    ids, _ = make_batch(256)
    with pytest.raises(ValueError, match="every target label is -100"):
        trainer.train_step(ids, np.full_like(ids, -100))


def test_sgd_optimizer(tmp_path):
    peft_model = make_peft_model(seed=3, targets=("q_proj", "up_proj"), num_hidden_layers=1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        export_ort_artifacts(peft_model, tmp_path / "adam", optimizer="adam")
    out = export_ort_artifacts(peft_model, tmp_path / "sgd", optimizer="sgd", seq_len=32)
    ids, labels = make_batch(256, seq=12)
    trainer = OrtTrainer(out, lr=0.1)
    before = trainer.get_lora()
    _, grads = torch_loss_and_grads(copy.deepcopy(peft_model), ids, labels)
    trainer.train_step(ids, labels)
    after = trainer.get_lora()
    worst = max(np.abs(after[k] - (before[k] - 0.1 * grads[k])).max() for k in grads)
    assert load_manifest(out).optimizer == "sgd"
    assert worst < 1e-6


# --- the device loop without torch ---------------------------------------------------------------

DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from edge_runtime.backends.ort_backend import OrtTrainer

    trainer = OrtTrainer(sys.argv[1], lr=1e-2, threads=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(2, 16), dtype=np.int64)
    labels = ids.copy()
    labels[:, :4] = -100
    losses = [trainer.train_step(ids, labels) for _ in range(10)]
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft", "onnxscript"})
    print(json.dumps({"losses": losses, "heavy": heavy}))
""")


def _run_device(artifacts: Path, tmp_path: Path, block_torch: bool) -> dict:
    paths = [str(REPO)]
    if block_torch:  # the shadowing packages make `import torch` (and friends) fail as on a device
        for pkg in ("torch", "transformers", "peft"):
            (tmp_path / "blocked" / pkg).mkdir(parents=True)
            (tmp_path / "blocked" / pkg / "__init__.py").write_text(f"raise ImportError('no {pkg} on the device')\n")
        paths.insert(0, str(tmp_path / "blocked"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run(
        [sys.executable, "-c", DEVICE_SCRIPT, str(artifacts)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_device_training_loop_runs_where_torch_cannot_be_imported(tiny, tmp_path):
    result = _run_device(tiny[1], tmp_path, block_torch=True)
    losses = result["losses"]
    assert losses[-1] < losses[0] - 1e-3, losses


def test_device_training_loop_does_not_import_torch_even_if_installed(tiny, tmp_path):
    result = _run_device(tiny[1], tmp_path, block_torch=False)
    assert result["heavy"] == []


# --- SmolLM2-135M shapes ---------------------------------------------------------------------------

SMOLLM2_SLICE = dict(
    hidden_size=576,
    num_hidden_layers=2,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    head_dim=64,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)


def test_smollm2_shaped_slice_first_step_parity(tmp_path):
    peft_model = make_peft_model(seed=7, targets=ALL_TARGETS, **SMOLLM2_SLICE)
    out = export_ort_artifacts(peft_model, tmp_path / "smol", seq_len=64)
    ids, labels = make_batch(49152, seq=32)
    ort_loss, ort_grads = OrtTrainer(out).loss_and_grads(ids, labels)
    ref_loss, ref_grads = torch_loss_and_grads(peft_model, ids, labels)
    rel = abs(ort_loss - ref_loss) / abs(ref_loss)
    worst = max(np.abs(ort_grads[k] - ref_grads[k]).max() for k in ref_grads)
    scale = max(np.abs(g).max() for g in ref_grads.values())
    print(
        f"\nSmolLM2 slice: loss ort {ort_loss:.7f} torch {ref_loss:.7f} rel {rel:.2e}; "
        f"grad max abs diff {worst:.2e} (max |grad| {scale:.2e})"
    )
    assert len(ort_grads) == 2 * 7 * 2
    assert rel < 1e-5
    assert worst < 1e-6
