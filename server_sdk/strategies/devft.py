"""DEVFT: developmental stages of growing submodels built by deconfliction-guided grouping
and differential fusion, with the trained LoRA transferred back to every group member.

The config's `grouping`, `anchor`, `fusion`, `beta` and `transfer` pick the rules from
their registries (grouping.py, fusion.py); `stages` is the schedule (default: doubling)."""

from __future__ import annotations

from ..config import ConfigError
from ..fusion import choose_anchor
from ..grouping import make_groups
from ..lora import scaling
from ..similarity import layer_similarity
from ..submodel import StagePlan, build_submodel, identity_plan, transfer_lora_back
from .base import Strategy


def default_schedule(n_layers: int) -> list[int]:
    """4 -> 8 -> 16 -> ... -> n_layers (doubling, capped, always ending at the full model)."""
    stages, s = [], 4
    while s < n_layers:
        stages.append(s)
        s *= 2
    return [*stages, n_layers] if n_layers >= 1 else [n_layers]


class DevFT(Strategy):
    name = "devft"

    def stage_sizes(self, n_layers):
        stages = list(self.cfg.stages) if self.cfg.stages is not None else default_schedule(n_layers)
        if stages[-1] > n_layers:
            raise ConfigError(f"stages={stages}: stage of {stages[-1]} layers is larger than the model's {n_layers} layers")
        if stages[-1] != n_layers:
            raise ConfigError(f"stages={stages}: the last stage must be the full model ({n_layers} layers); "
                              f"append {n_layers}")
        return stages

    def configure_stage(self, stage, model, full_lora, n_sub_layers):
        """Group the current (adapted) full model into n_sub_layers groups, ordered by anchor depth;
        the full model's stage keeps every layer as its own group, in depth order."""
        sim = layer_similarity(model, full_lora, scaling(self.cfg.lora))
        n = len(model.model.layers)
        if n_sub_layers == n:
            return identity_plan(n, stage), sim
        groups = make_groups(self.cfg.grouping, sim, n_sub_layers, seed=self.cfg.seed + 1000 * stage)
        anchors = [choose_anchor(g, sim, self.cfg.anchor) for g in groups]
        order = sorted(range(len(groups)), key=lambda i: anchors[i])
        return StagePlan(stage, n_sub_layers, [groups[i] for i in order], [anchors[i] for i in order]), sim

    def build_submodel(self, model, full_lora, plan):
        return build_submodel(model, full_lora, plan, self.cfg.beta, self.cfg.fusion, self.cfg.lora)

    def finish_stage(self, full_lora, trained, initial, plan):
        return transfer_lora_back(full_lora, trained, initial, plan, self.cfg.transfer)
