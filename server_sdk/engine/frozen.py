"""A stage submodel's frozen weights as one memory-mapped safetensors file.

The coordinator writes the file tensor by tensor (never a second copy of the model in
memory); readers map it (`read_frozen`), so every process on a machine that reads it shares
the same page-cache pages instead of holding its own fp32 copy. The Ray executor reads it
once per stage into Ray's object store, from where its workers (on any node) map it again.
Only frozen tensors are written: LoRA tensors travel separately, every round.

A stage whose frozen tensors are exactly the base model's (FedIT; DEVFT's full-model stage)
needs no such file when the base model was loaded unconverted from one safetensors file
(`holds_exactly`): readers map that file, and the coordinator never reads those weights.

Reading needs numpy only (torch is imported where tensors are written), so the Ray task that
maps a stage file into the object store does not pay for a torch import.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def _dtype_name(t: torch.Tensor) -> str | None:
    """The safetensors dtype name of a stage-file tensor (None: a dtype stage files do not hold)."""
    return {"torch.float32": "F32", "torch.float16": "F16", "torch.float64": "F64"}.get(str(t.dtype))


def frozen_state(peft_model) -> dict[str, torch.Tensor]:
    """The submodel's frozen tensors under the plain LlamaForCausalLM names (no PEFT wrappers,
    no LoRA), each tensor once: a tied LM head is left out (the reader ties it again)."""
    from peft import PeftModel

    inner = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in inner.state_dict().items():
        if "lora_" in key:
            continue
        if t.data_ptr() in seen and key == "lm_head.weight":
            continue
        seen.add(t.data_ptr())
        out[key.replace(".base_layer.", ".")] = t.detach()
    return out


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """True when two frozen states are the same tensors (the same memory, not equal values): e.g. a
    FedIT submodel's and the base model's. Compares addresses and layouts, reads no weight."""
    return a.keys() == b.keys() and all(
        a[k].data_ptr() == b[k].data_ptr() and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].stride() == b[k].stride() for k in a)


def write_frozen(path: Path, state: dict[str, torch.Tensor]) -> int:
    """Write `state` as a safetensors file (atomically), one tensor at a time; returns its bytes."""
    header, offset = {}, 0
    for k, t in state.items():
        if _dtype_name(t) is None:
            raise TypeError(f"frozen tensor {k} has dtype {t.dtype}; the stage file holds float32/16/64 tensors")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _dtype_name(t), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensors start 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in state.values():
            f.write(memoryview(t.contiguous().numpy()).cast("B"))
    os.replace(tmp, path)
    return 8 + len(blob) + offset


def _header(path: Path) -> tuple[int, dict]:
    """A safetensors file's tensor table and the offset where its data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > os.fstat(f.fileno()).st_size - 8:
            raise ValueError(f"{path} is not a safetensors file (its header length exceeds the file)")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def read_frozen(path: Path) -> dict[str, np.ndarray]:
    """Read-only arrays mapped from a file of write_frozen (or any safetensors file of those dtypes).

    Plain ndarray views of the mapping, not np.memmap: numpy pickles an ndarray subclass with its
    bytes in-band, so Ray would copy a memmap into every worker that unpickles it (a private copy of
    the weights per worker), while a plain array crosses the object store out-of-band and every
    worker on the node maps the same bytes."""
    data_start, header = _header(path)
    data = np.asarray(np.memmap(path, dtype=np.uint8, mode="r", offset=data_start))
    out = {}
    for k, info in header.items():
        start, end = info["data_offsets"]
        out[k] = data[start:end].view(_NUMPY[info["dtype"]]).reshape(info["shape"])
    return out


def holds_exactly(path: Path, state: dict[str, torch.Tensor]) -> bool:
    """True when the safetensors file at `path` holds exactly `state`'s tensors, as read_frozen gives
    them back: the same names, dtypes and shapes, nothing more (the tied LM head absent on both sides).

    Only the header is read. The values are the caller's to vouch for: the tensors of a model loaded
    from this file without a dtype change (model.BaseModel.weights_file) are its bytes, and a stage
    whose frozen tensors are that model's own (shared, never written) can then be served from the
    file itself instead of a copy written by write_frozen."""
    try:
        _, header = _header(path)
    except (OSError, ValueError):
        return False
    return header.keys() == state.keys() and all(
        header[k]["dtype"] == _dtype_name(t) and header[k]["shape"] == list(t.shape) for k, t in state.items())


def tensor_bytes(path: Path, name: str, chunk: int = 1 << 24) -> Iterator[bytes]:
    """The stored bytes of one tensor, read (not mapped) in chunks: a pass over a file's weights that
    leaves them in the page cache, never resident in the reading process."""
    data_start, header = _header(path)
    start, end = header[name]["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + start)
        left = end - start
        while left > 0:
            block = f.read(min(chunk, left))
            if not block:
                raise ValueError(f"{path} ends inside tensor {name}")
            left -= len(block)
            yield block


def map_stage_file(path: str) -> dict[str, np.ndarray]:
    """The Ray task of server_sdk.engine.ray_executor: the file's arrays, which Ray copies into its object store."""
    return read_frozen(Path(path))
