"""The memory a device needs to train one stage of the portable format, predicted from the model's shapes.

The floor is what a step needs at least (benchmarks/RESULTS.md, "The memory floor, predicted from shapes"):
the frozen weights as stored, LoRA with its gradients and AdamW's two moments, one batch's activations as
autograd keeps them, and the runtime's own process. The coordinator samples a device for a stage only when
the stage's predicted peak fits the memory the device declares (`ram_mb` in its hello, docs/protocol.md).

    predicted peak = PEAK_FACTOR x floor + PEAK_EXTRA_BYTES

The margin covers what the floor leaves out: backward temporaries, attention's [batch, heads, seq, seq]
tensors while they are built, dequantized weight slices, allocator slack, onnxruntime's session (about 5 KiB
a graph node). It is set from the measured portable-format rows of benchmarks/results/device.json (SmolLM2-135M,
4, 8, 16 and 30 layers, fp32/int8/int4, activations kept or recomputed, batch 4 x 128 whole and in
micro-batches of 1, onnxruntime 1 thread): their peaks are 1.14-1.47x this floor with activations kept and up
to 1.89x recomputed (2026-12-07; the recomputed graphs' copies make the session bigger while the floor
shrinks); 1.25 x floor + 192 MiB lies 12% (int4 recomputed, 30 layers, whole batch) to 94% (int4
recomputed, 4 layers, micro-batch 1) above each of them (tests/test_fleet_capabilities.py checks it against
the file). Torch-free arithmetic on a config dict, so the
coordinator, the benchmarks and a device-side tool can share it.
"""

from __future__ import annotations

import math
from typing import Any

from export.options import PLAIN, GraphOptions

MIB = 2**20
LM_HEAD_CHUNKS = 8  # the portable graph's LM head works through the vocabulary in this many slices (export/onnx_trace.py)
# a process of the Python device runtime after `import numpy, safetensors, onnxruntime` (57 MiB measured,
# benchmarks.device runtime_baseline); browsers and Node hold their own, which the margin has to cover
RUNTIME_BYTES = 64 * MIB
PEAK_FACTOR = 1.25
PEAK_EXTRA_BYTES = 192 * MIB
# export/quant.py: int8-asym and int4-asym a float16 scale and minimum per 32 values, the table's int8 a float32 scale
WEIGHT_BYTES_PER_VALUE = {"fp32": 4.0, "int8": 1.0 + 4 / 32, "int4": 0.5 + 4 / 32}
TABLE_SCHEME = {"fp32": "fp32", "int8": "int8", "int4": "int8"}  # the tied embedding / LM head's (export/quant.py)


def _dims(cfg: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, vocab, attention heads, key/value width) of a LLaMA-style config dict."""
    h, i, v = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads) * int(cfg.get("head_dim") or h // heads)
    return h, i, v, heads, kv


def activation_bytes(cfg: dict[str, Any], batch: int, seq: int, supervised: int, rank: int = 8,
                     recompute: bool = False) -> dict[str, int]:
    """fp32 bytes one batch's backward needs kept from its forward, per the graph LoRA training makes.

    Per decoder layer (T = batch x seq tokens): the layer input and its norm, q, k, v (after RoPE) and the
    attention output ([T, hidden] or [T, kv]), the attention probabilities and the scores they come from
    ([batch, heads, seq, seq] each), the post-attention residual and its norm, the MLP's gate, up, SiLU(gate)
    and product ([T, intermediate] each), and the rank-r LoRA intermediates of the seven projections. Plus the
    loss head's working set: two [supervised, vocab / chunks] float tensors at a time (logits and their
    softmax) in the portable graph's chunked head; the eager head holds the full [supervised, vocab] logits,
    their log-softmax and its gradient.

    `recompute` (export/recompute.py): the step keeps two [T, hidden] tensors a layer (its input and the
    residual it hands on) and one layer's activations at a time, recomputed in its backward."""
    h, i, v, heads, kv = _dims(cfg)
    t = batch * seq
    per_layer = t * (6 * h + 2 * kv) + 4 * t * i + 2 * batch * heads * seq * seq + 7 * t * rank
    n = int(cfg["num_hidden_layers"])
    return {"decoder": 4 * (2 * t * h * n + per_layer if recompute else per_layer * n),
            "head_chunked": 4 * 2 * supervised * -(-v // LM_HEAD_CHUNKS), "head_full": 4 * 3 * supervised * v}


def weight_bytes_of(cfg: dict[str, Any], n_layers: int, scheme: str) -> int:
    """Frozen weight bytes of an `n_layers` model of `cfg` as the portable format stores them under `scheme`
    (export/quant.py: int8 1 byte and int4 half a byte per value, plus 4 bytes of scales (and minimums) per 32
    values; under both the tied embedding / LM head is int8)."""
    h, i, v, _, kv = _dims(cfg)
    linear = n_layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    table = v * h  # the tied embedding / LM head
    norms = (2 * n_layers + 1) * h
    return int(linear * WEIGHT_BYTES_PER_VALUE[scheme] + table * WEIGHT_BYTES_PER_VALUE[TABLE_SCHEME[scheme]]) + 4 * norms


def lora_bytes_of(cfg: dict[str, Any], n_layers: int, rank: int = 8) -> int:
    """fp32 bytes of the rank-r LoRA tensors of the seven projections of `n_layers` layers."""
    h, i, _, _, kv = _dims(cfg)
    per_layer = rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    return 4 * per_layer * n_layers


def lora_state_copies(batch: int, micro_batch: int | None = None) -> int:
    """LoRA-sized float32 tensors a step holds: the LoRA, its gradients and AdamW's two moments, plus the
    accumulated gradients when the batch runs in micro-batches (docs/protocol.md, "Micro-batches")."""
    return 5 if micro_batch is not None and micro_batch < batch else 4


def floor_parts(cfg: dict[str, Any], n_layers: int, *, batch: int, seq: int, rank: int = 8,
                graph: GraphOptions = PLAIN, runtime: int = RUNTIME_BYTES,
                micro_batch: int | None = None) -> dict[str, int]:
    """The floor of one step of an `n_layers` stage, each part named, with every position supervised (the
    loss head's most): weights as stored (`graph.weights`), LoRA + gradients + AdamW's two moments, activations
    (kept or recomputed: `graph.recompute`), runtime. `micro_batch` rows per graph run (None: the whole batch):
    the activations are those of that many rows."""
    rows = min(batch, micro_batch or batch)
    act = activation_bytes({**cfg, "num_hidden_layers": n_layers}, rows, seq, rows * (seq - 1), rank,
                           graph.recompute)
    parts = {"weights": weight_bytes_of(cfg, n_layers, graph.weights),
             "lora_state": lora_state_copies(batch, micro_batch) * lora_bytes_of(cfg, n_layers, rank),
             "activations": act["decoder"] + act["head_chunked"], "runtime": runtime}
    return {**parts, "total": sum(parts.values())}


def predicted_peak_mb(cfg: dict[str, Any], n_layers: int, *, batch: int, seq: int, rank: int = 8,
                      graph: GraphOptions = PLAIN, micro_batch: int | None = None) -> dict[str, Any]:
    """{"need_mb": the stage's predicted peak in whole MiB (rounded up), "floor_mb", the floor's parts in MiB,
    and the margin}: what a device must declare (`ram_mb`) to be sampled for the stage (`graph`: the stage's
    weight storage and activations; `micro_batch`: the round's rows per graph run)."""
    floor = floor_parts(cfg, n_layers, batch=batch, seq=seq, rank=rank, graph=graph, micro_batch=micro_batch)
    peak = PEAK_FACTOR * floor["total"] + PEAK_EXTRA_BYTES
    return {"need_mb": math.ceil(peak / MIB), "floor_mb": math.ceil(floor["total"] / MIB),
            "parts_mb": {k: round(v / MIB, 1) for k, v in floor.items() if k != "total"},
            "margin": f"{PEAK_FACTOR:g} x floor + {PEAK_EXTRA_BYTES // MIB} MiB", "source": "predicted"}
