"""Simulated clients trained in parallel Ray actors (`devft run --executor ray --workers N`).

Each worker is a Ray actor that holds the stage submodel, built once per stage from frozen
weights that cross Ray's object store once per stage: a Ray task on the coordinator's node
maps a safetensors file of them (server_sdk.engine.frozen) and puts its arrays in the object store,
and every worker maps that object (zero-copy on the same node; Ray moves it to other nodes).
The file is the base model's own when the stage's frozen weights are exactly the base
model's (FedIT, DEVFT's full-model stage) and the model was loaded from it unconverted; the
coordinator then never reads those weights. Otherwise (fused layers, a random test model)
the coordinator writes the stage's frozen weights to a file first.

Per round only the global LoRA is put once and the sampled clients' tasks go to the workers
in turn; each runs the same `local_train` with the same seed as the in-process executor,
with the same torch thread count, so the results are bit-identical to it. Results come back
ordered by client. The full model is evaluated on the workers too (`evaluate`), split across
all live ones in parallel: each builds it once over the base model's arrays in the object
store (for FedIT the same mapped memory as its stage submodel), writes the round's LoRA and
evaluates one range of whole batches of the held-out set (trainer.eval_chunks) on the
coordinator's thread count; the coordinator combines the per-example parts in example order
(trainer.combine_eval). It holds no resident copy of the weights, and since every example is
evaluated in the same batch as in-process, the numbers equal in-process evaluation's bit for
bit.

A worker that dies mid-round (crash, OOM kill, lost node, `ray.kill`) is a missing client,
like a missing device of a real fleet: the round aggregates the survivors if at least
ceil(quorum * sampled) answered, else raises QuorumNotReached (the checkpoint holds the
previous round; `devft run --resume` repeats it). With a round deadline, clients not done
by then are cancelled and count as missing too. Dead workers are replaced before the next
round. A worker that dies evaluating loses nothing: its range goes at once to another live
worker (when none is left, all are replaced), and the evaluation completes with the same
numbers.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from server_sdk.config import DEFAULT_QUORUM, LoraSettings, RunConfig, check_quorum
from server_sdk.data import Example
from server_sdk.engine.executor import ClientExecutor, QuorumNotReached, quorum_need
from server_sdk.engine.frozen import frozen_state, holds_exactly, map_stage_file, same_tensors, write_frozen
from server_sdk.engine.model import BaseModel
from server_sdk.engine.trainer import EvalPart, combine_eval, eval_chunks, evaluate_part, local_train
from server_sdk.method.lora import LoraState, attach_lora, read_lora, write_lora
from server_sdk.method.strategies.base import ClientResult
from server_sdk.method.submodel import StagePlan, empty_model, load_frozen, submodel_bytes
from server_sdk.progress import phase

log = logging.getLogger(__name__)


@dataclass
class RaySettings:
    """Where and how the Ray workers run."""

    workers: int = 2  # Ray actors training clients in parallel (one CPU each)
    address: str | None = None  # an existing Ray cluster ("auto", "HOST:PORT"); None = start Ray here
    quorum: float = DEFAULT_QUORUM  # fraction of sampled clients a round needs (as for a real fleet)
    round_timeout_s: float | None = None  # a round's deadline; None = wait for every live worker

    def validate(self) -> RaySettings:
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be at least 1")
        check_quorum(self.quorum)
        if self.round_timeout_s is not None and self.round_timeout_s <= 0:
            raise ValueError(f"round_timeout_s={self.round_timeout_s} must be positive")
        return self


class ClientWorker:
    """One Ray actor: the stage submodel (frozen weights mapped from the object store) and the
    client shards; trains one client per call. It also evaluates its part of the held-out set when
    asked, on a second model object, the full model, built once over the base model's mapped frozen
    weights (for FedIT and DEVFT's full-model stage the very same mapped arrays as the stage
    submodel's)."""

    def __init__(self, tokenizer, clients: list[list[Example]], lora: LoraSettings, threads: int):
        torch.set_num_threads(threads)
        self.tokenizer, self.clients, self.lora = tokenizer, clients, lora
        self.stage: int | None = None
        self.model: PeftModel | None = None
        self.eval_model: PeftModel | None = None

    def _build(self, config: dict, n_layers: int, frozen: dict) -> PeftModel:
        """A model around the mapped frozen arrays (no copy), with LoRA attached."""
        with warnings.catch_warnings():  # the arrays are read-only shared memory; nothing writes them
            warnings.filterwarnings("ignore", message=".*not writable.*")
            state = {k: torch.from_numpy(v) for k, v in frozen.items()}
        sub = empty_model(config, n_layers)
        load_frozen(sub, state)
        return attach_lora(sub, self.lora)

    def load_stage(self, stage: int, config: dict, n_layers: int, frozen: dict) -> int:
        """Build the stage submodel around the mapped frozen arrays; returns its pid."""
        self.model = None
        self.model, self.stage = self._build(config, n_layers, frozen), stage
        return os.getpid()

    def train(self, stage: int, client: int, global_lora: LoraState, seed: int,
              is_trainable: Callable[[str], bool], steps: int, batch_size: int, lr: float,
              seq_len: int, precision: str = "fp32", optimizer: str = "adamw") -> ClientResult:
        if self.model is None or self.stage != stage:
            raise RuntimeError(f"worker holds stage {self.stage}, asked to train stage {stage}")
        write_lora(self.model, global_lora)
        return local_train(self.model, self.tokenizer, self.clients[client], steps=steps, batch_size=batch_size,
                           lr=lr, seq_len=seq_len, seed=seed, is_trainable=is_trainable, client=client,
                           precision=precision, optimizer=optimizer)

    def evaluate_part(self, config: dict, n_layers: int, frozen: dict, lora: LoraState, examples: list[Example],
                      start: int, stop: int, kw: dict, threads: int) -> EvalPart:
        """trainer.evaluate_part of examples[start:stop] (a range of trainer.eval_chunks) on the full model
        (the base model's frozen arrays, built on the first call) with `lora`, on the coordinator's torch
        thread count: the per-example numbers it would compute itself."""
        if self.eval_model is None:
            self.eval_model = self._build(config, n_layers, frozen)
        write_lora(self.eval_model, lora)
        own = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return evaluate_part(self.eval_model, self.tokenizer, examples[start:stop], **kw)
        finally:
            torch.set_num_threads(own)

    def pid(self) -> int:
        return os.getpid()


class RayExecutor(ClientExecutor):
    """Sampled clients train in parallel Ray actors, each with the stage submodel loaded once per stage;
    the full model's evaluation is split across them."""

    def __init__(self, cfg: RunConfig, base: BaseModel, clients: list[list[Example]], settings: RaySettings,
                 after_submit: Callable[[list], None] | None = None,
                 after_eval_submit: Callable[[list], None] | None = None):
        """after_submit(workers) is called once a round's tasks are submitted, after_eval_submit(workers) once
        an evaluation's parts are (tests kill a worker there)."""
        import ray

        self.ray, self.cfg, self.base, self.settings = ray, cfg, base, settings.validate()
        self.after_submit, self.after_eval_submit = after_submit, after_eval_submit
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            kw = {"address": settings.address} if settings.address else {"num_cpus": max(settings.workers, 1)}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
        self.threads = cfg.torch_threads or 1
        self._worker_cls = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(ClientWorker)
        self._mapper = ray.remote(num_cpus=0)(map_stage_file)
        self._shared = (ray.put(base.tokenizer), ray.put(clients))
        self.stage_dir = Path(tempfile.mkdtemp(prefix="devft-ray-stage-"))  # the frozen-weight files written here
        self._stage: tuple | None = None  # (stage, config, n_layers, object ref of the frozen arrays)
        self._base_arrays: tuple | None = None  # (config, n_layers, object ref of the base model's frozen arrays)
        self._held_out: tuple | None = None  # (the held-out examples, their object ref)
        self.workers = [self._new_worker() for _ in range(settings.workers)]
        self._dead: set[int] = set()  # indices of workers lost in the last round, replaced before the next
        self.worker_pids = ray.get([w.pid.remote() for w in self.workers])

    def _new_worker(self):
        tok_ref, clients_ref = self._shared
        return self._worker_cls.remote(tok_ref, clients_ref, self.cfg.lora, self.threads)

    def _map(self, path: Path):
        """The safetensors file's arrays in the object store, read by a Ray task on this node (the file is here)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(), soft=False)
        return self._mapper.options(scheduling_strategy=here).remote(str(path))

    def _base_frozen(self) -> tuple:
        """The base model's config, depth and frozen arrays in the object store, put there once: mapped
        from the file the base model was loaded from where it holds them exactly (this process reads
        none of them), else from a file written here (e.g. a random test model)."""
        if self._base_arrays is None:
            state = frozen_state(self.base.model)
            path = self.base.weights_file
            if path is None or not holds_exactly(path, state):
                path = self.stage_dir / "base.safetensors"
                write_frozen(path, state)
            self._base_arrays = (self.base.model.config.to_dict(), self.base.n_layers, self._map(path))
        return self._base_arrays

    def _is_base(self, model: PeftModel) -> bool:
        """True when the model's frozen tensors are the base model's own (shared, never written)."""
        return same_tensors(frozen_state(model), frozen_state(self.base.model))

    def begin_stage(self, stage: int, plan: StagePlan, sub_model: PeftModel) -> int:
        for old in self.stage_dir.glob("stage-*.safetensors"):
            old.unlink()
        if self._is_base(sub_model):  # FedIT, DEVFT's full-model stage: the base model's arrays, already there
            frozen_ref = self._base_frozen()[2]
        else:  # fused layers: this stage's own file
            path = self.stage_dir / f"stage-{stage}.safetensors"
            write_frozen(path, frozen_state(sub_model))
            frozen_ref = self._map(path)
        inner = sub_model.get_base_model()
        self._stage = (stage, inner.config.to_dict(), len(inner.model.layers), frozen_ref)
        self._load_stage(range(len(self.workers)))
        return submodel_bytes(sub_model)

    def evaluate(self, model, tokenizer, examples, *, seq_len, generate=True, max_new_tokens=24, batch_size=16,
                 progress=None, precision="fp32"):
        """Split across the live workers: each evaluates one range of whole batches (trainer.eval_chunks) on
        the full model built there once over the base model's frozen arrays in the object store, with
        `model`'s LoRA, on this process's torch thread count; the parts are combined here in example order
        (trainer.combine_eval), so the numbers are those of evaluating here, bit for bit. The held-out
        examples are put in the object store once; a worker gets its range's bounds. A model whose frozen
        tensors are not the base model's is evaluated here."""
        if not self._is_base(model):
            return super().evaluate(model, tokenizer, examples, seq_len=seq_len, generate=generate,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                    precision=precision)
        if self._held_out is None or self._held_out[0] is not examples:
            self._held_out = (examples, self.ray.put(examples))
        config, n_layers, frozen_ref = self._base_frozen()
        lora_ref, held_ref, threads = self.ray.put(read_lora(model)), self._held_out[1], torch.get_num_threads()
        kw = dict(seq_len=seq_len, generate=generate, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  precision=precision)
        chunks = eval_chunks(len(examples), batch_size, max(len(self._live()), 1))
        with phase(progress or "", enabled=progress is not None):
            parts = self._on_workers(
                [lambda w, c=c: w.evaluate_part.remote(config, n_layers, frozen_ref, lora_ref, held_ref, c.start,
                                                       c.stop, kw, threads) for c in chunks],
                after_submit=self.after_eval_submit)
        return combine_eval(parts, generate=generate)

    def _live(self) -> list[int]:
        """Indices of the workers not known to be dead."""
        return [i for i in range(len(self.workers)) if i not in self._dead]

    def _on_workers(self, calls: list[Callable], after_submit: Callable[[list], None] | None = None) -> list:
        """[ray.get(call(worker)) for call in calls], all in parallel: each call goes to the least busy live
        worker (with as many calls as live workers, one each). A call whose worker dies meanwhile goes at
        once to another live worker (the dead one is replaced before the next round; when none is left, all
        are replaced now); a call that loses more workers than there are fails."""
        from ray.exceptions import RayActorError

        results, tries, pending = [None] * len(calls), [0] * len(calls), {}

        def submit(j: int) -> None:
            if not self._live():  # every worker is lost: replace them now
                self._replace_dead()
            busy = Counter(i for _, i, worker in pending.values() if self.workers[i] is worker)
            i = min(self._live(), key=lambda k: busy[k])
            tries[j] += 1
            pending[calls[j](self.workers[i])] = (j, i, self.workers[i])

        for j in range(len(calls)):
            submit(j)
        if after_submit:
            after_submit(self.workers)
        while pending:
            [ref], _ = self.ray.wait(list(pending), num_returns=1)
            j, i, worker = pending.pop(ref)
            try:
                results[j] = self.ray.get(ref)
            except RayActorError:
                log.warning("Ray worker %d died during an evaluation; its part goes to another", i)
                if self.workers[i] is worker:  # not already replaced
                    self._dead.add(i)
                if tries[j] > len(self.workers):
                    raise RuntimeError("Ray workers kept dying during an evaluation; check their logs under "
                                       "/tmp/ray/session_latest/logs") from None
                submit(j)
        return results

    def _replace_dead(self) -> None:
        """Fresh workers for those lost, given the stage (if one has begun)."""
        dead = sorted(self._dead)
        for i in dead:
            self.ray.kill(self.workers[i])
            self.workers[i] = self._new_worker()
        if self._stage is not None:
            self._load_stage(dead)
        self._dead.clear()

    def _load_stage(self, indices) -> None:
        """Give the stage to these workers; one that is dead (or dies loading) is replaced once."""
        from ray.exceptions import RayActorError

        refs = {i: self.workers[i].load_stage.remote(*self._stage) for i in indices}
        for i, ref in refs.items():
            try:
                self.ray.get(ref)
            except RayActorError:
                log.warning("Ray worker %d is dead; starting a replacement", i)
                self.workers[i] = self._new_worker()
                self.ray.get(self.workers[i].load_stage.remote(*self._stage))

    def train_round(self, stage, rnd, sampled, global_lora, is_trainable, seeds):
        if self._stage is None or self._stage[0] != stage:
            raise RuntimeError(f"train_round for stage {stage} before begin_stage({stage})")
        self._replace_dead()  # workers lost in an earlier round
        ray, cfg = self.ray, self.cfg
        lora_ref, trainable_ref = ray.put(global_lora), ray.put(is_trainable)
        pending = {}
        for i, c in enumerate(sampled):
            worker = i % len(self.workers)
            ref = self.workers[worker].train.remote(stage, c, lora_ref, seeds[c], trainable_ref, cfg.local_steps,
                                                    cfg.batch_size, cfg.lr, cfg.seq_len, cfg.precision,
                                                    cfg.optimizer)
            pending[ref] = (c, worker)
        if self.after_submit:
            self.after_submit(self.workers)
        results, failed = self._collect(pending)
        need = quorum_need(self.settings.quorum, len(sampled))
        if len(results) < need:
            raise QuorumNotReached(
                f"stage {stage} round {rnd}: {len(results)} of {len(sampled)} sampled clients answered, quorum is "
                f"{need} ({self.settings.quorum:.0%}); lost {failed}. Check the Ray workers (`ray status`, their "
                "logs under /tmp/ray/session_latest/logs), lower --quorum or raise --round-timeout, then resume "
                "with --resume (the checkpoint holds the previous round)")
        if failed:
            log.warning("stage %d round %d: lost %s; aggregating %d of %d", stage, rnd, failed, len(results),
                        len(sampled))
        return sorted(results, key=lambda r: r.client)

    def _collect(self, pending: dict) -> tuple[list[ClientResult], dict[int, str]]:
        """Every result that arrives (by the deadline, if any); the lost clients with the reason.

        A worker still busy at the deadline is killed (Ray cannot interrupt a running actor task)
        and replaced before the next round."""
        ray = self.ray
        from ray.exceptions import RayActorError, RayError

        deadline = None if self.settings.round_timeout_s is None else time.time() + self.settings.round_timeout_s
        results, failed = [], {}
        waiting = list(pending)
        while waiting:
            left = None if deadline is None else max(deadline - time.time(), 0.0)
            done, waiting = ray.wait(waiting, num_returns=1, timeout=left)
            if not done:  # the deadline passed
                for ref in waiting:
                    client, worker = pending[ref]
                    ray.kill(self.workers[worker])
                    self._dead.add(worker)
                    failed[client] = "no result by the round deadline"
                break
            client, worker = pending[done[0]]
            try:
                results.append(ray.get(done[0]))
            except RayActorError as err:  # the worker died: its client is missing, the worker replaced
                self._dead.add(worker)
                failed[client] = type(err).__name__
            except RayError as err:  # the client's training raised: missing, with the cause logged
                log.warning("client %d failed on a Ray worker: %s", client, err)
                failed[client] = str(err).strip().splitlines()[-1][:200]
        return results, failed

    def close(self) -> None:
        for w in getattr(self, "workers", []):
            self.ray.kill(w)
        self.workers = []
        self._stage = self._base_arrays = self._held_out = None
        shutil.rmtree(getattr(self, "stage_dir", ""), ignore_errors=True)
        if getattr(self, "_started_ray", False):
            self.ray.shutdown()


def ray_executor_factory(settings: RaySettings, after_submit: Callable[[list], None] | None = None,
                         after_eval_submit: Callable[[list], None] | None = None):
    """An executor_factory for rounds.run: clients train (and the full model is evaluated) on Ray workers."""

    def make(cfg: RunConfig, base: BaseModel, clients: list[list[Example]]) -> RayExecutor:
        return RayExecutor(cfg, base, clients, settings, after_submit=after_submit,
                           after_eval_submit=after_eval_submit)

    return make
