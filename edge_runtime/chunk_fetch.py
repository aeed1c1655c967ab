"""Fetching one file's chunks into the cache: over MQTT (chunk requests to the coordinator's artifact server) or
from an HTTPS origin (`origin` + sha256, the device's own fleet login), every chunk checked against the descriptor
before it is kept. Part of edge_runtime/fetch.py: ArtifactCache inherits FileFetching.
"""

from __future__ import annotations

import base64
import collections
import http.client
import logging
import queue
import random
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from edge_runtime.artifact_files import sha256_bytes
from edge_runtime.mqtt import Message, MqttClient
from edge_runtime.protocol import (
    MAX_CHUNKS_PER_REQUEST,
    ChunkRequest,
    FileEntry,
    ProtocolError,
    chunk_topic,
    encode_chunk_request,
    fetch_topic,
    parse_topic,
)

log = logging.getLogger("edge_runtime.fetch")  # the fetch's one logger

Progress = Callable[[FileEntry, int, int], None]  # called as chunks arrive: (the file, chunks it has, chunks in all)


class FetchError(RuntimeError):
    """An artifact could not be fetched; the message says which file and why."""


class FetchCancelled(FetchError):
    pass


class OriginRefused(Exception):
    """The HTTPS origin answered 401/403: this device may not fetch there (not enrolled, wrong login)."""


class OriginCorrupt(Exception):
    """The HTTPS origin served bytes that fail their hash."""


class OriginUnavailable(Exception):
    """The HTTPS origin answered with an error or a short body (retried)."""


class OriginLogin:
    """How a device authenticates to an HTTPS artifact origin: its own fleet login (the MQTT username and password)
    as HTTP Basic credentials, over TLS verified against the fleet CA (and the system's CAs, for a public origin)."""

    def __init__(self, username: str, password: str, ca_file: str | None) -> None:
        self.username = username
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self.header = f"Basic {token}"
        self.ca_file = ca_file
        self.public = not ca_file  # trust the system's CAs too: set once the fleet CA alone failed to verify it
        self._ctx: ssl.SSLContext | None = None

    @staticmethod
    def of(client: MqttClient) -> OriginLogin:
        s = client.settings
        return OriginLogin(s.username or "", s.password or "", s.ca_file)

    def context(self) -> ssl.SSLContext:
        """The fleet CA alone first (loading the system's CA bundle costs ~50 ms of CPU, per device at a stage
        start); the system's CAs as well once the origin turned out to have a public certificate (a CDN, a bucket)."""
        if self._ctx is None:
            ctx = ssl.create_default_context(cafile=None if self.public else self.ca_file)
            if self.public and self.ca_file:
                ctx.load_verify_locations(self.ca_file)
            self._ctx = ctx
        return self._ctx

    def trust_public_cas(self) -> bool:
        """After a certificate the fleet CA does not verify: add the system's CAs; False if they were already in."""
        if self.public:
            return False
        self.public, self._ctx = True, None
        return True

class FileFetching:
    """ArtifactCache's fetching of one file (edge_runtime/fetch.py): the methods use the cache's `has`,
    `blob_path`, `missing_chunks`, `store_chunk`, `assemble`, its lock and its counters."""

    def fetch_file_https(self, origin: str, entry: FileEntry, login: OriginLogin, *, max_retries: int = 5,
                         backoff_s: float = 0.5, timeout_s: float = 30.0, cancel: threading.Event | None = None,
                         progress: Progress | None = None) -> Path:
        """Download one file from an HTTPS origin (`origin` + sha256), checking every chunk against the descriptor.

        The bytes go through the same checks as MQTT chunks: each chunk is kept (in `partial/`) only if it hashes
        to `entry.chunks[i]`, and the whole file only if it hashes to its name, so an origin can slow a device
        down but never make it use other bytes. An interrupted download resumes at the first missing chunk (an
        HTTP Range request). Network errors and 5xx answers are retried with exponential backoff and jitter, up
        to `max_retries` times in a row without progress; a refusal (401/403: the device is not enrolled in the
        run, or its login is wrong) and bytes that fail their hash twice raise FetchError at once, saying which."""
        if self.has(entry.sha256, entry.size):
            return self.blob_path(entry.sha256)
        url = origin + entry.sha256
        failures, corrupt = 0, 0
        while missing := self.missing_chunks(entry):
            if cancel is not None and cancel.is_set():
                raise FetchCancelled(f"fetch of {entry.path} cancelled with {len(missing)}/{len(entry.chunks)} "
                                     "chunks missing")
            why: object = "no chunk arrived"
            try:
                got = self._download(url, entry, set(missing), login, timeout_s, cancel, progress)
            except OriginCorrupt as exc:
                corrupt += 1
                if corrupt >= 2:
                    raise FetchError(f"{entry.path}: refused the file served at {url}: {exc}; the origin's copy "
                                     "is corrupt or was tampered with - publish the stage again (the coordinator "
                                     "re-copies files whose bytes changed)") from None
                log.warning("%s: %s; downloading it again", entry.path, exc)
                continue
            except OriginRefused as exc:
                raise FetchError(f"{entry.path}: the artifact origin refused this device: {exc}") from None
            except ssl.SSLCertVerificationError as exc:
                if login.trust_public_cas():
                    continue  # not signed by the fleet CA: a public origin, verified against the system's CAs
                raise FetchError(f"{entry.path}: {url}'s TLS certificate is signed neither by the fleet CA nor by a "
                                 f"CA this system trusts ({exc.verify_message}); refusing it") from None
            except (OSError, http.client.HTTPException, OriginUnavailable) as exc:
                got = 0
                why = exc
            if got:
                failures = 0
                continue
            failures += 1
            if failures > max_retries:
                raise FetchError(f"{entry.path} ({entry.sha256[:12]}): {url} failed {max_retries + 1} times in a row "
                                 f"({why}); {len(missing)}/{len(entry.chunks)} chunks missing - is the origin up?")
            delay = backoff_s * 2 ** (failures - 1) * (0.5 + random.random())
            log.warning("%s: %s (%s); retrying in %.1f s", entry.path, url, why, delay)
            if cancel is not None:
                cancel.wait(delay)  # a cancel ends the wait, and the loop's check raises FetchCancelled
            else:
                time.sleep(delay)
        return self.assemble(entry)

    def _download(self, url: str, entry: FileEntry, missing: set[int], login: OriginLogin, timeout_s: float,
                  cancel: threading.Event | None, progress: Progress | None) -> int:
        """One GET from the first missing chunk on; stores the chunks that verify; returns how many it stored."""
        first = min(missing)
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout_s,
                                           context=login.context())
        stored = 0
        try:
            headers = {"Authorization": login.header, "User-Agent": "devft-edge"}
            if first:
                headers["Range"] = f"bytes={first * entry.chunk_size}-"
            conn.request("GET", parts.path, headers=headers)
            resp = conn.getresponse()
            if resp.status in (401, 403):
                raise OriginRefused(f"HTTP {resp.status} for {url} as {login.username} (a device fetches only while "
                                    "it is enrolled in the run, with its own fleet login)")
            if resp.status not in (200, 206):
                raise OriginUnavailable(f"HTTP {resp.status} {resp.reason}")
            index = first if resp.status == 206 else 0
            while index < len(entry.chunks):
                if cancel is not None and cancel.is_set():
                    break
                data = resp.read(entry.chunk_length(index))
                with self._lock:
                    self.bytes_downloaded += len(data)
                if len(data) != entry.chunk_length(index):
                    raise OriginUnavailable(f"the answer ended at chunk {index} of {len(entry.chunks)}")
                if index in missing:
                    if sha256_bytes(data) != entry.chunks[index]:
                        with self._lock:
                            self.chunks_rejected += 1
                        raise OriginCorrupt(f"chunk {index} hashes to {sha256_bytes(data)[:16]}..., the descriptor "
                                            f"says {entry.chunks[index][:16]}...")
                    self.store_chunk(entry, index, data)
                    with self._lock:
                        self.chunks_downloaded += 1
                    missing.discard(index)
                    stored += 1
                    if progress is not None:
                        progress(entry, len(entry.chunks) - len(missing), len(entry.chunks))
                index += 1
        finally:
            conn.close()
        return stored

    def fetch_file(self, client: MqttClient, run_id: str, device_id: str, entry: FileEntry, *, window: int = 16,
                   chunk_timeout_s: float = 10.0, max_retries: int = 5, cancel: threading.Event | None = None,
                   progress: Progress | None = None) -> Path:
        """Download the missing chunks of one file, `window` requested at a time.

        Chunks not received within `chunk_timeout_s` are requested again, up to
        `max_retries` times in a row without progress.
        """
        if self.has(entry.sha256, entry.size):
            return self.blob_path(entry.sha256)
        missing = set(self.missing_chunks(entry))
        total = len(entry.chunks)
        if not missing:
            return self.assemble(entry)
        inbox: queue.Queue[Message] = queue.Queue()
        topic = chunk_topic(run_id, entry.sha256, "+")
        client.subscribe(topic, inbox.put)
        try:
            to_request = collections.deque(sorted(missing))  # next chunks to ask for, in order
            outstanding: set[int] = set()  # asked for, not yet received
            retries = 0
            last_progress = time.monotonic()
            while missing:
                if cancel is not None and cancel.is_set():
                    raise FetchCancelled(f"fetch of {entry.path} cancelled with {len(missing)}/{total} chunks missing")
                want: list[int] = []
                while to_request and len(outstanding) + len(want) < window:
                    i = to_request.popleft()
                    if i in missing and i not in outstanding:
                        want.append(i)
                for start in range(0, len(want), MAX_CHUNKS_PER_REQUEST):
                    part = tuple(want[start : start + MAX_CHUNKS_PER_REQUEST])
                    req = ChunkRequest(run_id=run_id, device_id=device_id, sha256=entry.sha256, chunks=part)
                    client.publish(fetch_topic(run_id, device_id), encode_chunk_request(req))
                    outstanding.update(part)
                try:
                    msg = inbox.get(timeout=0.2)
                except queue.Empty:
                    if time.monotonic() - last_progress > chunk_timeout_s:
                        retries += 1
                        if retries > max_retries:
                            raise FetchError(
                                f"{entry.path} ({entry.sha256[:12]}): no chunk arrived for "
                                f"{chunk_timeout_s}s, {max_retries} times; {len(missing)}/{total} chunks "
                                "missing - is the server's ArtifactServer running for this run?"
                            ) from None
                        log.warning("%s: chunks %s timed out; requesting again", entry.path, sorted(outstanding)[:8])
                        to_request.extendleft(sorted(outstanding, reverse=True))
                        outstanding.clear()
                        last_progress = time.monotonic()
                    continue
                with self._lock:
                    self.bytes_downloaded += len(msg.payload)
                    self.chunks_downloaded += 1
                try:
                    index = int(parse_topic(msg.topic)[2][1])
                except (ProtocolError, IndexError, ValueError):
                    continue
                outstanding.discard(index)
                if index not in missing:
                    continue  # a duplicate, or a chunk another device asked for
                if not self.store_chunk(entry, index, msg.payload):
                    to_request.appendleft(index)  # corrupted in transit: ask again
                else:
                    missing.discard(index)
                    retries = 0
                    last_progress = time.monotonic()
                    if progress is not None:
                        progress(entry, total - len(missing), total)
        finally:
            client.unsubscribe(topic)
        return self.assemble(entry)
