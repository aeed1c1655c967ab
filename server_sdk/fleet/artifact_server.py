"""Serve artifact chunks to devices over MQTT (coordinator side of edge_runtime/fetch.py).

`ArtifactServer` answers `ChunkRequest`s on the fetch topic by publishing chunks (QoS 0) on the
per-blob artifact topic from its own worker thread, rate-limited and with a bounded number of
chunks not yet written to the socket, so control messages are never stuck behind megabytes of
weights. For the same reason the coordinator gives it its own MQTT connection.

Every chunk goes to every device fetching its file, so one device's requests cost the whole
fleet (issue #27, hole 7: one device's 25,608 requests made the server broadcast 31 x a stage).
Two bounds keep that in check, both at intake:

* a chunk published less than `republish_after_s` ago is not published again before then: the
  requests for it are merged into one later publish (a device that subscribed too late for the
  first copy gets the second);
* each device has a byte budget: the chunks its requests caused to be published (requests merged
  into a queued or deferred chunk cost nothing) may total at most `device_budget_factor` x the
  bytes of every file registered so far, plus `device_budget_floor` bytes. An honest device needs
  about 1 x (each file once, a few retried chunks); past its budget a device's requests are
  ignored (logged, bounded) and its fetch fails with the usual timeout error.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from paho.mqtt.client import MQTT_ERR_SUCCESS, MQTTMessageInfo

from edge_runtime.fetch import describe_file, describe_files, sha256_bytes
from edge_runtime.mqtt import Message, MqttClient, wait_published
from edge_runtime.protocol import (
    DEFAULT_CHUNK_BYTES,
    ArtifactDescriptor,
    FileEntry,
    ProtocolError,
    chunk_topic,
    decode_chunk_request,
    fetch_topic,
    parse_topic,
)
from server_sdk.fleet.ratelimit import LogBudget, cut

log = logging.getLogger(__name__)

# Chunks go out at QoS 0: the broker never queues them for an offline session (`queue_qos0_messages false`),
# so a device that went away mid-download cannot make the broker hold a stage's worth of chunks for it (issue
# #27, hole 8). A chunk lost on the way is asked for again (edge_runtime/fetch.py), as after a restart.
CHUNK_QOS = 0


class ArtifactServer:
    """Publishes requested chunks of registered files; never blocks the caller.

    Requests for a chunk already queued are merged, so many devices asking for
    the same weights cost one publish per chunk (all subscribers get it).
    """

    def __init__(
        self,
        client: MqttClient,
        run_id: str,
        *,
        max_bytes_per_s: float | None = 20e6,
        max_unacked: int = 8,
        republish_after_s: float = 1.0,
        device_budget_factor: float = 2.0,
        device_budget_floor: int = 8 * 2**20,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.max_bytes_per_s = max_bytes_per_s
        self.max_unacked = max_unacked
        self.republish_after_s = republish_after_s
        self.device_budget_factor = device_budget_factor
        self.device_budget_floor = device_budget_floor
        self.files: dict[str, tuple[Path, FileEntry]] = {}
        self.registered_bytes = 0  # of every distinct file registered: what the device budgets scale with
        self.charged: collections.Counter[str] = collections.Counter()  # device -> bytes its requests caused
        self.refused: collections.Counter[str] = collections.Counter()  # device -> chunks refused over budget
        self._last_sent: dict[tuple[str, int], float] = {}  # chunk -> when it was last taken for publishing
        self._deferred: dict[tuple[str, int], float] = {}  # chunk -> when it may go again (republish_after_s)
        self._log_budget = LogBudget()
        self.chunks_sent = 0
        self.bytes_sent = 0
        self.sent_log: collections.Counter[tuple[str, int]] = collections.Counter()
        self._queue: collections.deque[tuple[str, int]] = collections.deque()
        self._queued: set[tuple[str, int]] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        """Chunks requested but not yet published."""
        with self._cond:
            return len(self._queue)

    def add_file(
        self, path: str | Path, rel_path: str | None = None, chunk_size: int = DEFAULT_CHUNK_BYTES
    ) -> FileEntry:
        entry = describe_file(path, rel_path, chunk_size)
        self._register(Path(path), entry)
        return entry

    def add_files(self, files: Mapping[str, str | Path], chunk_size: int = DEFAULT_CHUNK_BYTES) -> ArtifactDescriptor:
        """Register files and return the descriptor to put in the control message."""
        descriptor = describe_files(files, chunk_size)
        for e in descriptor.files:
            self._register(Path(files[e.path]), e)
        return descriptor

    def _register(self, path: Path, entry: FileEntry) -> None:
        with self._cond:
            if entry.sha256 not in self.files:
                self.registered_bytes += entry.size
            self.files[entry.sha256] = (path, entry)

    def budget(self) -> float:
        """Bytes of chunks one device's requests may cause to be published, in all."""
        return self.device_budget_factor * self.registered_bytes + self.device_budget_floor

    def start(self) -> ArtifactServer:
        self.client.subscribe(fetch_topic(self.run_id, "+"), self._on_request)
        self._thread = threading.Thread(target=self._serve, name=f"artifacts-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)
        self.client.unsubscribe(fetch_topic(self.run_id, "+"))

    def _on_request(self, msg: Message) -> None:
        topic_device = cut(msg.topic.rsplit("/", 1)[-1], 64)
        try:
            req = decode_chunk_request(msg.payload)
            topic_device = parse_topic(msg.topic)[2][0]
        except (ProtocolError, IndexError) as exc:
            self._warn(topic_device, "malformed", "ignoring malformed chunk request on %s: %s", cut(msg.topic), cut(str(exc)))
            return
        if req.device_id != topic_device or req.run_id != self.run_id:
            self._warn(topic_device, "mismatch", "ignoring chunk request on %s claiming device %r run %r", msg.topic,
                       req.device_id, req.run_id)
            return
        known = self.files.get(req.sha256)
        if known is None:
            self._warn(topic_device, "unknown", "device %s asked for unknown blob %s", req.device_id, req.sha256)
            return
        entry = known[1]
        now = time.monotonic()
        refused = 0
        with self._cond:
            for i in req.chunks:
                item = (req.sha256, i)
                if i >= len(entry.chunks) or item in self._queued or item in self._deferred:
                    continue  # out of range, or merged into a publish already coming: free
                size = entry.chunk_length(i)
                if self.charged[topic_device] + size > self.budget():
                    refused += 1
                    continue
                self.charged[topic_device] += size
                sent = self._last_sent.get(item)
                if sent is not None and now - sent < self.republish_after_s:
                    self._deferred[item] = sent + self.republish_after_s  # all devices fetching it just got it
                else:
                    self._queued.add(item)
                    self._queue.append(item)
            self._cond.notify()
        if refused:
            self.refused[topic_device] += refused
            self._warn(topic_device, "budget", "%s: %d chunk(s) refused: its requests already made this server "
                       "publish %d bytes, its budget is %d (%.1f x the %d bytes of files served + %d)", topic_device,
                       refused, self.charged[topic_device], self.budget(), self.device_budget_factor,
                       self.registered_bytes, self.device_budget_floor)

    def _warn(self, device: str, kind: str, message: str, *args) -> None:
        """A warning a device can cause at will: the first few per (device, kind), then counted summaries."""
        verdict, skipped = self._log_budget.take((device, kind))
        if verdict == "full":
            log.warning(message, *args)
        elif verdict == "summary":
            log.warning("%s: %d more chunk requests refused (%s) since the last line", device, skipped, kind)

    def _serve(self) -> None:
        unacked: collections.deque[MQTTMessageInfo] = collections.deque()
        next_send = time.monotonic()  # token bucket: earliest time the next chunk may go
        while (item := self._next_request()) is not None:
            sha, index = item
            try:
                data = self._read_chunk(sha, index)
                if data is None:
                    continue
                while len(unacked) >= self.max_unacked and not self._stop.is_set():
                    if wait_published(unacked[0], 1.0):
                        unacked.popleft()
                if self.max_bytes_per_s:
                    now = time.monotonic()
                    if next_send > now:
                        time.sleep(next_send - now)
                    next_send = max(now, next_send) + len(data) / self.max_bytes_per_s
                info = self.client.publish(chunk_topic(self.run_id, sha, index), data, qos=CHUNK_QOS)
                if info.rc != MQTT_ERR_SUCCESS:  # not connected: QoS 0 is not kept for later; the device asks again
                    continue
                unacked.append(info)
            except Exception:
                log.exception("publishing chunk %d of %s failed; the device will ask again", index, sha)
                continue
            self.chunks_sent += 1
            self.bytes_sent += len(data)
            self.sent_log[(sha, index)] += 1

    def _next_request(self) -> tuple[str, int] | None:
        """Oldest queued (sha256, chunk index), waiting for one; None once stopped. Deferred chunks join the
        queue once their `republish_after_s` has passed."""
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                for item, due in list(self._deferred.items()):
                    if due <= now:
                        del self._deferred[item]
                        if item not in self._queued:
                            self._queued.add(item)
                            self._queue.append(item)
                if self._queue:
                    item = self._queue.popleft()
                    self._queued.discard(item)
                    self._last_sent[item] = now
                    return item
                soonest = min(self._deferred.values(), default=now + 0.5)
                self._cond.wait(min(0.5, max(soonest - now, 0.01)))
            return None

    def _read_chunk(self, sha: str, index: int) -> bytes | None:
        path, entry = self.files[sha]
        try:
            with open(path, "rb") as f:
                f.seek(index * entry.chunk_size)
                data = f.read(entry.chunk_length(index))
        except OSError as exc:
            log.error("cannot read chunk %d of %s: %s", index, path, exc)
            return None
        if sha256_bytes(data) != entry.chunks[index]:
            log.error("%s changed on disk since it was registered (chunk %d); not serving it", path, index)
            return None
        return data
