"""FedIT: plain federated LoRA instruction tuning on the full model, every round."""

from __future__ import annotations

from server_sdk.method.strategies.base import Strategy
from server_sdk.method.submodel import fold_back_lora, identity_plan


class FedIT(Strategy):
    name = "fedit"

    def stage_sizes(self, n_layers):
        return [n_layers]

    def configure_stage(self, stage, model, full_lora, n_sub_layers):
        return identity_plan(len(model.model.layers), stage), None

    def finish_stage(self, full_lora, trained, initial, plan):
        return fold_back_lora(full_lora, trained, initial, plan, "copy")
