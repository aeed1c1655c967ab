"""Fetching artifacts: chunked, content-addressed downloads over a real broker (edge_runtime/fetch.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edge_runtime import protocol as P
from edge_runtime.fetch import (
    ArtifactCache,
    FetchCancelled,
    FetchError,
    describe_file,
    describe_files,
    split_safetensors,
)
from edge_runtime.mqtt import Message
from server_sdk.fleet.artifact_server import ArtifactServer

pytest_plugins = ("tests.broker_fixtures",)  # fleet, broker, clients

RUN = "run1"
CHUNK = 64 * 1024
N_CHUNKS = 12


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "server" / "frozen.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(CHUNK * (N_CHUNKS - 1) + 1234))  # last chunk is short
    return path


@pytest.fixture
def served(fleet, broker, clients):
    """An ArtifactServer on its own server connection."""
    server = ArtifactServer(clients(fleet.server, client_id="server-artifacts"), RUN, max_bytes_per_s=None).start()
    yield server
    server.stop()


def _fetch(cache, device, descriptor, **kwargs):
    return cache.fetch(device, RUN, "dev1", descriptor, chunk_timeout_s=2.0, max_retries=2, **kwargs)


# --------------------------------------------------------------------------- offline pieces


def test_describe_file_hashes_whole_and_chunks(weights):
    entry = describe_file(weights, "w.bin", CHUNK)
    data = weights.read_bytes()
    assert entry.size == len(data) and len(entry.chunks) == N_CHUNKS
    assert entry.chunk_length(N_CHUNKS - 1) == 1234
    assert P.FileEntry.from_json(entry.to_json()) == entry


def test_bad_chunk_is_refused_and_bad_partial_chunk_dropped(tmp_path, weights):
    entry = describe_file(weights, "w.bin", CHUNK)
    data = weights.read_bytes()
    cache = ArtifactCache(tmp_path / "cache")
    assert not cache.store_chunk(entry, 0, b"x" * CHUNK)
    assert cache.chunks_rejected == 1
    assert cache.store_chunk(entry, 0, data[:CHUNK]) and cache.store_chunk(entry, 1, data[CHUNK : 2 * CHUNK])
    chunk_file = next((tmp_path / "cache" / "partial" / entry.sha256).glob("00000001.*"))
    chunk_file.write_bytes(b"rot" + chunk_file.read_bytes()[3:])
    (chunk_file.parent / ".00000002.junk.123.tmp").write_bytes(b"torn write")
    again = ArtifactCache(tmp_path / "cache")  # a restart
    assert again.missing_chunks(entry) == list(range(1, N_CHUNKS))
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# --------------------------------------------------------------------------- over the broker


def test_fetch_reassembles_file_and_counts_bytes(tmp_path, fleet, clients, served, weights):
    descriptor = served.add_files({"weights/frozen.bin": weights}, chunk_size=CHUNK)
    device = clients(fleet.devices["dev1"])
    cache = ArtifactCache(tmp_path / "cache")
    seen = []
    paths = _fetch(cache, device, descriptor, progress=lambda e, done, total: seen.append(done))
    blob = paths["weights/frozen.bin"]
    assert blob.read_bytes() == weights.read_bytes()
    assert blob == cache.blob_path(descriptor.files[0].sha256)
    assert cache.bytes_downloaded == weights.stat().st_size
    assert seen == list(range(1, N_CHUNKS + 1))
    assert not any((tmp_path / "cache" / "partial").iterdir())
    out = cache.materialize(descriptor, tmp_path / "stage1")
    assert (out / "weights" / "frozen.bin").read_bytes() == weights.read_bytes()


def test_blob_already_held_is_not_fetched(tmp_path, fleet, clients, served, weights):
    descriptor = served.add_files({"frozen.bin": weights}, chunk_size=CHUNK)
    cache = ArtifactCache(tmp_path / "cache")
    cache.add_file(weights)
    device = clients(fleet.devices["dev1"])
    _fetch(cache, device, descriptor)
    assert cache.bytes_downloaded == 0
    assert served.chunks_sent == 0


def test_corrupted_or_truncated_blob_is_fetched_again(tmp_path, fleet, clients, served, weights):
    descriptor = served.add_files({"frozen.bin": weights}, chunk_size=CHUNK)
    entry = descriptor.files[0]
    device = clients(fleet.devices["dev1"])
    _fetch(ArtifactCache(tmp_path / "cache"), device, descriptor)

    blob = tmp_path / "cache" / "blobs" / entry.sha256
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[5000] ^= 0xFF
    blob.write_bytes(bytes(data))
    cache = ArtifactCache(tmp_path / "cache")  # restart: the bad blob must not be used
    with pytest.raises(FileNotFoundError):
        cache.path(entry.sha256)
    _fetch(cache, device, descriptor)
    assert blob.read_bytes() == weights.read_bytes()
    assert cache.bytes_downloaded == entry.size

    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.truncate(100)
    assert cache.missing_chunks(entry) == list(range(N_CHUNKS))
    _fetch(cache, device, descriptor)
    assert blob.read_bytes() == weights.read_bytes()


class _FlakyLink(ArtifactServer):
    """Flips a byte of the first copy of chunk 2 it sends, like a bad link would."""

    def _read_chunk(self, sha, index):
        data = super()._read_chunk(sha, index)
        if index == 2 and self.sent_log[(sha, index)] == 0:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def test_chunk_corrupted_in_transit_is_requested_again(tmp_path, fleet, broker, clients, weights):
    flaky = _FlakyLink(clients(fleet.server, client_id="server-flaky"), RUN, max_bytes_per_s=None).start()
    try:
        descriptor = flaky.add_files({"frozen.bin": weights}, chunk_size=CHUNK)
        cache = ArtifactCache(tmp_path / "cache")
        paths = _fetch(cache, clients(fleet.devices["dev1"]), descriptor)
        assert paths["frozen.bin"].read_bytes() == weights.read_bytes()
        assert cache.chunks_rejected == 1
        assert flaky.sent_log[(descriptor.files[0].sha256, 2)] == 2
        assert cache.bytes_downloaded == weights.stat().st_size + CHUNK
    finally:
        flaky.stop()


def test_interrupted_download_resumes_without_refetching_verified_chunks(tmp_path, fleet, clients, served, weights):
    descriptor = served.add_files({"frozen.bin": weights}, chunk_size=CHUNK)
    entry = descriptor.files[0]
    device = clients(fleet.devices["dev1"])
    cancel = threading.Event()

    def stop_after_five(e, done, total):
        if done == 5:
            cancel.set()

    first = ArtifactCache(tmp_path / "cache")
    with pytest.raises(FetchCancelled):
        _fetch(first, device, descriptor, window=1, cancel=cancel, progress=stop_after_five)
    assert first.bytes_downloaded == 5 * CHUNK

    resumed = ArtifactCache(tmp_path / "cache")
    _fetch(resumed, device, descriptor)
    assert resumed.bytes_downloaded == entry.size - 5 * CHUNK
    assert all(served.sent_log[(entry.sha256, i)] == 1 for i in range(N_CHUNKS))
    assert resumed.path(entry.sha256).read_bytes() == weights.read_bytes()


def test_killed_download_resumes(tmp_path, fleet, broker, clients, weights):
    """SIGKILL a device process mid-download; a new process keeps its verified chunks."""
    slow = ArtifactServer(clients(fleet.server, client_id="server-slow"), RUN, max_bytes_per_s=8 * CHUNK).start()
    try:
        descriptor = slow.add_files({"frozen.bin": weights}, chunk_size=CHUNK)
        entry = descriptor.files[0]
        cache_dir = tmp_path / "cache"
        creds = fleet.devices["dev1"]
        script = textwrap.dedent(
            f"""
            import json
            from edge_runtime.mqtt import MqttClient, MqttSettings
            from edge_runtime.protocol import ArtifactDescriptor
            from edge_runtime.fetch import ArtifactCache
            d = ArtifactDescriptor.from_json(json.loads({str(descriptor.to_json()).replace("'", '"')!r}))
            c = MqttClient(MqttSettings(host="localhost", port={creds.port}, username={creds.username!r},
                password={creds.password!r}, ca_file={creds.ca_file!r}, client_id="dev1-doomed"))
            c.connect()
            ArtifactCache({str(cache_dir)!r}).fetch(c, "{RUN}", "dev1", d, window=4)
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
        partial = cache_dir / "partial" / entry.sha256
        deadline = time.monotonic() + 20
        while not (partial.is_dir() and len(list(partial.glob("0*"))) >= 3):
            assert proc.poll() is None, "device process died on its own"
            assert time.monotonic() < deadline, "device process made no progress"
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        while slow.queued:  # let chunks the dead device asked for drain
            time.sleep(0.05)
        time.sleep(0.3)

        cache = ArtifactCache(cache_dir)
        held = len(cache.verified_chunks(entry))
        assert 3 <= held < N_CHUNKS
        device = clients(creds)
        # the broker binds the session to the login, so this process inherits the dead one's session and is
        # handed the chunks queued for it on connect; no fetch is listening yet, so they are dropped uncounted
        time.sleep(0.5)
        _fetch(cache, device, descriptor)
        assert cache.bytes_downloaded == entry.size - held * CHUNK
        assert cache.path(entry.sha256).read_bytes() == weights.read_bytes()
    finally:
        slow.stop()


def test_shared_frozen_tensor_travels_once(tmp_path, fleet, clients, served):
    """Frozen weights split per tensor: stage 2 reuses stage 1's tensors from the cache."""
    rng = np.random.default_rng(0)
    shared = {"embed": rng.standard_normal((64, 32)).astype(np.float32)}
    stage1 = tmp_path / "s1.safetensors"
    stage2 = tmp_path / "s2.safetensors"
    save_file({**shared, "layer0": rng.standard_normal((32, 32)).astype(np.float32)}, stage1)
    save_file({**shared, "layer1": rng.standard_normal((32, 32)).astype(np.float32)}, stage2)
    parts1 = split_safetensors(stage1, tmp_path / "parts1")
    parts2 = split_safetensors(stage2, tmp_path / "parts2")
    d1 = served.add_files({f"frozen/{k}.safetensors": p for k, p in parts1.items()})
    d2 = served.add_files({f"frozen/{k}.safetensors": p for k, p in parts2.items()})
    device = clients(fleet.devices["dev1"])
    cache = ArtifactCache(tmp_path / "cache")
    _fetch(cache, device, d1)
    before = cache.bytes_downloaded
    paths = _fetch(cache, device, d2)
    assert cache.bytes_downloaded - before == parts2["layer1"].stat().st_size
    np.testing.assert_array_equal(load_file(paths["frozen/embed.safetensors"])["embed"], shared["embed"])


def test_unknown_blob_times_out_with_clear_error(tmp_path, fleet, clients, served, weights):
    descriptor = describe_files({"frozen.bin": weights}, chunk_size=CHUNK)  # never registered
    device = clients(fleet.devices["dev1"])
    with pytest.raises(FetchError, match="ArtifactServer"):
        ArtifactCache(tmp_path / "cache").fetch(device, RUN, "dev1", descriptor, chunk_timeout_s=0.3, max_retries=1)


def test_server_ignores_requests_claiming_another_device(fleet, broker, clients, weights):
    server = ArtifactServer(clients(fleet.server), RUN)
    entry = server.add_file(weights, chunk_size=CHUNK)
    req = P.ChunkRequest(run_id=RUN, device_id="dev2", sha256=entry.sha256, chunks=(0, 1))
    server._on_request(Message(P.fetch_topic(RUN, "dev1"), P.encode_chunk_request(req), 1, False))
    assert server.queued == 0
    server._on_request(Message(P.fetch_topic(RUN, "dev2"), P.encode_chunk_request(req), 1, False))
    server._on_request(Message(P.fetch_topic(RUN, "dev2"), P.encode_chunk_request(req), 1, False))
    assert server.queued == 2  # the same chunk asked twice is sent once
    server._on_request(Message(P.fetch_topic(RUN, "dev2"), b"{oops", 1, False))


def test_recheck_rehashes_a_blob_this_process_already_verified(tmp_path):
    """Rot that keeps size and mtime slips past the cheap check; recheck (after a failed manifest check) finds it."""
    cache = ArtifactCache(tmp_path / "cache")
    sha = cache.add_bytes(b"x" * 4096)
    assert cache.has(sha, 4096)
    path = cache.blob_path(sha)
    st = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as f:  # same size, same inode
        f.write(b"y")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert cache.has(sha, 4096)  # the per-process verification is keyed by size, mtime and inode
    assert not cache.recheck(sha, 4096) and not path.exists()
