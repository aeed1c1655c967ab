"""Quantized frozen weights for the portable format: int8 or int4, blockwise (32 inputs), the embedding int8.

QLoRA-style: the frozen base is stored in 8 or 4 bits and dequantized in the graph where it is used;
LoRA, its gradients and the optimiser stay float32. The graph stays standard ONNX (ai.onnx ops only), so
every onnxruntime build runs it, web and mobile included. The manifest names the byte format
(edge_runtime/manifest.WEIGHT_FORMATS: `int8-asym`, `int4-asym`), so a runtime that reads another format refuses.

    int8-asym  the decoder's Linears: weight[r, c] = q[r, c] * scale[r, c // 32] + min[r, c // 32], q in 0..255
               (uint8, one value a byte), scale = (max - min) / 255 and min float16. Graph: the codes viewed
               one block a row, a per-row DequantizeLinear and an Add of the minimum.
    int4-asym  the decoder's Linears: the same with q in 0..15 (all 16 levels), two values a byte as ggml's Q4_1
               packs them: in each block of 32, byte j holds value j (low nibble) and value j + 16 (high
               nibble). Graph: BitwiseAnd and BitShift split the bytes into the block's two halves, a Concat
               joins them, then the same DequantizeLinear and Add as int8-asym.
    table      the tied embedding / LM head under both (TABLE_SCHEME, internal name `int8-sym`): weight[r, c] =
               int8 q[r, c] * scale[r, c // 32], scale = max |w| / 127 rounded to float16's 11 significant bits
               (ggml's Q8_0), stored float32, q clipped to +-127. Graph: Cast, Mul on gathered rows, one
               DequantizeLinear a LM-head slice (export/quant_graph.lower_int8).
               In 4 bits it cost most of the loss (113 MB of SmolLM2-135M's 540; benchmarks/RESULTS.md).

Why float16 scales, and int4 asymmetric: SmolLM2-135M's packaged weights are themselves ggml Q4_1 (decoder,
blocks of 32 along the input, float16 d and m) and Q8_0 (embedding, float16 d). The old int4 (symmetric, 15
levels, 8-bit floored scales) requantized that grid and lost 0.65 of eval loss after training; int4-asym and
the table's int8 reproduce those grids exactly (so on SmolLM2-135M an int4 run computes on the fp32 run's very
weights), and on weights from any other source they are ggml's Q4_1 and Q8_0, standard formats. int8-asym is
Q4_1's scheme with 256 levels: the symmetric int8 before it (Q8_0 on the decoder too) requantized the decoder's
16-level asymmetric grid onto a symmetric one and cost more eval loss than int4 (benchmarks/RESULTS.md). And a
block whose values already lie exactly on Q4_1's or Q5_1's grid (16 or 32 levels from its minimum) keeps that
grid under int8-asym: codes 0..15 (or 0..31) a byte, the grid's own scale. 256 levels over such a block would
requantize it (each value moved by up to half a 256-level step), so 8 bits would hold a 4-bit model's weights less
exactly than 4 bits do; kept, int8 on SmolLM2-135M computes on the fp32 run's weights too. The byte format is
unchanged (a device cannot tell), only the quantizer's choice of scale.

Every dequantized value is computed the same way (float32 q * scale, then + min) by the server (numpy) and
the device (onnxruntime), so the server's simulation and the fleet agree bit for bit: the server replaces a
submodel's frozen weights by their dequantized values (`fake_quantize_`), the export quantizes those, and
quantizing dequantized weights gives back the same q, scales and minimums (idempotent: a block's minimum
maps to 0 and its maximum to the top level, so the block's range, hence its scale, comes back).

The ONNX side (int4 lowering, recomputation and deferral of the dequantizations): export/quant_graph.py.

Which weights: every frozen Linear weight (LoRA's base layers and projections without LoRA) whose
input width is a multiple of the block, and the tied embedding / LM head. Norm weights stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from export.options import check_scheme

BLOCK = 32
LEVELS = {"int8": 255, "int4": 15}  # the asymmetric (decoder) schemes: q in 0..LEVELS, + a minimum per block
GRIDS = (15, 31)  # ggml Q4_1 / Q5_1 grids: int8-asym keeps a block that lies on one exactly (`_quantize_asym`)
QMAX = {"int8-sym": 127}  # the symmetric one (the tied table's): q in -QMAX..QMAX
QWEIGHT, QSCALE, QMIN = "qweight", "qscale", "qmin"  # buffer (and ONNX initializer) name suffixes
TABLE = "table"  # the tied embedding's QuantLinear, registered under the embedding module
TABLE_SCHEME = {"int8": "int8-sym", "int4": "int8-sym"}  # the tied embedding / LM head's own scheme under each
INT4_OPSET = 21  # the quantized graphs' ai.onnx opset (DequantizeLinear's opset-21 form; BitwiseAnd is 18)
QUANTIZER = 2  # revision of the quantizer's choices, not of the byte format (2: int8-asym keeps GRIDS)
QUANT_GRAPH = 4  # revision of the quantized graphs' passes (in the template key: a new one re-traces cached templates)


def quantize(w: np.ndarray, scheme: str) -> dict[str, np.ndarray]:
    """The stored tensors ({QWEIGHT: q, QSCALE: scale[, QMIN: min]}) of a float [rows, cols] weight, cols a
    multiple of BLOCK."""
    rows, cols = w.shape
    if scheme in LEVELS:
        return _quantize_asym(np.asarray(w, dtype=np.float64).reshape(rows, cols // BLOCK, BLOCK), LEVELS[scheme])
    qmax = QMAX[scheme]
    blocks = np.asarray(w, dtype=np.float32).reshape(rows, cols // BLOCK, BLOCK)
    amax = np.abs(blocks).max(-1)
    scale = _half(amax.astype(np.float64) / qmax).astype(np.float32)
    scale[scale == 0] = 1  # an all-zero block (or one below float16's range): q = 0
    q = np.clip(np.rint(blocks / scale[..., None]), -qmax, qmax).astype(np.int8).reshape(rows, cols)
    return {QWEIGHT: q, QSCALE: scale}


def _half(x: np.ndarray) -> np.ndarray:
    """x rounded to float16 (11 significant bits): q * scale stays exact in float32 (at most 19 bits)."""
    if not np.isfinite(x.astype(np.float16)).all():
        raise ValueError("quantized weights must lie within float16's range (|w| < 65504)")
    return x.astype(np.float16)


def _quantize_asym(blocks: np.ndarray, levels: int) -> dict[str, np.ndarray]:
    """Q4_1 with `levels` + 1 levels: per block the float16 minimum and (max - min) / levels; q = round((w - min)
    / scale) in 0..levels, one byte a value; for 4 bits two a byte, value j and j + 16 of a block in byte j
    (low and high nibble: Q4_1's own layout)."""
    rows, nblocks, _ = blocks.shape
    low = _half(blocks.min(-1))
    q, scale = _codes(blocks, low, levels)
    values = blocks.astype(np.float32)
    for grid in (g for g in GRIDS if g < levels):  # a block already on a coarser grid keeps it: lossless
        where = _near_grid(blocks, values, low, grid)  # the blocks that may lie on it (all that do, cheaply)
        q_g, scale_g = _codes(blocks[where], low[where], grid)
        exact = (_block_values(q_g, scale_g, low[where]) == values[where]).all(-1)
        q[tuple(i[exact] for i in where)], scale[tuple(i[exact] for i in where)] = q_g[exact], scale_g[exact]
    q = q.astype(np.uint8).reshape(rows, nblocks * BLOCK)
    return {QWEIGHT: pack_int4(q) if levels < 16 else q, QSCALE: scale, QMIN: low}


def _near_grid(blocks: np.ndarray, values: np.ndarray, low: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Indices of the blocks each of whose values (`values`: `blocks` in float32) lies within 1e-3 of a step of
    the block's `levels`-level grid from its minimum, the step `_codes`' own: every block exactly on that grid
    (float32's error is ~1e-6 of a step) and, on weights from elsewhere, almost never another. One pass in
    float32 over all, so that the exact test (`_codes`, float64) runs on these few."""
    step = _half((blocks.max(-1) - low) / levels).astype(np.float32)
    step[step == 0] = 1
    near = np.empty(values.shape[:-1], dtype=bool)
    for at in range(0, len(values), 256):  # 256 rows at a time: temporaries that stay in cache
        rows = slice(at, at + 256)
        r = values[rows] - low[rows].astype(np.float32)[..., None]
        r /= step[rows][..., None]
        r -= np.rint(r)
        near[rows] = (np.abs(r, out=r) < 1e-3).all(-1)
    return np.nonzero(near)


def _codes(blocks: np.ndarray, low: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Each block's codes in 0..levels and its float16 scale, (max - min) / levels, for minimums `low`."""
    scale = _half((blocks.max(-1) - low) / levels)
    scale[scale == 0] = 1  # a constant block (or a range below float16's): every value is its minimum
    q = np.clip(np.rint((blocks - low[..., None]) / scale[..., None]), 0, levels)
    q[np.broadcast_to(scale[..., None] == 1, q.shape) & (blocks.max(-1) == blocks.min(-1))[..., None]] = 0
    return q, scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """[rows, cols] values in 0..15 as Q4_1 stores them: [rows, cols / 2] bytes, byte j of a block of 32 holding
    value j in its low nibble and value j + 16 in its high nibble."""
    rows, cols = q.shape
    half = q.astype(np.uint8).reshape(rows, cols // BLOCK, 2, BLOCK // 2)
    return (half[:, :, 0] | (half[:, :, 1] << 4)).reshape(rows, cols // 2)


def dequantize(parts: dict[str, np.ndarray], scheme: str) -> np.ndarray:
    """The float32 weight (exactly what the graph computes: q * scale in float32, then + min)."""
    q = parts[QWEIGHT]
    if scheme == "int4":
        half = q.reshape(q.shape[0], -1, BLOCK // 2)
        vals = np.concatenate([half & 15, half >> 4], axis=-1).reshape(q.shape[0], -1).astype(np.float32)
    else:
        vals = q.astype(np.float32)
    rows, cols = vals.shape
    low = parts[QMIN] if scheme in LEVELS else None
    return _block_values(vals.reshape(rows, cols // BLOCK, BLOCK), parts[QSCALE], low).reshape(rows, cols)


def _block_values(codes: np.ndarray, scale: np.ndarray, low: np.ndarray | None = None) -> np.ndarray:
    """[..., BLOCK] codes to float32 values as every reader computes them: q * scale in float32, then + min."""
    out = codes.astype(np.float32) * scale.astype(np.float32)[..., None]
    return out if low is None else out + low.astype(np.float32)[..., None]


def _dequantize_torch(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The table's int8-sym dequantize() in torch ops that export to plain ONNX (Cast, Mul)."""
    f = q.float()
    rows, cols = f.shape
    return (f.reshape(rows, cols // BLOCK, BLOCK) * scale.unsqueeze(-1)).reshape(rows, cols)


@torch.library.custom_op("devft::dequantize_int4", mutates_args=())
def dequantize_int4(qweight: torch.Tensor, qscale: torch.Tensor, qmin: torch.Tensor) -> torch.Tensor:
    """The asymmetric schemes' dequantize() (int4: packed two a byte; int8: one a byte, told apart by the
    shapes) as one opaque op while tracing: the export lowers it to DequantizeLinear + Add (`lower_int4`), which a
    torch decomposition of the nibble unpacking would spread over a dozen nodes."""
    if qweight.shape[1] == qscale.shape[1] * BLOCK:
        q = qweight.float()
    else:
        half = qweight.reshape(qweight.shape[0], -1, BLOCK // 2)
        q = torch.cat([half % 16, half // 16], dim=-1).reshape(qweight.shape[0], -1).float()
    rows, cols = q.shape
    out = q.reshape(rows, cols // BLOCK, BLOCK) * qscale.float().unsqueeze(-1) + qmin.float().unsqueeze(-1)
    return out.reshape(rows, cols)


@dequantize_int4.register_fake
def _(qweight: torch.Tensor, qscale: torch.Tensor, qmin: torch.Tensor) -> torch.Tensor:
    return qweight.new_empty((qweight.shape[0], qscale.shape[1] * BLOCK), dtype=torch.float32)


class QuantLinear(torch.nn.Module):
    """A frozen bias-free Linear whose weight is stored quantized and dequantized where it is used."""

    def __init__(self, out_features: int, in_features: int, scheme: str):
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, in_features, out_features
        blocks = (out_features, in_features // BLOCK)
        # placeholders (restamping writes the values), random so that no optimiser pass merges equal tensors
        if scheme in LEVELS:
            width = in_features // 2 if scheme == "int4" else in_features
            self.register_buffer(QWEIGHT, torch.randint(0, 256, (out_features, width), dtype=torch.uint8))
            self.register_buffer(QSCALE, (torch.rand(blocks) + 0.5).half())
            self.register_buffer(QMIN, (-torch.rand(blocks)).half())
        else:
            self.register_buffer(QWEIGHT, torch.randint(-100, 100, (out_features, in_features), dtype=torch.int8))
            self.register_buffer(QSCALE, torch.rand(blocks) + 0.5)

    def rows(self, start: int, length: int) -> torch.Tensor:
        """Dequantized rows [start, start + length): one slice of the LM head at a time (int8-sym tables)."""
        return _dequantize_torch(getattr(self, QWEIGHT).narrow(0, start, length),
                                 getattr(self, QSCALE).narrow(0, start, length))

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized rows idx (embedding lookups, target rows): never the whole table (int8-sym tables)."""
        return _dequantize_torch(getattr(self, QWEIGHT).index_select(0, idx),
                                 getattr(self, QSCALE).index_select(0, idx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme in LEVELS:
            return F.linear(x, dequantize_int4(getattr(self, QWEIGHT), getattr(self, QSCALE), getattr(self, QMIN)))
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
            table = QuantLinear(emb.weight.shape[0], emb.weight.shape[1], TABLE_SCHEME[scheme])
            swapped += [(inner.model, "embed_tokens", emb), (inner, "lm_head", inner.lm_head)]
            inner.model.embed_tokens, inner.lm_head = QuantEmbedding(table), table
        yield
    finally:
        for parent, attr, original in reversed(swapped):
            setattr(parent, attr, original)


def source_weight(initializer: str) -> str | None:
    """The float weight an initializer `....qweight` / `.qscale` / `.qmin` quantizes (None: not a quantized one)."""
    base, _, suffix = initializer.rpartition(".")
    if suffix not in (QWEIGHT, QSCALE, QMIN):
        return None
    if base.endswith("." + TABLE):
        base = base[: -len(TABLE) - 1]
    return base + ".weight"


def is_table(stem: str) -> bool:
    """Whether a quantized initializer's name minus its suffix names the tied embedding / LM head (the graph
    names it after either module)."""
    return stem.endswith(("." + TABLE, "lm_head"))


def scheme_of(initializer: str, scheme: str) -> str:
    """The scheme a quantized initializer of a `scheme` graph is stored in (the tied table has its own)."""
    return TABLE_SCHEME[scheme] if is_table(initializer.rpartition(".")[0]) else scheme


@torch.no_grad()
def fake_quantize_(model: Any, scheme: str) -> int:
    """Replace, in place, the weights `quantized_modules` would quantize by their dequantized values: what a
    device's graph computes from the quantized files. Idempotent. Returns how many tensors changed."""
    if check_scheme(scheme) == "fp32":
        return 0
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = [(lin.weight, scheme) for _, _, lin in _frozen_linears(inner)]
    if _tied(inner):
        weights.append((inner.model.embed_tokens.weight, TABLE_SCHEME[scheme]))
    for w, kind in weights:
        parts = quantize(w.detach().float().cpu().numpy(), kind)
        w.copy_(torch.from_numpy(dequantize(parts, kind)).to(w.dtype))
    return len(weights)
