"""The control message (server -> all devices, retained): what to train this round, on which artifacts, with
which settings, which devices were refused and why. Part of edge_runtime/protocol.py, which re-exports it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.protocol_base import (
    ARTIFACT_FORMATS,
    CONTROL_STATES,
    MAX_CHUNK_BYTES,
    MAX_CONTROL_BYTES,
    MAX_SEED,
    OPTIMIZERS,
    PROTOCOL_VERSION,
    ProtocolError,
    check_name,
    check_origin,
    check_sha256,
)
from edge_runtime.protocol_framing import dump_json, load_stateful, optional_field, require_field

MAX_REFUSAL_CHARS = 400  # a control message's refused[device]


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
        path = require_field(obj, what, "path", str)
        if path.startswith("/") or ".." in path.split("/") or not path:
            raise ProtocolError(f"{what} path {path!r} must be relative and stay inside the artifact")
        entry = FileEntry(
            path=path,
            sha256=check_sha256(require_field(obj, what, "sha256", str)),
            size=require_field(obj, what, "size", int),
            chunk_size=require_field(obj, what, "chunk_size", int),
            chunks=tuple(check_sha256(c) for c in require_field(obj, what, "chunks", list)),
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
        files = tuple(FileEntry.from_json(f) for f in require_field(obj, what, "files", list))
        origin = optional_field(obj, what, "origin", str, None)
        return ArtifactDescriptor(artifact_id=require_field(obj, what, "artifact_id", str), files=files,
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
        lr = float(require_field(obj, what, "lr", (int, float)))
        if not (math.isfinite(lr) and lr > 0):
            raise ProtocolError(f"{what} lr must be a positive finite number, got {lr}")
        ints = {k: require_field(obj, what, k, int) for k in ("local_steps", "batch_size")}
        if any(v < 1 for v in ints.values()):
            raise ProtocolError(f"{what} local_steps and batch_size must be at least 1, got {ints}")
        trainable = require_field(obj, what, "trainable", list)
        if not trainable or not all(isinstance(t, str) for t in trainable):
            raise ProtocolError(f"{what} trainable must be a non-empty array of tensor names")
        seeds = require_field(obj, what, "seeds", dict)
        for device, seed in seeds.items():
            check_name("device_id in seeds", device)
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
                raise ProtocolError(f"{what} seed of {device} must be an integer in [0, 2^53 - 1] (exact as a JSON "
                                    f"number in every language), got {seed!r}")
        optimizer = optional_field(obj, what, "optimizer", str, "adamw")
        if optimizer not in OPTIMIZERS:
            raise ProtocolError(f"{what} optimizer {optimizer!r} is not one of {OPTIMIZERS}")
        micro = optional_field(obj, what, "micro_batch", int, None)
        if micro is not None and not 1 <= micro <= ints["batch_size"]:
            raise ProtocolError(f"{what} micro_batch must be a whole number in [1, batch_size={ints['batch_size']}], "
                                f"got {micro}")
        return TrainSettings(lr=lr, trainable=tuple(trainable), seeds=dict(seeds),
                             session=require_field(obj, what, "session", str), optimizer=optimizer, micro_batch=micro,
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
    data = dump_json(obj)
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message is {len(data)} bytes, over {MAX_CONTROL_BYTES}")
    return data

def decode_control(data: bytes) -> ControlMessage:
    what = "control message"
    obj, state = load_stateful(data, what, MAX_CONTROL_BYTES, CONTROL_STATES)
    clients = optional_field(obj, what, "sampled_clients", list, [])
    hyper = obj.get("hyperparams")
    if state == "train" and hyper is None:
        raise ProtocolError(f"{what} in state 'train' has no hyperparams")
    return ControlMessage(
        run_id=check_name("run_id", require_field(obj, what, "run_id", str)),
        stage=require_field(obj, what, "stage", int),
        round=require_field(obj, what, "round", int),
        state=state,
        sampled_clients=tuple(check_name("sampled client", c) for c in clients),
        deadline_unix=optional_field(obj, what, "deadline_unix", (int, float), None),
        hyperparams=TrainSettings.from_json(hyper) if hyper is not None else None,
        artifacts=_decode_artifacts(obj, what, "artifacts"),
        prefetch=_decode_artifacts(obj, what, "prefetch"),
        refused=_decode_refused(obj, what),
    )


def _decode_refused(obj: Mapping[str, Any], what: str) -> dict[str, str]:
    """A control message's `refused` field: {device id: why, at most MAX_REFUSAL_CHARS}; absent or null = {}."""
    refused = optional_field(obj, what, "refused", dict, {})
    for device, why in refused.items():
        check_name("refused device", device)
        if not isinstance(why, str) or len(why) > MAX_REFUSAL_CHARS:
            raise ProtocolError(f"{what} refused[{device!r}] must be a string of at most {MAX_REFUSAL_CHARS} "
                                "characters")
    return dict(refused)


def _decode_artifacts(obj: Mapping[str, Any], what: str, key: str) -> dict[str, ArtifactDescriptor]:
    """A control message's {format: descriptor} field `key` (artifacts, prefetch); absent or null = {}."""
    offer = optional_field(obj, what, key, dict, {})
    unknown = sorted(set(offer) - set(ARTIFACT_FORMATS))
    if unknown:
        raise ProtocolError(f"{what} {key} offers unknown artifact formats {unknown}; known: {ARTIFACT_FORMATS}")
    return {fmt: ArtifactDescriptor.from_json(desc) for fmt, desc in offer.items()}
