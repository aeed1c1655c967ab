"""Turn a stage submodel (PEFT-LoRA LlamaForCausalLM) into ONNX Runtime Training artifacts.

Offline, on the server: export the model with the loss inputs inside the graph,
let `onnxruntime.training.artifacts` build the gradient, eval and optimizer
graphs, and write a manifest. The device then only runs `CheckpointState`,
`Module` and `Optimizer` over these files (edge_runtime/backends/ort_backend.py).

Artifact directory:
    training_model.onnx   forward + loss + LoRA gradients; output: loss
    eval_model.onnx       forward + loss; outputs: loss, logits [N, vocab]
    optimizer_model.onnx  AdamW (Hugging Face variant) or SGD over the LoRA tensors
    checkpoint            all weights; only LoRA tensors are trainable
    tokenizer.json        if a tokenizer dir was given
    manifest.json         see edge_runtime/manifest.py
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edge_runtime.batching import DEFAULT_SEQ_LEN, IGNORE_INDEX, MIN_SEQ_LEN
from edge_runtime.manifest import InputSpec, Manifest, TensorSpec
from export import naming
from export.common import check_weight_bytes, eager_attention
from export.publish import StageInfo, publish_stage, staging

OPTIMIZER_IR_VERSION = 10  # onnx 1.23 writes IR 14 for the optimizer graph; ORT 1.19 reads at most 10
LOGITS = "logits"
OPTIMIZERS = ("adamw", "sgd")  # what generate_artifacts offers (OptimType); AdamW is the Hugging Face variant
INPUTS = (InputSpec("input_ids", ("batch", "seq")), InputSpec("labels", ("batch", "seq")))
# generate_artifacts gets the model as one in-memory ModelProto, and protobuf cannot serialise a
# message over 2 GiB. With onnx 1.23 the path-based route for bigger models fails too ("External
# data file exists in temp.onnx.data"), so bigger submodels are refused before the slow export.
MAX_PROTO_BYTES = 2**31 - 2**24  # 2 GiB less a margin for the graph itself


class _ShiftedLogits(torch.nn.Module):
    """Puts the next-token shift inside the graph so the device feeds input_ids and labels as-is.

    ORT's SoftmaxCrossEntropyLoss wants 2-D scores and 1-D labels (3-D logits pass
    artifact generation but fail at the first step), so both come out flattened.
    The attribute name `model` is naming.ARTIFACT_PREFIX.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        vocab = logits.shape[-1]
        return logits[:, :-1, :].reshape(-1, vocab), labels[:, 1:].reshape(-1)


def check_exportable(peft_model: Any, optimizer: str, seq_len: int) -> None:
    """Fail before the slow export. Devices train in float32 on CPU: bf16 or CUDA graphs would not run."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len must be at least {MIN_SEQ_LEN}, got {seq_len}")
    bad = {(str(p.dtype), str(p.device)) for p in peft_model.parameters()} - {("torch.float32", "cpu")}
    if bad:
        raise ValueError(
            f"export needs a float32 CPU model, found parameters as {sorted(bad)}; call peft_model.float().cpu() first"
        )
    if any(getattr(c, "lora_dropout", 0.0) for c in peft_model.peft_config.values()):
        warnings.warn(
            "LoRA dropout is not exported (the graph is traced in eval mode); devices train without it", stacklevel=3
        )


def _check_size(peft_model: Any) -> None:
    check_weight_bytes(peft_model, MAX_PROTO_BYTES,
                       "protobuf limit of one ONNX model in memory: export fewer layers per stage, or generate the "
                       "artifacts from a path with external data (needs onnx 1.17.0, see docs/export.md)")


def export_onnx(peft_model: Any, path: Path, *, seq_len: int, opset: int) -> onnx.ModelProto:
    """Dynamo export with dynamic batch and seq; optimize=False keeps the LoRA initializer names."""
    wrapper = _ShiftedLogits(peft_model).eval()
    vocab = peft_model.get_base_model().config.vocab_size
    example = torch.randint(0, vocab, (2, min(16, seq_len)), dtype=torch.long)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2, max=seq_len)
    with eager_attention(peft_model), torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example, example.clone()),
            dynamo=True,
            optimize=False,
            verbose=False,
            opset_version=opset,
            input_names=[i.name for i in INPUTS],
            output_names=[LOGITS, "shifted_labels"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "labels": {0: batch, 1: seq}},
        )
    program.save(str(path), external_data=True)
    model = onnx.load(str(path))
    for node in model.graph.node:  # torch stack traces: 90% of the eval graph's bytes, no use on a device
        del node.metadata_props[:]
    return model


def split_parameters(model: onnx.ModelProto, peft_model: Any) -> tuple[list[str], list[str]]:
    """(trainable, frozen) initializer names; fails loudly if the exporter lost or renamed a LoRA tensor."""
    names = [init.name for init in model.graph.initializer]
    trainable = [n for n in names if naming.is_lora(n)]
    exported = {naming.to_peft_name(n) for n in trainable}
    expected = set(naming.lora_peft_names(peft_model.state_dict()))
    if exported != expected:
        raise RuntimeError(
            f"ONNX graph LoRA initializers differ from the PEFT model: missing "
            f"{sorted(expected - exported)[:5]}, unexpected {sorted(exported - expected)[:5]}; "
            "was the graph optimized (constant folding merges LoRA weights)?"
        )
    return trainable, [n for n in names if not naming.is_lora(n)]


def generate(model: onnx.ModelProto, out_dir: Path, trainable: list[str], frozen: list[str], optimizer: str) -> None:
    """Training, eval and optimizer graphs plus checkpoint, via onnxruntime.training.artifacts."""
    from onnxruntime.training import artifacts, onnxblock

    optim = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}
    # SoftmaxCrossEntropyLoss(mean) averages over labels != ignore_index, as Hugging Face does.
    loss = onnxblock.loss.CrossEntropyLoss(reduction="mean", ignore_index=IGNORE_INDEX)
    artifacts.generate_artifacts(
        model,
        requires_grad=trainable,
        frozen_params=frozen,
        loss=loss,
        optimizer=optim[optimizer],
        artifact_directory=out_dir,
        additional_output_names=[LOGITS],
    )
    _drop_output(out_dir / "training_model.onnx", LOGITS)  # training returns the loss only
    _set_ir_version(out_dir / "optimizer_model.onnx", OPTIMIZER_IR_VERSION)


def _drop_output(path: Path, name: str) -> None:
    model = onnx.load(str(path))
    kept = [o for o in model.graph.output if o.name != name]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(path))


def _set_ir_version(path: Path, ir_version: int) -> None:
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, ir_version)
    onnx.save(model, str(path))


def _trainable_specs(model: onnx.ModelProto, trainable: list[str]) -> list[TensorSpec]:
    inits = {init.name: init for init in model.graph.initializer}
    return [
        TensorSpec(
            name=n,
            peft_name=naming.to_peft_name(n),
            shape=tuple(inits[n].dims),
            dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inits[n].data_type)).name,
        )
        for n in sorted(trainable)
    ]


def _versions(model: onnx.ModelProto, opset: int) -> dict[str, Any]:
    return {
        "opset": opset,
        "ir_version": model.ir_version,
        "optimizer_ir_version": OPTIMIZER_IR_VERSION,
        "runtime": f"onnxruntime-training=={version('onnxruntime-training')}",
        "exporter": f"torch=={torch.__version__}",
        "transformers": version("transformers"),
        "peft": version("peft"),
    }


def export_ort_artifacts(
    peft_model: Any,
    out_dir: str | os.PathLike[str],
    info: StageInfo = StageInfo(),
    *,
    optimizer: str = "adamw",
    seq_len: int = DEFAULT_SEQ_LEN,
    opset: int = 18,
) -> Path:
    """Write ORT training artifacts and manifest for `peft_model` into `out_dir` and return it.

    The directory is built beside `out_dir` and renamed into place at the end, so a
    reader (the broker serving files) never sees a half-written or stale mix.
    Changes the process cwd while generating (generate_artifacts writes temp.onnx there).
    """
    check_exportable(peft_model, optimizer, seq_len)
    _check_size(peft_model)
    with staging(out_dir) as (out, build):
        with tempfile.TemporaryDirectory() as work, contextlib.chdir(work):
            model = export_onnx(peft_model, Path(work) / "model.onnx", seq_len=seq_len, opset=opset)
            trainable, frozen = split_parameters(model, peft_model)
            generate(model, build, trainable, frozen, optimizer)
        manifest = Manifest(run_id="", stage=0, backend="ort", model_config={}, seq_len=seq_len,
                            trainable=_trainable_specs(model, trainable), inputs=list(INPUTS),
                            versions=_versions(model, opset), optimizer=optimizer)
        return publish_stage(build, out, manifest, peft_model, info)


def import_trained_lora(peft_model: Any, trained: Mapping[str, np.ndarray]) -> None:
    """Load LoRA tensors trained on a device (keyed by PEFT name) back into `peft_model`."""
    naming.load_lora_into_peft(peft_model, trained)
