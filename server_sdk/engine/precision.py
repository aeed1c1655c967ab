"""Compute precision of simulated training and server-side evaluation (`RunConfig.precision`).

- "fp32" (the default): everything in float32, the numbers devices compute with their fp32
  ONNX graphs.
- "bf16": mixed precision. Weights stay float32 in memory (the frozen tensors are shared,
  never copied); inside `compute(...)` the linear layers and the LM head run as bfloat16
  matmuls (torch.autocast), while attention, softmax, norms, the loss, the LoRA weights, their
  gradients and the AdamW state stay float32. On CPUs with a bfloat16 dot product (x86
  AVX512_BF16 or AMX, Arm BF16: Zen 4, Sapphire Rapids, Graviton 3, Apple M2 and later) the
  matmuls run several times faster (benchmarks/RESULTS.md, simulation); elsewhere torch emulates
  them and bf16 is slower than fp32 (a warning says so).

bf16 changes the numbers (a bfloat16 keeps 8 bits of mantissa): a bf16 run is a different
run, not the fp32 run faster. It applies to simulated clients (in-process and Ray executors)
and to the server's evaluation; fleet devices train their fp32 graphs, so a fleet run refuses it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
ATTENTION = "devft_fp32_attention"  # the attention implementation a model runs under bf16


def _fp32_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention computed in float32 with autocast off: bf16 attention is both less
    exact and, on CPU, slower than fp32 at these sizes (its backward above all)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast("cpu", enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


@functools.cache
def _register_attention() -> None:
    """The attention function and its mask builder (SDPA's). Without a mask builder transformers builds no
    mask at all: SDPA is still causal, but a left-padded batch (generation) would attend to its pads."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _fp32_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; choose one of {list(PRECISIONS)}")


@functools.cache
def native_bf16() -> bool | None:
    """Whether this CPU has a bfloat16 dot-product instruction (None: cannot tell on this platform)."""
    machine = platform.machine().lower()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    words = set(text.replace(":", " ").split())
    if machine in ("x86_64", "amd64"):
        return bool(words & {"avx512_bf16", "amx_bf16"})
    if machine in ("aarch64", "arm64"):
        return "bf16" in words
    return None


def warn_if_emulated(precision: str) -> None:
    if precision == "bf16" and native_bf16() is False:
        log.warning("precision=bf16 on a CPU without a bfloat16 dot product (no avx512_bf16/amx_bf16 or Arm bf16): "
                    "torch emulates it and training is slower than fp32; use precision=fp32 here")


def _inner_configs(model: torch.nn.Module) -> list:
    """Every config object a model's attention layers read `_attn_implementation` from (one per layer in
    some transformers versions, shared in others)."""
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


@contextlib.contextmanager
def compute(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """Run the forward (and the backward started inside it) of `model` in `precision`. fp32: nothing
    changes. bf16: autocast to bfloat16 with attention in float32; the model's attention setting is
    restored on exit, so a model shared with fp32 callers is left as it was."""
    check(precision)
    if precision == "fp32":
        yield
        return
    _register_attention()
    configs = _inner_configs(model)
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = ATTENTION
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b
