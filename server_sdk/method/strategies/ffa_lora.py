"""FFA-LoRA: federated LoRA with A frozen at its random init; only B is trained and sent,
which halves traffic and makes FedAvg of B exact (no cross terms of averaged A and B)."""

from __future__ import annotations

from server_sdk.method.strategies.fedit import FedIT


class FFALoRA(FedIT):
    name = "ffa-lora"

    def is_trainable(self, name):
        return "lora_B" in name
