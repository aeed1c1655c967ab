"""Stage submodels: given a stage's plan (which full-model layers each submodel layer stands
for), fuse each group into one layer, and send the trained LoRA back to every member when
the stage ends. The strategy (strategies/) makes the plan and picks the rules."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import init_empty_weights
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from server_sdk.method.fusion import FOLD_BACKS, fuse_group, pick
from server_sdk.method.grouping import Groups
from server_sdk.method.lora import LoraState, attach_lora, layer_slice, with_layer, write_lora

if TYPE_CHECKING:
    from server_sdk.config import LoraSettings


@dataclass
class StagePlan:
    """Which full-model layers each submodel layer stands for; submodel layer i = groups[i]."""

    stage: int
    n_layers: int
    groups: Groups
    anchors: list[int]
    full: bool = False  # the full model itself (identity_plan), not a submodel of it

    def to_dict(self) -> dict:
        """JSON form, for the checkpoint, the kept stage starts and report.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> StagePlan:
        return cls(raw["stage"], raw["n_layers"], raw["groups"], raw["anchors"], bool(raw.get("full", False)))

    @property
    def draw_key(self) -> int:
        """Key of the stage's client draws and local-training seeds (strategies.base.sample_clients, client_seed).
        The full model's stage draws as FedIT's rounds do (key 0), so on one seed a DEVFT run's full-model
        rounds and a FedIT run train the same clients on the same batches and compare paired; submodel
        stages draw by their index. (Checkpoints written before `full` existed resume with their old draws.)"""
        return 0 if self.full else self.stage


def identity_plan(n_layers: int, stage: int = 0) -> StagePlan:
    """The full model's plan: every layer its own group."""
    return StagePlan(stage, n_layers, [[i] for i in range(n_layers)], list(range(n_layers)), full=True)


def fuse_lora(full_lora: LoraState, plan: StagePlan, beta: float, method: str) -> LoraState:
    """The submodel's initial LoRA: each group's member LoRA fused exactly as its weights are."""
    out: LoraState = {}
    for i, (group, anchor) in enumerate(zip(plan.groups, plan.anchors)):
        members = [layer_slice(full_lora, m) for m in group]
        out.update(with_layer(i, fuse_group(members, group.index(anchor), beta, method)))
    return out


def empty_model(config_dict: dict, n_layers: int) -> LlamaForCausalLM:
    """A LlamaForCausalLM of `n_layers` decoder layers whose parameters are not allocated yet
    (meta tensors; buffers such as the rotary frequencies are real): load_state_dict(assign=True)
    then makes the given tensors its parameters, without a copy."""
    cfg_dict = dict(config_dict)
    cfg_dict["num_hidden_layers"] = n_layers
    for key in ("layer_types", "quantization_config"):
        cfg_dict.pop(key, None)
    config = LlamaConfig.from_dict(cfg_dict)
    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        return LlamaForCausalLM(config)


def assemble(model: LlamaForCausalLM, layer_states: list[dict[str, torch.Tensor]]) -> LlamaForCausalLM:
    """A new frozen LlamaForCausalLM with the given decoder layers and the model's embeddings,
    final norm and LM head.

    The tensors are shared, not copied: the new model's parameters are the given tensors (and
    the model's own embeddings, norm and head), so the base model, the evaluation model and a
    stage submodel hold one copy of every frozen weight they have in common. Nothing writes
    frozen weights in place (training updates LoRA tensors only), so sharing is safe."""
    sub = empty_model(model.config.to_dict(), len(layer_states))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    for i, layer_state in enumerate(layer_states):
        state.update({f"model.layers.{i}.{k}": v for k, v in layer_state.items()})
    load_frozen(sub, state)
    return sub


def load_frozen(sub: LlamaForCausalLM, state: dict[str, torch.Tensor]) -> None:
    """Make `state`'s tensors the (frozen) parameters of an empty_model(), tying the LM head to the
    embeddings where the config says so; RuntimeError if the tensors do not fit the model."""
    missing, unexpected = sub.load_state_dict(state, strict=False, assign=True)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"submodel state mismatch: missing={missing[:4]} unexpected={unexpected[:4]}")
    if sub.config.tie_word_embeddings:
        sub.tie_weights()
    elif "lm_head.weight" in missing:
        raise RuntimeError("submodel state has no lm_head.weight and the model does not tie it to the embeddings")
    sub.eval()
    for p in sub.parameters():
        p.requires_grad_(False)


def share_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A new frozen model object over the same weight tensors (no copy: one set of frozen weights in memory).

    Attaching LoRA to it leaves `model` untouched; writing into its frozen weights in place would not."""
    return assemble(model, [layer.state_dict() for layer in model.model.layers])


def build_submodel(model: LlamaForCausalLM, full_lora: LoraState, plan: StagePlan, beta: float, method: str,
                   lora_settings: LoraSettings) -> tuple[PeftModel, LoraState]:
    """A real HF LlamaForCausalLM with one fused layer per group (ordered by anchor depth),
    wrapped with PEFT LoRA that holds the group members' fused LoRA."""
    layers = model.model.layers
    with torch.no_grad():
        # a group of one is its layer as it is: shared with the base model, not copied
        fused_layers = [layers[group[0]].state_dict() if len(group) == 1 else
                        fuse_group([{k: v.detach() for k, v in layers[m].state_dict().items()} for m in group],
                                   group.index(anchor), beta, method)
                        for group, anchor in zip(plan.groups, plan.anchors)]
    peft_model = attach_lora(assemble(model, fused_layers), lora_settings)
    sub_lora = fuse_lora(full_lora, plan, beta, method)
    write_lora(peft_model, sub_lora)
    return peft_model, sub_lora


def fold_back_lora(full_lora: LoraState, trained: LoraState, initial: LoraState, plan: StagePlan,
                   mode: str = "copy") -> LoraState:
    """Fold each fused layer's trained LoRA back into every member of its group.

    `mode` names a rule of fusion.FOLD_BACKS (the config's `transfer`; copy: members get the trained
    tensors; delta: members add (trained - initial) to their own)."""
    rule = pick(FOLD_BACKS, "fold-back rule (transfer)", mode)
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
