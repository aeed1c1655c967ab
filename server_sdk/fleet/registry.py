"""The fleet's devices as the coordinator knows them: names and shards, liveness, capabilities, refusals.

Client index `c` (the data shard `data/client_{c:03d}.jsonl`) is the device named `dev-{c:03d}`;
`client_index` reads any trailing number, so a fleet provisioned as `dev1`, `dev2` maps to clients 1 and 2.
A device's statuses (hello, ready, training, offline through its will) say whether it is live and what it
holds; its hello's capabilities (platform, runtime, ram_mb, cores; docs/protocol.md §11, "Memory") are
checked, and decide the stages it is sampled for. A device refused (bad capabilities, fits no stage) is
told so in the control message. Replacements for devices lost mid-round are drawn here.

`DeviceRegistry` holds the methods; their state (statuses, refusals, the MQTT client) lives in
`FleetExecutor` (coordinator.py), which mixes this class in.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Collection, Sequence

import numpy as np

from edge_runtime import protocol as P
from edge_runtime.manifest import WEIGHT_FORMATS
from edge_runtime.mqtt import Message
from server_sdk.engine.executor import QuorumNotReached
from server_sdk.fleet.ratelimit import cut

log = logging.getLogger(__name__)


_TRAILING_NUMBER = re.compile(r"(\d+)$")


# An "offline" status (a device's will) lets a round stop waiting for that device OFFLINE_CONFIRM_S after it
# arrived, unless the device said hello meanwhile. A restarting broker publishes the wills of every device,
# though devices come straight back; so while our own connection is down no device counts as offline, and
# a will that arrived within RESTART_GRACE_S of our own reconnect counts only RESTART_GRACE_S after it
# (a device killed during a broker restart costs that, not the deadline).
OFFLINE_CONFIRM_S = 1.0


RESTART_GRACE_S = 10.0


class StageDoesNotFit(QuorumNotReached):
    """No connected device declares the memory a stage needs: no round of it can reach a quorum, so it fails at
    once, naming the stage, its need and the largest budget a device declared (rather than waiting out deadlines)."""


# at most this many devices are named in the control message's `refused` (each entry <= 400 characters); the
# fleet's ACL binds a status topic to its login, so only provisioned devices can get there
MAX_TOLD = 1000


RETELL_S = 10.0  # an unchanged refusal is republished at most this often per device (docs/protocol.md §11, "Memory")


def device_name(client: int) -> str:
    """The device that holds client shard `client`."""
    return f"dev-{client:03d}"


def client_index(device: str) -> int:
    """`dev-003` -> 3 (any trailing number); raises ValueError for a name without one."""
    m = _TRAILING_NUMBER.search(device)
    if not m:
        raise ValueError(f"device name {device!r} has no trailing shard number; name devices dev-000, dev-001, ...")
    return int(m.group(1))


def replacement_order(seed: int, key: int, rnd: int, num_clients: int) -> list[int]:
    """Every client, in the order replacements for round `rnd` of the stage whose draw key is `key` are tried
    (a draw of its own, independent of strategies.base.sample_clients')."""
    rng = np.random.default_rng([seed, 23, key, rnd])
    return [int(c) for c in rng.permutation(num_clients)]


def choose_replacements(order: Sequence[str], taken: Collection[str], live: Collection[str],
                        ready: Collection[str], n: int) -> list[str]:
    """Up to `n` devices of `order` that are `live` and not `taken` (already in the round), those `ready`
    (holding the stage's files) first, each group in `order`."""
    free = [d for d in order if d in live and d not in taken]
    return ([d for d in free if d in ready] + [d for d in free if d not in ready])[:max(n, 0)]


class DeviceRegistry:
    """Device registry, liveness and capability checks of the coordinator (mixed into FleetExecutor)."""

    def device_of(self, client: int) -> str:
        return self.settings.device_names.get(str(client)) or device_name(client)

    def _mark_silent(self, accepted: Collection[str]) -> None:
        """Mark the devices of the open round that let `start_timeout_s` pass without acknowledging it (a status
        naming the round) or answering: unresponsive, until they send a status again."""
        limit = self.settings.start_timeout_s
        since = self._heard_since()
        if limit is None or since is None:
            return
        now = time.time()
        with self._status_lock:
            for d in accepted:  # an accepted update is a sign of life too
                self._silent.pop(d, None)
            late = sorted(d for d, asked in self._asked.items() if now - max(asked, since) >= limit
                          and d not in self._acked and d not in accepted and d not in self._silent
                          and d not in self._offline)
            for d in late:
                self._silent[d] = now
            wr = self._open_round
        for d in late:
            self._limited(("unresponsive", d), "round %s: %s did not acknowledge the round within %.0f s "
                          "(start_timeout_s); not waiting for it, nor in later rounds until it sends a status",
                          (wr, d, limit), "unresponsive", device=d, round=wr, start_timeout_s=limit)

    def _heard_since(self) -> float | None:
        """Since when this coordinator could hear devices: None while its connection is down, the reconnect
        time after one (statuses were held up meanwhile, as during a broker restart), else 0."""
        if not self.client.connected:
            return None
        return self.client.connected_at if self.client.reconnects else 0.0

    def _lost(self, wanted: Collection[str], accepted: Collection[str]) -> set[str]:
        """Devices of the round it need not wait for: seen offline (`_offline_now`), unresponsive (`_mark_silent`),
        or running no format served this stage (as their hello says)."""
        self._mark_silent(accepted)
        with self._status_lock:
            silent = set(self._silent)
            statuses = {d: self.device_status.get(d, {}) for d in wanted}
        unserved = {d for d, st in statuses.items() if not (self._runs_served(st) and self._fits(d))}
        return ((self._offline_now() | silent) & set(wanted)) | unserved

    def _silent_of(self, missing: Collection[str]) -> dict:
        """round_end's `unresponsive`: the missing devices marked unresponsive (when any)."""
        with self._status_lock:
            silent = sorted(d for d in missing if d in self._silent)
        return {"unresponsive": silent} if silent else {}

    def _tell_loop(self) -> None:
        """Republish the retained control when a device is refused (or no longer is), so it learns why at once.
        Off paho's thread: a publish waits for the broker's ack, which paho's thread delivers."""
        while not self._closing.is_set():
            if not self._tell_wake.wait(0.5):
                continue
            self._tell_wake.clear()
            with self._control_lock:
                if self._last_control is None or self._closing.is_set():
                    continue
                try:
                    self._publish_control(self._last_control)
                except Exception:  # noqa: BLE001 - the next control carries the refusal anyway
                    log.exception("republishing the control message with the refused devices")
            self._closing.wait(1.0)  # refusals arriving meanwhile go out together, at most one control a second

    def _offline_now(self) -> set[str]:
        """Devices the current round need not wait for (see OFFLINE_CONFIRM_S and RESTART_GRACE_S)."""
        if not self.client.connected:
            return set()
        now = time.time()
        reconnected = self.client.connected_at if self.client.reconnects else None
        with self._status_lock:
            arrivals = dict(self._offline)
        gone = set()
        for device, arrived in arrivals.items():
            counts_from = arrived + OFFLINE_CONFIRM_S
            if reconnected is not None and abs(reconnected - arrived) < RESTART_GRACE_S:
                counts_from = max(counts_from, reconnected + RESTART_GRACE_S)
            if counts_from <= now:
                gone.add(device)
        return gone

    def _on_status(self, msg: Message) -> None:
        """Record a device's status; an `offline` one (its will) lets a round stop waiting for it, any other one
        ends its `unresponsive` mark, one naming the open round acknowledges that round (start_timeout_s).

        The status must name the device its topic names (the broker's ACL binds the topic to the
        login), otherwise it is logged as rejected and dropped."""
        try:
            sender = P.parse_topic(msg.topic)[2][0]
            status = P.validate_status(P.decode_status(msg.payload), sender)
        except (P.ProtocolError, IndexError) as exc:
            reason = exc.reason if isinstance(exc, P.StatusRejected) else "malformed"
            device = cut(msg.topic.rsplit("/", 1)[-1], 64)
            self.rejections[reason] += 1
            self._limited(("rejected", device, reason), "status from %s rejected (%s): %s", (device, reason, exc),
                          "rejected", device=device, reason=reason, detail=cut(str(exc)), bytes=len(msg.payload),
                          message="status")
            return
        device, live = status.device_id, status.state != "offline"
        with self._status_lock:
            was_offline = device in self._offline
            if not live and not was_offline:
                self._offline[device] = time.time()
            elif live:
                self._offline.pop(device, None)
            revived = live and self._silent.pop(device, None) is not None
            self._heard[device] = time.time()
            if live and self._open_round is not None and status.info.get("round") == self._open_round:
                self._acked.add(device)
            # `info` is the device's to fill; it cannot override the state or the time the status itself carries
            self.device_status[device] = {**status.info, "state": status.state, "timestamp": status.timestamp}
            self._status_seq += 1
            self._status_changed.notify_all()
        if (not live) != was_offline:
            self._limited(("status", device, status.state), None, (), "status", device=device, state=status.state)
        if revived:
            self._limited(("status", device, "responsive"), "%s sent a status again; rounds wait for it again",
                          (device,), "status", device=device, state=status.state, was="unresponsive")
        self._check_formats(device, status.info.get("formats"))
        if status.state == "hello":
            self._check_weights(device, status.info)
        if live:
            self._check_capabilities(device, status.info)

    def _check_capabilities(self, device: str, info: dict) -> None:
        """Check what a status declares about the device (P.check_capabilities): a bad declaration refuses the
        device (never sampled, told why) until it sends a good one; a good one is recorded (an event per change,
        for the report), then checked against the run's stages (`_check_memory`)."""
        try:
            caps = P.check_capabilities(info)
        except P.StatusRejected as exc:
            self._caps.pop(device, None)
            self._refuse(device, exc.reason, f"{str(exc).split(': ', 1)[-1]}; fix the device's declaration and "
                         "restart it")
            return
        if caps != self._caps.get(device):
            self._caps[device] = caps
            self._limited(("capabilities", device), None, (), "capabilities", device=device, **caps)
        self._check_memory(device)

    def _check_memory(self, device: str) -> None:
        """Refuse a device whose declared `ram_mb` fits no stage of the run; clear an earlier refusal otherwise."""
        ram = self._caps.get(device, {}).get("ram_mb")
        if device not in self._caps:
            return
        smallest = min(self._run_needs.values(), key=lambda n: n["need_mb"], default=None)
        if ram is not None and smallest is not None and ram < smallest["need_mb"]:
            self._refuse(device, "memory", f"{device} declares ram_mb {ram} MiB; the smallest stage of this run "
                         f"({smallest['layers']} layers) needs {smallest['need_mb']} MiB ({smallest['source']}), so "
                         "it is never sampled. Declare what the device can give training (devft-edge --ram-mb, the web "
                         "device's ramMb) if it has more, or run smaller stages, batch_size or seq_len")
        elif device in self._told:
            self._told.pop(device)
            self._write_event("refusal_cleared", {"device": device})
            self._tell_wake.set()

    def _refuse(self, device: str, reason: str, detail: str) -> None:
        """Refuse a device: it is never sampled, stage starts do not wait for it, and every control message names it
        in `refused` with why (republished now), so the device can say so and stop."""
        why = cut(f"{reason}: {detail}", P.MAX_REFUSAL_CHARS)
        if self._told.get(device) == why:
            # a device heeds only a control published after it subscribed (a retained one may be stale), so a
            # restarted device is told again, at most once per RETELL_S (a status costs it nothing, a control does)
            if time.time() - self._told_at.get(device, 0.0) >= RETELL_S:
                self._told_at[device] = time.time()
                self._tell_wake.set()
            return
        self._told_at[device] = time.time()
        if device not in self._told and len(self._told) >= MAX_TOLD:
            log.warning("refusing %s (%s) without telling it: %d devices are named already", device, reason, MAX_TOLD)
        else:
            self._told[device] = why
            self._tell_wake.set()
        self.rejections[reason] += 1
        self._limited(("rejected", device, reason), "device %s refused (%s): %s", (device, reason, detail), "rejected",
                      device=device, reason=reason, detail=cut(detail, P.MAX_REFUSAL_CHARS), message="hello")

    def _fits(self, device: str) -> bool:
        """Whether the device may train the current stage: not refused, and its declared `ram_mb` (if any) is at least
        the stage's need (no need known yet: every device fits)."""
        if device in self._told:
            return False
        ram = self._caps.get(device, {}).get("ram_mb")
        return ram is None or self._need is None or ram >= self._need["need_mb"]

    def _pool(self) -> list[int] | None:
        """The clients whose devices fit the current stage (`_fits`); None when all do (the plain draw)."""
        fit = [c for c in range(self.cfg.num_clients) if self._fits(self.device_of(c))]
        return None if len(fit) == self.cfg.num_clients else fit

    def eligible_clients(self, stage: int) -> list[int] | None:
        """The round loop samples only these clients (None: all). Raises StageDoesNotFit when no connected device
        fits the stage (or no device at all may take it): the stage could only wait out its deadlines."""
        pool = self._pool()
        with self._status_lock:
            connected = {d for d, st in self.device_status.items()
                         if st.get("state") != "offline" and d not in self._offline}
        if pool == [] or (connected and not any(self._fits(d) for d in connected)):
            need = self._need or {}
            budgets = {d: c["ram_mb"] for d, c in self._caps.items() if "ram_mb" in c}
            top = max(budgets, key=budgets.get, default=None)
            seen = f"{budgets[top]} MiB ({top})" if top else "none declared"
            refused = sorted(d for d in connected if d in self._told)
            raise StageDoesNotFit(
                f"stage {stage + 1} ({need.get('layers')} layers) needs {need.get('need_mb')} MiB per device "
                f"({need.get('source')}{', ' + need['margin'] if 'margin' in need else ''}), and no connected device "
                f"may train it: the largest budget a device declared is {seen}"
                f"{f'; refused: {refused}' if refused else ''}. Add devices with more memory, give the devices' "
                "declared budget if it is too low (devft-edge --ram-mb), lower batch_size or seq_len, or use "
                "smaller stages; then resume with --resume")
        return pool

    def _check_formats(self, device: str, declared) -> None:
        """Refuse a device whose hello declares only formats this coordinator does not serve: say so once (per
        change), naming what it offers, what is served and the flag that changes it. Rounds and stage starts
        do not wait for it (`_runs_served`); nothing it declares changes what is exported."""
        if not isinstance(declared, list):
            self._refused.pop(device, None)
            return
        offered = tuple(cut(f, 32) for f in declared[:8] if isinstance(f, str))
        if any(f in self.settings.formats for f in offered):
            self._refused.pop(device, None)
            return
        if self._refused.get(device) == offered:
            return
        self._refused[device] = offered
        self._limited(("refused", device), "refusing %s: it runs %s, this coordinator serves %s only (start it with "
                      "--formats %s, FleetSettings.formats, to serve another); it is never waited for",
                      (device, list(offered), self.settings.formats, ",".join(self.settings.formats + ["FORMAT"])),
                      "refused", device=device, offered=list(offered), served=list(self.settings.formats),
                      reason="format_not_served", fix="--formats (FleetSettings.formats)")

    def _check_weights(self, device: str, info: dict) -> None:
        """Refuse, once per device, a device whose hello does not declare the run's frozen-weight scheme
        (`runs_weights`): it is never sampled for the portable format."""
        if self.runs_weights(info) or device in self._weights_refused:
            return
        self._weights_refused.add(device)
        self.rejections["weights_scheme"] += 1
        detail = (f"the run's frozen weights are {self.cfg.weights} (file format {WEIGHT_FORMATS[self.cfg.weights]}); "
                  "the device declares "
                  f"{cut(str(info.get('weights', 'none (fp32 only)')), 40)}: it is not sampled for the portable "
                  "format (update its devft runtime)")
        self._limited(("rejected", device, "weights_scheme"), "device %s refused at hello (weights_scheme): %s",
                      (device, detail), "rejected", device=device, reason="weights_scheme", detail=detail,
                      message="hello")
