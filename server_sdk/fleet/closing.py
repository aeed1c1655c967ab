"""Round closing: a round's train control out, device updates in, until it can close.

Round policy (docs/protocol.md, "Coordinator"): a round ends when every sampled device's update was
accepted or the device was seen offline (its MQTT will, a retained `offline` status) and the quorum is
met, or at the deadline (`round_timeout_s` after the control message). With `replacements` > 0, once
sampled devices seen offline leave the round unable to reach its quorum, the coordinator samples up to
that many replacement devices (`registry.choose_replacements`: live, not yet in the round, holding the
stage's files first; drawn from the run seed, the stage's draw key and the round) and republishes the
round's train control with them added, same deadline; their updates pass the same checks. The quorum
stays `ceil(quorum * sampled)` of the original sample. With fewer accepted updates the round fails with
`QuorumNotReached`; the checkpoint still holds the previous round, so `--resume` repeats it (retrying
in-process would only wait for the same absent devices again).

`RoundClosing` holds the methods; their state lives in `FleetExecutor` (coordinator.py), which mixes
this class in.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Callable, Collection
from dataclasses import replace

import numpy as np

from edge_runtime import protocol as P
from server_sdk.engine.executor import QuorumNotReached, quorum_need
from server_sdk.fleet.intake import RoundGate
from server_sdk.fleet.registry import (
    choose_replacements,
    replacement_order,
)
from server_sdk.method.aggregation import FedAvgSum, RoundResults, adamw_norm_bound
from server_sdk.method.lora import LoraState, to_peft_key
from server_sdk.method.strategies.base import ClientResult

log = logging.getLogger(__name__)


class RoundClosing:
    """A round from its control message to its accepted updates (mixed into FleetExecutor)."""

    def train_round(self, stage: int, rnd: int, sampled: list[int], global_lora: LoraState,
                    is_trainable: Callable[[str], bool], seeds: dict[int, int]) -> list[ClientResult]:
        if stage != self._stage or not self._artifacts:
            raise RuntimeError(f"train_round for stage {stage} before begin_stage({stage})")
        self._finish_speculation()  # the last round's guess, when no evaluation came in between
        wr = self.wire_round(stage, rnd)
        names = {to_peft_key(k): k for k in global_lora}
        trained = sorted(p for p, k in names.items() if is_trainable(k))
        expected = {p: (tuple(global_lora[names[p]].shape), np.float32) for p in trained}
        wanted = {self.device_of(c): c for c in sampled}
        # an update is at most the expected tensors plus a header; anything larger is refused unread
        limit = len(P.encode_tensors({p: np.zeros(s, np.float32) for p, (s, _) in expected.items()})) \
            + P.MAX_HEADER_BYTES + 4
        numel = sum(math.prod(s) for s, _ in expected.values())

        body = {p: global_lora[k].detach().float().cpu().numpy() for p, k in names.items()}
        self._publish(P.global_topic(self.run_id, wr), P.encode_global(P.GlobalMessage(self.run_id, stage, wr, body)),
                      retain=True)
        if self._last_global is not None:  # retained globals of old rounds are dead weight for new devices
            self._publish(self._last_global, b"", retain=True)
        self._last_global = P.global_topic(self.run_id, wr)
        self._drain_stale()
        deadline = time.time() + self.settings.round_timeout_s
        hyper = P.TrainSettings(lr=self.cfg.lr, local_steps=self.cfg.local_steps, batch_size=self.cfg.batch_size,
                                trainable=tuple(trained), session=self.session, optimizer=self.cfg.optimizer,
                                seeds={self.device_of(c): int(seeds[c]) for c in sampled},
                                micro_batch=self.cfg.micro_batch)
        with self._gate_lock:
            bound = adamw_norm_bound(hyper.lr, hyper.local_steps, numel) \
                if self.settings.adamw_norm_bound and hyper.optimizer == "adamw" else None
            self._gate = RoundGate(wr, set(wanted), limit, bound)
        silent = self._open(wr, wanted)
        with self._control_lock:
            self._control = P.ControlMessage(self.run_id, stage, wr, "train", tuple(wanted), deadline, hyper,
                                             self._artifacts)
            self._publish_control(self._control)
        self._event("round_start", stage=stage, round=wr, sampled=list(wanted), deadline=deadline,
                    **({"unresponsive": silent} if silent else {}))
        self._start_speculation(wait=lambda: self._devices_started(list(wanted), wr))
        try:
            return self._collect(stage, rnd, wr, wanted, expected, deadline)
        finally:
            with self._gate_lock:
                self._gate = None  # updates arriving from now on are refused on arrival, unqueued
            with self._status_lock:
                self._open_round, self._asked = None, {}
            if self._speculation is None:
                with self._control_lock:
                    self._control = None

    def _open(self, wr: int, wanted: Collection[str]) -> list[str]:
        """Open wire round `wr` for the liveness check (start_timeout_s): its devices are asked now, none has
        acknowledged it yet. Returns those of them marked unresponsive, which the round does not wait for."""
        with self._status_lock:
            self._open_round, self._acked = wr, set()
            self._asked = dict.fromkeys(wanted, time.time())
            silent = sorted(d for d in wanted if d in self._silent)
        if silent:
            log.warning("round %d: %s sampled but unresponsive since an earlier round; not waiting for them unless "
                        "they acknowledge this one", wr, silent)
        return silent

    def _update_control(self, change: Callable[[P.ControlMessage], P.ControlMessage]) -> None:
        """Republish the round's train control with `change` applied (the prefetch hint, replacements), one change
        at a time so neither undoes the other."""
        with self._control_lock:
            if self._control is not None:
                self._control = change(self._control)
                self._publish_control(self._control)

    def _collect(self, stage: int, rnd: int, wr: int, wanted: dict[str, int], expected: dict,
                 deadline: float) -> list[ClientResult]:
        """Take updates until the round may close, then apply the round-level checks and the quorum.

        Under FedAvg each accepted delta goes into the round's running sum at once (RoundResults.folded) when
        no round-level check can still refuse or reweigh it; the results then carry no deltas."""
        gate = self._gate
        fold = FedAvgSum() if self._folds(gate) else None
        accepted: dict[str, ClientResult] = {}
        norms: dict[str, float] = {}
        nonces = self._nonces
        sampled = len(wanted)
        need = quorum_need(self.settings.quorum, sampled)  # of the original sample, replacements or not
        wanted = dict(wanted)  # replacements join it
        replaced: dict[str, str] = {}  # replacement device -> the device it stands in for
        while True:
            if self.settings.replacements:
                self._replace_lost(wr, rnd, wanted, accepted, need, replaced)
            if not self._still_waiting(wanted, accepted, need):
                break
            left = deadline - time.time()
            if left <= 0:
                break
            try:
                msg = self._inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            with self._gate_lock:
                gate.queued[msg.topic.rsplit("/", 1)[-1]] -= len(msg.payload)
            answer = self._handle_update(msg, stage, wr, wanted, expected, nonces, accepted, gate)
            if answer is not None:
                result, norm = answer
                if self.device_of(result.client) in replaced:
                    result.telemetry["replaces"] = replaced[self.device_of(result.client)]
                if fold is not None:
                    fold.add(result.num_samples, result.delta)
                    result = replace(result, delta={})
                accepted[self.device_of(result.client)] = result
                norms[self.device_of(result.client)] = norm
        if fold is None:  # else (_folds) neither can change anything
            self._refuse_norm_outliers(accepted, norms, wr, gate.norm_bound)
            self._cap_unknown_weights(accepted)
        missing = sorted(set(wanted) - set(accepted))
        offline = sorted(set(missing) & self._offline_now())
        self._event("round_end", stage=stage, round=wr, accepted=sorted(accepted), missing=missing, offline=offline,
                    **self._silent_of(missing),
                    quorum=need, weights={d: r.num_samples for d, r in sorted(accepted.items())},
                    **({"replacements": replaced} if replaced else {}))
        if len(accepted) < need:
            spare = (f", {len(replaced)} replacement(s) {sorted(replaced)} drawn" if replaced else
                     ", no live device to replace them" if self.settings.replacements else "")
            raise QuorumNotReached(
                f"stage {stage} round {rnd} (wire round {wr}): {len(accepted)} of {sampled} sampled devices "
                f"answered by the deadline{spare}, quorum is {need} ({self.settings.quorum:.0%}); missing {missing}. "
                "Check the devices' logs and status, raise round_timeout_s or lower quorum"
                f"{'' if self.settings.replacements else ' (or allow replacements)'}, then resume the run "
                "with --resume (the checkpoint holds the previous round)")
        if missing:
            log.warning("round %d: no update from %s (offline, unresponsive or past the deadline); aggregating "
                        "%d of %d", wr, missing, len(accepted), sampled)
        self._rounds_done = wr + 1
        results = RoundResults(sorted(accepted.values(), key=lambda r: r.client))
        results.folded = fold
        return results

    def _replace_lost(self, wr: int, rnd: int, wanted: dict[str, int], accepted: dict[str, ClientResult],
                      need: int, replaced: dict[str, str]) -> None:
        """When devices seen offline leave the round unable to reach `need`, sample replacements (at most
        `replacements` per round) and send them the round's train control; `wanted` and `replaced` grow."""
        gone = self._lost(wanted, accepted)
        lost = [d for d in wanted if d not in accepted and d in gone]
        short = need - (len(wanted) - len(lost))  # accepted + still possible, against the quorum
        budget = self.settings.replacements - len(replaced)
        if short <= 0 or budget <= 0:
            return
        stand_ins = set(replaced.values())
        uncovered = [d for d in lost if d not in stand_ins]  # a lost replacement is itself replaced
        order = [self.device_of(c) for c in replacement_order(self.cfg.seed, self._draw_key, rnd, self.cfg.num_clients)]
        with self._status_lock:
            statuses = dict(self.device_status)
            gone = set(self._offline) | set(self._silent)
        live = {d for d, st in statuses.items() if d not in gone and st.get("state") != "offline"
                and self._runs_served(st) and self._fits(d)}
        ready = {d for d, st in statuses.items() if self._holds_stage(st)}
        chosen = choose_replacements(order, wanted, live, ready, min(short, budget, len(uncovered)))
        if not chosen:
            return
        from server_sdk.method.strategies.base import client_seed

        clients = {self.device_of(c): c for c in range(self.cfg.num_clients)}
        seeds = {}
        with self._gate_lock:
            self._gate.wanted.update(chosen)
        with self._status_lock:
            self._asked.update(dict.fromkeys(chosen, time.time()))
        for device, lost_device in zip(chosen, uncovered):
            client = clients[device]
            wanted[device] = client
            replaced[device] = lost_device
            seeds[device] = int(client_seed(self.cfg.seed, self._draw_key, rnd, client))
            self._event("replacement", round=wr, device=device, replaces=lost_device, seed=seeds[device],
                        ready=device in ready)
        log.warning("round %d: %s went offline and the quorum of %d is out of reach; sampled %s in their place", wr,
                    uncovered[:len(chosen)], need, chosen)
        self._update_control(lambda c: replace(
            c, sampled_clients=(*c.sampled_clients, *chosen),
            hyperparams=replace(c.hyperparams, seeds={**c.hyperparams.seeds, **seeds})))

    def _still_waiting(self, wanted: dict[str, int], accepted: dict[str, ClientResult], need: int) -> bool:
        """Wait while a sampled device may still answer: it has not answered and is not lost (`_lost`: seen
        offline, unresponsive, or running no served format).

        Lost devices end the wait early only once the quorum is met: a round that would fail anyway
        waits out its deadline, in case the devices come back (after a broker restart, say)."""
        unanswered = set(wanted) - set(accepted)
        if not unanswered:
            return False
        return bool(unanswered - self._lost(wanted, accepted)) or len(accepted) < need
