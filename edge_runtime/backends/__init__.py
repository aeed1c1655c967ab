"""Device-side trainers over exported artifacts, one per artifact format, behind one `Trainer` protocol.

    onnx        the portable format (export/onnx.py) on plain onnxruntime; optimiser in numpy
    ort         legacy ONNX Runtime Training artifacts (export/ort.py); x86_64 onnxruntime-training only
    executorch  ExecuTorch training programs (export/executorch.py); SGD

Each backend is torch-free except ExecuTorch's, which imports torch lazily, inside the trainer,
because its training bindings link it. `available_formats` is what a device declares in its
hello, so the coordinator can serve each device a format it runs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_runtime.manifest import WEIGHT_SCHEMES, Manifest
from edge_runtime.protocol import ARTIFACT_FORMATS as FORMATS  # in order of preference


class Trainer(Protocol):
    """What a device needs from a backend: LoRA in and out (PEFT names), steps, a loss."""

    manifest: Manifest

    def get_lora(self) -> dict[str, np.ndarray]: ...

    def set_lora(self, tensors: Mapping[str, np.ndarray]) -> None: ...

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> float: ...

    def loss_and_grads(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]: ...

    def eval_loss(self, input_ids: np.ndarray, labels: np.ndarray) -> float: ...

    def set_lr(self, lr: float) -> None: ...


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_formats() -> list[str]:
    """The artifact formats this device can train, in order of preference."""
    formats = []
    if onnx_runtime_problem() is None:
        formats.append("onnx")  # plain onnxruntime, or onnxruntime-training's superset of it
    if _importable("onnxruntime.training"):
        formats.append("ort")
    if _importable("executorch") and _importable("torch"):
        formats.append("executorch")
    return formats


def onnx_runtime_problem() -> str | None:
    """Why this device cannot train the portable format (no or too old onnxruntime), or None."""
    from edge_runtime.backends.onnx_backend import MIN_ONNXRUNTIME, version_tuple

    have = runtime_versions().get("onnxruntime")
    if have is None or not _importable("onnxruntime"):
        return f"onnxruntime is not installed: pip install 'onnxruntime>={MIN_ONNXRUNTIME}' (or 'devft[edge]')"
    if version_tuple(have) < version_tuple(MIN_ONNXRUNTIME):
        return (f"onnxruntime {have} is too old for the portable training graphs (opset 20): they need "
                f"onnxruntime>={MIN_ONNXRUNTIME}; pip install -U 'onnxruntime>={MIN_ONNXRUNTIME}'")
    return None


def runtime_versions() -> dict[str, str]:
    """Installed runtime versions, for the hello (the coordinator refuses a device whose onnxruntime is too old).

    Read from package metadata: importing onnxruntime-training would import torch when present."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist, key in (("onnxruntime", "onnxruntime"), ("onnxruntime-training", "onnxruntime"),
                      ("onnxruntime-gpu", "onnxruntime"), ("executorch", "executorch")):
        try:
            found.setdefault(key, version(dist))
        except PackageNotFoundError:
            continue
    if "onnxruntime" in found:  # frozen-weight schemes this runtime's portable trainer runs (Manifest.weights)
        found["weights"] = ",".join(weight_formats(found["onnxruntime"]))
    return found


def weight_formats(onnxruntime_version: str) -> list[str]:
    """The frozen-weight formats an onnxruntime of this version runs (the hello's `weights`): the quantized ones
    from 1.20 on, so an older device is refused at hello in a quantized run, not when its stage fails to load."""
    from edge_runtime.backends.onnx_backend import QUANTIZED_MIN_ONNXRUNTIME, version_tuple

    new_enough = version_tuple(onnxruntime_version) >= version_tuple(QUANTIZED_MIN_ONNXRUNTIME)
    return [w for w in WEIGHT_SCHEMES if w == "fp32" or new_enough]


def open_trainer(fmt: str, artifact_dir: str | os.PathLike[str], *, lr: float, threads: int | None = None,
                 trainable: Iterable[str] | None = None, optimizer: str | None = None,
                 micro_batch: int | None = None) -> Trainer:
    """The trainer for an artifact directory of format `fmt`.

    `trainable` (PEFT names) are the tensors the round trains; the others must keep the values
    they were given (FFA-LoRA). The onnx trainer skips their update; the legacy trainers update
    every LoRA tensor, so for them the caller restores the frozen ones after each step.
    `optimizer` (the round's `hyperparams.optimizer`) picks the onnx trainer's numpy optimiser;
    the legacy formats run the one baked into their graphs. `micro_batch` (rows per graph run, the round's
    `hyperparams.micro_batch`; None: whole batches) only the onnx trainer does: the legacy ones refuse it."""
    artifact_dir = Path(artifact_dir)
    if fmt == "onnx":
        from edge_runtime.backends.onnx_backend import OnnxTrainer

        return OnnxTrainer(artifact_dir, lr=lr, threads=threads, trainable=trainable, optimizer=optimizer,
                           micro_batch=micro_batch)
    if micro_batch is not None and fmt in FORMATS:
        raise ValueError(f"the {fmt} format trains whole batches only (its optimiser runs inside its graph); "
                         f"micro_batch={micro_batch} needs the portable onnx format: serve formats ['onnx'] or "
                         "leave micro_batch unset")
    if fmt == "ort":
        from edge_runtime.backends.ort_backend import OrtTrainer

        return OrtTrainer(artifact_dir, lr=lr, threads=threads)
    if fmt == "executorch":  # its bindings import torch when a trainer is built
        from edge_runtime.backends.executorch_backend import ExecuTorchTrainer

        return ExecuTorchTrainer(artifact_dir, lr=lr, threads=threads)
    raise ValueError(f"artifact format {fmt!r} is not one of {FORMATS}")
