"""Fetching artifacts: chunked, content-addressed downloads over MQTT (or HTTPS).

Every file a device needs (frozen weights, a stage submodel, a tokenizer) is
addressed by the sha256 of its bytes and cut into fixed-size chunks, each with
its own sha256. An `ArtifactDescriptor` (see protocol.py) lists the files of an
artifact; the server embeds it in the control message.

Device side, `ArtifactCache` keeps:

    <cache>/blobs/<sha256>                       complete, verified files (read-only)
    <cache>/partial/<sha256>/<index>.<chunk_sha> verified chunks of an unfinished file

A file already in `blobs/` is never fetched again, so a frozen tensor shared by
two stages travels once if the server publishes it as its own file (see
`split_safetensors`).

Several devices on one machine (a local fleet) can share one store for the bytes:
with `shared=DIR`, each device still fetches what it lacks (so its download counts
are those of a real device), but a finished blob becomes one inode under
`DIR/<sha256>` hard-linked into every device's `blobs/`, so N devices hold one copy
on disk. A blob is linked into the shared store under its final name with
`os.link`, which fails if another device got there first; the loser verifies the
existing copy and links to it, so devices writing the same blob at once never see
a partial file. Every write goes to a temp file, is fsynced and renamed,
so a crash leaves either nothing or a whole verified piece. Verified chunks of a
partial file survive restarts and are not downloaded again. A blob whose bytes
no longer match its name (bit rot, truncation, tampering) is deleted on first
use and fetched again, never used.

When the descriptor names an HTTPS `origin` (a directory served by nginx, a bucket),
the same files are downloaded from `origin + sha256` instead (`fetch_file_https`),
through the same per-chunk and whole-file hash checks and the same cache.

The server side, which answers the devices' chunk requests, is
server_sdk/fleet/artifact_server.py (the HTTPS origin: server_sdk/fleet/origin.py); what both sides
share (describing files as chunks, hashing) is here.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import http.client
import json
import logging
import os
import queue
import random
import re
import secrets
import shutil
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_runtime.mqtt import Message, MqttClient
from edge_runtime.protocol import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS_PER_REQUEST,
    ArtifactDescriptor,
    ChunkRequest,
    FileEntry,
    ProtocolError,
    check_sha256,
    chunk_topic,
    encode_chunk_request,
    fetch_topic,
    parse_topic,
)

log = logging.getLogger(__name__)

_CHUNK_FILE_RE = re.compile(r"^(\d{8})\.([0-9a-f]{64})$")
_READ_BLOCK = 1024 * 1024


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


# --------------------------------------------------------------------------- hashing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def describe_file(path: str | Path, rel_path: str | None = None, chunk_size: int = DEFAULT_CHUNK_BYTES) -> FileEntry:
    """Hash a file whole and per chunk in one pass."""
    if not 0 < chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size {chunk_size} must be in 1..{MAX_CHUNK_BYTES}")
    path = Path(path)
    whole = hashlib.sha256()
    chunks = []
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            whole.update(block)
            chunks.append(sha256_bytes(block))
            size += len(block)
    return FileEntry(
        path=rel_path or path.name, sha256=whole.hexdigest(), size=size, chunk_size=chunk_size, chunks=tuple(chunks)
    )


def describe_files(files: Mapping[str, str | Path], chunk_size: int = DEFAULT_CHUNK_BYTES) -> ArtifactDescriptor:
    """Descriptor for {relative path on device: local file}; its id is the hash of its contents."""
    entries = tuple(describe_file(p, rel, chunk_size) for rel, p in sorted(files.items()))
    listing = json.dumps([[e.path, e.sha256, e.size] for e in entries], separators=(",", ":"))
    return ArtifactDescriptor(artifact_id=sha256_bytes(listing.encode()), files=entries)


def describe_dir(root: str | Path, chunk_size: int = DEFAULT_CHUNK_BYTES) -> ArtifactDescriptor:
    root = Path(root)
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    return describe_files(files, chunk_size)


def split_safetensors(path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write every tensor of a safetensors file as its own file, named by tensor.

    Publishing frozen weights per tensor makes each tensor its own blob, so a
    device that got a tensor in an earlier stage does not download it again.
    """
    from safetensors import safe_open
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            target = out / f"{name}.safetensors"
            save_file({name: f.get_tensor(name)}, str(target))
            result[name] = target
    return result


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that is writing `tmp` (named by _tmp_name: .NAME.PID.HEX.tmp) still runs."""
    try:
        pid = int(tmp.name.rsplit(".", 3)[-3])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- device side


class ArtifactCache:
    """Content-addressed blob store on the device, filled chunk by chunk."""

    def __init__(self, root: str | Path, verify_on_start: bool = False, shared: str | Path | None = None) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        self.shared = Path(shared) if shared is not None else None
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        if self.shared is not None:
            self.shared.mkdir(parents=True, exist_ok=True)
            for tmp in list(self.shared.glob(".*.tmp")):  # other devices may be writing: only dead writers' files
                if not _writer_alive(tmp):
                    tmp.unlink(missing_ok=True)
        self.bytes_downloaded = 0  # chunk payload bytes received from the network
        self.chunks_downloaded = 0
        self.chunks_rejected = 0  # received chunks whose hash did not match
        self._verified: dict[str, tuple[int, int, int]] = {}  # sha -> (size, mtime_ns, inode)
        self._lock = threading.Lock()
        for tmp in list(self.root.rglob("*.tmp")):  # left by a crash mid-write
            tmp.unlink(missing_ok=True)
        if verify_on_start:
            self.scan()

    # -- blobs -------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / check_sha256(sha256)

    def has(self, sha256: str, size: int | None = None) -> bool:
        """True if a blob with exactly these bytes is present; a bad blob is deleted.

        The full hash is checked once per process per file version; later calls
        only compare size, mtime and inode.
        """
        path = self.blob_path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        if size is not None and st.st_size != size:
            self._discard(path, f"size {st.st_size} != expected {size} (truncated?)")
            return False
        if self._verified.get(sha256) == key:
            return True
        actual = sha256_file(path)
        if actual != sha256:
            self._discard(path, f"content hashes to {actual}")
            return False
        self._verified[sha256] = key
        return True

    def recheck(self, sha256: str, size: int | None = None) -> bool:
        """`has`, hashing the whole file again even if this process verified it before (a manifest check failed)."""
        self._verified.pop(sha256, None)
        return self.has(sha256, size)

    def path(self, sha256: str, size: int | None = None) -> Path:
        """Path of a verified blob; raises FileNotFoundError if absent or corrupt."""
        if not self.has(sha256, size):
            raise FileNotFoundError(f"blob {sha256} is not in cache {self.root} (or was corrupt and removed); fetch it")
        return self.blob_path(sha256)

    def scan(self) -> list[str]:
        """Verify every blob and partial chunk now; returns the hashes of removed blobs."""
        removed = []
        for p in sorted(self.blobs.iterdir()):
            if len(p.name) == 64 and not self.has(p.name):
                removed.append(p.name)
        for d in sorted(self.partial.iterdir()):
            for c in list(d.iterdir()):
                m = _CHUNK_FILE_RE.match(c.name)
                if m is None or sha256_file(c) != m.group(2):
                    c.unlink(missing_ok=True)
        return removed

    def _discard(self, path: Path, why: str) -> None:
        log.warning("cache blob %s is corrupt (%s); removing it so it is fetched again", path, why)
        self._verified.pop(path.name, None)
        path.unlink(missing_ok=True)

    def add_bytes(self, data: bytes) -> str:
        sha = sha256_bytes(data)
        if not self.has(sha, len(data)):
            tmp = _tmp_name(self.blob_path(sha))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._install(tmp, sha)
        return sha

    def add_file(self, src: str | Path) -> str:
        """Copy a local file into the cache (e.g. pre-seeding a device)."""
        sha = sha256_file(src)
        dst = self.blob_path(sha)
        if not self.has(sha):
            tmp = _tmp_name(dst)
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            self._install(tmp, sha)
        return sha

    def _install(self, tmp: Path, sha: str) -> Path:
        """Move a complete, verified temp file (in blobs/) to blobs/<sha>, read-only.

        With a shared store the bytes end up once on disk: ours become the shared copy, or we
        link to the copy another device finished first (after checking it) and drop ours."""
        dst = self.blob_path(sha)
        os.chmod(tmp, 0o444)
        if self.shared is not None:
            common = self.shared / sha
            try:
                os.link(tmp, common)  # atomic: fails if the name exists, never exposes a partial file
            except FileExistsError:
                if sha256_file(common) == sha:
                    theirs = _tmp_name(dst)
                    try:
                        os.link(common, theirs)
                    except OSError:  # removed meanwhile (devft clean) or another filesystem: keep ours
                        pass
                    else:
                        tmp.unlink()
                        tmp = theirs
                else:  # a corrupt shared copy: ours replaces it, atomically
                    ours = _tmp_name(common)
                    os.link(tmp, ours)
                    os.replace(ours, common)
            except OSError as exc:  # e.g. the shared store is on another filesystem
                log.debug("not sharing blob %s: %s", sha[:12], exc)
        os.replace(tmp, dst)
        _fsync_dir(self.blobs)
        st = dst.stat()
        self._verified[sha] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return dst

    # -- partial files -------------------------------------------------------------

    def _partial_dir(self, entry: FileEntry) -> Path:
        return self.partial / entry.sha256

    def verified_chunks(self, entry: FileEntry) -> set[int]:
        """Indices of chunks already on disk with the right hash; bad chunk files are removed."""
        d = self._partial_dir(entry)
        if not d.is_dir():
            return set()
        have = set()
        for c in d.iterdir():
            m = _CHUNK_FILE_RE.match(c.name)
            idx = int(m.group(1)) if m else -1
            ok = (
                m is not None
                and idx < len(entry.chunks)
                and entry.chunks[idx] == m.group(2)
                and c.stat().st_size == entry.chunk_length(idx)
                and sha256_file(c) == m.group(2)
            )
            if ok:
                have.add(idx)
            else:
                log.warning("dropping bad partial chunk %s", c)
                c.unlink(missing_ok=True)
        return have

    def missing_chunks(self, entry: FileEntry) -> list[int]:
        if self.has(entry.sha256, entry.size):
            return []
        have = self.verified_chunks(entry)
        return [i for i in range(len(entry.chunks)) if i not in have]

    def store_chunk(self, entry: FileEntry, index: int, data: bytes) -> bool:
        """Keep a received chunk if its hash matches the descriptor; False otherwise."""
        if not 0 <= index < len(entry.chunks):
            return False
        if sha256_bytes(data) != entry.chunks[index] or len(data) != entry.chunk_length(index):
            with self._lock:
                self.chunks_rejected += 1
            log.warning("chunk %d of %s failed its hash check; will request it again", index, entry.path)
            return False
        d = self._partial_dir(entry)
        d.mkdir(exist_ok=True)
        _atomic_write(d / f"{index:08d}.{entry.chunks[index]}", data)
        return True

    def assemble(self, entry: FileEntry) -> Path:
        """Join all verified chunks into the blob, check the file hash, drop the chunks."""
        dst = self.blob_path(entry.sha256)
        d = self._partial_dir(entry)
        tmp = _tmp_name(dst)
        whole = hashlib.sha256()
        with open(tmp, "wb") as out:
            for i, chunk_sha in enumerate(entry.chunks):
                data = (d / f"{i:08d}.{chunk_sha}").read_bytes()
                whole.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != entry.sha256:
            tmp.unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)
            raise FetchError(
                f"{entry.path}: chunks hash correctly but the file hashes to {whole.hexdigest()}, "
                f"not {entry.sha256}; the descriptor is inconsistent - regenerate it on the server"
            )
        self._install(tmp, entry.sha256)
        shutil.rmtree(d, ignore_errors=True)
        return dst

    # -- fetching --------------------------------------------------------------------

    def fetch(
        self,
        client: MqttClient,
        run_id: str,
        device_id: str,
        descriptor: ArtifactDescriptor,
        *,
        files_at_once: int = 4,
        **kwargs,  # passed to fetch_file
    ) -> dict[str, Path]:
        """Make every file of an artifact present; returns {relative path: blob path}.

        Up to `files_at_once` missing files are fetched at the same time (each with its own chunk
        window): an artifact of many small files (one per frozen tensor) would otherwise pay one
        request round trip per file. A file listed under several paths is fetched once."""
        unique = {e.sha256: e for e in descriptor.files}
        missing = [e for e in unique.values() if not self.has(e.sha256, e.size)]
        if missing:
            if descriptor.origin is not None:  # an HTTPS origin serves the files: fetch them there, not over MQTT
                login = OriginLogin.of(client)

                def one(e: FileEntry) -> Path:
                    return self.fetch_file_https(descriptor.origin, e, login, cancel=kwargs.get("cancel"),
                                                 progress=kwargs.get("progress"))
            else:
                def one(e: FileEntry) -> Path:
                    return self.fetch_file(client, run_id, device_id, e, **kwargs)
            with ThreadPoolExecutor(max(1, min(files_at_once, len(missing))), thread_name_prefix="fetch") as pool:
                list(pool.map(one, missing))
        return {e.path: self.blob_path(e.sha256) for e in descriptor.files}

    def fetch_file_https(
        self,
        origin: str,
        entry: FileEntry,
        login: OriginLogin,
        *,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 30.0,
        cancel: threading.Event | None = None,
        progress: Callable[[FileEntry, int, int], None] | None = None,
    ) -> Path:
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
                  cancel: threading.Event | None, progress: Callable[[FileEntry, int, int], None] | None) -> int:
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

    def fetch_file(
        self,
        client: MqttClient,
        run_id: str,
        device_id: str,
        entry: FileEntry,
        *,
        window: int = 16,
        chunk_timeout_s: float = 10.0,
        max_retries: int = 5,
        cancel: threading.Event | None = None,
        progress: Callable[[FileEntry, int, int], None] | None = None,
    ) -> Path:
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

    def prune(self, keep: set[str], stages_dir: Path | None = None, keep_stage: str | None = None) -> int:
        """Delete blobs not in `keep` (and laid-out stage dirs other than `keep_stage`); bytes freed here.

        A device calls it once a new stage's files are all present: whatever the new stage
        shares with the old one is in `keep`, the rest of the old stage is dead weight (a
        SmolLM2 stage is hundreds of MB). Partial downloads of kept files stay."""
        freed = 0
        if stages_dir is not None and stages_dir.is_dir():
            for d in stages_dir.iterdir():
                if d.name != keep_stage:
                    shutil.rmtree(d, ignore_errors=True)
        for p in list(self.blobs.iterdir()):
            if len(p.name) == 64 and p.name not in keep:
                try:
                    st = p.stat()
                    p.unlink()
                except FileNotFoundError:
                    continue
                self._verified.pop(p.name, None)
                freed += st.st_size if st.st_nlink <= 1 else 0
        for d in list(self.partial.iterdir()):
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
        if self.shared is not None:  # a shared blob no device links to any more (one link left: its own)
            for p in list(self.shared.iterdir()):
                try:
                    st = p.stat()
                    if len(p.name) == 64 and p.name not in keep and st.st_nlink == 1:
                        p.unlink()
                        freed += st.st_size
                except FileNotFoundError:
                    continue
        return freed

    def materialize(self, descriptor: ArtifactDescriptor, dest: str | Path) -> Path:
        """Lay out an artifact's files under `dest` by path (hard links, else copies)."""
        dest = Path(dest)
        for e in descriptor.files:
            src = self.path(e.sha256, e.size)
            target = dest / e.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)
        return dest
