"""Describing files as content-addressed chunks, and hashing them: what the server (which publishes artifacts) and
the devices (which check every chunk and file) share. Part of edge_runtime/fetch.py, which re-exports it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from edge_runtime.protocol import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, ArtifactDescriptor, FileEntry

_READ_BLOCK = 1024 * 1024


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
