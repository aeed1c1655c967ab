"""Ship an ONNX Runtime checkpoint as content-addressed tensor files; rebuild it byte-for-byte on the device.

An ORT training checkpoint is one flatbuffer holding every weight, so a new DEVFT
stage means a new file even though most of its bytes (the token embedding, the
final norm) are the same as in the previous stage. The server therefore sends,
instead of `checkpoint`:

    checkpoint.recipe.json   the checkpoint's sha256, and per parameter (in order): name,
                             trainable or not, and the file that holds it
    tensors/<name>.safetensors  one file per large tensor (>= min_tensor_bytes)
    tensors/rest.safetensors    all smaller tensors together

Large tensors that did not change between stages have identical files, hence the
same sha256, and the device's cache already holds them. The device rebuilds the
checkpoint with ORT's own writer from TensorProtos it encodes itself (no onnx
package) and keeps it only if it hashes to the sha256 in the recipe and the
manifest, so it never trains on anything the server did not produce.

The server side (splitting a checkpoint) is server_sdk/fleet/checkpoint_split.py. This is the legacy
`ort` format only: the portable `onnx` format keeps every frozen tensor in a file of its own.
Torch-free: numpy, safetensors and the onnxruntime-training C bindings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open

RECIPE = "checkpoint.recipe.json"
CHECKPOINT = "checkpoint"
TENSOR_DIR = "tensors"
REST = "rest.safetensors"
_ONNX_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10,
                "float64": 11}


class CheckpointAssemblyError(RuntimeError):
    pass


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tensor_proto(name: str, arr: np.ndarray) -> bytes:
    """onnx.TensorProto bytes as onnx.numpy_helper.from_array writes them (dims, data_type, name, raw_data)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.name not in _ONNX_DTYPES:
        raise CheckpointAssemblyError(f"tensor {name!r} has dtype {arr.dtype}, which this writer does not encode")
    out = b"".join(b"\x08" + _varint(int(d)) for d in arr.shape)
    out += b"\x10" + _varint(_ONNX_DTYPES[arr.dtype.name])
    raw_name = name.encode()
    out += b"\x42" + _varint(len(raw_name)) + raw_name
    raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return out + b"\x4a" + _varint(len(raw)) + raw


def assemble_checkpoint(artifact_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> str:
    """Rebuild `checkpoint` from the recipe and tensor files in `artifact_dir`; returns its sha256.

    Raises CheckpointAssemblyError if the result does not hash to the recipe's sha256."""
    from edge_runtime.backends.ort_backend import training_api

    training_api()  # loads the onnxruntime C bindings without onnxruntime.training's torch probe
    from onnxruntime.capi._pybind_state import save_checkpoint

    artifact_dir = Path(artifact_dir)
    recipe = json.loads((artifact_dir / RECIPE).read_text())
    readers: dict[str, object] = {}
    trainable, frozen = [], []
    try:
        for p in recipe["parameters"]:
            if p["file"] not in readers:
                readers[p["file"]] = safe_open(str(artifact_dir / p["file"]), framework="numpy")
            proto = tensor_proto(p["name"], readers[p["file"]].get_tensor(p["name"]))  # type: ignore[attr-defined]
            (trainable if p["trainable"] else frozen).append(proto)
    except (KeyError, OSError) as exc:
        raise CheckpointAssemblyError(f"{artifact_dir / RECIPE}: cannot read a tensor: {exc!r}") from exc
    save_checkpoint(trainable, frozen, str(dest), False)
    digest = hashlib.sha256(Path(dest).read_bytes()).hexdigest()
    if digest != recipe["sha256"]:
        Path(dest).unlink(missing_ok=True)
        raise CheckpointAssemblyError(f"rebuilt checkpoint hashes to {digest}, the server's to {recipe['sha256']}; "
                                      "the device's onnxruntime writes checkpoints differently - ask the server "
                                      "for whole checkpoints (per_tensor_checkpoint=False)")
    return digest
