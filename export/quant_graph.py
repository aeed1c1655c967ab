"""The quantized graphs' passes (export/quant.py holds the schemes and the torch side of tracing).

After torch.onnx.export, in this order (export/onnx.export_template): `lower_int4` turns the traced
placeholder of the asymmetric schemes into a per-block DequantizeLinear plus an Add, `lower_int8`
does the same for the table's symmetric Cast/Mul, `dequant_recompute` gives every later use of a dequantized
weight its own copy (no float weight held from the forward to the backward), and `defer_dequantization`
makes each copy wait for its use (none runs early and is held). Each pass changes no value: the tests compare
losses and gradients bit for bit.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from export.common import reads_only, upstream, view_after, wait_for
from export.quant import BLOCK, INT4_OPSET, QSCALE, QWEIGHT, source_weight

# Reshape shapes equal to a 2-D tensor's own, written differently: a recomputed dequantization reads its
# quantized initializers through a Reshape with one of these, so no common-subexpression pass merges it back
_SAME_SHAPE = ((-1, None), (None, -1), (0, None), (None, 0), (0, -1), (-1, 0), (0, 0), (None, None))


def dequant_recompute(graph: Any, loss: str = "loss") -> int:
    """Give each backward consumer of a dequantized weight its own copy of the dequantization.

    Autograd keeps the tensors the backward reads from the forward, and for a frozen Linear that is the
    float weight: traced as is, every layer's dequantized weight would live from its forward to its backward,
    all of them at once at the turn, the fp32 model again. With the chain (Cast, Mul by the scales, ...)
    repeated in front of its backward consumers, each float weight lives for its forward use and again for
    its backward use, at the cost of dequantizing again in the backward (for int4 one DequantizeLinear and
    one Add: benchmarks/RESULTS.md weighs the two). A second consumer in the forward (an ancestor of the
    `loss` output: the LM head's two products of one vocabulary slice) shares the first one's result, which
    defer_dequantization then computes just before the first of them. Returns how many chains were added."""
    source, const, producer = _dequantized_tensors(graph)
    forward = _ancestors_of(graph, loss)
    ctx = _CloneContext({i.name: i for i in graph.initializer}, producer)
    uses: Counter[str] = Counter()
    out_nodes, added = [], 0
    for node in graph.node:
        if not reads_only(node, const):  # a consumer that depends on the batch
            for j, name in enumerate(node.input):
                if name in source:
                    uses[source[name]] += 1
                    if uses[source[name]] > 1 and id(node) not in forward:
                        node.input[j] = ctx.clone(name, uses[source[name]], out_nodes)
                        added += 1
        out_nodes.append(node)
    graph.initializer.extend(ctx.extra_inits)
    _keep_needed(graph, out_nodes)
    return added


def _ancestors_of(graph: Any, output: str) -> set[int]:
    """id() of every node `output` depends on (the forward of a training graph, when `output` is its loss)."""
    nodes = list(graph.node)
    return {id(nodes[k]) for k in upstream(nodes, {o: k for k, n in enumerate(nodes) for o in n.output if o}, [output])}


GATE_PREFIX = "dequant_gate_"  # the nodes defer_dequantization adds (their names make the pass idempotent)


def defer_dequantization(graph: Any) -> int:
    """Make each dequantization wait until the step reaches its use; returns how many were gated.

    A dequantization reads initializers only, so it is ready when the step starts, and onnxruntime's
    priority-based order runs such nodes early and holds their float results until their use: every layer's
    float weight at once, the memory quantizing was for (SmolLM2 4-layer int8: 565 MiB priority-based against
    433 MiB in the default order, which has its own early runs: the LM head's vocabulary slices, several at
    once). Here each dequantization feeding a batch-dependent node N gets a data dependency on the node just
    before N in the traced order: its quantized initializers are read through a Reshape (an alias, no copy)
    whose shape is their own plus 0 x Size(that node's output). No value changes; the float weight exists
    from just before its use to its use, in either execution order. Plain ai.onnx ops (Size, Mul, Add,
    Reshape). Run after dequant_recompute (the backward's copies are gated to their own uses)."""
    import onnx

    if any(n.name.startswith(GATE_PREFIX) for n in graph.node):
        return 0
    source, const, _ = _dequantized_tensors(graph)
    nodes = list(graph.node)
    gates = _Gates({i.name: i for i in graph.initializer}, nodes, const)
    before = gates.plan(source)
    if not before:
        return 0
    ordered = [n for k, n in enumerate(nodes) if k not in gates.moved for n in before.get(k, []) + [n]]
    del graph.node[:]
    graph.node.extend(onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered)
    graph.initializer.extend(gates.extra_inits.values())
    return len(before)


class _Gates:
    """The bookkeeping of defer_dequantization: which nodes compute a consumer's dequantized inputs privately
    (moved to just before it), and the gate nodes in front of them."""

    def __init__(self, inits: dict[str, Any], nodes: list[Any], const: set[str]):
        self.inits, self.nodes, self.const = inits, nodes, const
        self.producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
        self.readers: dict[str, set[int]] = {}
        for k, n in enumerate(nodes):
            for x in n.input:
                self.readers.setdefault(x, set()).add(k)
        self.moved: set[int] = set()
        self.extra_inits: dict[str, Any] = {}

    def plan(self, source: dict[str, str]) -> dict[int, list[Any]]:
        """Per batch-dependent node reading dequantized tensors: the gate and chain nodes to put in front of it."""
        before: dict[int, list[Any]] = {}
        previous: str | None = None  # an output of the last batch-dependent node so far
        for k, node in enumerate(self.nodes):
            if reads_only(node, self.const):
                continue
            roots = [i for i in node.input if i in source]
            front = self.gate(k, roots, previous or self._batch_input(node)) if roots else []
            if front:
                before[k] = front
            previous = next((o for o in node.output if o), previous)
        return before

    def _batch_input(self, node: Any) -> str:
        return next(i for i in node.input if i and i not in self.const)

    def private_chain(self, consumer: int, roots: list[str]) -> list[int]:
        """The initializer-only nodes computing `roots` that nothing before `consumer` reads but each other."""
        chain, stack = set(), list(roots)
        while stack:
            k = self.producer.get(stack.pop())
            if k is not None and k not in chain and k not in self.moved:
                chain.add(k)
                stack += [i for i in self.nodes[k].input if i]
        changed = True
        while changed:  # a node read before `consumer` from outside the chain stays where it is, and so do its
            # inputs' producers (a later reader, such as the LM head slice's second product, reads it there)
            outside = {k for k in chain if any(r not in chain and r < consumer
                                               for o in self.nodes[k].output for r in self.readers.get(o, ()))}
            changed = bool(outside)
            chain -= outside
            for k in outside:
                chain -= upstream(self.nodes, self.producer, list(self.nodes[k].input))
        return sorted(chain)

    def gate(self, consumer: int, roots: list[str], after: str) -> list[Any]:
        """Gate nodes then the private chain of `consumer`'s dequantized inputs, reading `after` first."""
        import onnx

        chain = self.private_chain(consumer, roots)
        reads = [(k, j) for k in chain for j, i in enumerate(self.nodes[k].input)
                 if i in self.inits and source_weight(i) is not None]
        if not reads:
            return []
        g = f"{GATE_PREFIX}{consumer}"
        front = wait_for(after, g, GATE_PREFIX + "zero")
        self.extra_inits.setdefault(GATE_PREFIX + "zero", onnx.numpy_helper.from_array(np.array(0, np.int64),
                                                                                        GATE_PREFIX + "zero"))
        gated: dict[str, str] = {}
        for k, j in reads:
            name = self.nodes[k].input[j]
            if name not in gated:
                dims = list(self.inits[name].dims)
                shape = GATE_PREFIX + "shape_" + "x".join(map(str, dims))
                self.extra_inits.setdefault(shape, onnx.numpy_helper.from_array(np.array(dims, np.int64), shape))
                gated[name] = f"{g}.{name}"
                front += view_after(name, shape, g + "_zero", gated[name])
            self.nodes[k].input[j] = gated[name]
        self.moved.update(chain)
        return front + [self.nodes[k] for k in chain]


def _dequantized_tensors(graph: Any) -> tuple[dict[str, str], set[str], dict[str, Any]]:
    """(tensor computed from initializers only, at least one quantized -> the float weight it stands for;
    every tensor computed from initializers only; the node producing each tensor)."""
    const: set[str] = {i.name for i in graph.initializer}
    source: dict[str, str] = {}
    producer: dict[str, Any] = {}
    for node in graph.node:
        producer.update({o: node for o in node.output})
        if reads_only(node, const):
            const.update(node.output)
            found = {source.get(i) or source_weight(i) for i in node.input if i} - {None}
            if found:
                source.update({o: min(found) for o in node.output})
    return source, const, producer


def _keep_needed(graph: Any, nodes: list[Any]) -> None:
    """Set graph's nodes to those of `nodes` the outputs need (originals whose every use went to a copy go)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))


class _CloneContext:
    """Copies of dequantization chains: the k-th copy reads each quantized initializer through the k-th
    same-shape Reshape."""

    def __init__(self, inits: dict[str, Any], producer: dict[str, Any]):
        self.inits, self.producer, self.extra_inits = inits, producer, []

    def clone(self, name: str, k: int, out: list[Any]) -> str:
        return self._clone(name, k, out, {})

    def _clone(self, name: str, k: int, out: list[Any], done: dict[str, str]) -> str:
        """Append copies of the nodes computing `name` from initializers to `out`; return the copy's name."""
        import onnx

        if name not in done:
            if name in self.inits:
                done[name] = self._reshaped(name, k, out)
            elif name not in self.producer:
                done[name] = name
            else:
                node = self.producer[name]
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name = f"{node.name}__rc{k}"
                copy.input[:] = [self._clone(i, k, out, done) if i else i for i in node.input]
                copy.output[:] = [f"{o}__rc{k}" for o in node.output]
                out.append(copy)
                done.update(zip(node.output, copy.output))
        return done[name]

    def _reshaped(self, name: str, k: int, out: list[Any]) -> str:
        import onnx

        init = self.inits[name]
        if source_weight(name) is None or len(init.dims) != 2:
            return name
        shape = [d if v is None else v for d, v in zip(init.dims, _SAME_SHAPE[(k - 2) % len(_SAME_SHAPE)])]
        shape_name = f"recompute_shape{k}.{name}"  # not an artifact name: stays inside the graph
        self.extra_inits.append(onnx.numpy_helper.from_array(np.array(shape, dtype=np.int64), shape_name))
        new = f"{name}__rc{k}"
        out.append(onnx.helper.make_node("Reshape", [name, shape_name], [new], name=new))
        return new


# ---- the int4 (and int8-asym) graph ---------------------------------------------

DOMAIN = "devft"  # the placeholder's domain while tracing; lower_int4 leaves only ai.onnx ops


def onnx_translations() -> dict[Any, Any]:
    """torch.onnx.export's custom_translation_table: dequantize_int4 becomes a placeholder node that
    `lower_int4` replaces (its lowering views the codes in blocks, which the traced shapes do not know)."""
    import onnx
    import onnxscript

    if not onnx.defs.has("DequantizeInt4", domain=DOMAIN):  # onnxscript builds nodes of known schemas only
        param = onnx.defs.OpSchema.FormalParameter
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "DequantizeInt4", DOMAIN, 1, inputs=[param("qweight", "tensor(uint8)"), param("qscale", "tensor(float16)"),
                                                 param("qmin", "tensor(float16)")],
            outputs=[param("weight", "tensor(float)")]))
    opset = onnxscript.values.Opset(domain=DOMAIN, version=1)

    def translate(qweight: Any, qscale: Any, qmin: Any) -> Any:
        return opset.DequantizeInt4(qweight, qscale, qmin)

    return {torch.ops.devft.dequantize_int4.default: translate}


def lower_int4(model: Any) -> int:
    """Replace every DequantizeInt4 placeholder by ai.onnx ops (`_per_block_nodes`): the codes, as stored, viewed
    one block a row, dequantized by one per-row DequantizeLinear, then + min per block. Two passes over the
    float weight (three byte-wide ones more for int4's nibbles) where the traced torch unpacking took a dozen.
    Raises the model's ai.onnx opset to 21. Returns how many were lowered."""
    import onnx

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, consts, lowered = [], {}, 0
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        nodes += _per_block_nodes(node, inits[node.input[0]], inits[node.input[1]], consts)
        lowered += 1
    if not lowered:
        return 0
    _block_shapes(graph)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in consts.items())
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, INT4_OPSET)
    model.ir_version = max(model.ir_version, 10)
    return lowered


def lower_int8(model: Any) -> int:
    """Replace each traced int8 dequantization (Cast to float, Reshape to blocks, Mul by the unsqueezed scales)
    by one per-row DequantizeLinear over the codes viewed as [blocks, 32] (each block a row, its scale that
    row's, as `_per_block_nodes` does for int8-asym) and aliasing Reshapes: the same q * scale, one float32
    multiplication, bit for bit, without the Cast's float copy of the weight beside the product (the LM head's
    vocabulary slice: 13.5 MiB for SmolLM2). Raises the model's ai.onnx opset to 21. Returns how many were
    lowered."""
    from onnx.helper import make_node

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    inits = {i.name: i for i in graph.initializer}
    nodes, lowered = [], 0
    for node in graph.node:
        found = _int8_dequantization(node, producer, inits) if node.op_type == "Mul" else None
        if found is None:
            nodes.append(node)
            continue
        q, scale, blocks_shape = found
        t = f"{node.output[0]}/int8"
        nodes += [make_node("Reshape", [q, BLOCK_ROWS], [t + "_q"], name=t + "_q"),
                  make_node("Reshape", [scale, FLAT], [t + "_scale"], name=t + "_scale"),
                  make_node("DequantizeLinear", [t + "_q", t + "_scale"], [t + "_dq"], axis=0, name=t + "_dq"),
                  make_node("Reshape", [t + "_dq", blocks_shape], [node.output[0]], name=f"{node.output[0]}/int8_blocks")]
        lowered += 1
    if not lowered:
        return 0
    _block_shapes(graph)
    _keep_needed(graph, nodes)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, INT4_OPSET)
    model.ir_version = max(model.ir_version, 10)
    return lowered


BLOCK_ROWS, FLAT, BLOCK_COLUMN = "dq_block_rows", "dq_flat", "dq_block_column"  # Reshape shapes of the lowerings
HALF_BLOCK_ROWS = "dq_half_block_rows"  # int4's bytes, a block a row


def _block_shapes(graph: Any) -> None:
    """The lowerings' shared Reshape shapes, as initializers (once): codes as [blocks, 32], scales flat, minimums
    as a [blocks, 1] column."""
    import onnx

    have = {i.name for i in graph.initializer}
    for name, shape in ((BLOCK_ROWS, [-1, BLOCK]), (FLAT, [-1]), (BLOCK_COLUMN, [-1, 1])):
        if name not in have:
            graph.initializer.append(onnx.numpy_helper.from_array(np.array(shape, dtype=np.int64), name))


def _int8_dequantization(mul: Any, producer: dict[str, Any], inits: dict[str, Any]) -> tuple[str, str, str] | None:
    """(int8 codes, float scales, blocks shape) if `mul` is Reshape(Cast(int8 codes), blocks) x Unsqueeze(scales)
    with both read from quantized initializers (directly, sliced or through a recompute Reshape)."""
    import onnx

    for a, b in ((0, 1), (1, 0)):
        view, unsq = producer.get(mul.input[a]), producer.get(mul.input[b])
        if view is None or unsq is None or view.op_type != "Reshape" or unsq.op_type != "Unsqueeze":
            continue
        cast = producer.get(view.input[0])
        if (cast is None or cast.op_type != "Cast"
                or next(x.i for x in cast.attribute if x.name == "to") != onnx.TensorProto.FLOAT):
            continue
        q, scale = _initializer_root(cast.input[0], producer, inits), _initializer_root(unsq.input[0], producer, inits)
        if (q is not None and scale is not None and q.data_type == onnx.TensorProto.INT8
                and q.name.endswith("." + QWEIGHT) and scale.name.endswith("." + QSCALE)):
            return cast.input[0], unsq.input[0], view.input[1]
    return None


def _initializer_root(name: str, producer: dict[str, Any], inits: dict[str, Any]) -> Any:
    """The initializer `name` reads, through Slice and Reshape nodes (which keep the dtype), or None."""
    while name not in inits:
        node = producer.get(name)
        if node is None or node.op_type not in ("Slice", "Reshape"):
            return None
        name = node.input[0]
    return inits[name]


NIBBLE_MASK, NIBBLE_SHIFT = "dq_nibble_mask", "dq_nibble_shift"  # uint8 15 and 4: int4's two halves of a byte


def _per_block_nodes(node: Any, qweight: Any, qscale: Any, consts: dict[str, np.ndarray]) -> list[Any]:
    """The asymmetric schemes' dequantization, one block a row.

    The codes viewed as [blocks, 32] (an alias; int4's [blocks, 16] bytes first split by BitwiseAnd 15 and
    BitShift 4 into the block's values 0-15 and 16-31, joined by a Concat) go through a per-axis
    DequantizeLinear (axis 0, one scale a row), the minimums as a [blocks, 1] column are added, and the result
    is viewed as the weight again. The values are the blockwise DequantizeLinear's bit for bit, in less of its
    time on onnxruntime's CPU kernels (`python -m benchmarks.quantized_step_time --kernels`, which times both
    and checks the bits)."""
    from onnx import TensorProto
    from onnx.helper import make_node

    q, scale, minimum = node.input
    rows, cols = int(qscale.dims[0]), int(qscale.dims[1]) * BLOCK
    nibbles = int(qweight.dims[1]) * 2 == cols  # int4: two values a byte
    flat = f"dq_rows_{rows}x{cols}"
    consts[flat] = np.array([rows, cols], np.int64)
    out, t = node.output[0], f"{node.output[0]}/asym"
    if nibbles:
        consts.update({NIBBLE_MASK: np.array(15, np.uint8), NIBBLE_SHIFT: np.array(4, np.uint8),
                       HALF_BLOCK_ROWS: np.array([-1, BLOCK // 2], np.int64)})
        codes = [make_node("Reshape", [q, HALF_BLOCK_ROWS], [t + "_bytes"], name=t + "_bytes"),
                 make_node("BitwiseAnd", [t + "_bytes", NIBBLE_MASK], [t + "_low"], name=t + "_low"),
                 make_node("BitShift", [t + "_bytes", NIBBLE_SHIFT], [t + "_high"], direction="RIGHT", name=t + "_high"),
                 make_node("Concat", [t + "_low", t + "_high"], [t + "_q"], axis=1, name=t + "_q")]
    else:
        codes = [make_node("Reshape", [q, BLOCK_ROWS], [t + "_q"], name=t + "_q")]
    return codes + [
        make_node("Cast", [scale], [t + "_scale16"], to=TensorProto.FLOAT, name=t + "_scale16"),
        make_node("Reshape", [t + "_scale16", FLAT], [t + "_scale"], name=t + "_scale"),
        make_node("DequantizeLinear", [t + "_q", t + "_scale"], [t + "_qs"], axis=0, name=t + "_dq"),
        make_node("Cast", [minimum], [t + "_min16"], to=TensorProto.FLOAT, name=t + "_min16"),
        make_node("Reshape", [t + "_min16", BLOCK_COLUMN], [t + "_min"], name=t + "_min"),
        make_node("Add", [t + "_qs", t + "_min"], [t + "_sum"], name=t + "_add"),
        make_node("Reshape", [t + "_sum", flat], [out], name=t + "_out")]
