"""Where client training happens. The round loop (rounds.run) is the same for a
simulated fleet and a real one; only the executor differs:

- InProcessExecutor: clients train one after another in this process (eager torch);
- the Ray executor (server_sdk.engine.ray_executor): clients train in parallel Ray workers, which
  also evaluate the full model each round (`evaluate`), the held-out set split across them;
- a fleet executor (server_sdk.fleet.coordinator) sends artifacts and global LoRA over MQTT and
  collects device updates.

Evaluation on the held-out set runs where the executor says (`evaluate`): here by default.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

from peft import PeftModel

from server_sdk.config import RunConfig
from server_sdk.data import Example
from server_sdk.engine.trainer import evaluate, local_train
from server_sdk.method.lora import LoraState, write_lora
from server_sdk.method.strategies.base import ClientResult
from server_sdk.method.submodel import StagePlan, submodel_bytes


class QuorumNotReached(RuntimeError):
    """Too few clients (devices, Ray actors) answered a round before its deadline."""


def quorum_need(quorum: float, sampled: int) -> int:
    """Answers a round of `sampled` clients needs."""
    return math.ceil(quorum * sampled)


class ClientExecutor(ABC):
    @abstractmethod
    def begin_stage(self, stage: int, plan: StagePlan, sub_model: PeftModel) -> int:
        """Make the stage's submodel available to clients; return the bytes one device downloads for it."""

    @abstractmethod
    def train_round(self, stage: int, rnd: int, sampled: list[int], global_lora: LoraState,
                    is_trainable: Callable[[str], bool], seeds: dict[int, int]) -> list[ClientResult]:
        """Have the sampled clients train from global_lora; return the results that arrived in time."""

    def prefetch_stage(self, stage: int, speculate: Callable[[], tuple[StagePlan, PeftModel] | None]) -> None:
        """Called before a stage's last round: `speculate()` guesses stage `stage`'s plan and submodel (None: no
        guess). An executor whose clients download stages may build it meanwhile and let them fetch it early
        (server_sdk/fleet/prefetch.py); the guess never changes what the run trains. Default: ignored."""

    def expect_stages(self, config: dict, stage_sizes: list[int]) -> None:
        """Called once the run's stage sizes are known (`config`: the base model's config dict). An executor
        that exports stages may prepare their graphs ahead of need (the fleet traces them in a background
        process: server_sdk/engine/warm.py). Default: ignored."""

    def evaluate(self, model: PeftModel, tokenizer, examples: list[Example], *, seq_len: int, generate: bool = True,
                 max_new_tokens: int = 24, batch_size: int = 16, progress: str | None = None,
                 precision: str = "fp32") -> dict:
        """trainer.evaluate of the full model (the base model's frozen weights, with the LoRA it holds now)
        on the held-out examples. Default: here, on `model`; an executor whose workers hold the frozen
        weights anyway may evaluate there instead (the Ray executor, split across its workers), with the
        same numbers."""
        return evaluate(model, tokenizer, examples, seq_len=seq_len, generate=generate,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, precision=precision)

    def eligible_clients(self, stage: int) -> list[int] | None:
        """The clients a round of `stage` may sample (None: every client). A fleet leaves out the devices whose
        declared memory does not fit the stage, and raises when none does. Default: every client."""
        return None

    def follow_rounds_per_stage(self, rounds_per_stage: list[int]) -> None:
        """The run's rounds per stage: the round loop's list, which it updates in place when the strategy replans
        (called once, before the first stage). Default: ignored."""

    def run_finished(self) -> None:
        """The run's last round is done (called before close; not after an interrupted or failed run)."""

    def close(self) -> None:
        """Release connections and processes."""


class InProcessExecutor(ClientExecutor):
    """Simulated clients in one process: each trains the stage submodel in turn."""

    def __init__(self, cfg: RunConfig, tokenizer, clients: list[list[Example]],
                 on_step: Callable[[], None] | None = None):
        self.cfg, self.tokenizer, self.clients, self.on_step = cfg, tokenizer, clients, on_step
        self.sub_model: PeftModel | None = None

    def begin_stage(self, stage, plan, sub_model):
        self.sub_model = sub_model
        return submodel_bytes(sub_model)

    def train_round(self, stage, rnd, sampled, global_lora, is_trainable, seeds):
        assert self.sub_model is not None, "begin_stage must come first"
        results = []
        for c in sampled:
            write_lora(self.sub_model, global_lora)
            results.append(local_train(
                self.sub_model, self.tokenizer, self.clients[c], steps=self.cfg.local_steps,
                batch_size=self.cfg.batch_size, lr=self.cfg.lr, seq_len=self.cfg.seq_len, seed=seeds[c],
                is_trainable=is_trainable, client=c, progress=self.on_step, precision=self.cfg.precision,
                optimizer=self.cfg.optimizer))
        return results
