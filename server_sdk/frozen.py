"""A stage submodel's frozen weights as one memory-mapped safetensors file.

The coordinator writes the file tensor by tensor (never a second copy of the model in
memory); readers map it (`read_frozen`), so every process on a machine that reads it shares
the same page-cache pages instead of holding its own fp32 copy. The Ray executor reads it
once per stage into Ray's object store, from where its workers (on any node) map it again.
Only frozen tensors are written: LoRA tensors travel separately, every round.

Reading needs numpy only (torch is imported where tensors are written), so the Ray task that
maps a stage file into the object store does not pay for a torch import.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


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


def write_frozen(path: Path, state: dict[str, torch.Tensor]) -> int:
    """Write `state` as a safetensors file (atomically), one tensor at a time; returns its bytes."""
    import torch

    _DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.float64: "F64"}
    header, offset = {}, 0
    for k, t in state.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"frozen tensor {k} has dtype {t.dtype}; the stage file holds float32/16/64 tensors")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
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


def read_frozen(path: Path) -> dict[str, np.ndarray]:
    """Read-only arrays mapped from a file of write_frozen (or any safetensors file of those dtypes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for k, info in header.items():
        start, end = info["data_offsets"]
        out[k] = data[start:end].view(_NUMPY[info["dtype"]]).reshape(info["shape"])
    return out


def map_stage_file(path: str) -> dict[str, np.ndarray]:
    """The Ray task of server_sdk.ray_executor: the file's arrays, which Ray copies into its object store."""
    return read_frozen(Path(path))
