"""ExecuTorch export of a PEFT-LoRA Llama submodel and the device trainer over it.

Parity is against eager torch on the same weights and batch, as in test_export_ort.py;
one export (the slow part, about a minute on 2 cores) serves the whole file.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="executorch is not installed: pip install executorch==1.5.1 (see pyproject extras)")

from edge_runtime.backends.executorch_backend import ExecuTorchTrainer  # noqa: E402
from edge_runtime.manifest import load_manifest  # noqa: E402
from export import StageInfo  # noqa: E402
from export.executorch import export_executorch_artifacts, import_trained_lora  # noqa: E402
from tests.export_helpers import (  # noqa: E402
    REPO,
    lora_shapes,
    make_batch,
    make_peft_model,
    save_tiny_tokenizer,
    torch_loss_and_grads,
)

TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    peft_model = make_peft_model(targets=TARGETS)
    tokenizer_dir = save_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")
    out = export_executorch_artifacts(
        peft_model,
        tmp_path_factory.mktemp("tiny") / "stage1",
        StageInfo(run_id="run-test", stage=1, groups=[[0], [1]], anchors=[0, 1], tokenizer_dir=tokenizer_dir),
        seq_len=64,
        max_batch=4,
    )
    return peft_model, out


def test_manifest_describes_artifacts(tiny):
    peft_model, out = tiny
    m = load_manifest(out, expected_trainable=lora_shapes(peft_model))
    assert (m.backend, m.run_id, m.stage, m.optimizer) == ("executorch", "run-test", 1, "sgd")
    assert set(m.files) == {"model.pte", "lora.ptd", "tokenizer.json"}
    assert m.chat_template.startswith("{% for m in messages %}") and m.groups == [[0], [1]]
    assert [t.peft_name for t in m.trainable] == sorted(lora_shapes(peft_model))
    assert m.versions["runtime"].startswith("executorch==") and m.versions["max_batch"] == 4
    assert peft_model.get_base_model().config._attn_implementation == "sdpa"  # restored after export


def test_first_step_loss_and_grads_match_torch(tiny):
    peft_model, out = tiny
    ids, labels = make_batch(256)
    et_loss, et_grads = ExecuTorchTrainer(out).loss_and_grads(ids, labels)
    ref_loss, ref_grads = torch_loss_and_grads(copy.deepcopy(peft_model), ids, labels)
    rel = abs(et_loss - ref_loss) / abs(ref_loss)
    worst = max(np.abs(et_grads[k] - ref_grads[k]).max() for k in ref_grads)
    scale = max(np.abs(g).max() for g in ref_grads.values())
    print(f"\nexecutorch: loss rel diff {rel:.2e}; grad max abs diff {worst:.2e} (max |grad| {scale:.2e})")
    assert set(et_grads) == set(ref_grads)  # LoRA-only gradients
    assert rel < 1e-5
    assert worst < 1e-6 and scale > 1e-4


def test_ten_sgd_steps_match_torch(tiny):
    peft_model, out = tiny
    lr = 0.05
    ids, labels = make_batch(256)
    trainer = ExecuTorchTrainer(out, lr=lr)
    et_losses = [trainer.train_step(ids, labels) for _ in range(10)]

    ref = copy.deepcopy(peft_model)
    lora = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    opt = torch.optim.SGD(list(lora.values()), lr=lr)
    ref_losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = ref(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    trained = trainer.get_lora()
    worst = max(np.abs(trained[n] - p.detach().numpy()).max() for n, p in lora.items())
    loss_diff = max(abs(a - b) for a, b in zip(et_losses, ref_losses))
    print(f"\n10 SGD steps: LoRA max abs diff {worst:.2e}; loss max abs diff {loss_diff:.2e}")
    assert worst < 1e-5
    assert loss_diff < 1e-5 * abs(ref_losses[0])
    assert et_losses[-1] < et_losses[0]


def test_trained_lora_imported_into_peft_reproduces_eval_logits(tiny):
    peft_model, out = tiny
    ids, labels = make_batch(256)
    trainer = ExecuTorchTrainer(out, lr=0.1)
    for _ in range(3):
        trainer.train_step(ids, labels)
    et_loss, et_logits = trainer.evaluate(ids, labels)

    model = copy.deepcopy(peft_model)
    import_trained_lora(model, trainer.get_lora())
    with torch.no_grad():
        result = model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels))
    ref_logits = result.logits[:, :-1].numpy()
    diff = np.abs(et_logits - ref_logits).max()
    print(f"\nimport back: logits max abs diff {diff:.2e}")
    assert et_logits.shape == ref_logits.shape
    assert diff < 1e-4
    assert abs(et_loss - result.loss.item()) < 1e-5 * abs(et_loss)


def test_frozen_weights_unchanged_by_training(tiny):
    """Training moves only the LoRA tensors: restoring them restores the eval output exactly."""
    peft_model, out = tiny
    ids, labels = make_batch(256)
    trainer = ExecuTorchTrainer(out, lr=0.1)
    assert set(trainer._params) == {f"model.{n}" for n in lora_shapes(peft_model)}
    initial = trainer.get_lora()
    loss0, logits0 = trainer.evaluate(ids, labels)
    for _ in range(5):
        trainer.train_step(ids, labels)
    assert trainer.eval_loss(ids, labels) < loss0
    trainer.set_lora(initial)
    loss1, logits1 = trainer.evaluate(ids, labels)
    assert loss1 == loss0 and np.array_equal(logits1, logits0)
    load_manifest(out)  # and the artifact files on disk are as exported


def test_dynamic_batch_and_sequence_length(tiny):
    peft_model, out = tiny
    trainer = ExecuTorchTrainer(out)
    ids, labels = make_batch(256, batch=3, seq=9, seed=5)
    loss, logits = trainer.evaluate(ids, labels)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss.item()
    assert logits.shape == (3, 8, 256)
    assert abs(loss - ref) < 1e-5 * ref
    assert np.isfinite(trainer.train_step(*make_batch(256, batch=1, seq=64)))
    with pytest.raises(ValueError, match="outside"):
        trainer.train_step(*make_batch(256, batch=1, seq=65))
    with pytest.raises(ValueError, match="batch size 5"):
        trainer.train_step(*make_batch(256, batch=5, seq=8))


def test_set_lora_set_lr_and_rejections(tiny):
    _, out = tiny
    trainer = ExecuTorchTrainer(out, lr=0.0)
    lora = {k: v + 0.5 for k, v in trainer.get_lora().items()}
    trainer.set_lora(lora)
    assert all(np.array_equal(trainer.get_lora()[k], v) for k, v in lora.items())
    ids, labels = make_batch(256)
    trainer.train_step(ids, labels)  # lr 0: nothing moves
    assert all(np.array_equal(trainer.get_lora()[k], v) for k, v in lora.items())
    trainer.set_lr(0.1)
    _, grads = trainer.loss_and_grads(ids, labels)
    trainer.train_step(ids, labels)
    assert trainer.lr == 0.1
    assert max(np.abs(trainer.get_lora()[k] - (lora[k] - 0.1 * grads[k])).max() for k in lora) < 1e-6
    name = next(iter(lora))
    with pytest.raises(ValueError, match="unknown"):
        trainer.set_lora({**lora, "nope.lora_A.weight": lora[name]})
    with pytest.raises(ValueError, match="float32"):
        trainer.set_lora({**lora, name: lora[name].astype(np.float64)})
    with pytest.raises(ValueError, match="int64"):
        trainer.train_step(*(a.astype(np.int32) for a in make_batch(256)))
    with pytest.raises(ValueError, match="every target label is -100"):
        trainer.train_step(ids, np.full_like(ids, -100))


def test_backend_module_imports_without_torch(tmp_path):
    """The device imports the backend module without torch; only building a trainer needs it."""
    (tmp_path / "blocked" / "torch").mkdir(parents=True)
    (tmp_path / "blocked" / "torch" / "__init__.py").write_text("raise ImportError('no torch on the device')\n")
    script = textwrap.dedent("""
        import json, sys
        import edge_runtime.backends.executorch_backend as b
        print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'executorch'})))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
