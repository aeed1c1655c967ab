"""Stage submodels: given a stage's plan (which full-model layers each submodel layer stands
for), fuse each group into one layer, and send the trained LoRA back to every member when
the stage ends. The strategy (strategies/) makes the plan and picks the rules."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from .config import LoraSettings
from .fusion import TRANSFERS, fuse_group, pick
from .grouping import Groups
from .lora import LoraState, attach_lora, layer_slice, with_layer, write_lora


@dataclass
class StagePlan:
    """Which full-model layers each submodel layer stands for; submodel layer i = groups[i]."""

    stage: int
    n_layers: int
    groups: Groups
    anchors: list[int]

    def to_dict(self) -> dict:
        """JSON form, for the checkpoint, the kept stage starts and report.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> StagePlan:
        return cls(raw["stage"], raw["n_layers"], raw["groups"], raw["anchors"])


def identity_plan(n_layers: int, stage: int = 0) -> StagePlan:
    return StagePlan(stage, n_layers, [[i] for i in range(n_layers)], list(range(n_layers)))


def fuse_lora(full_lora: LoraState, plan: StagePlan, beta: float, method: str) -> LoraState:
    """The submodel's initial LoRA: each group's member LoRA fused exactly as its weights are."""
    out: LoraState = {}
    for i, (group, anchor) in enumerate(zip(plan.groups, plan.anchors)):
        members = [layer_slice(full_lora, m) for m in group]
        out.update(with_layer(i, fuse_group(members, group.index(anchor), beta, method)))
    return out


def assemble(model: LlamaForCausalLM, layer_states: list[dict[str, torch.Tensor]]) -> LlamaForCausalLM:
    """A new frozen LlamaForCausalLM with the given decoder layers and the model's embeddings,
    final norm and LM head (copied)."""
    cfg_dict = model.config.to_dict()
    cfg_dict["num_hidden_layers"] = len(layer_states)
    for key in ("layer_types", "quantization_config"):
        cfg_dict.pop(key, None)
    config = LlamaConfig.from_dict(cfg_dict)
    config.use_cache = False
    sub = LlamaForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    for i, layer_state in enumerate(layer_states):
        state.update({f"model.layers.{i}.{k}": v for k, v in layer_state.items()})
    missing, unexpected = sub.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"submodel state mismatch: missing={missing[:4]} unexpected={unexpected[:4]}")
    if config.tie_word_embeddings:
        sub.tie_weights()
    sub.eval()
    for p in sub.parameters():
        p.requires_grad_(False)
    return sub


def copy_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    return assemble(model, [layer.state_dict() for layer in model.model.layers])


def build_submodel(model: LlamaForCausalLM, full_lora: LoraState, plan: StagePlan, beta: float, method: str,
                   lora_settings: LoraSettings) -> tuple[PeftModel, LoraState]:
    """A real HF LlamaForCausalLM with one fused layer per group (ordered by anchor depth),
    wrapped with PEFT LoRA that holds the group members' fused LoRA."""
    layers = model.model.layers
    with torch.no_grad():
        fused_layers = [fuse_group([{k: v.detach() for k, v in layers[m].state_dict().items()} for m in group],
                                   group.index(anchor), beta, method)
                        for group, anchor in zip(plan.groups, plan.anchors)]
    peft_model = attach_lora(assemble(model, fused_layers), lora_settings)
    sub_lora = fuse_lora(full_lora, plan, beta, method)
    write_lora(peft_model, sub_lora)
    return peft_model, sub_lora


def transfer_lora_back(full_lora: LoraState, trained: LoraState, initial: LoraState, plan: StagePlan,
                       mode: str = "copy") -> LoraState:
    """Send each fused layer's trained LoRA back to every member of its group.

    `mode` names a rule of fusion.TRANSFERS (copy: members get the trained tensors; delta:
    members add (trained - initial) to their own)."""
    rule = pick(TRANSFERS, "transfer mode", mode)
    out = {k: v.clone() for k, v in full_lora.items()}
    for i, group in enumerate(plan.groups):
        trained_i, initial_i = layer_slice(trained, i), layer_slice(initial, i)
        for member in group:
            for name, t in trained_i.items():
                key = f"layers.{member}.{name}"
                out[key] = rule(out[key], t, initial_i[name])
    return out


def submodel_bytes(peft_model: PeftModel) -> int:
    """fp32 bytes of the frozen weights a device must hold for this submodel (tied weights once)."""
    seen, total = set(), 0
    for p in peft_model.parameters():
        if p.requires_grad or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total
