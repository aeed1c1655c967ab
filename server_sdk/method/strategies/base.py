"""The strategy interface every federated method implements (after Flower's Strategy).

A run is a list of stages; each stage trains one submodel for some rounds. A strategy
decides the stages, the submodel of each stage (its layer groups and how a group becomes
one layer), which LoRA tensors clients train, how their results are aggregated, and what
the full model's LoRA becomes when a stage ends. Callers (the round loop, `devft plan`,
`devft export`, the benchmarks) ask the strategy for each of these and never apply a
rule themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from peft import PeftModel
from transformers import LlamaForCausalLM

from server_sdk.config import RunConfig
from server_sdk.method.lora import LoraState
from server_sdk.method.submodel import StagePlan, build_submodel


@dataclass
class ClientResult:
    """What one client's local training returns, whoever trained it (a simulated client, a Ray actor, a
    device): the input of every aggregation rule."""

    client: int
    num_samples: int
    delta: LoraState  # trained - received, only the tensors the strategy trains
    train_loss: float
    seconds: float
    cpu_seconds: float | None = None  # process CPU time of the local training (robust on a shared machine)
    payload_bytes: int | None = None  # bytes of the update as sent, where a transport measured them
    telemetry: dict | None = None  # device-side measurements (memory, latency, energy), if any


class Strategy(ABC):
    name: str = "base"
    tokenizer = None  # the base model's tokenizer, for strategies whose server work needs text (heal)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @abstractmethod
    def stage_sizes(self, n_layers: int) -> list[int]:
        """Submodel depth of each stage; the last is the full model. ConfigError if the
        configured schedule does not fit a model of n_layers layers."""

    @abstractmethod
    def configure_stage(self, stage: int, model: LlamaForCausalLM, full_lora: LoraState,
                        n_sub_layers: int) -> tuple[StagePlan, np.ndarray | None]:
        """Group the full model's layers for this stage (and the similarity matrix used, if any)."""

    def build_submodel(self, model: LlamaForCausalLM, full_lora: LoraState,
                       plan: StagePlan) -> tuple[PeftModel, LoraState]:
        """The stage's submodel with its initial LoRA. Without fusion, each group is one layer as it is."""
        return build_submodel(model, full_lora, plan, 0.0, "select", self.cfg.lora)

    def speculate_stage(self, stage: int, model: LlamaForCausalLM, full_lora: LoraState,
                        n_sub_layers: int) -> tuple[StagePlan, PeftModel] | None:
        """What configure_stage and build_submodel would give for this full-model LoRA, for devices to fetch
        before the stage starts (a guess: the real stage is configured at its start). Must not change the
        strategy's state. None when no cheap guess exists."""
        plan, _ = self.configure_stage(stage, model, full_lora, n_sub_layers)
        return plan, self.build_submodel(model, full_lora, plan)[0]

    def replan_rounds(self, stage: int, stage_round: int, records: list[dict], rounds: list[int]) -> list[int]:
        """Rounds per stage from now on, asked after every evaluated round of a non-final stage
        (records end with that round). Returning rounds[stage] == stage_round + 1 ends the stage now;
        a stage given 0 rounds is skipped. Default: the schedule as configured."""
        return list(rounds)

    def keeps_stage(self, stage: int, records: list[dict]) -> bool:
        """Asked when a stage ends (records end with its last, evaluated round, whose eval loss is the
        full model's with the stage's LoRA folded back): False rolls the full model's LoRA back to
        what it was before the stage. Default: keep every stage."""
        return True

    def stage_notes(self, stage: int) -> dict:
        """Extra facts about the stage just built (e.g. server seconds spent preparing it), kept
        in report.json's stage_plans."""
        return {}

    def is_trainable(self, name: str) -> bool:
        """Which LoRA tensors clients train and send back."""
        return "lora_" in name

    def aggregate_train(self, global_lora: LoraState, results: list[ClientResult]) -> LoraState:
        """FedAvg over client deltas weighted by sample count, or the robust rule `cfg.aggregation` names."""
        from server_sdk.method.aggregation import aggregate

        return aggregate(self.cfg.aggregation, global_lora, results)

    @abstractmethod
    def finish_stage(self, full_lora: LoraState, trained: LoraState, initial: LoraState,
                     plan: StagePlan) -> LoraState:
        """The full model's LoRA after this stage's submodel LoRA has been trained."""
