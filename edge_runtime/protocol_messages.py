"""The messages besides control: a device's status (with its capabilities), its chunk requests and its
update, and the server's global message. Part of edge_runtime/protocol.py, which re-exports it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_runtime.protocol_base import (
    MAX_CHUNKS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    MAX_STATUS_BYTES,
    MAX_UPDATE_BYTES,
    PROTOCOL_VERSION,
    STATUS_STATES,
    ProtocolError,
    check_name,
    check_sha256,
)
from edge_runtime.protocol_framing import (
    as_float,
    decode_tensors,
    dump_json,
    encode_tensors,
    frame,
    load_json,
    load_stateful,
    optional_field,
    require_field,
    unframe,
)


@dataclass(frozen=True)
class StatusMessage:
    """Device liveness: hello on connect, heartbeats, and "offline" as the MQTT will."""

    device_id: str
    state: str  # one of STATUS_STATES
    timestamp: float
    info: dict[str, Any] = field(default_factory=dict)  # backend, RAM, cached blobs, ...
    version: int = PROTOCOL_VERSION


def encode_status(msg: StatusMessage) -> bytes:
    check_name("device_id", msg.device_id)
    data = dump_json(asdict(msg))
    if len(data) > MAX_STATUS_BYTES:
        raise ProtocolError(f"status message is {len(data)} bytes, over {MAX_STATUS_BYTES}")
    return data


class StatusRejected(ProtocolError):
    """A well-formed status the server must not store; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"status rejected ({reason}): {detail}")
        self.reason = reason


def validate_status(msg: StatusMessage, sender: str) -> StatusMessage:
    """The status must speak for the device whose topic it came on (the ACL binds that topic to the login).

    Raises `StatusRejected("device_mismatch", ...)` otherwise; returns the message unchanged."""
    if msg.device_id != sender:
        raise StatusRejected("device_mismatch", f"status on {sender!r}'s topic claims to come from {msg.device_id!r}")
    return msg


# What a device declares about itself in a status's `info` (docs/protocol.md, "Capabilities"). The coordinator
# samples by ram_mb and shows the rest in the run's report, so each is checked before anything keeps it.
CAPABILITY_TEXT = re.compile(r"^[A-Za-z0-9 ._,;:()/+-]{1,64}$")  # platform, runtime: printable words, 1-64 chars
MAX_RAM_MB = 2**24  # 16 TiB; ram_mb is whole MiB in [1, MAX_RAM_MB]
MAX_CORES = 4096

def check_capabilities(info: Mapping[str, Any]) -> dict[str, Any]:
    """The capabilities a status's `info` declares, checked: {platform, runtime, ram_mb, cores}, those present.

    Each is optional (a device that declares no ram_mb is sampled for every stage); one that is present must be
    right, or the whole declaration is refused: `StatusRejected("bad_capabilities", ...)` naming the field, what
    it holds and what is allowed."""
    caps: dict[str, Any] = {}
    for key in ("platform", "runtime"):
        value = info.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not CAPABILITY_TEXT.fullmatch(value):  # fullmatch: `$` allows a final \n
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise StatusRejected("bad_capabilities", f"info.{key} {shown} must be a string of 1-64 characters from "
                                 "letters, digits, space and ._,;:()/+- (e.g. 'linux-aarch64', 'onnxruntime-web')")
        caps[key] = value
    for key, top, example in (("ram_mb", MAX_RAM_MB, "3800 for a board with 4 GB"), ("cores", MAX_CORES, "4")):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise StatusRejected("bad_capabilities", f"info.{key} {shown} must be a whole number in [1, {top}] "
                                 f"(e.g. {example})")
        caps[key] = value
    return caps


def decode_status(data: bytes) -> StatusMessage:
    what = "status message"
    obj, state = load_stateful(data, what, MAX_STATUS_BYTES, STATUS_STATES)
    return StatusMessage(
        device_id=check_name("device_id", require_field(obj, what, "device_id", str)),
        state=state,
        timestamp=as_float(require_field(obj, what, "timestamp", (int, float)), what, "timestamp"),
        info=optional_field(obj, what, "info", dict, {}),
    )


@dataclass(frozen=True)
class ChunkRequest:
    """A device asks the server to (re)publish some chunks of one blob."""

    run_id: str
    device_id: str
    sha256: str
    chunks: tuple[int, ...]
    version: int = PROTOCOL_VERSION


def encode_chunk_request(msg: ChunkRequest) -> bytes:
    check_name("device_id", msg.device_id)
    check_sha256(msg.sha256)
    if not 0 < len(msg.chunks) <= MAX_CHUNKS_PER_REQUEST:
        raise ProtocolError(f"a chunk request asks for 1..{MAX_CHUNKS_PER_REQUEST} chunks, got {len(msg.chunks)}")
    return dump_json({**asdict(msg), "chunks": list(msg.chunks)})


def decode_chunk_request(data: bytes) -> ChunkRequest:
    what = "chunk request"
    obj = load_json(data, what, MAX_REQUEST_BYTES)
    chunks = require_field(obj, what, "chunks", list)
    if not 0 < len(chunks) <= MAX_CHUNKS_PER_REQUEST:
        raise ProtocolError(f"{what} asks for {len(chunks)} chunks; allowed 1..{MAX_CHUNKS_PER_REQUEST}")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chunks):
        raise ProtocolError(f"{what} chunks must be non-negative integers, got {chunks!r}")
    return ChunkRequest(
        run_id=check_name("run_id", require_field(obj, what, "run_id", str)),
        device_id=check_name("device_id", require_field(obj, what, "device_id", str)),
        sha256=check_sha256(require_field(obj, what, "sha256", str)),
        chunks=tuple(chunks),
    )


@dataclass(frozen=True)
class UpdateMessage:
    """A device's trained LoRA delta for one round, with what it cost to produce."""

    run_id: str
    stage: int
    round: int
    device_id: str
    nonce: str  # fresh random hex per update; the server refuses repeats
    num_samples: int
    tensors: dict[str, np.ndarray]
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. train_loss
    telemetry: dict[str, Any] = field(default_factory=dict)  # e.g. wall_s, peak_rss_mb, energy_j
    version: int = PROTOCOL_VERSION


def encode_update(msg: UpdateMessage) -> bytes:
    check_name("device_id", msg.device_id)
    fields = {"device_id": msg.device_id, "nonce": msg.nonce, "num_samples": msg.num_samples,
              "metrics": msg.metrics, "telemetry": msg.telemetry}
    return _encode_framed("update", msg, fields, msg.tensors, "; send a smaller adapter")


def decode_update(data: bytes) -> UpdateMessage:
    header, common, what = _decode_framed(data, "update")
    nonce = require_field(header, what, "nonce", str)
    if not 8 <= len(nonce) <= 128:
        raise ProtocolError(f"{what} nonce must be 8-128 characters, got {len(nonce)}")
    return UpdateMessage(
        **common,
        device_id=check_name("device_id", require_field(header, what, "device_id", str)),
        nonce=nonce,
        num_samples=require_field(header, what, "num_samples", int),
        telemetry=optional_field(header, what, "telemetry", dict, {}),
    )


def _encode_framed(kind: str, msg: Any, fields: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                   hint: str = "") -> bytes:
    """A framed message of `kind` (update, global): the shared header fields, `fields`, then the tensors."""
    check_name("run_id", msg.run_id)
    header = {"version": msg.version, "kind": kind, "run_id": msg.run_id, "stage": msg.stage, "round": msg.round,
              **fields}
    data = frame(header, encode_tensors(tensors))
    if len(data) > MAX_UPDATE_BYTES:
        raise ProtocolError(f"{kind} message is {len(data)} bytes, over {MAX_UPDATE_BYTES}{hint}")
    return data


def _decode_framed(data: bytes, kind: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(header, the fields every framed message has, a name for errors) of a framed message of `kind`."""
    what = f"{kind} message"
    header, body = unframe(data, what)
    if header.get("kind") != kind:
        raise ProtocolError(f"{what} header kind is {header.get('kind')!r}, expected {kind!r}")
    common = {"run_id": check_name("run_id", require_field(header, what, "run_id", str)),
              "stage": require_field(header, what, "stage", int), "round": require_field(header, what, "round", int),
              "tensors": decode_tensors(body), "metrics": optional_field(header, what, "metrics", dict, {})}
    return header, common, what


@dataclass(frozen=True)
class GlobalMessage:
    """The aggregated LoRA adapter the server sends at the start of a round."""

    run_id: str
    stage: int
    round: int
    tensors: dict[str, np.ndarray]
    metrics: dict[str, Any] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION


def encode_global(msg: GlobalMessage) -> bytes:
    return _encode_framed("global", msg, {"metrics": msg.metrics}, msg.tensors)


def decode_global(data: bytes) -> GlobalMessage:
    return GlobalMessage(**_decode_framed(data, "global")[1])
