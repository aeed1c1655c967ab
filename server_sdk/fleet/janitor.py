"""Delete retained messages that no honest client leaves on the broker (issue #27, holes 3 and 12).

A device may set the retain flag on its own update, fetch and status topics, and Mosquitto 2.0's ACL
cannot refuse the flag per topic. A retained message stays on the broker, in memory and in its
persistence file, until someone deletes it, and every coordinator that subscribes gets it again (a
resumed one included). The janitor sweeps the run's topics on a server connection (server users may
write anywhere under devft/): when the coordinator starts, then every `interval_s`.

- update and fetch topics: every retained message goes (the protocol never retains them);
- status topics: a retained status the coordinator would refuse (over MAX_STATUS_BYTES, undecodable,
  speaking for another device) goes; the devices' own hello/busy/offline stay;
- at the start only: the run's control and global messages, a previous coordinator's, so no device acts
  on a stale `done` or round of an earlier run of the same name before this coordinator publishes.

Deleting is MQTT's own way: an empty retained message on the topic. A sweep subscribes to filters of
its own (the coordinator's subscriptions stay as they are), which makes the broker send what is
retained there; a marker published after the subscriptions comes back after all of it.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

from edge_runtime import protocol as P
from edge_runtime.mqtt import Message, MqttClient, wait_published

log = logging.getLogger(__name__)


class RetainedJanitor:
    """Sweeps one run's topics of retained messages nobody should find there (see the module docstring)."""

    def __init__(self, client: MqttClient, run_id: str, *, interval_s: float = 60.0, timeout_s: float = 10.0,
                 on_clear: Callable[..., None] | None = None) -> None:
        self.client = client
        self.run_id = P.check_name("run_id", run_id)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_clear = on_clear
        self.cleared = 0  # retained messages deleted so far
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RetainedJanitor:
        """Sweep now, stale control and globals included, then every `interval_s` in the background."""
        self.sweep(clear_state=True)
        self._thread = threading.Thread(target=self._every, name=f"janitor-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 1)

    def _every(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.client.connected:
                continue
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next interval
                log.warning("sweeping retained messages of run %s failed", self.run_id, exc_info=True)

    def sweep(self, clear_state: bool = False) -> dict[str, int]:
        """Delete what should not be retained under the run; returns {topic kind: messages deleted}."""
        root = f"{P.TOPIC_ROOT}/{self.run_id}"
        kinds = ["update", "fetch", "status"] + (["control", "global"] if clear_state else [])
        filters = [f"{root}/{kind}/#" for kind in kinds]  # never the coordinator's own filter strings
        found: dict[str, bytes] = {}
        lock = threading.Lock()
        marker = f"{root}/janitor/{secrets.token_hex(8)}"
        back = threading.Event()

        def on_retained(msg: Message) -> None:
            if msg.retain and msg.payload:
                with lock:
                    found[msg.topic] = msg.payload

        self.client.subscribe(marker, lambda msg: back.set(), wait_s=self.timeout_s)
        try:
            for topic_filter in filters:
                self.client.subscribe(topic_filter, on_retained, wait_s=self.timeout_s)
            self.client.publish(marker, b"sweep")
            if not back.wait(self.timeout_s):
                log.warning("janitor of run %s: the broker did not echo the sweep marker within %.0f s",
                            self.run_id, self.timeout_s)
        finally:
            for topic_filter in (*filters, marker):
                self.client.unsubscribe(topic_filter)
        with lock:
            doomed = sorted(topic for topic, payload in found.items() if self._doomed(topic, payload))
        counts: dict[str, int] = {}
        pending = []
        for topic in doomed:
            pending.append(self.client.publish(topic, b"", retain=True))
            kind = topic.split("/")[2]
            counts[kind] = counts.get(kind, 0) + 1
        for info in pending:
            wait_published(info, self.timeout_s)
        if doomed:
            self.cleared += len(doomed)
            log.info("janitor of run %s deleted %d retained message(s): %s", self.run_id, len(doomed), counts)
            if self.on_clear is not None:
                self.on_clear(counts=counts, bytes=sum(len(found[t]) for t in doomed))
        return counts

    def _doomed(self, topic: str, payload: bytes) -> bool:
        """Whether a retained message on `topic` must go."""
        kind, rest = topic.split("/")[2], topic.split("/")[3:]
        if kind != "status":
            return True  # update, fetch, and (at the start) control and global
        try:
            P.validate_status(P.decode_status(payload), rest[0] if len(rest) == 1 else "")
        except (P.ProtocolError, IndexError):
            return True
        return False
