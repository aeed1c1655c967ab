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
share (describing files as chunks, hashing) is in artifact_files.py, fetching one file (MQTT chunks, an
HTTPS origin) in chunk_fetch.py; this module re-exports both and keeps the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_runtime.artifact_files import (
    describe_dir,
    describe_file,
    describe_files,
    sha256_bytes,
    sha256_file,
    split_safetensors,
)
from edge_runtime.chunk_fetch import (
    FetchCancelled,
    FetchError,
    FileFetching,
    OriginCorrupt,
    OriginLogin,
    OriginRefused,
    OriginUnavailable,
)
from edge_runtime.mqtt import MqttClient
from edge_runtime.protocol import ArtifactDescriptor, FileEntry, check_sha256

__all__ = [  # the fetch module's public names, wherever they live (artifact_files.py, chunk_fetch.py)
    "ArtifactCache", "FetchCancelled", "FetchError", "OriginCorrupt", "OriginLogin", "OriginRefused",
    "OriginUnavailable", "describe_dir", "describe_file", "describe_files", "sha256_bytes", "sha256_file",
    "split_safetensors",
]

log = logging.getLogger(__name__)

_CHUNK_FILE_RE = re.compile(r"^(\d{8})\.([0-9a-f]{64})$")


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

class ArtifactCache(FileFetching):
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
