"""Turn a stage submodel (PEFT-LoRA LlamaForCausalLM) into an ExecuTorch training program.

Offline, on the server: trace the model with its loss, let torch build the joint
forward + backward graph, lower it to ExecuTorch and write a manifest. The device
(edge_runtime/backends/executorch_backend.py) then runs the program and applies
ExecuTorch's SGD to the gradients it returns.

Artifact directory:
    model.pte      two methods over the frozen base weights stored inside:
                   forward(input_ids, labels) -> (loss, LoRA gradients, LoRA tensors)
                       the joint training graph; only LoRA tensors get gradients
                   evaluate(input_ids, labels, *lora) -> (loss, logits [batch, seq - 1, vocab])
                       forward only; takes the LoRA tensors as inputs, in manifest.trainable
                       order, so it always sees what training has made of them
    lora.ptd       the LoRA tensors (initial values), loaded into the training method's memory
    tokenizer.json if a tokenizer dir was given
    manifest.json  see edge_runtime/manifest.py

Both methods are planned for inputs up to [max_batch, seq_len]: ExecuTorch allocates
activation memory for that upper bound when it loads a method, so pick the bounds the device
will use, not generous ones.

Size limit: a .pte is a flatbuffer whose offsets are 32-bit, so the program is limited to
about 2 GB, like a protobuf; the frozen weights live in segments after it and are not
limited that way, but export also keeps several copies of them in memory. SmolLM2-135M
(548 MB float32) is far below. Larger models should move the frozen weights to a .ptd of
their own (`external_constants`), which this module does not do yet; export_executorch_artifacts
fails early with a clear message above MAX_PTE_BYTES instead of writing something a device
cannot load.

The training API is experimental upstream and `_export_forward_backward` is private:
everything that touches it is in `_joint_program`, so an API change touches one function.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edge_runtime.batching import DEFAULT_SEQ_LEN, IGNORE_INDEX, MIN_SEQ_LEN
from edge_runtime.manifest import InputSpec, Manifest, TensorSpec
from export import naming
from export.common import check_weight_bytes, eager_attention
from export.ort import check_exportable
from export.publish import StageInfo, publish_stage, staging

PROGRAM = "model.pte"
TRAINABLE_DATA = "lora.ptd"
TRAIN_METHOD = "forward"
EVAL_METHOD = "evaluate"
MAX_PTE_BYTES = 2**31 - 2**24  # flatbuffer offsets are 32-bit; keep a margin for the graph
INPUTS = (InputSpec("input_ids", ("batch", "seq")), InputSpec("labels", ("batch", "seq")))


def _shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal LM loss: mean over target tokens whose label is not -100."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1, :].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


class _TrainLoss(torch.nn.Module):
    """forward(input_ids, labels) -> (loss,); loss must be output 0 for the joint graph.

    The attribute name `model` is naming.ARTIFACT_PREFIX, so parameter FQNs are artifact names.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor]:
        return (_shifted_loss(self.model(input_ids=input_ids, use_cache=False).logits, labels),)


class _EvalWithLora(torch.nn.Module):
    """forward(input_ids, labels, *lora) -> (loss, next-token logits), LoRA given as inputs.

    The training method owns the live LoRA tensors; the evaluate method of the same program
    has memory of its own, so it takes them as inputs instead of reading stale copies.
    """

    def __init__(self, model: torch.nn.Module, lora_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.lora_names = list(lora_names)  # PEFT names, manifest order

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *lora: torch.Tensor):
        logits = torch.func.functional_call(
            self.model, dict(zip(self.lora_names, lora)), args=(), kwargs={"input_ids": input_ids, "use_cache": False}
        ).logits
        return _shifted_loss(logits, labels), logits[:, :-1, :]


def _replace_empty_permuted(gm: torch.fx.GraphModule) -> None:
    """full_like(empty_permuted(shape), v) -> full(shape, v): to_edge rejects empty_permuted.

    SiLU's backward builds its ones tensor this way; the shape list may hold symbolic sizes.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.full_like.default:
            continue
        src = node.args[0]
        if getattr(src, "target", None) is not torch.ops.aten.empty_permuted.default:
            continue
        with graph.inserting_before(node):
            full = graph.call_function(
                torch.ops.aten.full.default,
                (src.args[0], node.args[1]),
                {"dtype": src.kwargs.get("dtype", torch.float32), "device": torch.device("cpu")},
            )
        full.meta = dict(node.meta)
        node.replace_all_uses_with(full)
        graph.erase_node(node)
        if not src.users:
            graph.erase_node(src)
    graph.lint()
    gm.recompile()


def _dynamic_shapes(names: Sequence[str], max_batch: int, seq_len: int) -> dict[str, Any]:
    """Symbolic batch and seq up to their bounds; a bound equal to its minimum is a static size."""
    dims = {}
    if max_batch > 1:
        dims[0] = torch.export.Dim("batch", min=1, max=max_batch)
    if seq_len > MIN_SEQ_LEN:
        dims[1] = torch.export.Dim("seq", min=MIN_SEQ_LEN, max=seq_len)
    return {n: dict(dims) for n in names}


def _joint_program(peft_model: Any, example: tuple[torch.Tensor, torch.Tensor], max_batch: int, seq_len: int):
    """The exported joint forward + backward program: the one place that uses the private API."""
    from torch.export.experimental import _export_forward_backward

    ep = torch.export.export(
        _TrainLoss(peft_model), example, dynamic_shapes=_dynamic_shapes(("input_ids", "labels"), max_batch, seq_len)
    )
    ep = _export_forward_backward(ep)
    _replace_empty_permuted(ep.graph_module)
    return ep


def _eval_program(peft_model: Any, example: tuple[torch.Tensor, torch.Tensor], lora: dict[str, torch.Tensor],
                  max_batch: int, seq_len: int):
    wrapper = _EvalWithLora(peft_model, list(lora))
    shapes = _dynamic_shapes(("input_ids", "labels"), max_batch, seq_len)
    shapes["lora"] = tuple({} for _ in lora)
    with torch.no_grad():
        return torch.export.export(wrapper, (*example, *lora.values()), dynamic_shapes=shapes)


def lower(peft_model: Any, *, max_batch: int, seq_len: int) -> tuple[Any, list[str]]:
    """ExecutorchProgramManager with both methods, and the trainable PEFT names in evaluate's input order."""
    from executorch.exir import ExecutorchBackendConfig, to_edge

    vocab = peft_model.get_base_model().config.vocab_size
    shape = (min(2, max_batch), min(16, seq_len))  # not 1: export would specialise a size-1 dim
    example = (torch.randint(0, vocab, shape), torch.randint(0, vocab, shape))
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if naming.is_lora(n)}
    lora = dict(sorted(lora.items(), key=lambda kv: naming.to_artifact_name(kv[0])))
    with eager_attention(peft_model):  # SDPA's backward is not in the core ATen opset
        joint = _joint_program(peft_model, example, max_batch, seq_len)
        evaluate = _eval_program(peft_model, example, lora, max_batch, seq_len)
    edge = to_edge({TRAIN_METHOD: joint, EVAL_METHOD: evaluate})
    program = edge.to_executorch(ExecutorchBackendConfig(external_mutable_weights=True))
    return program, list(lora)


def _check_trainable(program: Any, peft_model: Any) -> None:
    """The training method's parameters must be exactly the model's LoRA tensors, by name."""
    from torch.export.graph_signature import OutputKind

    expected = set(naming.lora_peft_names(peft_model.state_dict()))

    specs = program.exported_program(TRAIN_METHOD).graph_signature.output_specs
    exported = {naming.to_peft_name(s.target) for s in specs if s.kind == OutputKind.GRADIENT_TO_PARAMETER}
    if exported != expected:
        raise RuntimeError(
            f"ExecuTorch training parameters differ from the PEFT LoRA tensors: missing "
            f"{sorted(expected - exported)[:5]}, unexpected {sorted(exported - expected)[:5]}; "
            "are frozen weights requires_grad=False and LoRA tensors requires_grad=True?"
        )


def _write_program(program: Any, out_dir: Path) -> None:
    """model.pte, and the external LoRA data renamed to lora.ptd (ExecuTorch picks its own file name)."""
    with open(out_dir / PROGRAM, "wb") as f:
        program.write_to_file(f)
    program.write_tensor_data_to_file(str(out_dir))
    written = sorted(out_dir.glob("*.ptd"))
    if len(written) != 1:
        raise RuntimeError(f"expected ExecuTorch to write one .ptd (the LoRA tensors), found {[p.name for p in written]}")
    written[0].rename(out_dir / TRAINABLE_DATA)


def _check_size(peft_model: Any) -> None:
    check_weight_bytes(peft_model, MAX_PTE_BYTES, "this exporter writes into one .pte; export fewer layers per stage "
                       "or use the ORT backend (external data)")


def _versions() -> dict[str, Any]:
    return {
        "runtime": f"executorch=={version('executorch')}",
        "exporter": f"torch=={torch.__version__}",
        "transformers": version("transformers"),
        "peft": version("peft"),
        "train_method": TRAIN_METHOD,
        "eval_method": EVAL_METHOD,
        "program": PROGRAM,
        "trainable_data": TRAINABLE_DATA,
    }


def export_executorch_artifacts(
    peft_model: Any,
    out_dir: str | os.PathLike[str],
    info: StageInfo = StageInfo(),
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_batch: int = 4,
) -> Path:
    """Write the ExecuTorch training program, LoRA data and manifest into `out_dir` and return it.

    Built beside `out_dir` and renamed into place, as export_ort_artifacts does. The optimizer
    is the runtime's SGD (the only one ExecuTorch exposes), so the manifest says "sgd".
    """
    check_exportable(peft_model, "sgd", seq_len)
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len must be at least {MIN_SEQ_LEN} for the ExecuTorch export, got {seq_len}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    _check_size(peft_model)
    with staging(out_dir) as (out, build):
        program, order = lower(peft_model, max_batch=max_batch, seq_len=seq_len)
        _check_trainable(program, peft_model)
        _write_program(program, build)
        state = peft_model.state_dict()
        trainable = [TensorSpec(naming.to_artifact_name(n), n, tuple(state[n].shape),
                                str(state[n].dtype).removeprefix("torch.")) for n in order]
        manifest = Manifest(run_id="", stage=0, backend="executorch", model_config={}, trainable=trainable,
                            inputs=list(INPUTS), seq_len=seq_len, optimizer="sgd",
                            versions={**_versions(), "max_batch": max_batch, "min_seq_len": MIN_SEQ_LEN})
        return publish_stage(build, out, manifest, peft_model, info)


import_trained_lora = naming.load_lora_into_peft  # the same import-back as ORT's: one name mapping
