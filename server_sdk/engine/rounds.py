"""The round loop: one federated fine-tuning, with simulated clients or a real fleet.

The same loop runs every strategy (DEVFT, FedIT, FFA-LoRA) over every executor (clients
in this process, or devices over MQTT: server_sdk.fleet.coordinator). Per stage it asks the strategy
for the submodel and hands it to the executor; per round it samples clients, has them
train, aggregates with the strategy, evaluates the full model with the stage's LoRA
folded back (where the executor says: here, or on its Ray workers), and checkpoints.
`RunState` is everything the checkpoint holds; report.json's rows are `RoundRecord`s (kept typed until
written); `run` returns a `RunResult`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from server_sdk.config import RunConfig
from server_sdk.data import Example, build_client_data, build_eval_data, read_jsonl, write_jsonl
from server_sdk.engine import checkpoint
from server_sdk.engine.eval_cache import base_evaluation
from server_sdk.engine.executor import ClientExecutor, InProcessExecutor
from server_sdk.engine.model import BaseModel, describe, load_base_model
from server_sdk.engine.precision import warn_if_emulated
from server_sdk.engine.quantized import quantize_submodel_, quantized_base
from server_sdk.engine.report import plot_curves, plot_groups
from server_sdk.method.lora import LoraState, attach_lora, nbytes, read_lora, serialize, write_lora
from server_sdk.method.records import RoundRecord
from server_sdk.method.stage_gain import stage_gains
from server_sdk.method.strategies import Strategy, make_strategy
from server_sdk.method.submodel import StagePlan, share_model
from server_sdk.progress import bar as progress_bar
from server_sdk.progress import phase, round_postfix

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
    records: list[RoundRecord] = field(default_factory=list)  # report.json's rows
    stage_plans: list[dict] = field(default_factory=list)  # report.json's: each stage's plan and similarity
    devices_with_stage: list[int] = field(default_factory=list)
    rounds_per_stage: list[int] | None = None  # once a strategy re-planned them at runtime (checkpoint key "rounds")

    def save(self, run_dir: Path) -> None:
        meta = {"stage": self.stage, "next_round": self.next_round,
                "plan": self.plan.to_dict() if self.plan is not None else None,
                "records": [r.to_dict() for r in self.records],
                "stage_plans": self.stage_plans, "devices_with_stage": self.devices_with_stage,
                "rounds": self.rounds_per_stage}
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
                   records=[RoundRecord.from_dict(r) for r in meta["records"]], stage_plans=meta["stage_plans"],
                   devices_with_stage=meta["devices_with_stage"], rounds_per_stage=meta.get("rounds"))


@dataclass
class RunResult:
    """What `run` returns: the run's records, and report.json's content once the run reached its end."""

    records: list[RoundRecord]
    report: dict | None = None  # report.json as written; None when this call ended before the run's last round
    stopped_early: bool = False  # stop_when ended the run (then it has no report either)

    @property
    def interrupted(self) -> bool:
        """This call ended before the run's last round (stop_after_rounds, stop_when): --resume continues it."""
        return self.report is None

    @property
    def before(self) -> RoundRecord:
        """The base model's row."""
        return self.records[0]

    @property
    def after(self) -> RoundRecord:
        """The last round's row."""
        return self.records[-1]

    def to_dict(self) -> dict:
        """report.json's content; for an interrupted call, `interrupted` (and `stopped_early`) and the records."""
        if self.report is not None:
            return self.report
        return {"interrupted": True, **({"stopped_early": True} if self.stopped_early else {}),
                "records": [r.to_dict() for r in self.records]}

    def __getitem__(self, key: str) -> Any:
        """to_dict()[key]: for callers that still read the result as report.json's dict (benchmarks)."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


@dataclass
class RoundLoop:
    """What the loop works with for the whole run (fixed once the run starts)."""

    cfg: RunConfig
    run_dir: Path
    base: BaseModel
    held_out: list[Example]
    strategy: Strategy
    stages: list[int]  # submodel layers per stage (the strategy's schedule)
    rounds_per_stage: list[int]  # resolved from the config, re-planned in place by the strategy
    executor: ClientExecutor
    steps_bar: Any  # local steps of in-process clients (server_sdk.progress.bar)
    progress: bool = True
    stop_after_rounds: int | None = None  # end this call early (the checkpoint lets --resume continue)
    stop_when: Callable[[list[RoundRecord]], bool] | None = None  # end the run early once this holds (benchmarks)


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
        stop_when: Callable[[list[RoundRecord]], bool] | None = None) -> RunResult:
    """Run (or resume) a federated fine-tuning; returns its records and report (also written to run_dir).

    stop_after_rounds ends the process early after that many rounds in this call (for
    interruption tests and time-boxed sessions); the checkpoint lets --resume continue.
    executor_factory picks where clients train (default: in this process). stop_when(records)
    is asked after every evaluated round: True ends the run there (benchmarks that measure the
    cost to reach a target loss); the result then says `stopped_early` and holds the records."""
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
    stages, rounds_per_stage = stages_and_rounds_per_stage(cfg, strategy, base.n_layers)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_json(run_dir / "config.json")
    clients, held_out = prepare_data(cfg, base, run_dir)
    # local steps are visible only where clients train in this process; devices report per round
    steps_bar = progress_bar("local steps", cfg.clients_per_round * cfg.local_steps, position=1, lines=False,
                             enabled=progress and executor_factory is None)
    executor = executor_factory(cfg, base, clients) if executor_factory else \
        InProcessExecutor(cfg, base.tokenizer, clients, on_step=lambda: steps_bar.update(1))
    try:
        executor.follow_rounds_per_stage(rounds_per_stage)
        executor.expect_stages(base.model.config.to_dict(), [n for n, k in zip(stages, rounds_per_stage) if k > 0])
        result = _run_loop(RoundLoop(cfg, run_dir, base, held_out, strategy, stages, rounds_per_stage, executor,
                                     steps_bar, progress, stop_after_rounds, stop_when), resume)
        if not result.interrupted:
            executor.run_finished()
        return result
    finally:
        steps_bar.close()
        executor.close()


def stages_and_rounds_per_stage(cfg: RunConfig, strategy: Strategy, n_layers: int) -> tuple[list[int], list[int]]:
    """The strategy's stages (submodel layers) and the config's rounds_per_stage resolved to one count per stage:
    the one place a run resolves it (`devft plan` shows the same)."""
    stages = strategy.stage_sizes(n_layers)
    return stages, cfg.resolve_rounds_per_stage(len(stages))


@dataclass
class Pace:
    """The loop's count of rounds: the progress bar, rounds done in the run and in this call."""

    bar: Any
    done: int
    this_call: int = 0


@dataclass
class RoundOutcome:
    """One trained and aggregated round, before its record is written."""

    sampled: list[int]
    results: list
    new_devices: list[int]
    bytes_down: int
    bytes_up: int
    started: float  # perf_counter at the round's start


def _run_loop(loop: RoundLoop, resume: bool) -> RunResult:
    """Stages, and rounds within each: plan, train, aggregate, evaluate, record, replan, fold back, checkpoint."""
    torch.manual_seed(loop.cfg.seed)  # seeds the initial LoRA
    eval_model, initial_full = _full_eval_model(loop.base, loop.cfg)  # the full model: seeds the LoRA, evaluates
    state = _load_state(loop, resume, initial_full)
    _evaluate_base(loop, state, eval_model)
    pace = _pace(loop, state)
    for s in range(state.stage, len(loop.stages)):
        if loop.rounds_per_stage[s] == 0:  # skipped by the strategy's runtime schedule
            continue
        plan, stage_artifact = _enter_stage(loop, state, s)
        for r in range(state.next_round, loop.rounds_per_stage[s]):
            outcome = _train_round(loop, state, s, r, plan, pace)
            metrics = _evaluate_round(loop, state, s, r, plan, eval_model, pace)
            state.records.append(_record(loop, state, s, r, outcome, stage_artifact, metrics))
            stage_end = _close_round(loop, state, s, r, plan, metrics)
            is_last = s == len(loop.stages) - 1 and r == loop.rounds_per_stage[s] - 1
            _count_round(loop, state, pace, s)
            stop = _stop_early(loop, state, pace, metrics, is_last)
            if stop is not None:
                return stop
            if stage_end:
                break
    pace.bar.close()
    return _finish(loop, state, eval_model)


def _load_state(loop: RoundLoop, resume: bool, initial_full: LoraState) -> RunState:
    """A fresh state, or the checkpoint's when resuming (with the schedule as the strategy last re-planned it)."""
    state = RunState(full_lora=initial_full)
    loaded = RunState.load(loop.run_dir) if resume else None
    if loaded:
        state = loaded
        log.info("resuming %s at stage %d round %d", loop.run_dir, state.stage, state.next_round)
    elif resume:
        log.warning("no checkpoint in %s: starting from the beginning", loop.run_dir)
    if state.rounds_per_stage is not None:  # the strategy re-planned them before the interruption
        loop.rounds_per_stage[:] = state.rounds_per_stage
    return state


def _generation(cfg: RunConfig) -> dict:
    return dict(seq_len=cfg.seq_len, max_new_tokens=cfg.gen_max_new_tokens, precision=cfg.precision)


def _evaluate_base(loop: RoundLoop, state: RunState, eval_model: PeftModel) -> None:
    """The base model's held-out evaluation: the run's first record (once; a resumed run has it)."""
    if state.records:
        return
    before = base_evaluation(eval_model, loop.base, loop.held_out, generate=loop.cfg.accuracy_every != "never",
                             progress=loop.progress, evaluator=loop.executor.evaluate, **_generation(loop.cfg))
    state.records.append(RoundRecord.base_model(loop.base.n_layers, before))


def _pace(loop: RoundLoop, state: RunState) -> Pace:
    done = sum(loop.rounds_per_stage[:state.stage]) + state.next_round
    return Pace(progress_bar(f"{loop.cfg.strategy} rounds", sum(loop.rounds_per_stage), initial=done, position=0, leave=True,
                             enabled=loop.progress), done)


def _enter_stage(loop: RoundLoop, state: RunState, s: int) -> tuple[StagePlan, int]:
    """Plan stage s (or take the plan a resumed checkpoint holds), build its submodel, hand it to the executor.
    Returns the plan and the bytes of the stage's files one device downloads."""
    strategy, base = loop.strategy, loop.base
    if state.plan is None or state.plan.stage != s:
        plan, sim = strategy.configure_stage(s, base.model, state.full_lora, loop.stages[s])
        sub_model, init_sub = strategy.build_submodel(base.model, state.full_lora, plan)
        quantize_submodel_(sub_model, loop.cfg.weights)
        state.plan, state.stage_initial, state.stage_global = plan, init_sub, init_sub
        state.stage_plans.append({**plan.to_dict(), "similarity": sim.tolist() if sim is not None else None,
                                  **strategy.stage_notes(s)})
        checkpoint.save_stage_start(loop.run_dir, s, plan.to_dict(), state.full_lora)
        state.devices_with_stage, state.next_round = [], 0
    else:
        plan = state.plan
        sub_model, _ = strategy.build_submodel(base.model, state.full_lora, plan)
        quantize_submodel_(sub_model, loop.cfg.weights)
    with phase(f"stage {s + 1}/{len(loop.stages)}: preparing the {loop.stages[s]}-layer submodel",
               enabled=loop.progress):
        stage_artifact = loop.executor.begin_stage(s, plan, sub_model)
    return plan, stage_artifact


def _train_round(loop: RoundLoop, state: RunState, s: int, r: int, plan: StagePlan, pace: Pace) -> RoundOutcome:
    """The strategy's round (configure_train): its clients train (devices may fetch the next stage during a stage's
    last round), and the strategy aggregates their results into the stage's global LoRA."""
    executor = loop.executor
    started = time.perf_counter()
    train = loop.strategy.configure_train(plan, r, state.stage_global, executor.eligible_clients(s))
    sampled = train.clients
    bytes_down = len(serialize(train.global_lora)) * len(sampled)
    new_devices = [c for c in sampled if c not in state.devices_with_stage]
    state.devices_with_stage += new_devices
    nxt = next((t for t in range(s + 1, len(loop.stages)) if loop.rounds_per_stage[t] > 0), None)
    if r == loop.rounds_per_stage[s] - 1 and nxt is not None:
        executor.prefetch_stage(nxt, _guess_stage(loop, state, plan, nxt))
    loop.steps_bar.reset()
    with phase(f"round {pace.done + 1}: waiting for {len(sampled)} devices",
               enabled=loop.progress and loop.steps_bar.disable):
        results = executor.train_round(s, r, sampled, train.global_lora, train.is_trainable, train.seeds)
    if not results:
        raise RuntimeError(f"stage {s} round {r}: no client result arrived; the round cannot be aggregated")
    bytes_up = sum(res.payload_bytes or nbytes(res.delta) for res in results)  # before aggregation folds them
    state.stage_global = loop.strategy.aggregate_train(state.stage_global, results)
    state.next_round = r + 1
    return RoundOutcome(sampled, results, new_devices, bytes_down, bytes_up, started)


def _evaluate_round(loop: RoundLoop, state: RunState, s: int, r: int, plan: StagePlan, eval_model: PeftModel,
                    pace: Pace) -> dict | None:
    """The strategy's evaluation of the round (configure_evaluate, evaluate): the full model's held-out metrics
    with the stage's LoRA folded back, on the executor (here, or its Ray workers); None when not evaluated."""
    how = loop.strategy.configure_evaluate(r, loop.rounds_per_stage[s], s == len(loop.stages) - 1)  # the last: never re-planned
    if how is None:
        return None
    label = f"evaluating after round {pace.done + 1}" if loop.progress else None

    def evaluate_full(lora: LoraState) -> dict:
        write_lora(eval_model, lora)
        return loop.executor.evaluate(eval_model, loop.base.tokenizer, loop.held_out, generate=how.generate,
                                      **_generation(loop.cfg), progress=label)

    return loop.strategy.evaluate(state.full_lora, state.stage_global, state.stage_initial, plan, evaluate_full)


def _record(loop: RoundLoop, state: RunState, s: int, r: int, outcome: RoundOutcome, stage_artifact: int,
            metrics: dict | None) -> RoundRecord:
    """report.json's row for the round."""
    results = outcome.results
    return RoundRecord(
        stage=s, round=len([x for x in state.records if x.stage >= 0]) + 1, stage_round=r,
        layers=loop.stages[s], clients=outcome.sampled, train_loss=float(np.mean([res.train_loss for res in results])),
        bytes_down=outcome.bytes_down, bytes_up=outcome.bytes_up,
        stage_download_bytes=stage_artifact * len(outcome.new_devices),
        client_seconds=[res.seconds for res in results], wall_seconds=time.perf_counter() - outcome.started,
        client_samples=[res.num_samples for res in results],
        client_cpu_seconds=[res.cpu_seconds for res in results], stage_new_devices=len(outcome.new_devices),
        telemetry={res.telemetry.get("device") or str(res.client): res.telemetry  # keyed by device name
                   for res in results if res.telemetry} or None,
    ).with_metrics(metrics)


def _close_round(loop: RoundLoop, state: RunState, s: int, r: int, plan: StagePlan, metrics: dict | None) -> bool:
    """Let the strategy re-plan the schedule after an evaluated round; at a stage's end, fold its LoRA back
    into the full model (unless the strategy rolls the stage back); checkpoint. Returns whether the stage ended."""
    strategy, rounds_per_stage = loop.strategy, loop.rounds_per_stage
    stage_end = r == rounds_per_stage[s] - 1
    if metrics is not None and s < len(loop.stages) - 1:  # the strategy may end this stage now
        planned = strategy.replan_rounds(s, r, state.records, rounds_per_stage)
        if planned != rounds_per_stage:
            rounds_per_stage[:], state.rounds_per_stage = planned, list(planned)
        stage_end = r == rounds_per_stage[s] - 1
    if stage_end:
        if s < len(loop.stages) - 1 and not strategy.keeps_stage(s, state.records):
            state.records[-1].rolled_back = True  # the full model keeps its LoRA from before the stage
            log.info("stage %d did not pay for itself: its fold-back is rolled back", s + 1)
        else:
            state.full_lora = strategy.finish_stage(state.full_lora, state.stage_global, state.stage_initial, plan)
        state.stage, state.next_round, state.plan = s + 1, 0, None
    state.save(loop.run_dir)
    return stage_end


def _count_round(loop: RoundLoop, state: RunState, pace: Pace, s: int) -> None:
    pace.bar.update(1)
    pace.done += 1
    pace.bar.set_postfix_str(round_postfix(s, len(loop.stages), loop.stages[s], state.records))
    pace.this_call += 1


def _stop_early(loop: RoundLoop, state: RunState, pace: Pace, metrics: dict | None,
                is_last: bool) -> RunResult | None:
    """The result of a run this call ends before its last round (stop_after_rounds, stop_when), else None."""
    if loop.stop_after_rounds is not None and pace.this_call >= loop.stop_after_rounds and not is_last:
        pace.bar.close()
        return RunResult(state.records)
    if metrics is not None and not is_last and loop.stop_when is not None and loop.stop_when(state.records):
        pace.bar.close()
        return RunResult(state.records, stopped_early=True)
    return None


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


def _finish(loop: RoundLoop, state: RunState, eval_model: PeftModel) -> RunResult:
    """The run's adapter (the full model's final LoRA), report.json and its plots."""
    write_lora(eval_model, state.full_lora)
    adapter_dir = loop.run_dir / "adapter"
    eval_model.save_pretrained(adapter_dir)
    rows = [r.to_dict() for r in state.records]
    report = {"config": loop.cfg.to_dict(), "model": describe(loop.base), "strategy": loop.cfg.strategy,
              "stages": loop.stages, "rounds_per_stage": loop.rounds_per_stage, "stage_plans": state.stage_plans,
              "records": rows, "before": rows[0], "after": rows[-1],
              "stage_transfer": stage_gains(state.records),  # the stage gains; report key kept
              "adapter": str(adapter_dir)}
    (loop.run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_curves(report, loop.run_dir / "curves.png")
    plot_groups(report, loop.run_dir / "groups.png")
    return RunResult(state.records, report)


def _full_eval_model(base: BaseModel, cfg: RunConfig) -> tuple[PeftModel, LoraState]:
    """The full model with freshly initialised (seeded) LoRA: the run's starting adapter."""
    model = attach_lora(share_model(base.model), cfg.lora, seed=cfg.seed)
    return model, read_lora(model)
