"""The one devft wire protocol, imported by the server and by every device.

Everything that crosses MQTT is defined here: topic names, message dataclasses,
the binary framing of tensor-carrying messages, size limits and the checks a
server runs on an incoming update. `docs/protocol.md` is the same contract in
prose for clients written in other languages; keep the two in step and bump
`PROTOCOL_VERSION` on any incompatible change.

Torch-free on purpose: devices only have numpy, safetensors and paho-mqtt.

Topic layout (all QoS 1, `<run>` is the run id):

    devft/<run>/control                    server -> all   JSON ControlMessage (retained)
    devft/<run>/global/<round>             server -> all   framed GlobalMessage (retained)
    devft/<run>/artifacts/<sha256>/<index> server -> all   raw chunk bytes
    devft/<run>/fetch/<device>             device -> server JSON ChunkRequest
    devft/<run>/update/<device>            device -> server framed UpdateMessage
    devft/<run>/status/<device>            device -> server JSON StatusMessage (retained, LWT)

Framing of a tensor-carrying message (update, global):

    4-byte big-endian unsigned header length N | N bytes UTF-8 JSON header | body

where the body is a safetensors file (never pickle) of `header["body_size"]` bytes.

The protocol is in parts, all re-exported here (`from edge_runtime.protocol import ...` reaches every name):
protocol_base.py (version, topics, limits, errors, id checks), protocol_framing.py (tensors, bounded JSON,
framing), protocol_control.py (the control message), protocol_messages.py (status, capabilities, chunk
requests, updates, the global message); this module checks an update before the server aggregates it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableSet
from typing import Any

import numpy as np

from edge_runtime.protocol_base import (
    ARTIFACT_FORMATS,
    CONTROL_STATES,
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS_PER_REQUEST,
    MAX_CONTROL_BYTES,
    MAX_HEADER_BYTES,
    MAX_ORIGIN_CHARS,
    MAX_REQUEST_BYTES,
    MAX_SEED,
    MAX_STATUS_BYTES,
    MAX_UPDATE_BYTES,
    OPTIMIZERS,
    PROTOCOL_VERSION,
    QOS,
    REJECT_REASONS,
    STATUS_STATES,
    TOPIC_ROOT,
    ProtocolError,
    UpdateRejected,
    check_name,
    check_origin,
    check_sha256,
    chunk_topic,
    control_topic,
    fetch_topic,
    global_topic,
    parse_topic,
    status_topic,
    update_topic,
)
from edge_runtime.protocol_control import (
    MAX_REFUSAL_CHARS,
    ArtifactDescriptor,
    ControlMessage,
    FileEntry,
    TrainSettings,
    decode_control,
    encode_control,
)
from edge_runtime.protocol_framing import (
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    decode_tensors,
    encode_tensors,
    frame,
    unframe,
)
from edge_runtime.protocol_messages import (
    CAPABILITY_TEXT,
    MAX_CORES,
    MAX_RAM_MB,
    ChunkRequest,
    GlobalMessage,
    StatusMessage,
    StatusRejected,
    UpdateMessage,
    check_capabilities,
    decode_chunk_request,
    decode_global,
    decode_status,
    decode_update,
    encode_chunk_request,
    encode_global,
    encode_status,
    encode_update,
    validate_status,
)

__all__ = [  # the protocol's public names, wherever they live
    "ARTIFACT_FORMATS", "ArtifactDescriptor", "CAPABILITY_TEXT", "CONTROL_STATES", "ChunkRequest", "ControlMessage",
    "DEFAULT_CHUNK_BYTES", "FileEntry", "GlobalMessage", "MAX_CHUNKS_PER_REQUEST", "MAX_CHUNK_BYTES",
    "MAX_CONTROL_BYTES", "MAX_CORES", "MAX_HEADER_BYTES", "MAX_INT_DIGITS", "MAX_JSON_DEPTH", "MAX_ORIGIN_CHARS",
    "MAX_RAM_MB", "MAX_REFUSAL_CHARS", "MAX_REQUEST_BYTES", "MAX_SEED", "MAX_STATUS_BYTES", "MAX_UPDATE_BYTES",
    "OPTIMIZERS", "PROTOCOL_VERSION", "ProtocolError", "QOS", "REJECT_REASONS", "STATUS_STATES", "StatusMessage",
    "StatusRejected", "TOPIC_ROOT", "TensorSpec", "TrainSettings", "UpdateMessage", "UpdateRejected",
    "check_capabilities", "check_name", "check_origin", "check_sha256", "chunk_topic", "control_topic",
    "decode_chunk_request", "decode_control", "decode_global", "decode_status", "decode_tensors", "decode_update",
    "encode_chunk_request", "encode_control", "encode_global", "encode_status", "encode_tensors", "encode_update",
    "fetch_topic", "frame", "global_topic", "parse_topic", "status_topic", "unframe", "update_topic",
    "validate_status", "validate_update",
]

# --------------------------------------------------------------------------- validation

TensorSpec = Mapping[str, tuple[tuple[int, ...], Any]]  # name -> (shape, dtype)


def validate_update(
    msg: UpdateMessage,
    expected: TensorSpec,
    run_id: str,
    stage: int,
    round: int,
    seen_nonces: MutableSet[str],
    max_norm: float | None = None,
    *,
    sender: str | None = None,
) -> float:
    """Refuse an update the server must not aggregate; on success record its nonce.

    Raises `UpdateRejected` whose `reason` is one of `REJECT_REASONS`. Returns the
    global L2 norm of the delta so callers can log it. `max_norm=None` disables
    the norm bound. `sender` is the device id from the topic the update came on
    (the broker ACL guarantees it); the payload must claim the same device.
    `seen_nonces` may be cleared when a round ends: older rounds are refused anyway.
    """
    if sender is not None and msg.device_id != sender:
        raise UpdateRejected("device_mismatch", f"update on {sender!r}'s topic claims to come from {msg.device_id!r}")
    if msg.run_id != run_id:
        raise UpdateRejected("wrong_run", f"update is for run {msg.run_id!r}, this server runs {run_id!r}")
    if msg.stage != stage:
        raise UpdateRejected("wrong_stage", f"update is for stage {msg.stage}, current stage is {stage}")
    if msg.round < round:
        raise UpdateRejected("stale_round", f"update is for round {msg.round}, current round is {round}")
    if msg.round > round:
        raise UpdateRejected("future_round", f"update is for round {msg.round}, current round is {round}")
    if msg.nonce in seen_nonces:
        raise UpdateRejected("replayed_nonce", f"nonce {msg.nonce!r} from {msg.device_id!r} was already used")
    if msg.num_samples <= 0:
        raise UpdateRejected("bad_num_samples", f"num_samples must be positive, got {msg.num_samples}")
    missing = sorted(set(expected) - set(msg.tensors))
    if missing:
        raise UpdateRejected("missing_tensors", f"update lacks tensors {missing[:5]} ({len(missing)} missing)")
    extra = sorted(set(msg.tensors) - set(expected))
    if extra:
        raise UpdateRejected("unexpected_tensors", f"update has unknown tensors {extra[:5]} ({len(extra)} extra)")
    sq = 0.0
    for name, (shape, dtype) in expected.items():
        arr = msg.tensors[name]
        if tuple(arr.shape) != tuple(shape):
            raise UpdateRejected(
                "wrong_shape", f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}"
            )
        if arr.dtype != np.dtype(dtype):
            raise UpdateRejected("wrong_dtype", f"tensor {name!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        a64 = arr.astype(np.float64, copy=False)
        if not np.isfinite(a64).all():
            raise UpdateRejected("non_finite", f"tensor {name!r} contains NaN or Inf")
        # einsum's own loop, not BLAS: a multithreaded BLAS dot on a busy machine cost 1.2-1.6 s per SmolLM2-sized
        # update (9 ms single-threaded), which a coordinator pays for every update of every round (issue #27)
        flat = a64.ravel()
        sq += float(np.einsum("i,i->", flat, flat))
    norm = math.sqrt(sq)
    if max_norm is not None and not norm <= max_norm:
        raise UpdateRejected("norm_exceeded", f"update L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    seen_nonces.add(msg.nonce)
    return norm
