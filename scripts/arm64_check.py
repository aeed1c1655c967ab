"""Helper of scripts/arm64_check.sh: export a tiny stage on the host, train it on a device, compare.

    python scripts/arm64_check.py export DIR        # host, torch + executorch: tiny random LLaMA
    python scripts/arm64_check.py train DIR OUT     # host or arm64 root: ExecuTorch steps + ORT eval
    python scripts/arm64_check.py compare X86 ARM --markdown benchmarks/RESULTS.md

`train` runs where only the edge part is installed (numpy, onnxruntime inference, executorch
and the torch it links): it imports edge_runtime, never export/ or server_sdk/. It trains the
LoRA tensors with ExecuTorch for a few SGD steps on one fixed batch, then evaluates the same
model with ONNX Runtime (a plain InferenceSession over the forward ONNX graph, its LoRA
initializers replaced by the ExecuTorch-trained tensors): two runtimes, one set of weights.
There is no aarch64 onnxruntime-training wheel, so ORT only evaluates on arm64.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo (host) or /opt/devft/src (arm64 root)

STEPS, LR, SEED = 8, 0.2, 0
BATCH, SEQ, VOCAB = 2, 16, 256
TOLERANCE = 1e-4  # max |loss difference| between x86_64 and arm64; float32 kernels differ in summation order
BEGIN, END = "<!-- arm64_check: begin (generated) -->", "<!-- arm64_check: end -->"


# --------------------------------------------------------------------------- host: export


def export(out: Path) -> None:
    """A tiny random LLaMA (hidden 64, 2 layers, vocab 256) with LoRA: ExecuTorch artifacts + forward ONNX."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from export.executorch import export_executorch_artifacts
    from export.ort import export_onnx
    from server_sdk.config import LoraSettings
    from server_sdk.lora import attach_lora

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, use_cache=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8), seed=SEED)
    with torch.no_grad():  # B starts at zero; make it non-zero so step one already moves every tensor
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    out.mkdir(parents=True, exist_ok=True)
    export_executorch_artifacts(peft_model, out / "executorch", max_seq_len=SEQ, max_batch=BATCH)
    export_onnx(peft_model, out / "forward.onnx", max_seq_len=SEQ, opset=18)
    ids = np.random.default_rng(SEED).integers(0, VOCAB, size=(BATCH, SEQ), dtype=np.int64)
    np.save(out / "input_ids.npy", ids)


# --------------------------------------------------------------------------- device: train + evaluate


class MinimalExecutorchTrainer:
    """The reference recipe (executorch-training.md), used when edge_runtime has no ExecuTorch backend yet."""

    def __init__(self, artifact_dir: Path, lr: float):
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule, get_sgd_optimizer

        from edge_runtime.manifest import load_manifest

        self.manifest = load_manifest(artifact_dir)
        self.module = TrainingModule(_load_for_executorch(str(artifact_dir / "model.pte"), str(artifact_dir / "lora.ptd")))
        self.lr, self.optimizer, self._sgd = lr, None, get_sgd_optimizer

    def train_step(self, ids: np.ndarray, labels: np.ndarray) -> float:
        import torch

        (loss,) = self.module.forward_backward("forward", (torch.from_numpy(ids), torch.from_numpy(labels)))
        if self.optimizer is None:  # named_parameters() exists only after the first forward_backward
            self.optimizer = self._sgd(self.module.named_parameters(), self.lr, 0, 0, 0, False)
        self.optimizer.step(self.module.named_gradients())
        return float(loss)

    def eval_loss(self, ids: np.ndarray, labels: np.ndarray) -> float:
        """Loss at the current weights: a forward_backward whose gradients are not applied."""
        import torch

        (loss,) = self.module.forward_backward("forward", (torch.from_numpy(ids), torch.from_numpy(labels)))
        return float(loss)

    def get_lora(self) -> dict[str, np.ndarray]:
        params = self.module.named_parameters()
        return {t.peft_name: params[t.name].detach().numpy().copy() for t in self.manifest.trainable}


def _trainer(artifact_dir: Path, lr: float) -> tuple[Any, str]:
    try:
        from edge_runtime.backends.executorch_backend import ExecuTorchTrainer
    except ImportError:
        return MinimalExecutorchTrainer(artifact_dir, lr), "scripts/arm64_check.py MinimalExecutorchTrainer"
    return ExecuTorchTrainer(artifact_dir, lr=lr), "edge_runtime.backends.executorch_backend.ExecuTorchTrainer"


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    keep = labels != -100
    return float(-logp[keep, labels[keep]].mean())


def ort_eval_loss(onnx_path: Path, lora_by_artifact_name: dict[str, np.ndarray], ids: np.ndarray) -> float:
    """Loss of the forward graph with its LoRA initializers replaced, on plain ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The replacement values are bound when the session state is built, after graph optimisation:
    # constant folding would already have baked the exported LoRA values into the graph.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    keep = []  # add_initializer does not copy: the OrtValues must outlive session creation
    for name, value in lora_by_artifact_name.items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
        options.add_initializer(name, keep[-1])
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    logits, shifted = session.run(None, {"input_ids": ids, "labels": ids.copy()})
    return _cross_entropy(logits, shifted)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("executorch", "torch", "onnxruntime", "onnxruntime-training", "numpy"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def train(artifacts: Path, out: Path) -> None:
    t0 = time.perf_counter()
    ids = np.load(artifacts / "input_ids.npy")
    trainer, trainer_name = _trainer(artifacts / "executorch", LR)
    names = {t.peft_name: t.name for t in trainer.manifest.trainable}
    losses = [trainer.train_step(ids, ids.copy()) for _ in range(STEPS)]
    trained = trainer.get_lora()
    et_after = trainer.eval_loss(ids, ids.copy())
    ort_after = ort_eval_loss(artifacts / "forward.onnx", {names[k]: v for k, v in trained.items()}, ids)
    result = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": _versions(),
        "trainer": trainer_name,
        "steps": STEPS,
        "lr": LR,
        "executorch_train_losses": losses,
        "executorch_eval_loss_after": et_after,
        "ort_eval_loss_after": ort_after,
        "lora_checksum": float(sum(np.abs(v).sum() for v in trained.values())),
        "torch_imported": "torch" in sys.modules,
        "seconds": time.perf_counter() - t0,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


# --------------------------------------------------------------------------- compare


def compare(x86_path: Path, arm_path: Path, markdown: Path | None, setup_note: str) -> int:
    x86, arm = json.loads(x86_path.read_text()), json.loads(arm_path.read_text())
    diffs = [abs(a - b) for a, b in zip(x86["executorch_train_losses"], arm["executorch_train_losses"])]
    diffs += [abs(x86[k] - arm[k]) for k in ("executorch_eval_loss_after", "ort_eval_loss_after")]
    learned = arm["executorch_train_losses"][-1] < arm["executorch_train_losses"][0]
    # two runtimes, same trained weights: ONNX Runtime must agree with ExecuTorch on each machine
    runtimes_gap = max(abs(r["ort_eval_loss_after"] - r["executorch_eval_loss_after"]) for r in (x86, arm))
    passed = max(diffs) <= TOLERANCE and learned and runtimes_gap <= TOLERANCE
    lines = [BEGIN, "## ARM64 check (scripts/arm64_check.sh)", "",
             "Command: `sudo scripts/arm64_check.sh` (x86_64 host, arm64 Debian bookworm root under qemu-user; "
             "correctness only, emulated timings mean nothing).  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
             f"Model: tiny random LLaMA (hidden 64, 2 layers, vocab {VOCAB}), LoRA r=4 on all projections; "
             f"{STEPS} ExecuTorch SGD steps (lr {LR}) on one fixed batch {BATCH} x {SEQ}, then the trained LoRA "
             "evaluated by ONNX Runtime (InferenceSession on the forward graph, LoRA initializers replaced).  ",
             f"arm64 environment: {setup_note}", "",
             "| step | x86_64 loss | arm64 loss | abs diff |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(x86["executorch_train_losses"], arm["executorch_train_losses"])):
        lines.append(f"| ExecuTorch train {i + 1} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    for key, label in (("executorch_eval_loss_after", "ExecuTorch eval after training"),
                       ("ort_eval_loss_after", "ONNX Runtime eval after training")):
        a, b = x86[key], arm[key]
        lines.append(f"| {label} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    lines += ["", f"Trainer: {arm['trainer']}. Versions x86_64: {x86['versions']}; arm64: {arm['versions']}.  ",
              f"Result: **{'PASS' if passed else 'FAIL'}** (max |diff| {max(diffs):.1e}, tolerance {TOLERANCE:g}; "
              f"loss fell on arm64: {learned}; largest ONNX Runtime vs ExecuTorch gap on one machine {runtimes_gap:.1e}). "
              f"arm64 run took {arm['seconds']:.0f} s emulated.", END]
    section = "\n".join(lines)
    print(section)
    if markdown is not None:
        old = markdown.read_text() if markdown.exists() else "# Device benchmarks\n\n"
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        new = pattern.sub(lambda _: section, old) if pattern.search(old) else old.rstrip() + "\n\n" + section + "\n"
        markdown.write_text(new)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/arm64_check.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("export").add_argument("dir", type=Path)
    t = sub.add_parser("train")
    t.add_argument("dir", type=Path)
    t.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("x86", type=Path)
    c.add_argument("arm", type=Path)
    c.add_argument("--markdown", type=Path)
    c.add_argument("--setup-note", default="")
    args = p.parse_args(argv)
    if args.cmd == "export":
        export(args.dir)
        return 0
    if args.cmd == "train":
        train(args.dir, args.out)
        return 0
    return compare(args.x86, args.arm, args.markdown, args.setup_note)


if __name__ == "__main__":
    sys.exit(main())
