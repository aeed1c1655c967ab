"""The portable device format: a LoRA training step as a standard ONNX graph for plain onnxruntime.

`onnxruntime-training` ships x86_64 wheels only and is frozen since 2024; the ordinary
`onnxruntime` package runs on x86_64 and aarch64 Linux, Jetson, Android, iOS and the web.
So the whole training step (forward, masked loss, backward to the LoRA tensors) is exported
as one plain ONNX graph, and the optimiser runs on the device in numpy
(edge_runtime/optim.py). Nothing here needs onnxruntime-training.

Artifact directory (format and backend name "onnx"):

    train.onnx          inputs  input_ids [batch, seq] int64, labels [batch, seq] int64,
                                then every LoRA tensor (manifest.trainable order, artifact names)
                        outputs loss (float32 scalar: mean cross-entropy over target tokens),
                                then grad.<artifact name> per LoRA tensor (same order)
    eval.onnx           the same inputs; outputs loss only (train.onnx pruned to its forward)
    weights/<name>.bin  every frozen tensor as ONNX external data, one raw little-endian file per
                        tensor, so the fetch layer's content addressing sends a device only
                        tensors that are new to it (the embedding once per run, not per stage)
    lora.safetensors    the stage's initial LoRA (PEFT names): what `devft-edge bench` starts from
    tokenizer.json      if a tokenizer dir was given
    manifest.json       edge_runtime/manifest.py; versions.min_onnxruntime says what the graph needs

Labels are input_ids with prompt and padding positions set to -100; the graph shifts them by
one itself (position t predicts token t + 1). The LM head runs on target positions only
(gathered in-graph with NonZero), as the server's trainer does, and in vocabulary slices
(chunked_cross_entropy) so a batch's full-vocabulary logits never exist at once. Pad on the right: with
causal attention the padding never influences a real token, so there is no attention mask.

The route (shared/reference/portable-training.md): torch.export of a module returning the
loss, torch's joint forward-backward graph (`_export_forward_backward`, private: it stays
pinned with torch; we call its parts to decompose once, straight to the ONNX exporter's op set),
fix-ups so the ONNX exporter keeps the loss and gradients as outputs and
the LoRA tensors as inputs, then `torch.onnx.export(dynamo=True)`. The graph depends only on
the submodel's shape, so `ensure_template` traces once per shape and restamps weights. The tracing
(loss head, joint graph, signature fix-ups) lives in export/onnx_trace.py; this module turns its program into
the ONNX files and the artifact directory.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file

from edge_runtime.backends.onnx_backend import MIN_ONNXRUNTIME, QUANTIZED_MIN_ONNXRUNTIME
from edge_runtime.batching import MIN_SEQ_LEN
from edge_runtime.manifest import WEIGHT_FORMATS, InputSpec, Manifest, TensorSpec
from export import naming
from export.common import json_config, model_tensors, shape_key
from export.onnx_trace import TRACE, already_decomposed, trace_training_graph
from export.options import PLAIN, GraphOptions
from export.publish import StageInfo, publish, publish_from_template, staging
from export.quant import QUANT_GRAPH, quantize, scheme_of, source_weight
from export.quant_graph import (
    defer_dequantization,
    dequant_recompute,
    lower_int4,
    lower_int8,
    onnx_translations,
)
from export.recompute import RECOMPUTE_GRAPH, recompute_layers

FORMAT = "onnx"
TRAIN_GRAPH = "train.onnx"
EVAL_GRAPH = "eval.onnx"
WEIGHTS_DIR = "weights"
INITIAL_LORA = "lora.safetensors"
LOSS = "loss"
GRAD_PREFIX = "grad."
OPSET = 20
INPUTS = (InputSpec("input_ids", ("batch", "seq")), InputSpec("labels", ("batch", "seq")))
INLINE_MAX_BYTES = 1024  # smaller frozen tensors stay inside the graph file
# SlicesSplit (Slice, Slice -> Split) is a two-output pattern whose matcher is quadratic in the
# graph: 15 of the 16 s of rewriting a 4-layer SmolLM2 training graph, growing with the square of
# the depth, and it never matches in these graphs (rotate_half slices are not Split-shaped).
_SLOW_RULES_THAT_NEVER_MATCH = frozenset({"SlicesSplit"})


def _REWRITE_RULES() -> list[Any]:  # noqa: N802 (a constant, computed when onnxscript is first needed)
    from onnxscript import rewriter

    return [r for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "name", None) not in _SLOW_RULES_THAT_NEVER_MATCH]


def _optimize_keeping_weights(model: Any) -> None:
    """onnxscript's optimiser (constant folding, rewrites, CSE) minus what would break restamping.

    A folded Transpose(W) would become a new tensor without the model's name, and equal-valued
    weights (fresh norms are all ones) would be merged into one initializer: either way a later
    stage could not be restamped by name. onnxruntime folds those at session start on the device.
    """
    import onnx_ir.passes.common as common_passes
    from onnxscript import ir, rewriter
    from onnxscript.optimizer import _constant_folding

    weights = {name for name, value in model.graph.initializers.items() if value.const_value is not None}

    def should_fold(node: Any) -> bool | None:
        return False if any(v is not None and v.name in weights for v in node.inputs) else None

    ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [_constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=8192,
                                                 output_size_limit=262144, should_fold=should_fold),
             rewriter.RewritePass(_REWRITE_RULES()),
             common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedFunctionsPass(),
             common_passes.RemoveUnusedOpsetsPass()],
            steps=2, early_stop=True),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)


def to_onnx(ep: torch.export.ExportedProgram, lora: Sequence[str]) -> onnx.ModelProto:
    """The training program as an ONNX model with our input and output names (weights still inline)."""
    with already_decomposed():
        program = torch.onnx.export(ep, dynamo=True, optimize=False, verbose=False, opset_version=OPSET,
                                    custom_translation_table=onnx_translations())
    _optimize_keeping_weights(program.model)
    model = program.model_proto
    graph = model.graph
    want_in = [i.name for i in INPUTS] + list(lora)
    if len(graph.input) != len(want_in):
        raise RuntimeError(f"exported graph has {len(graph.input)} inputs, expected {len(want_in)} "
                           f"(input_ids, labels and {len(lora)} LoRA tensors)")
    want_out = [LOSS] + [GRAD_PREFIX + n for n in lora]
    if len(graph.output) != len(want_out):
        raise RuntimeError(f"exported graph has {len(graph.output)} outputs, expected {len(want_out)}")
    rename = {v.name: new for v, new in zip(list(graph.input) + list(graph.output), want_in + want_out)}
    for node in graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
        del node.metadata_props[:]  # torch stack traces: most of the graph's bytes, no use on a device
    for v in list(graph.input) + list(graph.output):
        v.name = rename[v.name]
    return model


def _safe_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".bin"


def externalize_weights(model: onnx.ModelProto, weights_dir: Path) -> dict[str, str]:
    """Move every named weight (artifact-prefixed initializer) into its own raw file under weights_dir.

    Returns {initializer name: file path relative to the graph}. Small unnamed constants the
    exporter made stay inside the graph; they depend on the shape only, never on weight values.
    """
    weights_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for init in model.graph.initializer:
        if not init.name.startswith(naming.ARTIFACT_PREFIX):
            continue
        rel = f"{WEIGHTS_DIR}/{_safe_file_name(init.name)}"
        array = onnx.numpy_helper.to_array(init)
        _write_raw(weights_dir.parent / rel, array)
        _point_to_file(init, rel, array.nbytes)
        files[init.name] = rel
    return files


def _write_raw(path: Path, array: np.ndarray) -> None:
    path.write_bytes(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def _point_to_file(init: onnx.TensorProto, rel: str, nbytes: int) -> None:
    init.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        init.ClearField(field)
    del init.external_data[:]
    for key, value in (("location", rel), ("offset", "0"), ("length", str(nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    init.data_location = onnx.TensorProto.EXTERNAL


def _drop_gradient_surrogate(graph: onnx.GraphProto) -> None:
    """The loss is `value + (s - s)` where s only carries the head's gradient (chunked_cross_entropy): the
    forward-only graph returns `value` itself, so pruning drops the gradient's computation too."""
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(LOSS)
    if node is None or node.op_type != "Add":
        return
    for keep, other in ((0, 1), (1, 0)):
        sub = producer.get(node.input[other])
        if sub is not None and sub.op_type == "Sub" and sub.input[0] == sub.input[1]:
            node.op_type, node.input[:] = "Identity", [node.input[keep]]
            return


CHAIN_PREFIX = "head_chain_"  # the nodes chain_head_slices adds (their names make the pass idempotent)


def chain_head_slices(graph: onnx.GraphProto) -> bool:
    """Make the loss head's vocabulary slice k wait for the last use of slice k - 1; returns whether it changed.

    chunked_cross_entropy slices the LM head weight into LM_HEAD_CHUNKS pieces. A Slice of an initializer is
    ready when the step starts, so onnxruntime's priority-based order runs all of them at once and holds every
    slice (one float32 copy of the head, 108 MiB for SmolLM2) until the head needs them: a fixed ~100 MiB above
    the floor in every measured peak (benchmarks/RESULTS.md, micro-batches). Adding `0 * (leading dimension of
    the last result that read slice k - 1)` to slice k's start changes no value and makes it a data dependency,
    so one slice at a time exists. Quantized heads slice their codes (export/quant.py) and run in the default
    order: left alone. Plain ai.onnx ops (Shape, Mul, Add), so every runtime runs it."""
    if any(n.name.startswith(CHAIN_PREFIX) for n in graph.node):
        return False
    inits = {i.name for i in graph.initializer}
    nodes = list(graph.node)
    slices = [i for i, n in enumerate(nodes) if n.op_type == "Slice" and n.input[0] in inits
              and n.input[0].endswith("lm_head.weight")]
    if len(slices) < 2:
        return False
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            readers.setdefault(x, []).append(i)
    added: dict[int, list[onnx.NodeProto]] = {}
    for k, (prev, cur) in enumerate(zip(slices, slices[1:]), start=1):
        uses = list(readers.get(nodes[prev].output[0], []))
        uses += [r for t in uses if nodes[t].op_type == "Transpose" for r in readers.get(nodes[t].output[0], [])]
        last = max(uses)  # node indices: the graph is in topological order
        if last > cur:
            return False  # slice k - 1 is still read after slice k: leave the graph as it is
        names = [f"{CHAIN_PREFIX}{k}_{part}" for part in ("dim", "zero", "start")]
        added[cur] = [
            onnx.helper.make_node("Shape", [nodes[last].output[0]], [names[0]], name=names[0], start=0, end=1),
            onnx.helper.make_node("Mul", [names[0], CHAIN_PREFIX + "zero"], [names[1]], name=names[1]),
            onnx.helper.make_node("Add", [nodes[cur].input[1], names[1]], [names[2]], name=names[2]),
        ]
    for cur, (_, _, add) in added.items():
        nodes[cur].input[1] = add.output[0]
    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.int64), CHAIN_PREFIX + "zero"))
    ordered = [onnx.NodeProto.FromString(m.SerializeToString())  # copies: the originals go with the del
               for i, n in enumerate(nodes) for m in added.get(i, []) + [n]]
    del graph.node[:]
    graph.node.extend(ordered)
    return True


def prune_to_outputs(model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` computing only the outputs in `keep` (the eval graph: train.onnx minus backward)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    _drop_gradient_surrogate(graph)
    needed = set(keep)
    nodes = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    kept_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in reversed(nodes)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    outputs = [o for o in graph.output if o.name in keep]
    del graph.output[:]
    graph.output.extend(outputs)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    # graph inputs stay (LoRA tensors too), so train and eval take the same feeds
    del graph.value_info[:]
    return out


def restamp_weights(peft_model: Any, graph: onnx.ModelProto, out_dir: Path, scheme: str = "fp32") -> None:
    """Write `peft_model`'s tensors into the weight files `graph` points to (a cached graph, a new stage);
    quantized initializers get the `scheme` quantization of the weight they stand for."""
    state = model_tensors(peft_model)
    quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for init in graph.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        source = source_weight(init.name)
        if source is None:
            key = naming.state_key(state, init.name, "graph weight")
            array = state[key].detach().cpu().numpy()
        else:
            key = naming.state_key(state, source, "quantized graph weight")
            if key not in quantized:
                quantized[key] = quantize(state[key].detach().float().cpu().numpy(), scheme_of(init.name, scheme))
            array = quantized[key][init.name.rpartition(".")[2]]
        if list(array.shape) != list(init.dims):
            raise ValueError(f"{key}: the submodel has shape {list(array.shape)}, the cached graph {list(init.dims)}; "
                             "delete the export template cache and retry")
        rel = next(e.value for e in init.external_data if e.key == "location")
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        _write_raw(out_dir / rel, array)


def template_key(peft_model: Any, *, seq_len: int, graph: GraphOptions = PLAIN) -> str:
    """Hash of everything the graph depends on (shapes, configs, tool versions, `graph`), never weight values."""
    extra = {} if graph.weights == "fp32" else {"weights": WEIGHT_FORMATS[graph.weights], "graph": QUANT_GRAPH}
    if graph.recompute:  # plain options hash as before they existed: fp32 templates cached earlier stay valid
        extra["activations"] = f"recompute-{RECOMPUTE_GRAPH}"
    return shape_key(peft_model, ("torch", "transformers", "peft", "onnx", "onnxscript"), format=FORMAT,
                     seq_len=seq_len, opset=OPSET, trace=TRACE, **extra)


def check_exportable(peft_model: Any, seq_len: int) -> None:
    """Fail before the slow export: devices train float32 on CPU, sequences need a target token."""
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len must be at least {MIN_SEQ_LEN}, got {seq_len}")
    bad = {(str(p.dtype), str(p.device)) for p in peft_model.parameters()} - {("torch.float32", "cpu")}
    if bad:
        raise ValueError(f"export needs a float32 CPU model, found parameters as {sorted(bad)}; "
                         "call peft_model.float().cpu() first")
    if any(getattr(c, "lora_dropout", 0.0) for c in peft_model.peft_config.values()):
        raise ValueError("LoRA dropout is not exported (the graph is traced in eval mode) and devices would train "
                         "without it: set lora.dropout=0")


def _trainable_specs(peft_model: Any, lora: Sequence[str]) -> list[TensorSpec]:
    params = dict(peft_model.named_parameters())
    specs = []
    for name in lora:
        peft = naming.to_peft_name(name)
        specs.append(TensorSpec(name=name, peft_name=peft, shape=tuple(params[peft].shape),
                                dtype=str(params[peft].dtype).removeprefix("torch.")))
    return specs


def _versions(model: onnx.ModelProto) -> dict[str, Any]:
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset, "ir_version": model.ir_version,  # int4's blockwise DequantizeLinear: opset 21, ORT 1.20
            "min_onnxruntime": MIN_ONNXRUNTIME if opset <= OPSET else QUANTIZED_MIN_ONNXRUNTIME,
            "train_graph": TRAIN_GRAPH, "eval_graph": EVAL_GRAPH, "initial_lora": INITIAL_LORA,
            "exporter": f"torch=={torch.__version__}", "onnx": version("onnx"), "onnxscript": version("onnxscript"),
            "transformers": version("transformers"), "peft": version("peft")}


def export_template(peft_model: Any, out_dir: Path, *, seq_len: int, graph: GraphOptions = PLAIN) -> Path:
    """Trace and write the graphs (with this model's weights) into out_dir: the slow part, once per shape."""
    check_exportable(peft_model, seq_len)
    ep, lora = trace_training_graph(peft_model, seq_len, graph.weights)
    model = to_onnx(ep, lora)
    del ep
    lower_int4(model)
    lower_int8(model)
    # before dequant_recompute, which then gives the layers' copies their own dequantizations
    if graph.recompute and not recompute_layers(model.graph, LOSS):
        raise ValueError("--recompute found no decoder layer to recompute: it looks for parameters named "
                         "'.layers.<N>.' (Llama-style models); export without it")
    dequant_recompute(model.graph, LOSS)
    with staging(out_dir) as (out, build):
        externalize_weights(model, build / WEIGHTS_DIR)
        if graph.weights != "fp32":
            restamp_weights(peft_model, model, build, graph.weights)  # the trace's placeholders -> this model's values
        eval_model = prune_to_outputs(model, [LOSS])  # before chaining: the eval graph chains to its own last uses
        for g in (model.graph, eval_model.graph):
            chain_head_slices(g)
            defer_dequantization(g)  # after pruning: each graph's dequantizations wait for its own nodes
        onnx.save(model, str(build / TRAIN_GRAPH))
        onnx.save(eval_model, str(build / EVAL_GRAPH))
        manifest = Manifest(run_id="", stage=0, backend=FORMAT, model_config=json_config(peft_model),
                            trainable=_trainable_specs(peft_model, lora), inputs=list(INPUTS), seq_len=seq_len,
                            versions=_versions(model), optimizer="adamw", weights=WEIGHT_FORMATS[graph.weights],
                            activations="recompute" if graph.recompute else "keep")
        return publish(build, out, manifest)


def ensure_template(peft_model: Any, template_root: str | os.PathLike[str], *, seq_len: int,
                    graph: GraphOptions = PLAIN) -> tuple[Path, Manifest]:
    """The cached graphs of `peft_model`'s shape under template_root (directory, manifest), traced now if
    there are none yet or they were written by an older devft (another manifest format).

    A lock file per shape makes concurrent callers trace it once: the coordinator waits for its own
    background warm-up process (server_sdk/engine/warm.py) instead of tracing the same graph beside it."""
    from edge_runtime.manifest import ManifestError, load_manifest

    check_exportable(peft_model, seq_len)
    root = Path(template_root)
    root.mkdir(parents=True, exist_ok=True)
    template = root / template_key(peft_model, seq_len=seq_len, graph=graph)
    with open(root / f"{template.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            return template, load_manifest(template, verify_hashes=False)
        except ManifestError:
            shutil.rmtree(template, ignore_errors=True)
            export_template(peft_model, template, seq_len=seq_len, graph=graph)
            return template, load_manifest(template, verify_hashes=False)


def export_onnx_artifacts(
    peft_model: Any,
    out_dir: str | os.PathLike[str],
    template_root: str | os.PathLike[str],
    info: StageInfo = StageInfo(),
    *,
    seq_len: int,
    optimizer: str = "adamw",
    graph: GraphOptions = PLAIN,
) -> Path:
    """Write the portable artifacts of `peft_model` into out_dir, tracing only if no graph of its shape is cached.

    `graph`: how the frozen weights are stored and whether activations are recomputed (export/options.py; the
    manifest records both). Built beside out_dir and renamed into place, so a reader never sees a half-written directory.
    """
    template, manifest = ensure_template(peft_model, template_root, seq_len=seq_len, graph=graph)
    manifest.optimizer = optimizer

    def write_weights(build: Path) -> None:
        for name in (TRAIN_GRAPH, EVAL_GRAPH):  # templates traced before chain_head_slices get it here
            model = onnx.load(str(build / name), load_external_data=False)
            if chain_head_slices(model.graph):
                onnx.save(model, str(build / name))
        restamp_weights(peft_model, onnx.load(str(build / TRAIN_GRAPH), load_external_data=False), build,
                        graph.weights)
        lora = {t.peft_name: peft_model.state_dict()[t.peft_name].detach().cpu().numpy() for t in manifest.trainable}
        save_file(lora, str(build / INITIAL_LORA))

    return publish_from_template(template, (TRAIN_GRAPH, EVAL_GRAPH), write_weights, out_dir, manifest, peft_model,
                                 info)


def import_trained_lora(peft_model: Any, trained: Mapping[str, np.ndarray]) -> None:
    """Load LoRA tensors trained on a device (keyed by PEFT name) back into `peft_model`."""
    naming.load_lora_into_peft(peft_model, trained)
