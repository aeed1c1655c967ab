"""LoRA state of a layered model, kept in one flat, framework-neutral form.

`LoraState` maps canonical names "layers.<i>.<module>.lora_A|lora_B" to tensors
(A: [r, in], B: [out, r]). It is what strategies fuse, average, fold back and
checkpoint; PEFT models are only read from and written to at the edges.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import LlamaForCausalLM

if TYPE_CHECKING:
    from server_sdk.config import LoraSettings

LoraState = dict[str, torch.Tensor]
_CANON = re.compile(r"^layers\.(\d+)\.(.+)\.(lora_[AB])$")
_PEFT = re.compile(r"model\.layers\.(\d+)\.(.+)\.(lora_[AB])\.default\.weight$")


def lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")


def attach_lora(model: LlamaForCausalLM, settings: LoraSettings, seed: int | None = None) -> PeftModel:
    """Wrap a model with freshly initialised LoRA (A random, B zero). Seeded for reproducible runs."""
    if seed is not None:
        torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(settings))
    return peft_model


def scaling(settings: LoraSettings) -> float:
    return settings.alpha / settings.r


def from_peft_key(key: str) -> str | None:
    """PEFT state_dict key -> canonical name ('layers.3.self_attn.q_proj.lora_A'); None if not LoRA."""
    m = _PEFT.search(key)
    return f"layers.{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def to_peft_key(name: str) -> str:
    """Canonical name -> the key in a PeftModel(LlamaForCausalLM).state_dict() (adapter 'default').

    Device artifacts name LoRA tensors by these keys (see export/naming.py)."""
    layer, module, ab = parse(name)
    return f"base_model.model.model.layers.{layer}.{module}.{ab}.default.weight"


def read_lora(peft_model: PeftModel) -> LoraState:
    """Copy the model's LoRA tensors out, under canonical names."""
    out: LoraState = {}
    for key, value in peft_model.state_dict().items():
        name = from_peft_key(key)
        if name:
            out[name] = value.detach().clone()
    return out


def write_lora(peft_model: PeftModel, state: LoraState) -> None:
    """Load canonical LoRA tensors into the model; every LoRA tensor of the model must be given."""
    targets = {name: key for key in peft_model.state_dict() if (name := from_peft_key(key))}
    if set(targets) != set(state):
        missing, extra = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
        raise KeyError(f"LoRA state does not match the model: missing {missing[:4]} extra {extra[:4]}")
    result = peft_model.load_state_dict({targets[k]: v for k, v in state.items()}, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"unexpected keys when loading LoRA: {result.unexpected_keys[:4]}")


def parse(name: str) -> tuple[int, str, str]:
    """'layers.3.self_attn.q_proj.lora_A' -> (3, 'self_attn.q_proj', 'lora_A')."""
    m = _CANON.match(name)
    if not m:
        raise KeyError(f"not a canonical LoRA name: {name!r}")
    return int(m.group(1)), m.group(2), m.group(3)


def layer_slice(state: LoraState, layer: int) -> dict[str, torch.Tensor]:
    """The LoRA tensors of one layer, keyed without the layer prefix ('self_attn.q_proj.lora_A')."""
    prefix = f"layers.{layer}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def with_layer(layer: int, tensors: dict[str, torch.Tensor]) -> LoraState:
    return {f"layers.{layer}.{k}": v for k, v in tensors.items()}


def n_layers_of(state: LoraState) -> int:
    return 1 + max(parse(k)[0] for k in state) if state else 0


def serialize(state: LoraState) -> bytes:
    """The bytes that cross the wire: safetensors, contiguous fp32 (never pickle)."""
    return st_save({k: v.detach().contiguous() for k, v in state.items()})


def deserialize(blob: bytes) -> LoraState:
    return dict(st_load(blob))


def nbytes(state: LoraState) -> int:
    return len(serialize(state))


def clone(state: LoraState) -> LoraState:
    return {k: v.detach().clone() for k, v in state.items()}
