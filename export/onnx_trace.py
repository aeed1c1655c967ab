"""Tracing the portable format's training step: a PEFT submodel -> torch's joint forward-backward program with
the LoRA tensors as inputs and the loss and gradients as outputs, ready for the ONNX exporter (export/onnx.py).

The loss is the server trainer's (`_AnswerLoss`: the LM head on answer positions only, in vocabulary slices by
`chunked_cross_entropy` so a batch's full-vocabulary logits never exist at once). The route
(shared/reference/portable-training.md): torch.export of a module returning the loss, torch's joint
forward-backward graph (`_export_forward_backward`, private: it stays pinned with torch; we call its parts to
decompose once, straight to the ONNX exporter's op set), and fix-ups so the ONNX exporter keeps the loss and
gradients as outputs and the LoRA tensors as inputs (`_as_user_signature`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from edge_runtime.batching import IGNORE_INDEX, MIN_SEQ_LEN
from export import naming
from export.common import eager_attention
from export.memory import LM_HEAD_CHUNKS
from export.quant import QuantLinear, quantized_modules


class _AnswerLoss(torch.nn.Module):
    """forward(input_ids, labels) -> (loss,): the server trainer's loss (server_sdk/engine/trainer.py token_losses).

    The decoder runs on every position, the LM head only on positions whose next-token label is
    not -100, and the loss is the mean of their cross-entropies. The attribute name `model` is
    naming.ARTIFACT_PREFIX, so parameter FQNs are artifact names.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor]:
        inner = self.model.get_base_model()
        hidden = inner.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        target = labels[:, 1:].reshape(-1)
        idx = (target != IGNORE_INDEX).nonzero().squeeze(-1)
        torch._check(idx.shape[0] > 0)  # a batch without targets is refused on the device, never a NaN
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
        target = target.index_select(0, idx)
        head = inner.lm_head
        if isinstance(head, QuantLinear):
            return (chunked_cross_entropy(picked, head, target, LM_HEAD_CHUNKS),)
        if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
            return (F.cross_entropy(head(picked).float(), target),)  # a head with LoRA or a bias: the plain loss
        return (chunked_cross_entropy(picked, head.weight, target, LM_HEAD_CHUNKS),)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor | QuantLinear, target: torch.Tensor,
                          chunks: int) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `target`, with the vocabulary in `chunks` slices, so the
    [positions, vocab] logits of a batch never exist at once (the head's memory on a device).

    The loss and its gradient with respect to `hidden` are computed here, from a detached copy, one
    vocabulary slice at a time: per slice its logits, their log-sum-exp and softmax, and softmax @ slice;
    the slices combine exactly (each softmax reweighted by exp(lse_slice - lse)). The result is the loss plus
    `(hidden * grad).sum()` minus its own detached value, which is zero, so the value is the loss and autograd
    sends exactly `grad` into the decoder. The frozen head weight needs no gradient, and the backward graph keeps
    nothing vocabulary-sized. Same arithmetic as F.cross_entropy up to float rounding (the parity tests check)."""
    h = hidden.detach().float()
    n = h.shape[0]
    lses, weighted = [], []
    quant = isinstance(weight, QuantLinear)
    vocab = weight.out_features if quant else weight.shape[0]
    size = -(-vocab // chunks)
    for start in range(0, vocab, size):
        length = min(size, vocab - start)  # a Slice (dequantized if stored quantized): one slice at a time
        w = weight.rows(start, length) if quant else weight.narrow(0, start, length).float()
        logits = h @ w.T
        lse = torch.logsumexp(logits, dim=-1)
        lses.append(lse)
        weighted.append(torch.exp(logits - lse[:, None]) @ w)
    slice_lse = torch.stack(lses, dim=-1)  # [n, chunks]
    lse = torch.logsumexp(slice_lse, dim=-1)
    share = torch.exp(slice_lse - lse[:, None])
    rows = weight.gather(target) if quant else weight.index_select(0, target).float()
    expected = sum(share[:, k : k + 1] * g for k, g in enumerate(weighted))
    loss = (lse - (h * rows).sum(-1)).mean()
    grad = (expected - rows) / n
    surrogate = (hidden.float() * grad).sum()
    return loss + (surrogate - surrogate.detach())


def _replace_empty_permuted(gm: torch.fx.GraphModule) -> None:
    """aten.empty_permuted (SiLU's backward) has no ONNX lowering: use aten.empty.memory_format."""
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.empty_permuted.default:
            node.target = torch.ops.aten.empty.memory_format
            node.args = (node.args[0],)
    gm.graph.lint()
    gm.recompile()


def _as_user_signature(ep: torch.export.ExportedProgram) -> tuple[torch.export.ExportedProgram, list[str]]:
    """LoRA parameters become user inputs (after input_ids and labels), loss and gradients user outputs.

    The ONNX exporter drops LOSS_OUTPUT and GRADIENT_TO_PARAMETER outputs silently (and then
    optimises every node away), and would bake the LoRA parameters in as constants. Returns the
    program and the LoRA artifact names in input (and gradient output) order.
    """
    sig = ep.graph_signature
    inputs, lora, n_user = _user_inputs(sig)
    outputs = _user_outputs(sig, lora)
    _reorder_graph(ep, inputs, outputs)
    ep._graph_signature = type(sig)(input_specs=inputs, output_specs=outputs)
    for name in lora:
        ep.state_dict.pop(name, None)
    _patch_call_graph(ep, n_user + len(lora), len(outputs))
    return ep, lora


def _user_inputs(sig: Any) -> tuple[list[Any], list[str], int]:
    """(the input specs: frozen parameters and buffers, then the user's inputs, then the LoRA parameters as user
    inputs; the LoRA names in that order; how many user inputs came first)."""
    from torch.export.graph_signature import InputKind
    from torch.export.graph_signature import InputSpec as EInput

    is_lora = [s.kind == InputKind.PARAMETER and naming.is_lora(s.target) for s in sig.input_specs]
    lora_specs = [s for s, lo in zip(sig.input_specs, is_lora) if lo]
    kept = [s for s, lo in zip(sig.input_specs, is_lora) if not lo and s.kind != InputKind.USER_INPUT]
    user = [s for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    inputs = kept + user + [EInput(InputKind.USER_INPUT, s.arg, None) for s in lora_specs]
    return inputs, [s.target for s in lora_specs], len(user)


def _user_outputs(sig: Any, lora: list[str]) -> list[Any]:
    """The loss, then one gradient per LoRA tensor in `lora`'s order, all as user outputs."""
    from torch.export.graph_signature import OutputKind
    from torch.export.graph_signature import OutputSpec as EOutput

    loss = [s for s in sig.output_specs if s.kind == OutputKind.LOSS_OUTPUT]
    grads = {s.target: s for s in sig.output_specs if s.kind == OutputKind.GRADIENT_TO_PARAMETER}
    if len(loss) != 1 or set(grads) != set(lora):
        raise RuntimeError(f"the joint graph has {len(loss)} loss outputs and gradients for {sorted(grads)[:3]}..., "
                           f"expected one loss and a gradient per LoRA tensor ({len(lora)}); is only LoRA "
                           "requires_grad=True?")
    return [EOutput(OutputKind.USER_OUTPUT, loss[0].arg, None)] + \
        [EOutput(OutputKind.USER_OUTPUT, grads[name].arg, None) for name in lora]


def _reorder_graph(ep: torch.export.ExportedProgram, inputs: list[Any], outputs: list[Any]) -> None:
    """Placeholders in `inputs` order (the graph must list them as the signature does), and the output node
    returning `outputs`."""
    graph = ep.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for spec in inputs:
        anchor.prepend(placeholders[spec.arg.name])
    by_name = {n.name: n for n in graph.nodes}
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_node.args = (tuple(by_name[s.arg.name] for s in outputs),)
    graph.lint()
    ep.graph_module.recompile()


def _patch_call_graph(ep: torch.export.ExportedProgram, n_in: int, n_out: int) -> None:
    """The root module call signature must describe the new user inputs and outputs (pytree specs)."""
    import torch.utils._pytree as pytree
    from torch.export.graph_signature import InputKind, TensorArgument

    sig = ep.module_call_graph[0].signature
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    sig.inputs = [TensorArgument(n) for n in user_inputs]
    sig.outputs = [TensorArgument(s.arg.name) for s in ep.graph_signature.output_specs]
    sig.in_spec = pytree.tree_flatten((tuple(range(n_in)), {}))[1]
    sig.out_spec = pytree.tree_flatten(tuple(range(n_out)))[1]
    sig.forward_arg_names = user_inputs
    ep._example_inputs = None


TRACE = 4  # how the graph is traced (in the template key): 2 = one decomposition pass, 4 = chunked loss head


def _decompositions() -> dict[Any, Any]:
    """What the two passes torch would run compose to, as one table: core ATen (what
    `_export_forward_backward` uses) over the ONNX exporter's table (the ATen ops its registry does
    not implement, e.g. squeeze.dims that core ATen's decompositions emit). Core ATen must win where
    both tables have an op: with the exporter's table alone the LoRA gradients came out 25x too large
    (the loss matched), which tests/test_export_onnx.py's parity test catches."""
    from torch._decomp import core_aten_decompositions
    from torch.onnx._internal.exporter import _decomp, _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    onnx_table = _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))
    return {**onnx_table, **core_aten_decompositions()}


def _joint_for_onnx(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`torch.export.experimental._export_forward_backward`, decomposing in one pass to what the
    ONNX exporter implements: each decomposition re-traces the whole joint graph, and
    torch.onnx.export's own second pass took 58 of its 76 s on 8 SmolLM2 layers. The ONNX graph
    has the same ops in the same order as with the two passes (only symbolic-size names differ)."""
    from torch.export.experimental import _copy_graph_module_and_signature, _remove_detach_pass
    from torch.export.exported_program import _decompose_exported_program

    ep = _decompose_exported_program(ep, cia_to_decomp={}, python_decomp_table=_decompositions(),
                                     joint_loss_index=0, decompose_custom_triton_ops=False)
    gm, signature = _copy_graph_module_and_signature(ep)
    _remove_detach_pass(gm, signature)
    return ep._update(gm, signature)


@contextlib.contextmanager
def already_decomposed() -> Iterator[None]:
    """torch.onnx.export without its decomposition pass (the program is decomposed for it already)."""
    from torch.onnx._internal.exporter import _fx_passes

    original = _fx_passes.decompose_with_registry
    _fx_passes.decompose_with_registry = lambda program, registry: program
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original


def trace_training_graph(peft_model: Any, seq_len: int, weights: str = "fp32",
                         ) -> tuple[torch.export.ExportedProgram, list[str]]:
    """The joint forward + backward program with LoRA as inputs and loss + gradients as outputs; `weights`
    int8/int4: the frozen weights as quantized buffers dequantized in the graph (export/quant.py)."""
    vocab = peft_model.get_base_model().config.vocab_size
    example = torch.randint(0, vocab, (2, min(16, seq_len)), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=MIN_SEQ_LEN, max=seq_len)
    shapes = {"input_ids": {0: batch, 1: seq}, "labels": {0: batch, 1: seq}}
    for n, p in peft_model.named_parameters():
        p.requires_grad_(naming.is_lora(n))
    with eager_attention(peft_model), quantized_modules(peft_model, weights):
        ep = torch.export.export(_AnswerLoss(peft_model), (example, example.clone()), dynamic_shapes=shapes,
                                 strict=False)
        ep = _joint_for_onnx(ep)
    _replace_empty_permuted(ep.graph_module)
    return _as_user_signature(ep)
