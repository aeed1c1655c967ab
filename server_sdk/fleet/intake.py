"""Update intake: every device update passes here, and every norm and weight policy lives here.

On paho's thread an update is taken into the inbox only while its round is open and its sender sampled,
within a byte budget per device (`RoundGate`); then it is decoded and checked against the round's
expected tensors (name, shape, dtype, finite values, protocol fields, nonce), its norm against the
AdamW bound (`aggregation.adamw_norm_bound`), and its weight (`num_samples`) capped by the shard the
coordinator wrote for that client. When the round closes, updates more than `norm_bound_k` times the
round's lower median norm are refused (`norm_outlier`). Accepted updates are folded into FedAvg's
running sum as they arrive where the strategy allows (`RoundResults`).

`UpdateIntake` holds the methods; their state (the inbox, the open round's gate) lives in
`FleetExecutor` (coordinator.py), which mixes this class in.
"""

from __future__ import annotations

import hashlib
import logging
import queue
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from edge_runtime import protocol as P
from edge_runtime.mqtt import Message
from server_sdk.fleet.ratelimit import cut
from server_sdk.fleet.telemetry_intake import clean_telemetry, number
from server_sdk.method.aggregation import cap_samples, lower_median, make_aggregator, norm_outliers
from server_sdk.method.strategies.base import ClientResult

log = logging.getLogger(__name__)


# an update message waits in the coordinator's inbox only while its round is open and its sender sampled; each
# sampled device may have this many of the round's largest updates waiting at once (its update and a QoS 1
# redelivery of it), counted in bytes
MAX_QUEUED_PER_DEVICE = 2


@dataclass
class RoundGate:
    """What the open round takes into the inbox as updates arrive (on paho's thread, before any decoding):
    messages of `wanted` devices up to `limit` bytes, at most MAX_QUEUED_PER_DEVICE x `limit` bytes waiting per
    device. So the inbox holds at most sampled devices x MAX_QUEUED_PER_DEVICE x limit bytes, whatever devices
    publish."""

    wire_round: int
    wanted: set[str]
    limit: int  # bytes of an update of this round: the expected tensors plus a header
    norm_bound: float | None  # adamw_norm_bound of the round (None: the optimiser gives none)
    queued: Counter[str] = field(default_factory=Counter)  # bytes waiting in the inbox, per device


def _canonical(peft_key: str) -> str:
    from server_sdk.method.lora import from_peft_key

    name = from_peft_key(peft_key)
    assert name is not None, peft_key
    return name


class UpdateIntake:
    """Update intake and its norm and weight policies (mixed into FleetExecutor)."""

    def _folds(self, gate: RoundGate) -> bool:
        """Whether a round may sum deltas as they arrive: the rule folds (FedAvg), and no check at the round's end
        can refuse or reweigh an accepted update (the AdamW bound is the adaptive bound's floor, so every update under it
        passes that; every client has a known weight cap, so no weight waits for the round's lower median)."""
        return (make_aggregator(self.cfg.aggregation).folds and gate.norm_bound is not None
                and all(self._weight_cap(c) is not None for c in range(self.cfg.num_clients)))

    def _handle_update(self, msg: Message, stage: int, wr: int, wanted: dict[str, int], expected: dict,
                       nonces: set[str], accepted: dict[str, ClientResult],
                       gate: RoundGate) -> tuple[ClientResult, float] | None:
        """Validate one update message, returning it with its norm; log and count a refusal, never raise."""
        try:
            sender = P.parse_topic(msg.topic)[2][0]
        except (P.ProtocolError, IndexError):
            self._reject("malformed", "?", f"update on unexpected topic {msg.topic!r}", len(msg.payload))
            return None
        try:
            update = P.decode_update(msg.payload)
        except P.ProtocolError as exc:
            self._reject("malformed", sender, str(exc), len(msg.payload))
            return None
        digest = hashlib.sha256(msg.payload).hexdigest()
        if self._digests.get(update.nonce) == digest:  # the same message delivered twice (QoS 1): not a replay
            self._event("duplicate", device=sender, round=update.round, nonce=update.nonce)
            return None
        try:
            norm = P.validate_update(update, expected, self.run_id, stage, wr, nonces,
                                     self.settings.max_update_norm, sender=sender)
        except P.UpdateRejected as exc:
            self._reject(exc.reason, sender, str(exc), len(msg.payload))
            return None
        self._digests[update.nonce] = digest
        if gate.norm_bound is not None and norm > gate.norm_bound:
            self._reject("norm_exceeded", sender, f"update L2 norm {norm:.4g} is over {gate.norm_bound:.4g}, the most "
                         f"the round's trainable tensors can move in {self.cfg.local_steps} AdamW steps at lr "
                         f"{self.cfg.lr:g} (aggregation.adamw_norm_bound)", len(msg.payload))
            return None
        if sender not in wanted:
            self._reject("not_sampled", sender, f"{sender} was not sampled for round {wr}", len(msg.payload))
            return None
        if sender in accepted:  # a restarted device trained the round again; its first answer stands
            self._event("duplicate", device=sender, round=wr, nonce=update.nonce, reason="second update")
            return None
        telemetry, dropped = clean_telemetry(update.telemetry)  # device-sent: only checked fields are kept
        if dropped:
            self._event("telemetry_dropped", device=sender, round=wr, keys=dropped[:20], count=len(dropped))
        loss = number(update.metrics.get("train_loss"), -1e30, 1e30)
        client = wanted[sender]
        weight = cap_samples(update.num_samples, self._weight_cap(client))
        self._event("accepted", device=sender, round=wr, bytes=len(msg.payload), norm=norm, weight=weight,
                    **({"claimed_samples": update.num_samples} if weight != update.num_samples else {}))
        return ClientResult(
            client=client, num_samples=weight,
            delta={k: torch.from_numpy(np.array(update.tensors[p], dtype=np.float32))
                   for p, k in ((p, _canonical(p)) for p in expected)},
            train_loss=float("nan") if loss is None else loss,
            seconds=number(telemetry.get("train_s", telemetry.get("duration_s")), 0, 1e7) or 0.0,
            cpu_seconds=number(telemetry.get("cpu_time_s"), 0, 1e7),
            payload_bytes=len(msg.payload), telemetry={**telemetry, "device": sender}), norm

    def _cap_unknown_weights(self, accepted: dict[str, ClientResult]) -> None:
        """A client without a known shard or cap weighs at most the round's lower median claim."""
        unknown = [d for d, r in accepted.items() if self._weight_cap(r.client) is None]
        if not unknown:
            return
        cap = int(lower_median([float(r.num_samples) for r in accepted.values()]))
        for d in unknown:
            accepted[d] = replace(accepted[d], num_samples=min(accepted[d].num_samples, cap))

    def _weight_cap(self, client: int) -> int | None:
        return self.shard_sizes.get(client, self.settings.max_samples_per_update)

    def _refuse_norm_outliers(self, accepted: dict[str, ClientResult], norms: dict[str, float], wr: int,
                              floor: float | None) -> None:
        """Refuse updates longer than `norm_bound_k` x the round's lower median norm (the fleet's own scale), a
        bound never below `floor` (the round's adamw_norm_bound): aggregation.norm_outliers."""
        k = self.settings.norm_bound_k
        if k is None or len(accepted) < 2:
            return
        outliers, bound = norm_outliers({d: norms[d] for d in accepted}, k, floor or 0.0)
        for device in outliers:
            result = accepted.pop(device)
            self._reject("norm_outlier", device, f"update L2 norm {norms[device]:.4g} is over {k:g} x the round's "
                         f"lower median norm ({bound:.4g}) in round {wr}", result.payload_bytes or 0)

    def _on_update(self, msg: Message) -> None:
        """An update arrived (paho's thread): queue it for the open round, or refuse it now, unread.

        Only what the open round can use waits in the inbox (RoundGate). A retained update was planted
        before this coordinator subscribed (by a device, even before the run existed): it is refused here,
        and the janitor (server_sdk/fleet/janitor.py) deletes it from the broker, so it cannot come back on a resume."""
        sender = msg.topic.rsplit("/", 1)[-1]
        if not msg.payload:
            return  # a retained update being deleted (by the janitor)
        if msg.retain:
            self._reject("retained", sender, "a retained update (published with the MQTT retain flag before this "
                         "coordinator subscribed); the janitor deletes it from the broker", len(msg.payload))
            return
        with self._gate_lock:
            why = self._refusal(self._gate, sender, len(msg.payload))
            if why is None:
                self._gate.queued[sender] += len(msg.payload)
                self._inbox.put(msg)
                return
        self._reject(*why, len(msg.payload))

    @staticmethod
    def _refusal(gate: RoundGate | None, sender: str, size: int) -> tuple[str, str, str] | None:
        """(reason, device, detail) when an arriving update may not wait in the inbox; None when it may."""
        if gate is None:
            return "stale_round", sender, "arrived while no round was open"
        if sender not in gate.wanted:
            return "not_sampled", sender, f"{sender} was not sampled for round {gate.wire_round}"
        if size > gate.limit:
            return "oversized", sender, f"{size} bytes, the bound for this round is {gate.limit}"
        if gate.queued[sender] + size > MAX_QUEUED_PER_DEVICE * gate.limit:
            return "flood", sender, (f"{gate.queued[sender]} bytes of {sender}'s updates already wait to be read; "
                                     f"the bound is {MAX_QUEUED_PER_DEVICE} x {gate.limit}")
        return None

    def _drain_stale(self) -> None:
        """Updates still queued from earlier rounds: refuse them now, with their reason, before the new round."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            sender = msg.topic.rsplit("/", 1)[-1]
            try:
                upd = P.decode_update(msg.payload)
                detail = f"round {upd.round} stage {upd.stage} arrived after its round closed"
            except P.ProtocolError as exc:
                self._reject("malformed", sender, str(exc), len(msg.payload))
                continue
            self._reject("stale_round", sender, detail, len(msg.payload))

    def _reject(self, reason: str, device: str, detail: str, nbytes: int) -> None:
        self.rejections[reason] += 1
        key = ("rejected", device, reason) if reason != "norm_outlier" else None  # that one: once per round at most
        self._limited(key, "update from %s rejected (%s): %s", (device, reason, cut(detail)), "rejected",
                      device=device, reason=reason, detail=cut(detail), bytes=nbytes)
