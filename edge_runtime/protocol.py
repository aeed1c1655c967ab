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
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, MutableSet, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

# Seeds stay below 2^53 so that a JSON number holds them exactly in every language (JavaScript's
# numbers are doubles); the coordinator's seeds are 32-bit (rounds.client_seed).
MAX_SEED = 2**53 - 1
# 2: per-format artifacts and typed hyperparams in the control message
# 3: batches drawn with edge_runtime.sampler (SplitMix64, partial Fisher-Yates) instead of numpy's Generator.choice
PROTOCOL_VERSION = 3
TOPIC_ROOT = "devft"
QOS = 1

# Size limits. The broker is configured with a max packet size just above
# MAX_UPDATE_BYTES so oversized publishes are dropped before reaching us.
MAX_CONTROL_BYTES = 4 * 1024 * 1024  # control messages may embed an artifact descriptor
MAX_STATUS_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 256 * 1024
MAX_HEADER_BYTES = 256 * 1024  # JSON header inside a framed message
MAX_UPDATE_BYTES = 64 * 1024 * 1024  # whole framed update / global message
MAX_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 512 * 1024
MAX_CHUNKS_PER_REQUEST = 64

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_HEADER_LEN = struct.Struct(">I")

CONTROL_STATES = ("idle", "train", "done")
ARTIFACT_FORMATS = ("onnx", "ort", "executorch")  # edge_runtime/backends: what a device can train
OPTIMIZERS = ("adamw", "sgd")
STATUS_STATES = ("hello", "heartbeat", "busy", "offline")


class ProtocolError(ValueError):
    """A message does not follow the devft wire protocol."""


class UpdateRejected(ProtocolError):
    """A well-formed update that the server must not aggregate.

    `reason` is a short stable code (see `REJECT_REASONS`) for counters and logs;
    the message says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"update rejected ({reason}): {detail}")
        self.reason = reason


REJECT_REASONS = (
    "device_mismatch",
    "wrong_run",
    "wrong_stage",
    "stale_round",
    "future_round",
    "replayed_nonce",
    "bad_num_samples",
    "missing_tensors",
    "unexpected_tensors",
    "wrong_shape",
    "wrong_dtype",
    "non_finite",
    "norm_exceeded",
)


# --------------------------------------------------------------------------- topics


def check_name(kind: str, value: str) -> str:
    """Run and device ids become topic levels, so they must be plain words."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ProtocolError(f"{kind} {value!r} is not a valid id: use 1-64 characters from [A-Za-z0-9_.-]")
    return value


def check_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA_RE.match(value):
        raise ProtocolError(f"{value!r} is not a lowercase hex sha256 digest")
    return value


MAX_ORIGIN_CHARS = 1024


def check_origin(url: str) -> str:
    """An artifact origin: an https:// base URL ending in `/` (files are at URL + sha256), without credentials,
    query or fragment (the device adds its own login as a header, never in the URL)."""
    if (len(url) > MAX_ORIGIN_CHARS or not url.startswith("https://") or not url.endswith("/") or "?" in url
            or "#" in url or "@" in url.split("/", 3)[2] or any(c.isspace() or ord(c) < 32 for c in url)):
        raise ProtocolError(f"artifact origin {url[:80]!r} must be an https:// base URL ending in '/' with no "
                            f"credentials, query or fragment, at most {MAX_ORIGIN_CHARS} characters")
    return url


def control_topic(run_id: str) -> str:
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/control"


def global_topic(run_id: str, round_: int | str) -> str:
    """`round_` may be "+" to subscribe to every round."""
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/global/{round_}"


def chunk_topic(run_id: str, sha256: str, index: int | str) -> str:
    """`index` may be "+" to subscribe to every chunk of one blob."""
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/artifacts/{check_sha256(sha256)}/{index}"


def fetch_topic(run_id: str, device_id: str) -> str:
    """`device_id` may be "+" on the server side."""
    dev = device_id if device_id == "+" else check_name("device_id", device_id)
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/fetch/{dev}"


def update_topic(run_id: str, device_id: str) -> str:
    dev = device_id if device_id == "+" else check_name("device_id", device_id)
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/update/{dev}"


def status_topic(run_id: str, device_id: str) -> str:
    dev = device_id if device_id == "+" else check_name("device_id", device_id)
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/status/{dev}"


def parse_topic(topic: str) -> tuple[str, str, tuple[str, ...]]:
    """Split `devft/<run>/<kind>/...` into (run_id, kind, rest)."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != TOPIC_ROOT:
        raise ProtocolError(f"topic {topic!r} is not under {TOPIC_ROOT}/<run_id>/")
    return parts[1], parts[2], tuple(parts[3:])


# --------------------------------------------------------------------------- tensors


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Tensors as safetensors bytes: a JSON header plus raw little-endian data."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiub":
            raise ProtocolError(f"tensor {name!r} has dtype {arr.dtype}; only numeric tensors travel")
        arrays[name] = np.ascontiguousarray(arr)
    return _st_save(arrays)


def decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    try:
        return dict(_st_load(bytes(data)))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise ProtocolError(f"tensor payload is not valid safetensors ({len(data)} bytes): {exc}") from exc


# --------------------------------------------------------------------------- JSON helpers


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN and Kotlin parsers refuse it."""
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(_json_safe(obj), separators=(",", ":"), allow_nan=False).encode()


MAX_JSON_DEPTH = 16  # objects and arrays nested deeper than this are refused (a control message needs 6)
MAX_INT_DIGITS = 40  # a JSON integer with more digits is refused (seeds and sizes need at most 20)


def _bounded_int(text: str) -> int:
    """json.loads's integer parser, refusing integers no field of the protocol needs (a 5,000-digit one costs
    quadratic time and trips Python's own limit)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} characters is over the {MAX_INT_DIGITS}-digit limit")
    return int(text)


def _check_depth(obj: Any, what: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (walked level by level, without recursion): later code that
    walks a message (logging, re-encoding, reports) must never meet a structure deep enough to exhaust its stack."""
    level, depth = [obj], 1  # the containers `depth` levels down
    while level:
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(f"{what} nests objects or arrays deeper than {MAX_JSON_DEPTH} levels; no message of "
                                "this protocol needs that")
        level = [v for o in level for v in (o.values() if isinstance(o, dict) else o) if isinstance(v, dict | list)]
        depth += 1


def _loads(data: bytes | str, what: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise ProtocolError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    try:
        obj = json.loads(data, parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid UTF-8 JSON: {exc}") from exc
    except (RecursionError, ValueError) as exc:  # nesting past the interpreter's stack, a huge integer
        raise ProtocolError(f"{what} is not JSON this protocol accepts: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(obj).__name__}")
    _check_depth(obj, what)
    version = obj.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{what} has protocol version {version!r}; this side speaks version "
            f"{PROTOCOL_VERSION} - upgrade the older side"
        )
    return obj


_JSON_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}


def _require(obj: Mapping[str, Any], what: str, key: str, types: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise ProtocolError(f"{what} is missing required field {key!r}")
    value = obj[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(_JSON_TYPE_NAMES.get(t, t.__name__) for t in allowed)
        shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
        raise ProtocolError(f"{what} field {key!r} must be {names}, got {shown}")
    return value


def _float(value: int | float, what: str, key: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ProtocolError(f"{what} field {key!r} is too large for a float") from None


def _optional(obj: Mapping[str, Any], what: str, key: str, types: type | tuple[type, ...], default: Any) -> Any:
    if obj.get(key) is None:
        return default
    return _require(obj, what, key, types)


# --------------------------------------------------------------------------- framing


def frame(header: Mapping[str, Any], body: bytes) -> bytes:
    """`u32 BE header length | JSON header | body`; the header records `body_size`."""
    head = _dumps({**header, "body_size": len(body)})
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header is {len(head)} bytes, over {MAX_HEADER_BYTES}")
    return _HEADER_LEN.pack(len(head)) + head + body


def unframe(data: bytes, what: str, limit: int = MAX_UPDATE_BYTES) -> tuple[dict[str, Any], bytes]:
    if len(data) > limit:
        raise ProtocolError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    if len(data) < _HEADER_LEN.size:
        raise ProtocolError(f"{what} is {len(data)} bytes, too short to hold a frame header length")
    (n,) = _HEADER_LEN.unpack_from(data)
    if n > MAX_HEADER_BYTES or _HEADER_LEN.size + n > len(data):
        raise ProtocolError(f"{what} declares a {n}-byte header but holds {len(data) - 4} bytes after the length")
    header = _loads(data[4 : 4 + n], f"{what} header", MAX_HEADER_BYTES)
    body = data[4 + n :]
    declared = _require(header, f"{what} header", "body_size", int)
    if declared != len(body):
        raise ProtocolError(f"{what} body is {len(body)} bytes but the header declares {declared} (truncated?)")
    return header, body


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class FileEntry:
    """One content-addressed file of an artifact: its bytes are `chunks` in order."""

    path: str  # where the device places it, relative to the artifact directory
    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]  # sha256 of every chunk, in order

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "chunks": list(self.chunks)}

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> FileEntry:
        what = "artifact file entry"
        if not isinstance(obj, Mapping):
            raise ProtocolError(f"{what} must be an object, got {obj!r}")
        path = _require(obj, what, "path", str)
        if path.startswith("/") or ".." in path.split("/") or not path:
            raise ProtocolError(f"{what} path {path!r} must be relative and stay inside the artifact")
        entry = FileEntry(
            path=path,
            sha256=check_sha256(_require(obj, what, "sha256", str)),
            size=_require(obj, what, "size", int),
            chunk_size=_require(obj, what, "chunk_size", int),
            chunks=tuple(check_sha256(c) for c in _require(obj, what, "chunks", list)),
        )
        if entry.size < 0 or not 0 < entry.chunk_size <= MAX_CHUNK_BYTES:
            raise ProtocolError(f"{what} {path!r} has size {entry.size} / chunk_size {entry.chunk_size} out of range")
        expected = -(-entry.size // entry.chunk_size)
        if len(entry.chunks) != expected:
            raise ProtocolError(
                f"{what} {path!r}: {entry.size} bytes in {entry.chunk_size}-byte chunks needs "
                f"{expected} chunk hashes, got {len(entry.chunks)}"
            )
        return entry

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass(frozen=True)
class ArtifactDescriptor:
    """What a device needs for a stage: files by path, each addressed by sha256."""

    artifact_id: str
    files: tuple[FileEntry, ...]
    version: int = PROTOCOL_VERSION
    # optional HTTPS base URL: file `f` is also served at origin + f.sha256 (an nginx directory, a bucket), fetched
    # with the device's own login as HTTP Basic credentials; absent = MQTT chunks only. Devices that do not know
    # the field ignore it and fetch chunks over MQTT, which the coordinator keeps serving (compatible, version 3)
    origin: str | None = None

    def to_json(self) -> dict[str, Any]:
        obj = {"version": self.version, "artifact_id": self.artifact_id, "files": [f.to_json() for f in self.files]}
        if self.origin is not None:
            obj["origin"] = self.origin
        return obj

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> ArtifactDescriptor:
        what = "artifact descriptor"
        if not isinstance(obj, Mapping):
            raise ProtocolError(f"{what} must be an object, got {obj!r}")
        files = tuple(FileEntry.from_json(f) for f in _require(obj, what, "files", list))
        origin = _optional(obj, what, "origin", str, None)
        return ArtifactDescriptor(artifact_id=_require(obj, what, "artifact_id", str), files=files,
                                  origin=None if origin is None else check_origin(origin))

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class TrainSettings:
    """What a sampled device trains in a round: the `hyperparams` object of a train control message.

    The device builds a fresh optimiser (`optimizer`, learning rate `lr`) every round from the
    global adapter it receives, draws `local_steps` batches of `batch_size` examples from its shard
    with `edge_runtime.sampler.round_draws(seeds[device_id], ...)` (without replacement within a
    batch; docs/device-client.md section 4), trains
    the LoRA tensors named in `trainable` (PEFT names; the others keep their received values),
    and answers once per (run, stage, round, session): `session` changes when the coordinator
    restarts, so a repeated round after a crash is trained again. Sequences are truncated to the
    artifacts' `seq_len` (manifest), the one sequence length of a run. `micro_batch` (optional,
    1 <= micro_batch <= batch_size; absent: the whole batch at once) runs the training graph on that
    many rows of a batch at a time and combines their gradients into the batch's exactly as
    docs/protocol.md ("Micro-batches") says, before the one optimiser step: less memory, same update
    up to float32 rounding.
    """

    lr: float
    local_steps: int
    batch_size: int
    trainable: tuple[str, ...]
    seeds: Mapping[str, int]
    session: str
    optimizer: str = "adamw"
    micro_batch: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"lr": self.lr, "local_steps": self.local_steps, "batch_size": self.batch_size,
               "trainable": list(self.trainable), "seeds": dict(self.seeds), "session": self.session,
               "optimizer": self.optimizer}
        if self.micro_batch is not None:  # absent: whole batches (control messages stay as they were)
            out["micro_batch"] = self.micro_batch
        return out

    @property
    def rows_per_run(self) -> int | None:
        """Rows per training-graph run when a batch is split into micro-batches, else None (whole batches)."""
        return self.micro_batch if self.micro_batch is not None and self.micro_batch < self.batch_size else None

    @staticmethod
    def from_json(obj: Any) -> TrainSettings:
        what = "control message hyperparams"
        if not isinstance(obj, Mapping):
            raise ProtocolError(f"{what} must be an object, got {obj!r}")
        lr = float(_require(obj, what, "lr", (int, float)))
        if not (math.isfinite(lr) and lr > 0):
            raise ProtocolError(f"{what} lr must be a positive finite number, got {lr}")
        ints = {k: _require(obj, what, k, int) for k in ("local_steps", "batch_size")}
        if any(v < 1 for v in ints.values()):
            raise ProtocolError(f"{what} local_steps and batch_size must be at least 1, got {ints}")
        trainable = _require(obj, what, "trainable", list)
        if not trainable or not all(isinstance(t, str) for t in trainable):
            raise ProtocolError(f"{what} trainable must be a non-empty array of tensor names")
        seeds = _require(obj, what, "seeds", dict)
        for device, seed in seeds.items():
            check_name("device_id in seeds", device)
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
                raise ProtocolError(f"{what} seed of {device} must be an integer in [0, 2^53 - 1] (exact as a JSON "
                                    f"number in every language), got {seed!r}")
        optimizer = _optional(obj, what, "optimizer", str, "adamw")
        if optimizer not in OPTIMIZERS:
            raise ProtocolError(f"{what} optimizer {optimizer!r} is not one of {OPTIMIZERS}")
        micro = _optional(obj, what, "micro_batch", int, None)
        if micro is not None and not 1 <= micro <= ints["batch_size"]:
            raise ProtocolError(f"{what} micro_batch must be a whole number in [1, batch_size={ints['batch_size']}], "
                                f"got {micro}")
        return TrainSettings(lr=lr, trainable=tuple(trainable), seeds=dict(seeds),
                             session=_require(obj, what, "session", str), optimizer=optimizer, micro_batch=micro,
                             **ints)


@dataclass(frozen=True)
class ControlMessage:
    """The server's current instruction to the fleet, retained on the control topic.

    `artifacts` maps an artifact format ("onnx", "ort", "executorch") to the stage's files in
    that format; a device trains the first format of its own preference list that is offered.
    `hyperparams` is set in the "train" state only. `prefetch` (same shape as `artifacts`, usually
    empty) is a hint: the coordinator's guess at the next stage's files, announced during the
    current stage's last round so devices can fetch them while idle. It may be wrong; a device
    never trains on it, and what it fetched is verified by hash like any other file."""

    run_id: str
    stage: int
    round: int
    state: str  # one of CONTROL_STATES
    sampled_clients: tuple[str, ...] = ()
    deadline_unix: float | None = None  # updates after this wall-clock time are ignored
    hyperparams: TrainSettings | None = None
    artifacts: Mapping[str, ArtifactDescriptor] = field(default_factory=dict)
    prefetch: Mapping[str, ArtifactDescriptor] = field(default_factory=dict)
    # devices the coordinator refuses, each with why (a bad hello, a memory budget no stage fits): a device named
    # here is never sampled; it says why and stops (docs/protocol.md, StatusMessage)
    refused: Mapping[str, str] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION

    def artifact_for(self, formats: Sequence[str]) -> tuple[str, ArtifactDescriptor] | None:
        """(format, descriptor) of the first of `formats` this message offers, or None."""
        return _first_offered(self.artifacts, formats)

    def prefetch_for(self, formats: Sequence[str]) -> tuple[str, ArtifactDescriptor] | None:
        """(format, descriptor) of the first of `formats` the prefetch hint offers, or None."""
        return _first_offered(self.prefetch, formats)


def _first_offered(offer: Mapping[str, ArtifactDescriptor],
                   formats: Sequence[str]) -> tuple[str, ArtifactDescriptor] | None:
    for fmt in formats:
        if fmt in offer:
            return fmt, offer[fmt]
    return None


def encode_control(msg: ControlMessage) -> bytes:
    check_name("run_id", msg.run_id)
    if msg.state == "train" and msg.hyperparams is None:
        raise ProtocolError("a train control message needs hyperparams")
    obj = {
        "version": msg.version,
        "run_id": msg.run_id,
        "stage": msg.stage,
        "round": msg.round,
        "state": msg.state,
        "sampled_clients": list(msg.sampled_clients),
        "deadline_unix": msg.deadline_unix,
        "hyperparams": msg.hyperparams.to_json() if msg.hyperparams else None,
        "artifacts": {fmt: desc.to_json() for fmt, desc in msg.artifacts.items()},
    }
    if msg.prefetch:  # omitted when empty: most control messages carry no hint
        obj["prefetch"] = {fmt: desc.to_json() for fmt, desc in msg.prefetch.items()}
    if msg.refused:  # omitted when empty
        obj["refused"] = {check_name("refused device", d): why[:MAX_REFUSAL_CHARS] for d, why in msg.refused.items()}
    data = _dumps(obj)
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message is {len(data)} bytes, over {MAX_CONTROL_BYTES}")
    return data


def _load_stateful(data: bytes, what: str, limit: int, states: tuple[str, ...]) -> tuple[dict, str]:
    """A message's JSON object and its `state`, which must be one of `states`."""
    obj = _loads(data, what, limit)
    state = _require(obj, what, "state", str)
    if state not in states:
        raise ProtocolError(f"{what} state {state!r} is not one of {states}")
    return obj, state


def decode_control(data: bytes) -> ControlMessage:
    what = "control message"
    obj, state = _load_stateful(data, what, MAX_CONTROL_BYTES, CONTROL_STATES)
    clients = _optional(obj, what, "sampled_clients", list, [])
    hyper = obj.get("hyperparams")
    if state == "train" and hyper is None:
        raise ProtocolError(f"{what} in state 'train' has no hyperparams")
    return ControlMessage(
        run_id=check_name("run_id", _require(obj, what, "run_id", str)),
        stage=_require(obj, what, "stage", int),
        round=_require(obj, what, "round", int),
        state=state,
        sampled_clients=tuple(check_name("sampled client", c) for c in clients),
        deadline_unix=_optional(obj, what, "deadline_unix", (int, float), None),
        hyperparams=TrainSettings.from_json(hyper) if hyper is not None else None,
        artifacts=_decode_artifacts(obj, what, "artifacts"),
        prefetch=_decode_artifacts(obj, what, "prefetch"),
        refused=_decode_refused(obj, what),
    )


def _decode_refused(obj: Mapping[str, Any], what: str) -> dict[str, str]:
    """A control message's `refused` field: {device id: why, at most MAX_REFUSAL_CHARS}; absent or null = {}."""
    refused = _optional(obj, what, "refused", dict, {})
    for device, why in refused.items():
        check_name("refused device", device)
        if not isinstance(why, str) or len(why) > MAX_REFUSAL_CHARS:
            raise ProtocolError(f"{what} refused[{device!r}] must be a string of at most {MAX_REFUSAL_CHARS} "
                                "characters")
    return dict(refused)


def _decode_artifacts(obj: Mapping[str, Any], what: str, key: str) -> dict[str, ArtifactDescriptor]:
    """A control message's {format: descriptor} field `key` (artifacts, prefetch); absent or null = {}."""
    offer = _optional(obj, what, key, dict, {})
    unknown = sorted(set(offer) - set(ARTIFACT_FORMATS))
    if unknown:
        raise ProtocolError(f"{what} {key} offers unknown artifact formats {unknown}; known: {ARTIFACT_FORMATS}")
    return {fmt: ArtifactDescriptor.from_json(desc) for fmt, desc in offer.items()}


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
    data = _dumps(asdict(msg))
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
MAX_REFUSAL_CHARS = 400  # a control message's refused[device]


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
    obj, state = _load_stateful(data, what, MAX_STATUS_BYTES, STATUS_STATES)
    return StatusMessage(
        device_id=check_name("device_id", _require(obj, what, "device_id", str)),
        state=state,
        timestamp=_float(_require(obj, what, "timestamp", (int, float)), what, "timestamp"),
        info=_optional(obj, what, "info", dict, {}),
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
    return _dumps({**asdict(msg), "chunks": list(msg.chunks)})


def decode_chunk_request(data: bytes) -> ChunkRequest:
    what = "chunk request"
    obj = _loads(data, what, MAX_REQUEST_BYTES)
    chunks = _require(obj, what, "chunks", list)
    if not 0 < len(chunks) <= MAX_CHUNKS_PER_REQUEST:
        raise ProtocolError(f"{what} asks for {len(chunks)} chunks; allowed 1..{MAX_CHUNKS_PER_REQUEST}")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chunks):
        raise ProtocolError(f"{what} chunks must be non-negative integers, got {chunks!r}")
    return ChunkRequest(
        run_id=check_name("run_id", _require(obj, what, "run_id", str)),
        device_id=check_name("device_id", _require(obj, what, "device_id", str)),
        sha256=check_sha256(_require(obj, what, "sha256", str)),
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
    nonce = _require(header, what, "nonce", str)
    if not 8 <= len(nonce) <= 128:
        raise ProtocolError(f"{what} nonce must be 8-128 characters, got {len(nonce)}")
    return UpdateMessage(
        **common,
        device_id=check_name("device_id", _require(header, what, "device_id", str)),
        nonce=nonce,
        num_samples=_require(header, what, "num_samples", int),
        telemetry=_optional(header, what, "telemetry", dict, {}),
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
    common = {"run_id": check_name("run_id", _require(header, what, "run_id", str)),
              "stage": _require(header, what, "stage", int), "round": _require(header, what, "round", int),
              "tensors": decode_tensors(body), "metrics": _optional(header, what, "metrics", dict, {})}
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
