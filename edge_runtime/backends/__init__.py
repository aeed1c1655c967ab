"""Device-side trainers over exported artifacts; each backend is torch-free (ExecuTorch's
imports torch lazily, inside the trainer, because its training bindings link it)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_runtime.manifest import Manifest, TensorSpec


def check_lora_set(tensors: Mapping[str, np.ndarray], specs: Mapping[str, TensorSpec], manifest: Manifest) -> None:
    """Refuse a partial or foreign LoRA set, or a tensor of the wrong shape or dtype, before anything is written."""
    unknown = sorted(set(tensors) - set(specs))
    missing = sorted(set(specs) - set(tensors))
    if unknown or missing:
        raise ValueError(
            f"set_lora needs exactly the {len(specs)} LoRA tensors of these artifacts "
            f"(run {manifest.run_id!r}, stage {manifest.stage}): unknown {unknown[:5]}, missing {missing[:5]}"
        )
    for name, value in tensors.items():
        spec = specs[name]
        if not isinstance(value, np.ndarray) or value.shape != spec.shape or value.dtype.name != spec.dtype:
            got = (getattr(value, "shape", None), getattr(getattr(value, "dtype", None), "name", type(value)))
            raise ValueError(f"{name}: expected ndarray {spec.shape} {spec.dtype}, got {got[0]} {got[1]}")


def check_batch_shape(input_ids: np.ndarray, labels: np.ndarray, min_seq: int, max_seq: int) -> None:
    """Both int64 [batch, seq] of the same shape, with seq inside what the artifacts were exported for."""
    for name, a in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.ndim != 2:
            raise ValueError(
                f"{name} must be an int64 ndarray [batch, seq], got {getattr(a, 'dtype', type(a))} "
                f"{getattr(a, 'shape', '')}"
            )
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {input_ids.shape} and labels {labels.shape} must have the same shape")
    seq = input_ids.shape[1]
    if not min_seq <= seq <= max_seq:
        raise ValueError(f"sequence length {seq} outside [{min_seq}, {max_seq}] of these artifacts")
