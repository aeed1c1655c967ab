"""The strategy interface every federated method implements (after Flower's Strategy).

A run is a list of stages; each stage trains one submodel for some rounds. A strategy
decides the stages, the submodel of each stage (its layer groups and how a group becomes
one layer), which LoRA tensors clients train, how their results are aggregated, and what
the full model's LoRA becomes when a stage ends. Callers (the round loop, `devft plan`,
`devft export`, the benchmarks) ask the strategy for each of these and never apply a
rule themselves.

Per round, the methods are Flower's: `configure_train` (who trains, from which LoRA, with which
seeds), `aggregate_train` (the strategy's `Aggregator`), `configure_evaluate` and `evaluate` (the
server's evaluation of the full model with the stage's LoRA transferred back). devft evaluates on
the server only, so there is no `aggregate_evaluate` of client metrics. Where clients train is the
executor's business (engine/executor.py), as Flower's Grid is its strategies'.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from peft import PeftModel
from transformers import LlamaForCausalLM

from server_sdk.config import RunConfig
from server_sdk.method.aggregation import make_aggregator
from server_sdk.method.lora import LoraState
from server_sdk.method.records import RoundRecord
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


def client_seed(seed: int, key: int, rnd: int, client: int) -> int:
    """The seed of a client's local training in round `rnd` of the stage whose draw key is `key`
    (StagePlan.draw_key: 0 for the full model, a submodel stage's index otherwise). 32 bits, so always
    within the protocol's bound (edge_runtime.protocol.MAX_SEED, 2^53 - 1)."""
    return int(np.random.SeedSequence([seed, key, rnd, client]).generate_state(1)[0])


def sample_clients(cfg: RunConfig, key: int, rnd: int, pool: list[int] | None = None) -> list[int]:
    """The clients that train round `rnd` of the stage whose draw key is `key` (StagePlan.draw_key), drawn from
    `pool` when the executor narrows it (a fleet: the devices whose declared memory fits the stage), at most
    clients_per_round of them; None = every client (the same draw as before pools existed)."""
    rng = np.random.default_rng([cfg.seed, 17, key, rnd])
    if pool is None:
        return sorted(int(c) for c in rng.choice(cfg.num_clients, size=cfg.clients_per_round, replace=False))
    return sorted(int(c) for c in rng.choice(sorted(pool), size=min(cfg.clients_per_round, len(pool)), replace=False))


@dataclass
class TrainRound:
    """What a round's clients get (configure_train): who trains, the LoRA they start from, which of its tensors
    they train and send back, and each client's local-training seed."""

    clients: list[int]
    global_lora: LoraState
    is_trainable: Callable[[str], bool]
    seeds: dict[int, int]


@dataclass
class EvalRound:
    """How a round's end is evaluated (configure_evaluate): the held-out loss, and with `generate` the
    exact-match accuracy too (generation is evaluation's costly part)."""

    generate: bool


class Strategy(ABC):
    name: str = "base"
    tokenizer = None  # the base model's tokenizer, for strategies whose server work needs text (heal)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.aggregator = make_aggregator(cfg.aggregation)  # FedAvg, or the robust rule cfg.aggregation names

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

    def replan_rounds(self, stage: int, stage_round: int, records: list[RoundRecord], rounds: list[int]) -> list[int]:
        """Rounds per stage from now on, asked after every evaluated round of a non-final stage
        (records end with that round). Returning rounds[stage] == stage_round + 1 ends the stage now;
        a stage given 0 rounds is skipped. Default: the schedule as configured."""
        return list(rounds)

    def keeps_stage(self, stage: int, records: list[RoundRecord]) -> bool:
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

    def configure_train(self, plan: StagePlan, rnd: int, global_lora: LoraState,
                        pool: list[int] | None) -> TrainRound:
        """Round `rnd` of the stage `plan`: clients drawn from `pool` (the executor's eligible ones; None = all)."""
        clients = sample_clients(self.cfg, plan.draw_key, rnd, pool)
        seeds = {c: client_seed(self.cfg.seed, plan.draw_key, rnd, c) for c in clients}
        return TrainRound(clients, global_lora, self.is_trainable, seeds)

    def aggregate_train(self, global_lora: LoraState, results: list[ClientResult]) -> LoraState:
        """The stage's global LoRA after a round: the aggregator over the clients' deltas."""
        return self.aggregator.aggregate(global_lora, results)

    def configure_evaluate(self, rnd: int, stage_rounds: int, final_stage: bool) -> EvalRound | None:
        """Whether the end of round `rnd` of a stage of `stage_rounds` rounds is evaluated (every eval_every rounds
        and at each stage's end; None: not), and whether with accuracy (config accuracy_every)."""
        stage_end = rnd == stage_rounds - 1
        if not ((rnd + 1) % self.cfg.eval_every == 0 or stage_end):
            return None
        every = self.cfg.accuracy_every
        return EvalRound(every == "round" or (every == "stage" and stage_end)
                         or (every == "end" and final_stage and stage_end))

    def evaluate(self, full_lora: LoraState, trained: LoraState, initial: LoraState, plan: StagePlan,
                 evaluate_fn: Callable[[LoraState], dict]) -> dict:
        """The held-out metrics (evaluate_fn's) of the full model with the stage's LoRA transferred back: what the
        stage has bought the model so far, whatever the submodel is."""
        return evaluate_fn(self.finish_stage(full_lora, trained, initial, plan))

    @abstractmethod
    def finish_stage(self, full_lora: LoraState, trained: LoraState, initial: LoraState,
                     plan: StagePlan) -> LoraState:
        """The full model's LoRA after this stage's submodel LoRA has been trained."""
