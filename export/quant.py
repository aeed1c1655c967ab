"""Quantized frozen weights for the portable format: int8 or int4 with one scale per block of 32 inputs.

QLoRA-style: the frozen base is stored in 8 or 4 bits and dequantized in the graph where it is used;
LoRA, its gradients and the optimiser stay float32. The graph stays standard ONNX (ai.onnx ops only:
Cast, Mul, Div, Floor, Sub, Slice, Gather, Reshape), so every onnxruntime build runs it, web and
mobile included.

    int8   weight[r, c] = int8 q[r, c] * scale[r, c // 32]
    int4   two 4-bit values per byte, q + 8 in 1..15 (low nibble: even column, high nibble: odd column),
           stored uint8 [r, c / 2]; weight = (nibble - 8) * scale[r, c // 32]

Scales keep 8 significant bits, floored, and values are clipped to +-127 (+-7): then every dequantized
value q * scale is exact in float32 (at most 16 significant bits), and quantizing dequantized weights
gives back the same q and scale. That makes the server's simulation and the fleet agree bit for bit:
the server replaces a submodel's frozen weights by their dequantized values (`fake_quantize_`), the
export quantizes those, and a device's graph computes exactly the values the server trained on.

Which weights: every frozen Linear weight (LoRA's base layers and projections without LoRA) whose
input width is a multiple of the block, and the tied embedding / LM head (113 MB of SmolLM2-135M's
540). Norm weights (a few KB) stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SCHEMES = ("fp32", "int8", "int4")
BLOCK = 32
QMAX = {"int8": 127, "int4": 7}
QWEIGHT, QSCALE = "qweight", "qscale"  # buffer (and ONNX initializer) name suffixes
TABLE = "table"  # the tied embedding's QuantLinear, registered under the embedding module


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"weights must be one of {SCHEMES}, got {scheme!r}")
    return scheme


def _floor8(x: np.ndarray) -> np.ndarray:
    """x rounded down to 8 significant bits (float32)."""
    m, e = np.frexp(x.astype(np.float32))
    return np.ldexp(np.floor(m * 256) / 256, e).astype(np.float32)


def quantize(w: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) of a float [rows, cols] weight, cols a multiple of BLOCK."""
    rows, cols = w.shape
    qmax = QMAX[scheme]
    blocks = np.asarray(w, dtype=np.float32).reshape(rows, cols // BLOCK, BLOCK)
    amax = np.abs(blocks).max(-1)
    scale = np.where(amax > 0, _floor8(amax / np.float32(qmax)), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -qmax, qmax).astype(np.int8).reshape(rows, cols)
    if scheme == "int4":
        nib = (q + 8).astype(np.uint8)
        q = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, scheme: str) -> np.ndarray:
    """The float32 weight (exactly what the graph computes)."""
    if scheme == "int4":
        vals = np.stack([q & 15, q >> 4], axis=-1).reshape(q.shape[0], -1).astype(np.float32) - 8
    else:
        vals = q.astype(np.float32)
    rows, cols = vals.shape
    return (vals.reshape(rows, cols // BLOCK, BLOCK) * scale[..., None]).reshape(rows, cols)


def _dequantize_torch(q: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """dequantize() in torch ops that export to plain ONNX (no bit operations: Div/Floor/Sub on floats)."""
    f = q.float()
    if scheme == "int4":
        hi = torch.floor(f / 16)
        f = torch.stack([f - hi * 16, hi], dim=-1).reshape(q.shape[0], -1) - 8
    rows, cols = f.shape
    return (f.reshape(rows, cols // BLOCK, BLOCK) * scale.unsqueeze(-1)).reshape(rows, cols)


class QuantLinear(torch.nn.Module):
    """A frozen bias-free Linear whose weight is stored quantized and dequantized where it is used."""

    def __init__(self, out_features: int, in_features: int, scheme: str):
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, in_features, out_features
        cols = in_features // 2 if scheme == "int4" else in_features
        dtype = torch.uint8 if scheme == "int4" else torch.int8
        # placeholders (restamping writes the values), random so that no optimiser pass merges equal tensors
        self.register_buffer(QWEIGHT, torch.randint(0, 100, (out_features, cols), dtype=torch.int16).to(dtype))
        self.register_buffer(QSCALE, torch.rand(out_features, in_features // BLOCK) + 0.5)

    def rows(self, start: int, length: int) -> torch.Tensor:
        """Dequantized rows [start, start + length): one slice of the LM head at a time."""
        return _dequantize_torch(getattr(self, QWEIGHT).narrow(0, start, length),
                                 getattr(self, QSCALE).narrow(0, start, length), self.scheme)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized rows idx (embedding lookups, target rows): never the whole table."""
        return _dequantize_torch(getattr(self, QWEIGHT).index_select(0, idx),
                                 getattr(self, QSCALE).index_select(0, idx), self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rows(0, self.out_features))


class QuantEmbedding(torch.nn.Module):
    """The input embedding over a (tied) QuantLinear table: gathers quantized rows, dequantizes those."""

    def __init__(self, table: QuantLinear):
        super().__init__()
        setattr(self, TABLE, table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = getattr(self, TABLE)
        return table.gather(ids.reshape(-1)).reshape(*ids.shape, table.in_features)


def _frozen_linears(inner: Any) -> Iterator[tuple[Any, str, torch.nn.Linear]]:
    """(parent module, attribute, Linear) of every frozen decoder Linear that can be quantized."""
    for name, module in list(inner.model.layers.named_modules()):
        if "lora_" in name:
            continue
        for attr, child in list(module.named_children()):
            if ("lora_" not in attr and type(child) is torch.nn.Linear and child.bias is None
                    and child.in_features % BLOCK == 0):
                yield module, attr, child


def _tied(inner: Any) -> bool:
    head, emb = getattr(inner, "lm_head", None), inner.model.embed_tokens
    return (type(head) is torch.nn.Linear and head.weight is emb.weight and head.bias is None
            and emb.weight.shape[1] % BLOCK == 0)


@contextlib.contextmanager
def quantized_modules(peft_model: Any, scheme: str) -> Iterator[None]:
    """Swap the frozen Linears (and the tied embedding / LM head) of `peft_model` for Quant modules while
    tracing; their buffers hold placeholders (the graph depends on shapes only; restamping writes values)."""
    if check_scheme(scheme) == "fp32":
        yield
        return
    inner = peft_model.get_base_model()
    swapped: list[tuple[Any, str, Any]] = []
    try:
        for parent, attr, lin in list(_frozen_linears(inner)):
            swapped.append((parent, attr, lin))
            setattr(parent, attr, QuantLinear(lin.out_features, lin.in_features, scheme))
        if _tied(inner):
            emb = inner.model.embed_tokens
            table = QuantLinear(emb.weight.shape[0], emb.weight.shape[1], scheme)
            swapped += [(inner.model, "embed_tokens", emb), (inner, "lm_head", inner.lm_head)]
            inner.model.embed_tokens, inner.lm_head = QuantEmbedding(table), table
        yield
    finally:
        for parent, attr, original in reversed(swapped):
            setattr(parent, attr, original)


def source_weight(initializer: str) -> str | None:
    """The float weight an initializer `....qweight` / `....qscale` quantizes (None: not a quantized one)."""
    base, _, suffix = initializer.rpartition(".")
    if suffix not in (QWEIGHT, QSCALE):
        return None
    if base.endswith("." + TABLE):
        base = base[: -len(TABLE) - 1]
    return base + ".weight"


@torch.no_grad()
def fake_quantize_(model: Any, scheme: str) -> int:
    """Replace, in place, the weights `quantized_modules` would quantize by their dequantized values: what a
    device's graph computes from the quantized files. Idempotent. Returns how many tensors changed."""
    if check_scheme(scheme) == "fp32":
        return 0
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = [lin.weight for _, _, lin in _frozen_linears(inner)]
    if _tied(inner):
        weights.append(inner.model.embed_tokens.weight)
    for w in weights:
        q, s = quantize(w.detach().float().cpu().numpy(), scheme)
        w.copy_(torch.from_numpy(dequantize(q, s, scheme)).to(w.dtype))
    return len(weights)


# Reshape shapes equal to a 2-D tensor's own, written differently: a recomputed dequantization starts from a
# Reshape of the quantized initializer with one of these, so no common-subexpression pass merges it back
_SAME_SHAPE = ((-1, None), (None, -1), (0, None), (None, 0), (0, -1), (-1, 0), (0, 0), (None, None))


def dequant_recompute(graph: Any) -> int:
    """Give every consumer of a dequantized weight but the first its own copy of the dequantization.

    Autograd keeps the tensors the backward reads from the forward, and for a frozen Linear that is the
    float weight: traced as is, every layer's dequantized weight would live from its forward to its backward,
    all of them at once at the turn, the fp32 model again. With the chain (Cast, Mul by the scales, ...)
    repeated in front of its later consumers, each float weight lives for one use, at the cost of dequantizing
    again in the backward. Returns how many chains were added."""

    inits = {i.name: i for i in graph.initializer}
    const: set[str] = set(inits)
    root: dict[str, str] = {}  # tensor computed from initializers only -> the quantized initializer it comes from
    producer: dict[str, Any] = {}
    for node in graph.node:
        for o in node.output:
            producer[o] = node
        if all(not i or i in const for i in node.input):
            const.update(node.output)
            roots = {root.get(i) or (i if source_weight(i) and i.endswith("." + QWEIGHT) else None) for i in node.input}
            roots.discard(None)
            if roots:
                root.update({o: next(iter(roots)) for o in node.output})
    uses: dict[str, int] = {}
    out_nodes: list[Any] = []
    extra_inits: list[Any] = []
    added = 0
    for node in graph.node:
        if not all(not i or i in const for i in node.input):  # a consumer that depends on the batch
            for j, name in enumerate(node.input):
                if name not in root:
                    continue
                r = root[name]
                k = uses[r] = uses.get(r, 0) + 1
                if k > 1:
                    node.input[j] = _clone(name, k, producer, inits, r, out_nodes, extra_inits, {})
                    added += 1
        out_nodes.append(node)
    graph.initializer.extend(extra_inits)
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(out_nodes):  # originals whose every use went to a copy are dropped
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    return added


def _clone(name: str, k: int, producer: dict[str, Any], inits: dict[str, Any], root: str, out: list[Any],
           extra_inits: list[Any], done: dict[str, str]) -> str:
    """Append copies of the nodes computing `name` from initializers to `out`; return the copy's name."""
    import onnx

    if name in done:
        return done[name]
    if name == root:
        dims = list(inits[root].dims)
        shape = [d if v is None else v for d, v in zip(dims, _SAME_SHAPE[(k - 2) % len(_SAME_SHAPE)])]
        shape_name = f"recompute_shape{k}.{root}"  # not an artifact name: stays inside the graph
        extra_inits.append(onnx.numpy_helper.from_array(np.array(shape, dtype=np.int64), shape_name))
        new = f"{root}__rc{k}"
        out.append(onnx.helper.make_node("Reshape", [root, shape_name], [new], name=new))
        done[name] = new
        return new
    if name in inits or name not in producer:
        return name
    node = producer[name]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = f"{node.name}__rc{k}"
    copy.input[:] = [_clone(i, k, producer, inits, root, out, extra_inits, done) if i else i for i in node.input]
    copy.output[:] = [f"{o}__rc{k}" for o in node.output]
    out.append(copy)
    for o, c in zip(node.output, copy.output):
        done[o] = c
    return done[name]
