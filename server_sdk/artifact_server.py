"""Serve artifact chunks to devices over MQTT (coordinator side of edge_runtime/transfer.py).

`ArtifactServer` answers `ChunkRequest`s on the fetch topic by publishing chunks (QoS 0) on the
per-blob artifact topic from its own worker thread, rate-limited and with a bounded number of
chunks not yet written to the socket, so control messages are never stuck behind megabytes of
weights. For the same reason the coordinator gives it its own MQTT connection.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from paho.mqtt.client import MQTT_ERR_SUCCESS, MQTTMessageInfo

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
from edge_runtime.transfer import describe_file, describe_files, sha256_bytes

log = logging.getLogger(__name__)

# Chunks go out at QoS 0: the broker never queues them for an offline session (`queue_qos0_messages false`),
# so a device that went away mid-download cannot make the broker hold a stage's worth of chunks for it (issue
# #27, hole 8). A chunk lost on the way is asked for again (edge_runtime/transfer.py), as after a restart.
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
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.max_bytes_per_s = max_bytes_per_s
        self.max_unacked = max_unacked
        self.files: dict[str, tuple[Path, FileEntry]] = {}
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
        self.files[entry.sha256] = (Path(path), entry)
        return entry

    def add_files(self, files: Mapping[str, str | Path], chunk_size: int = DEFAULT_CHUNK_BYTES) -> ArtifactDescriptor:
        """Register files and return the descriptor to put in the control message."""
        descriptor = describe_files(files, chunk_size)
        for e in descriptor.files:
            self.files[e.sha256] = (Path(files[e.path]), e)
        return descriptor

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
        try:
            req = decode_chunk_request(msg.payload)
        except ProtocolError as exc:
            log.warning("ignoring malformed chunk request on %s: %s", msg.topic, exc)
            return
        topic_device = parse_topic(msg.topic)[2][0]
        if req.device_id != topic_device or req.run_id != self.run_id:
            log.warning("ignoring chunk request on %s claiming device %r run %r", msg.topic, req.device_id, req.run_id)
            return
        known = self.files.get(req.sha256)
        if known is None:
            log.warning("device %s asked for unknown blob %s", req.device_id, req.sha256)
            return
        n = len(known[1].chunks)
        with self._cond:
            for i in req.chunks:
                if i < n and (req.sha256, i) not in self._queued:
                    self._queued.add((req.sha256, i))
                    self._queue.append((req.sha256, i))
            self._cond.notify()

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
        """Oldest queued (sha256, chunk index), waiting for one; None once stopped."""
        with self._cond:
            while not self._queue and not self._stop.is_set():
                self._cond.wait(0.5)
            if self._stop.is_set():
                return None
            item = self._queue.popleft()
            self._queued.discard(item)
            return item

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
