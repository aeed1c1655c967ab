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
from pathlib import Path
from typing import Any

import onnx

from edge_runtime.batching import DEFAULT_SEQ_LEN
from edge_runtime.manifest import MANIFEST_NAME, load_manifest
from export import naming
from export.common import model_tensors, shape_key
from export.ort import export_ort_artifacts
from export.publish import StageInfo, publish_from_template

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

    state = model_tensors(peft_model)

    def proto(name: str) -> bytes:
        key = naming.state_key(state, name, "template tensor")
        return onnx.numpy_helper.from_array(state[key].detach().cpu().numpy(), name).SerializeToString()

    save_checkpoint([proto(n) for n in trainable], [proto(n) for n in frozen], str(path), False)


def export_stage_cached(
    peft_model: Any,
    out_dir: str | os.PathLike[str],
    template_root: str | os.PathLike[str],
    info: StageInfo = StageInfo(),
    *,
    optimizer: str = "adamw",
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Path:
    """Same directory as `export_ort_artifacts`, reusing a cached export of the same model shape."""
    template = Path(template_root) / template_key(peft_model, optimizer=optimizer, seq_len=seq_len)
    if not (template / MANIFEST_NAME).is_file():
        template.parent.mkdir(parents=True, exist_ok=True)
        export_ort_artifacts(peft_model, template, optimizer=optimizer, seq_len=seq_len)
    manifest = load_manifest(template)
    trainable, frozen = _checkpoint_names(template / CHECKPOINT)
    return publish_from_template(template, GRAPHS,
                                 lambda build: write_checkpoint(peft_model, build / CHECKPOINT, trainable, frozen),
                                 out_dir, manifest, peft_model, info)
