"""Stage artifacts from a cached export: trace the graphs once per model shape, restamp weights.

`export_ort_artifacts` traces the model, builds gradient and optimizer graphs and
writes the checkpoint; for a tiny model that is ~30 s, for SmolLM2 minutes. The
graphs depend only on the submodel's shape (config, LoRA config, seq_len,
optimizer, tool versions), never on weight values: weights live in the
checkpoint. A DEVFT run builds a new submodel per stage with fused weights, and a
resumed run rebuilds the same one, so we keep one full export per shape under
`template_root/<key>/` and make every stage directory by copying its graphs and
writing a fresh checkpoint from the submodel's tensors.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from edge_runtime.batching import DEFAULT_SEQ_LEN
from edge_runtime.manifest import MANIFEST_NAME, load_manifest
from export import naming
from export.common import copy_tokenizer, json_config, shape_key
from export.ort import export_ort_artifacts
from export.publish import publish

GRAPHS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")
CHECKPOINT = "checkpoint"


def template_key(peft_model: Any, *, optimizer: str, seq_len: int) -> str:
    """Hash of everything the exported graphs depend on (not the weight values)."""
    return shape_key(peft_model, ("onnxruntime-training", "torch", "transformers", "onnx"), format="ort",
                     optimizer=optimizer, seq_len=seq_len)


def _checkpoint_names(checkpoint: Path) -> tuple[list[str], list[str]]:
    """(trainable, frozen) parameter names of an ORT checkpoint."""
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(checkpoint))
    trainable, frozen = [], []
    for name, param in state.parameters:
        (trainable if param.requires_grad else frozen).append(name)
    return trainable, frozen


def write_checkpoint(peft_model: Any, path: Path, trainable: list[str], frozen: list[str]) -> None:
    """An ORT checkpoint holding `peft_model`'s current tensors under the template's names."""
    from onnxruntime.capi._pybind_state import save_checkpoint

    state = {**dict(peft_model.named_buffers()), **peft_model.state_dict()}  # buffers: rotary inv_freq

    def proto(name: str) -> bytes:
        key = naming.to_peft_name(name)
        if key not in state:
            alias = naming.tied_alias(key)
            if alias is None or alias not in state:
                raise KeyError(f"template tensor {name!r} has no counterpart {key!r} in the submodel; "
                               "delete the export template cache and retry")
            key = alias
        return onnx.numpy_helper.from_array(state[key].detach().cpu().numpy(), name).SerializeToString()

    save_checkpoint([proto(n) for n in trainable], [proto(n) for n in frozen], str(path), False)


def export_stage_cached(
    peft_model: Any,
    out_dir: str | os.PathLike[str],
    template_root: str | os.PathLike[str],
    *,
    run_id: str = "",
    stage: int = 0,
    groups: Sequence[Sequence[int]] | None = None,
    anchors: Sequence[int] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    optimizer: str = "adamw",
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Path:
    """Same directory as `export_ort_artifacts`, reusing a cached export of the same model shape."""
    out_dir = Path(out_dir).resolve()
    template = Path(template_root) / template_key(peft_model, optimizer=optimizer, seq_len=seq_len)
    if not (template / MANIFEST_NAME).is_file():
        template.parent.mkdir(parents=True, exist_ok=True)
        export_ort_artifacts(peft_model, template, optimizer=optimizer, seq_len=seq_len)
    manifest = load_manifest(template)
    trainable, frozen = _checkpoint_names(template / CHECKPOINT)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name in GRAPHS:
            shutil.copyfile(template / name, build / name)
        write_checkpoint(peft_model, build / CHECKPOINT, trainable, frozen)
        if tokenizer_dir is not None:
            manifest.chat_template = copy_tokenizer(tokenizer_dir, build)
            manifest.tokenizer_file = "tokenizer.json"
        manifest.run_id, manifest.stage = run_id, stage
        manifest.model_config = json_config(peft_model)
        manifest.groups = [list(map(int, g)) for g in groups or []]
        manifest.anchors = [int(a) for a in anchors or []]
        publish(build, out_dir, manifest)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out_dir
