"""The round loop: one federated fine-tuning, with simulated clients or a real fleet.

The same loop runs every strategy (DEVFT, FedIT, FFA-LoRA) over every executor (clients
in this process, or devices over MQTT: server_sdk.fleet). Per stage it asks the strategy
for the submodel and hands it to the executor; per round it samples clients, has them
train, aggregates with the strategy, evaluates the full model with the stage's LoRA
transferred back (where the executor says: here, or on its Ray workers), and checkpoints.
`RunState` is everything the checkpoint holds; report.json's rows are `RoundRecord`s.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from . import checkpoint
from .config import RunConfig
from .data import Example, build_client_data, build_eval_data, read_jsonl, write_jsonl
from .disk import prune_finished_stages
from .eval_cache import base_evaluation
from .executor import ClientExecutor, InProcessExecutor
from .lora import LoraState, attach_lora, nbytes, read_lora, serialize, write_lora
from .model import BaseModel, describe, load_base_model
from .precision import warn_if_emulated
from .progress import bar as progress_bar
from .progress import phase, round_postfix
from .quantized import quantize_submodel_, quantized_base
from .report import plot_curves, plot_groups
from .stage_transfer import stage_transfer
from .strategies import Strategy, make_strategy
from .submodel import StagePlan, share_model

log = logging.getLogger(__name__)
ExecutorFactory = Callable[[RunConfig, BaseModel, list[list[Example]]], ClientExecutor]


@dataclass
class RunState:
    """Where the run stands; the checkpoint after every round holds exactly this."""

    stage: int = 0
    next_round: int = 0  # round index within the stage to run next
    full_lora: LoraState = field(default_factory=dict)
    stage_initial: LoraState = field(default_factory=dict)
    stage_global: LoraState = field(default_factory=dict)
    plan: StagePlan | None = None  # the stage in progress; None between stages
    records: list[dict] = field(default_factory=list)  # report.json's rows (RoundRecord.to_dict())
    stage_plans: list[dict] = field(default_factory=list)  # report.json's: each stage's plan and similarity
    devices_with_stage: list[int] = field(default_factory=list)
    rounds: list[int] | None = None  # rounds per stage, once a strategy re-planned them at runtime

    def save(self, run_dir: Path) -> None:
        meta = {"stage": self.stage, "next_round": self.next_round,
                "plan": self.plan.to_dict() if self.plan is not None else None, "records": self.records,
                "stage_plans": self.stage_plans, "devices_with_stage": self.devices_with_stage,
                "rounds": self.rounds}
        tensors = {"full": self.full_lora}
        if self.plan is not None:
            tensors.update(initial=self.stage_initial, **{"global": self.stage_global})
        checkpoint.save(run_dir, meta, tensors)

    @classmethod
    def load(cls, run_dir: Path) -> RunState | None:
        loaded = checkpoint.load(run_dir)
        if loaded is None:
            return None
        meta, tensors = loaded
        return cls(stage=meta["stage"], next_round=meta["next_round"], full_lora=tensors["full"],
                   stage_initial=tensors.get("initial", {}), stage_global=tensors.get("global", {}),
                   plan=StagePlan.from_dict(meta["plan"]) if meta["plan"] is not None else None,
                   records=meta["records"], stage_plans=meta["stage_plans"],
                   devices_with_stage=meta["devices_with_stage"], rounds=meta.get("rounds"))


@dataclass
class RoundRecord:
    """One row of report.json's `records`; stage -1 is the base model before any training."""

    stage: int
    round: int  # counted across stages from 1
    stage_round: int
    layers: int
    clients: list[int]
    train_loss: float | None
    bytes_down: int
    bytes_up: int
    stage_download_bytes: int
    client_seconds: list[float]
    wall_seconds: float
    client_samples: list[int]
    eval_loss: float | None = None
    accuracy: float | None = None
    per_task: dict | None = None
    # training rounds only (the base-model row has none of these)
    client_cpu_seconds: list[float] | None = None
    stage_new_devices: int | None = None
    telemetry: dict[str, Any] | None = None  # only when devices reported some

    @classmethod
    def base_model(cls, n_layers: int, metrics: dict) -> RoundRecord:
        return cls(-1, 0, 0, n_layers, [], None, 0, 0, 0, [], 0.0, []).with_metrics(metrics)

    def with_metrics(self, metrics: dict | None) -> RoundRecord:
        if metrics:
            self.eval_loss = metrics["eval_loss"]
            self.accuracy = metrics.get("accuracy")
            self.per_task = metrics["per_task"]
        return self

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("client_cpu_seconds", "stage_new_devices", "telemetry"):
            if out[key] is None:
                del out[key]
        return out


@dataclass
class RoundLoop:
    """What the loop works with for the whole run (fixed once the run starts)."""

    cfg: RunConfig
    run_dir: Path
    base: BaseModel
    held_out: list[Example]
    strategy: Strategy
    stages: list[int]  # submodel layers per stage (the strategy's schedule)
    rounds: list[int]  # rounds per stage
    executor: ClientExecutor
    steps_bar: Any  # local steps of in-process clients (server_sdk.progress.bar)
    progress: bool = True
    stop_after_rounds: int | None = None  # end this call early (the checkpoint lets --resume continue)
    stop_when: Callable[[list[dict]], bool] | None = None  # end the run early once this holds (benchmarks)


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


def prepare_data(cfg: RunConfig, base: BaseModel, run_dir: Path) -> tuple[list[list[Example]], list[Example]]:
    """Client shards and the held-out set, as JSONL under run_dir/data (reused on resume)."""
    data_dir = run_dir / "data"
    shards = [data_dir / f"client_{c:03d}.jsonl" for c in range(cfg.num_clients)]
    eval_path = data_dir / "eval.jsonl"
    if all(p.exists() for p in shards) and eval_path.exists():
        return [read_jsonl(p) for p in shards], read_jsonl(eval_path)
    clients = build_client_data(base.tokenizer, cfg.data, cfg.num_clients, cfg.seed)
    held_out = build_eval_data(base.tokenizer, cfg.data, cfg.seed, clients)
    for p, shard in zip(shards, clients):
        write_jsonl(p, shard)
    write_jsonl(eval_path, held_out)
    return clients, held_out


def run(cfg: RunConfig, run_dir: Path, *, resume: bool = False, base: BaseModel | None = None,
        progress: bool = True, stop_after_rounds: int | None = None,
        executor_factory: ExecutorFactory | None = None,
        stop_when: Callable[[list[dict]], bool] | None = None) -> dict:
    """Run (or resume) a federated fine-tuning; returns the report, also written to run_dir.

    stop_after_rounds ends the process early after that many rounds in this call (for
    interruption tests and time-boxed sessions); the checkpoint lets --resume continue.
    executor_factory picks where clients train (default: in this process). stop_when(records)
    is asked after every evaluated round: True ends the run there (benchmarks that measure the
    cost to reach a target loss); the returned dict then says `stopped_early` and holds the records."""
    run_dir = Path(run_dir)
    cfg.validate()
    if resume:
        saved = RunConfig.of_run(run_dir)
        if saved.to_dict() != cfg.to_dict():
            log.warning("resuming with the config saved in %s (command-line config ignored)", run_dir)
        cfg = saved
    elif (run_dir / checkpoint.NAME).exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    warn_if_emulated(cfg.precision)
    strategy = make_strategy(cfg)
    base = quantized_base(base or load_base_model(cfg.model), cfg.weights)
    strategy.tokenizer = base.tokenizer
    stages = strategy.stage_sizes(base.n_layers)
    rounds = cfg.resolved_rounds(len(stages))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_json(run_dir / "config.json")
    clients, held_out = prepare_data(cfg, base, run_dir)
    # local steps are visible only where clients train in this process; devices report per round
    steps_bar = progress_bar("local steps", cfg.clients_per_round * cfg.local_steps, position=1, lines=False,
                             enabled=progress and executor_factory is None)
    executor = executor_factory(cfg, base, clients) if executor_factory else \
        InProcessExecutor(cfg, base.tokenizer, clients, on_step=lambda: steps_bar.update(1))
    try:
        executor.follow_schedule(rounds)
        executor.expect_stages(base.model.config.to_dict(), [n for n, k in zip(stages, rounds) if k > 0])
        report = _run_loop(RoundLoop(cfg, run_dir, base, held_out, strategy, stages, rounds, executor, steps_bar,
                                     progress, stop_after_rounds, stop_when), resume)
        if not report.get("interrupted"):
            executor.run_finished()
        return report
    finally:
        steps_bar.close()
        executor.close()


def _run_loop(loop: RoundLoop, resume: bool) -> dict:
    cfg, base, strategy, executor = loop.cfg, loop.base, loop.strategy, loop.executor
    stages, rounds = loop.stages, loop.rounds

    # the full model with LoRA attached, used to seed the initial LoRA and to evaluate
    torch.manual_seed(cfg.seed)
    eval_model, initial_full = _full_eval_model(base, cfg)

    state = RunState(full_lora=initial_full)
    loaded = RunState.load(loop.run_dir) if resume else None
    if loaded:
        state = loaded
        log.info("resuming %s at stage %d round %d", loop.run_dir, state.stage, state.next_round)
    elif resume:
        log.warning("no checkpoint in %s: starting from the beginning", loop.run_dir)
    if state.rounds is not None:  # the strategy re-planned the schedule before the interruption
        rounds[:] = state.rounds

    gen = dict(seq_len=cfg.seq_len, max_new_tokens=cfg.gen_max_new_tokens, precision=cfg.precision)
    if not state.records:
        before = base_evaluation(eval_model, base, loop.held_out, generate=cfg.accuracy_every != "never",
                                 progress=loop.progress, evaluator=executor.evaluate, **gen)
        state.records.append(RoundRecord.base_model(base.n_layers, before).to_dict())

    total_rounds = sum(rounds)
    done_rounds = sum(rounds[:state.stage]) + state.next_round
    bar = progress_bar(f"{cfg.strategy} rounds", total_rounds, initial=done_rounds, position=0, leave=True,
                       enabled=loop.progress)
    rounds_this_call = 0
    for s in range(state.stage, len(stages)):
        if rounds[s] == 0:  # skipped by the strategy's runtime schedule
            continue
        if state.plan is None or state.plan.stage != s:
            plan, sim = strategy.configure_stage(s, base.model, state.full_lora, stages[s])
            sub_model, init_sub = strategy.build_submodel(base.model, state.full_lora, plan)
            quantize_submodel_(sub_model, cfg.weights)
            state.plan, state.stage_initial, state.stage_global = plan, init_sub, init_sub
            state.stage_plans.append({**plan.to_dict(), "similarity": sim.tolist() if sim is not None else None,
                                      **strategy.stage_notes(s)})
            checkpoint.save_stage_start(loop.run_dir, s, plan.to_dict(), state.full_lora)
            state.devices_with_stage, state.next_round = [], 0
        else:
            plan = state.plan
            sub_model, _ = strategy.build_submodel(base.model, state.full_lora, plan)
            quantize_submodel_(sub_model, cfg.weights)
        with phase(f"stage {s + 1}/{len(stages)}: preparing the {stages[s]}-layer submodel", enabled=loop.progress):
            stage_artifact = executor.begin_stage(s, plan, sub_model)
        prune_finished_stages(loop.run_dir, s)  # devices moved on; --keep-artifacts keeps them

        for r in range(state.next_round, rounds[s]):
            t_round = time.perf_counter()
            sampled = sample_clients(cfg, plan.draw_key, r, executor.eligible_clients(s))
            bytes_down = len(serialize(state.stage_global)) * len(sampled)
            new_devices = [c for c in sampled if c not in state.devices_with_stage]
            state.devices_with_stage += new_devices
            seeds = {c: client_seed(cfg.seed, plan.draw_key, r, c) for c in sampled}
            nxt = next((t for t in range(s + 1, len(stages)) if rounds[t] > 0), None)
            if r == rounds[s] - 1 and nxt is not None:
                executor.prefetch_stage(nxt, _guess_stage(loop, state, plan, nxt))
            loop.steps_bar.reset()
            with phase(f"round {done_rounds + 1}: waiting for {len(sampled)} devices",
                       enabled=loop.progress and loop.steps_bar.disable):
                results = executor.train_round(s, r, sampled, state.stage_global, strategy.is_trainable, seeds)
            if not results:
                raise RuntimeError(f"stage {s} round {r}: no client result arrived; the round cannot be aggregated")
            bytes_up = sum(res.payload_bytes or nbytes(res.delta) for res in results)
            state.stage_global = strategy.aggregate_train(state.stage_global, results)
            state.next_round = r + 1

            metrics = None
            stage_end = r == rounds[s] - 1
            if (r + 1) % cfg.eval_every == 0 or stage_end:
                projected = strategy.finish_stage(state.full_lora, state.stage_global, state.stage_initial, plan)
                write_lora(eval_model, projected)
                run_end = s == len(stages) - 1 and stage_end  # the final stage is never re-planned
                want_acc = (cfg.accuracy_every == "round" or (cfg.accuracy_every == "stage" and stage_end)
                            or (cfg.accuracy_every == "end" and run_end))
                label = f"evaluating after round {done_rounds + 1}" if loop.progress else None
                metrics = executor.evaluate(eval_model, base.tokenizer, loop.held_out, generate=want_acc, **gen,
                                            progress=label)
            rec = RoundRecord(
                stage=s, round=len([x for x in state.records if x["stage"] >= 0]) + 1, stage_round=r,
                layers=stages[s], clients=sampled, train_loss=float(np.mean([res.train_loss for res in results])),
                bytes_down=bytes_down, bytes_up=bytes_up, stage_download_bytes=stage_artifact * len(new_devices),
                client_seconds=[res.seconds for res in results], wall_seconds=time.perf_counter() - t_round,
                client_samples=[res.num_samples for res in results],
                client_cpu_seconds=[res.cpu_seconds for res in results], stage_new_devices=len(new_devices),
                telemetry={res.telemetry.get("device") or str(res.client): res.telemetry  # keyed by device name
                           for res in results if res.telemetry} or None,
            ).with_metrics(metrics)
            state.records.append(rec.to_dict())
            if metrics is not None and s < len(stages) - 1:  # the strategy may end this stage now
                planned = strategy.replan_rounds(s, r, state.records, rounds)
                if planned != rounds:
                    rounds[:], state.rounds = planned, list(planned)
                stage_end = r == rounds[s] - 1
            is_last = s == len(stages) - 1 and r == rounds[s] - 1
            if stage_end:  # stage done: transfer back into the full model, unless the strategy rolls it back
                if s < len(stages) - 1 and not strategy.keeps_stage(s, state.records):
                    state.records[-1]["rolled_back"] = True  # the full model keeps its LoRA from before the stage
                    log.info("stage %d did not pay for itself: its transfer is rolled back", s + 1)
                else:
                    state.full_lora = strategy.finish_stage(state.full_lora, state.stage_global, state.stage_initial,
                                                            plan)
                state.stage, state.next_round, state.plan = s + 1, 0, None
            state.save(loop.run_dir)
            bar.update(1)
            done_rounds += 1
            bar.set_postfix_str(round_postfix(s, len(stages), stages[s], state.records))
            rounds_this_call += 1
            if loop.stop_after_rounds is not None and rounds_this_call >= loop.stop_after_rounds and not is_last:
                bar.close()
                return {"interrupted": True, "records": state.records}
            if metrics is not None and not is_last and loop.stop_when is not None and loop.stop_when(state.records):
                bar.close()
                return {"interrupted": True, "stopped_early": True, "records": state.records}
            if stage_end:
                break
    bar.close()
    return _finish(loop, state, eval_model)


def _guess_stage(loop: RoundLoop, state: RunState, plan: StagePlan, stage: int) -> Callable[[], tuple | None]:
    """Stage `stage`'s plan and submodel as they would be if the coming round changed nothing: what the
    executor may let devices fetch early (executor.prefetch_stage). The real stage is planned at its start."""
    strategy, model, n_layers = loop.strategy, loop.base.model, loop.stages[stage]
    full, trained, initial = state.full_lora, state.stage_global, state.stage_initial  # not mutated in place

    def guess() -> tuple | None:
        guessed = strategy.speculate_stage(stage, model, strategy.finish_stage(full, trained, initial, plan), n_layers)
        if guessed is not None:
            quantize_submodel_(guessed[1], loop.cfg.weights)
        return guessed

    return guess


def _finish(loop: RoundLoop, state: RunState, eval_model: PeftModel) -> dict:
    """The run's adapter (the full model's final LoRA), report.json and its plots."""
    write_lora(eval_model, state.full_lora)
    adapter_dir = loop.run_dir / "adapter"
    eval_model.save_pretrained(adapter_dir)
    report = {"config": loop.cfg.to_dict(), "model": describe(loop.base), "strategy": loop.cfg.strategy,
              "stages": loop.stages, "rounds_per_stage": loop.rounds, "stage_plans": state.stage_plans,
              "records": state.records, "before": state.records[0], "after": state.records[-1],
              "stage_transfer": stage_transfer(state.records),
              "adapter": str(adapter_dir)}
    (loop.run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_curves(report, loop.run_dir / "curves.png")
    plot_groups(report, loop.run_dir / "groups.png")
    return report


def _full_eval_model(base: BaseModel, cfg: RunConfig) -> tuple[PeftModel, LoraState]:
    """The full model with freshly initialised (seeded) LoRA: the run's starting adapter."""
    model = attach_lora(share_model(base.model), cfg.lora, seed=cfg.seed)
    return model, read_lora(model)
