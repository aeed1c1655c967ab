"""Quantized frozen weights on the server: simulation and evaluation on the values devices compute.

With `weights=int8|int4` (RunConfig) devices hold the frozen weights quantized (export/quant.py) and
dequantize them in their graph. The server must train its simulated clients and evaluate on exactly
those values, or simulation and fleet drift apart: the base model is copied with its quantizable
weights replaced by their dequantized values, and so is every stage submodel whose fusion made new
weights. The scheme is idempotent, so exporting such a submodel quantized writes the very q and
scales whose dequantization the server used: a device's loss is the server's, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from export.quant import fake_quantize_
from server_sdk.engine.model import BaseModel


def quantized_base(base: BaseModel, scheme: str) -> BaseModel:
    """`base` itself for fp32; else a copy whose frozen weights are their `scheme` dequantization. A copy, so a
    caller's base (benchmarks reuse one across runs) stays fp32; no weights file: its bytes are not these."""
    if scheme == "fp32":
        return base
    model = copy.deepcopy(base.model)
    fake_quantize_(model, scheme)
    return dataclasses.replace(base, model=model, weights_file=None, source=f"{base.source}, {scheme} weights")


def quantize_submodel_(sub_model: Any, scheme: str) -> Any:
    """A stage submodel's frozen weights as devices hold them (in place; a no-op for fp32 and for weights
    already on the grid, such as layers shared with a quantized base)."""
    fake_quantize_(sub_model, scheme)
    return sub_model
