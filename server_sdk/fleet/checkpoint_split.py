"""Split a legacy ONNX Runtime Training checkpoint into content-addressed tensor files (coordinator side).

The device rebuilds it byte for byte (edge_runtime/checkpoint_blobs.py `assemble_checkpoint`);
see that module for why. Only the legacy `ort` format needs this.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from edge_runtime.backends.ort_backend import training_api
from edge_runtime.checkpoint_blobs import CHECKPOINT, RECIPE, REST, TENSOR_DIR


def safe_file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) + ".safetensors"


def split_checkpoint(artifact_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                     min_tensor_bytes: int = 256 * 1024) -> dict[str, Path]:
    """Write recipe and tensor files for `artifact_dir/checkpoint`; returns {path in artifact: file}.

    The result replaces `checkpoint` in what a device downloads; every other file of the
    artifact directory is included as it is."""
    artifact_dir, out = Path(artifact_dir), Path(out_dir)
    (out / TENSOR_DIR).mkdir(parents=True, exist_ok=True)
    state = training_api().CheckpointState.load_checkpoint(str(artifact_dir / CHECKPOINT))
    params, rest = [], {}
    for name, param in state.parameters:
        arr = np.array(param.data, copy=True)
        if arr.nbytes >= min_tensor_bytes:
            file = f"{TENSOR_DIR}/{safe_file_name(name)}"
            save_file({name: arr}, str(out / file))
        else:
            file = f"{TENSOR_DIR}/{REST}"
            rest[name] = arr
        params.append({"name": name, "trainable": bool(param.requires_grad), "file": file})
    if rest:
        save_file(rest, str(out / TENSOR_DIR / REST))
    digest = hashlib.sha256((artifact_dir / CHECKPOINT).read_bytes()).hexdigest()
    (out / RECIPE).write_text(json.dumps({"version": 1, "sha256": digest, "parameters": params}, indent=1))
    files = {p.relative_to(artifact_dir).as_posix(): p for p in sorted(artifact_dir.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT}
    files[RECIPE] = out / RECIPE
    for rel in sorted({p["file"] for p in params}):
        files[rel] = out / rel
    return files


