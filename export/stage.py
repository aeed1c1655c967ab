"""Export one stage submodel in a chosen artifact format (onnx, ort, executorch) and check the
written manifest as a device would.

The submodel comes from the caller (`devft export` builds it from a run or a base model
through the run's strategy: server_sdk/cli/export.py); this package never needs the server.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.batching import DEFAULT_SEQ_LEN
from edge_runtime.manifest import BACKENDS, Manifest, load_manifest
from export import StageInfo, export_artifacts, naming
from export.options import PLAIN, GraphOptions

DEFAULT_MAX_BATCH = 4  # ExecuTorch plans activation memory for this batch size


@dataclass
class StageSource:
    """A rebuilt stage submodel and what it was built from (recorded in the manifest)."""

    peft_model: Any
    tokenizer: Any
    run_id: str
    stage: int
    groups: list[list[int]]
    anchors: list[int]
    note: str


class ExportError(ValueError):
    """The requested stage cannot be exported from what is on disk; the message says why."""


def export_submodel(
    source: StageSource,
    backend: str,
    out_dir: str | os.PathLike[str],
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_batch: int = DEFAULT_MAX_BATCH,
    optimizer: str = "adamw",
    template_root: str | os.PathLike[str] | None = None,
    graph: GraphOptions = PLAIN,
) -> Path:
    """Export `source` in format `backend` into `out_dir`, then reload and verify its manifest.

    `template_root` caches traced graphs by shape (needed by onnx; optional for ort); `graph`: export_artifacts'."""
    if backend not in BACKENDS:
        raise ExportError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "onnx" and template_root is None:
        raise ExportError("the onnx format needs a template_root to cache its traced graphs in")
    with tempfile.TemporaryDirectory() as tok_dir:
        source.tokenizer.save_pretrained(tok_dir)
        info = StageInfo(run_id=source.run_id, stage=source.stage, groups=source.groups, anchors=source.anchors,
                         tokenizer_dir=tok_dir)
        out = export_artifacts(backend, source.peft_model, out_dir, info, seq_len=seq_len, template_root=template_root,
                               optimizer=optimizer, max_batch=max_batch, graph=graph)
    verify(out, source.peft_model)
    return out


def verify(out_dir: Path, peft_model: Any) -> Manifest:
    """Load the written manifest back, with hashes and the model's LoRA shapes, as a device would."""
    state = peft_model.state_dict()
    shapes = {k: tuple(state[k].shape) for k in naming.lora_peft_names(state)}
    return load_manifest(out_dir, expected_trainable=shapes)
