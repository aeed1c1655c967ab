"""DEVFT: developmental stages of growing submodels built by deconfliction-guided grouping
and differential fusion, with the trained LoRA transferred back to every group member."""

from __future__ import annotations

from ..grouping import layer_similarity
from ..lora import scaling
from ..submodel import identity_plan, plan_stage, transfer_lora_back
from .base import Strategy


class DevFT(Strategy):
    name = "devft"

    def stage_sizes(self, n_layers):
        return self.cfg.resolved_stages(n_layers)

    def configure_stage(self, stage, model, full_lora, n_sub_layers):
        n = len(model.model.layers)
        if n_sub_layers == n:  # the full model: every layer is its own group, in depth order
            return identity_plan(n, stage), layer_similarity(model, full_lora, scaling(self.cfg.lora))
        return plan_stage(model, full_lora, self.cfg.lora, stage, n_sub_layers, self.cfg.grouping,
                          self.cfg.anchor, self.cfg.seed)

    def finish_stage(self, full_lora, trained, initial, plan):
        return transfer_lora_back(full_lora, trained, initial, plan, self.cfg.transfer)
