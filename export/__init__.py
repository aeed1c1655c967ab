"""Turn a stage submodel into device training artifacts, in one of three formats.

    onnx        portable: one plain ONNX training graph (loss + LoRA gradients) for the ordinary
                onnxruntime package on every platform; optimiser on the device (export/onnx.py)
    ort         legacy ONNX Runtime Training artifacts, x86_64 onnxruntime-training (export/ort.py)
    executorch  ExecuTorch training programs (export/executorch.py)

This package sits below the server: it takes a PEFT submodel and writes files plus a manifest
(edge_runtime/manifest.py); it never imports server_sdk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_runtime.batching import DEFAULT_SEQ_LEN
from export.options import PLAIN, GraphOptions
from export.publish import StageInfo

FORMATS = ("onnx", "ort", "executorch")
# where each format caches its traced graphs under a template_root (DEVFT_CACHE for devft); `devft clean
# --all` frees every folder named here, so a format that caches templates elsewhere must be added here
TEMPLATE_DIRS = {"onnx": "onnx-templates", "ort": "ort-templates"}

__all__ = ["FORMATS", "TEMPLATE_DIRS", "GraphOptions", "StageInfo", "export_artifacts", "template_dir"]


def template_dir(fmt: str, template_root: str | os.PathLike[str]) -> Path:
    """The folder under `template_root` that caches format `fmt`'s traced graphs, one per shape."""
    return Path(template_root) / TEMPLATE_DIRS[fmt]


def export_artifacts(
    fmt: str,
    peft_model: Any,
    out_dir: str | os.PathLike[str],
    info: StageInfo = StageInfo(),
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    template_root: str | os.PathLike[str] | None = None,
    optimizer: str = "adamw",
    max_batch: int = 4,
    graph: GraphOptions = PLAIN,
) -> Path:
    """Write `peft_model`'s artifacts in format `fmt` into out_dir (atomically) and return it; the manifest
    records `info` (run, stage, layer groups, anchors, tokenizer).

    `template_root` caches traced graphs by shape (onnx, ort): a later submodel of the same shape
    only gets its weights written. ExecuTorch programs embed their weights and are traced each time.
    `graph` (onnx only, but for the default): int8/int4 frozen weights, recomputed activations (export/options.py).
    """
    graph.check_format(fmt)
    if fmt == "onnx":
        from export.onnx import export_onnx_artifacts

        if template_root is None:
            raise ValueError("the onnx format needs a template_root to cache its traced graphs in")
        return export_onnx_artifacts(peft_model, out_dir, template_dir("onnx", template_root), info,
                                     seq_len=seq_len, optimizer=optimizer, graph=graph)
    if fmt == "ort":
        from export.cached import export_stage_cached
        from export.ort import export_ort_artifacts

        if template_root is None:
            return export_ort_artifacts(peft_model, out_dir, info, optimizer=optimizer, seq_len=seq_len)
        return export_stage_cached(peft_model, out_dir, template_dir("ort", template_root), info,
                                   optimizer=optimizer, seq_len=seq_len)
    if fmt == "executorch":
        from export.executorch import export_executorch_artifacts

        return export_executorch_artifacts(peft_model, out_dir, info, seq_len=seq_len, max_batch=max_batch)
    raise ValueError(f"artifact format {fmt!r} is not one of {FORMATS}")
