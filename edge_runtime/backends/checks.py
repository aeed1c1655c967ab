"""What every device backend checks before it trains: the artifact directory is of its format, a LoRA set
is complete and well-shaped, a batch fits what the artifacts were exported for."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.manifest import Manifest, TensorSpec, load_manifest


def open_artifacts(artifact_dir: str | os.PathLike[str], fmt: str,
                   expected_trainable: list[TensorSpec] | Mapping[str, Any] | None = None) -> tuple[Path, Manifest]:
    """(the directory, its verified manifest); refuses artifacts of another format than `fmt`."""
    path = Path(artifact_dir)
    manifest = load_manifest(path, expected_trainable)
    if manifest.backend != fmt:
        raise ValueError(f"{path} holds {manifest.backend!r} artifacts, not {fmt!r}")
    return path, manifest


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
