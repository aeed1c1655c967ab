"""Activation recomputation in the portable training graph: keep each decoder layer's input, not its insides.

A training step holds, from the forward to the backward, every tensor the backward reads: per decoder layer
of SmolLM2-135M and row of 128 tokens about 6 MiB (attention probabilities, the MLP's gate, up and product,
the norms' statistics), 187 MiB for the 30-layer model at one row, more than its int4 weights. `recompute_layers`
rewrites the traced graph so the backward reads a copy of them instead: in front of each layer's backward
sits a copy of that layer's forward, from the layer's input (which the forward still keeps: one [rows, seq,
hidden] tensor a layer) to the tensors its backward reads, and the copy waits for the step to reach that
backward (its input is read through an aliasing Reshape whose shape is its own plus 0 x Size(the output of the
node before), the same device as export/quant_graph.defer_dequantization). The forward's own tensors then die
in the forward; one layer's at a time exist again in the backward. The copies compute the same operations on
the same inputs, so loss and gradients are bit for bit those of the graph without them (the tests compare);
the price is a second forward of the decoder in the backward (benchmarks/RESULTS.md measures it).

Layers are found from the parameters the forward reads: a node belongs to the highest layer whose weights,
norms or LoRA tensors it depends on (names with `.layers.N.`); the final norm and the loss head come after
the last layer; the embedding, rotary tables and masks before the first (kept, as they are small and every
layer reads them). Plain ai.onnx ops; runs on the traced graph before the quantized graphs' passes, which then
give the copies their own dequantizations.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from export.common import reads_only, upstream, view_after, wait_for

RECOMPUTE_GRAPH = 1  # revision of this pass (in the template key of graphs that use it)
PREFIX = "recompute_"  # the nodes and tensors this pass adds (their names make it idempotent)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def recompute_layers(graph: Any, loss: str = "loss") -> int:
    """Make every decoder layer's backward read a recomputed copy of the layer's forward; returns how many
    layers were rewritten (0 for a graph without a backward, or one already rewritten)."""
    import onnx

    if any(n.name.startswith(PREFIX) for n in graph.node):
        return 0
    nodes = list(graph.node)
    plan = _Plan(graph, nodes, loss)
    before: dict[int, list[Any]] = {}
    rewritten = 0
    for layer, saved in plan.saved().items():
        first = min(r for s in saved for r in plan.readers[s] if r not in plan.forward)
        before.setdefault(first, []).extend(plan.copy_layer(layer, saved, first))
        rewritten += 1
    if not rewritten:
        return 0
    ordered = [m for k, n in enumerate(nodes) for m in before.get(k, []) + [n]]
    del graph.node[:]
    graph.node.extend(onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered)
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), PREFIX + "zero"))
    return rewritten


class _Plan:
    """The forward's layers and the tensors each layer's backward reads."""

    def __init__(self, graph: Any, nodes: list[Any], loss: str):
        self.nodes = nodes
        self.producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
        self.readers: dict[str, list[int]] = {}
        for k, n in enumerate(nodes):
            for x in n.input:
                if x:
                    self.readers.setdefault(x, []).append(k)
        self.forward = upstream(nodes, self.producer, [loss])
        params = {i.name for i in graph.initializer} | {i.name for i in graph.input}
        layers = [int(m.group(1)) for name in params if (m := _LAYER.search(name))]
        self.n_layers = max(layers) + 1 if layers else 0
        self.const: set[str] = {i.name for i in graph.initializer}  # tensors computed from initializers only
        self.segment: dict[str, int] = {name: self._param_segment(name) for name in params}
        self._assign_segments()
        self.waiting: set[str] = set()  # tensors computed after a gate (copies and gated inputs)

    def _assign_segments(self) -> None:
        """Each forward (and initializer-only) tensor's layer: the highest of its inputs' (-1: none)."""
        for k, n in enumerate(self.nodes):
            const = reads_only(n, self.const)
            if const:
                self.const.update(o for o in n.output if o)
            if k in self.forward or const:
                seg = max((self.segment.get(x, -1) for x in n.input if x), default=-1)
                self.segment.update({o: seg for o in n.output if o})

    def _param_segment(self, name: str) -> int:
        """The layer whose parameter `name` is; after the last layer for the final norm; -1 otherwise (the
        tied embedding table, which the loss head and the embedding both read, and the rotary tables)."""
        m = _LAYER.search(name)
        if m:
            return int(m.group(1))
        return self.n_layers if ".norm." in name and "layernorm" not in name else -1

    def _in_layer(self, name: str, layer: int) -> bool:
        """A batch-dependent forward tensor of `layer` (not a weight, not a graph input)."""
        k = self.producer.get(name)
        return k is not None and k in self.forward and name not in self.const and self.segment.get(name) == layer

    def saved(self) -> dict[int, list[str]]:
        """Per layer (in order; layers whose backward reads none left out): the layer's forward tensors that a
        backward node reads, in graph order."""
        out: dict[int, list[str]] = {}
        for k in sorted(self.forward):
            for o in self.nodes[k].output:
                layer = self.segment.get(o, -1)
                if (o and 0 <= layer < self.n_layers and self._in_layer(o, layer)
                        and any(r not in self.forward for r in self.readers.get(o, ()))):
                    out.setdefault(layer, []).append(o)
        return dict(sorted(out.items()))

    def copy_layer(self, layer: int, saved: list[str], first: int) -> list[Any]:
        """Gate nodes, then copies of `layer`'s forward nodes computing `saved`; `first`'s backward readers (and
        every later backward reader) of each saved tensor read its copy instead."""
        tag = f"{PREFIX}{layer}"
        front = wait_for(self._gate(first), tag, PREFIX + "zero")
        done: dict[str, str] = {}
        copies: list[Any] = []
        for s in saved:
            self._copy(s, layer, tag, done, copies, front)
        for s in saved:
            for r in self.readers[s]:
                if r not in self.forward:
                    node = self.nodes[r]
                    node.input[:] = [done[x] if x == s else x for x in node.input]
        return front + copies

    def _gate(self, first: int) -> str:
        """An output of the last batch-dependent node before node `first`: the step has reached that backward."""
        for k in range(first - 1, -1, -1):
            if not reads_only(self.nodes[k], self.const):
                return next(o for o in self.nodes[k].output if o)
        raise ValueError("a backward node with no batch-dependent node before it")

    def _copy(self, name: str, layer: int, tag: str, done: dict[str, str], copies: list[Any],
              front: list[Any]) -> str:
        """The name of `name` as the copy computes it: a copied node for a tensor of `layer`, else `name` itself
        (the layer's input, weights, graph inputs, the rotary tables and masks, which the step keeps). A copied
        node none of whose inputs waits for the gate reads its first batch-dependent input through the gate
        (the layer's input, or for a node reading only LoRA tensors, those), so no copy runs early."""
        import onnx

        if name in done:
            return done[name]
        if not self._in_layer(name, layer):
            done[name] = name
            return name
        node = self.nodes[self.producer[name]]
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{tag}/{node.name}"
        inputs = [self._copy(x, layer, tag, done, copies, front) if x else x for x in node.input]
        if not any(x in self.waiting for x in inputs):
            j = next(j for j, x in enumerate(inputs) if x and x not in self.const)
            inputs[j] = self._gated(inputs[j], tag, front)
        copy.input[:] = inputs
        copy.output[:] = [f"{tag}/{o}" if o else o for o in node.output]
        copies.append(copy)
        self.waiting.update(o for o in copy.output if o)
        done.update({o: c for o, c in zip(node.output, copy.output) if o})
        return done[name]

    def _gated(self, name: str, tag: str, front: list[Any]) -> str:
        """`name` read through the layer's gate: Reshape to its own shape + 0 x Size(gate) (an alias, no copy)."""
        from onnx.helper import make_node

        g = f"{tag}/in/{name}"
        if g not in self.waiting:
            front += [make_node("Shape", [name], [g + "_dims"], name=g + "_dims"),
                      *view_after(name, g + "_dims", tag + "_zero", g)]
            self.waiting.add(g)
        return g
