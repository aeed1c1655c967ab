"""A fleet run's settings: deadlines, quorum, replacements, bounds, formats, artifact serving."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from edge_runtime import protocol as P
from edge_runtime.mqtt import MqttSettings
from edge_runtime.protocol import ARTIFACT_FORMATS
from server_sdk.config import DEFAULT_QUORUM, check_quorum
from server_sdk.fleet.broker import Credentials

log = logging.getLogger(__name__)


@dataclass
class FleetSettings:
    """How the coordinator talks to the fleet; saved as run_dir/fleet.json."""

    run_id: str = ""  # default: the run directory's name
    round_timeout_s: float = 120.0  # deadline of a round, from its control message
    quorum: float = DEFAULT_QUORUM  # fraction of sampled devices whose accepted updates a round needs
    max_update_norm: float | None = 1e3  # hard L2 bound on a delta, checked on arrival; None = unbounded
    norm_bound_k: float | None = 5.0  # refuse deltas over k x the round's lower median norm; None = off
    # refuse AdamW deltas longer than AdamW can move the trained tensors in the round's steps at its learning rate
    # (aggregation.adamw_norm_bound; no device can move it); also the floor of the adaptive bound above
    adamw_norm_bound: bool = True
    max_samples_per_update: int | None = None  # cap on an update's weight where no shard size is known
    artifact_bytes_per_s: float | None = 20e6  # chunk upload rate limit of the ArtifactServer
    export_template_dir: str | None = None  # cached per-shape exports (default: DEVFT_CACHE)
    # artifact formats served each stage: "onnx" (portable, plain onnxruntime), "ort" (legacy ONNX Runtime
    # Training, x86_64), "executorch". Only these: a device declaring none of them is refused at its hello (no
    # device-sent field changes what is exported). ["auto"], the old default, reads as ["onnx"].
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    per_tensor_checkpoint: bool = True  # legacy ort format: send the checkpoint as tensor files (cross-stage dedupe)
    device_names: dict[str, str] = field(default_factory=dict)  # client index -> device name overrides
    prefetch_next_stage: bool = True  # announce the guessed next stage's files during a stage's last round
    stage_ready_timeout_s: float = 60.0  # a stage's first round waits this long for devices' files; 0 = no wait
    trace_ahead: bool = True  # trace the later stages' onnx graphs in a background process from the run's start
    # at most this many replacement devices per round, sampled when devices seen offline leave the round unable
    # to reach its quorum; 0 = off (a round then fails with QuorumNotReached)
    replacements: int = 0
    # a sampled device must acknowledge a round (a status naming its round: devft-edge sends `busy` when the
    # train control arrives) within this many seconds, or it counts as lost for the round and is marked
    # unresponsive (later rounds and stage starts do not wait for it) until it sends a status again; None = off
    start_timeout_s: float | None = 10.0
    # measured peak memory (MiB) of a stage's training on the fleet's runtime, by the stage's layer count, e.g.
    # {"4": 524} from `python -m benchmarks.device`: a stage's memory need where given, else the peak predicted from
    # the model's shapes (export/memory.py). A device whose hello declares `ram_mb` below a stage's need is not
    # sampled for that stage (docs/protocol.md §11, "Memory")
    stage_peak_mb: dict[str, int] = field(default_factory=dict)
    # the broker's per-client queue bound (mosquitto's max_queued_bytes, fleet.json), where the CLI knows the fleet:
    # a stage whose round can send more update bytes at once than this is warned about at its start (the broker
    # drops what does not fit in the coordinator's queue, and the round waits out its deadline); None = unknown
    broker_queue_bytes: int | None = None
    # an HTTPS origin (server_sdk/fleet/origin.py): stage files are also copied to artifact_dir/<run>/<sha256>, which a web
    # server serves at artifact_origin + <run>/<sha256>, and descriptors name that URL; devices that know the field
    # download there (their own fleet login, checked per request against artifact_passwd, the fleet's password
    # file, and the run's devices), older ones keep fetching MQTT chunks. None = MQTT chunks only
    artifact_origin: str | None = None
    artifact_dir: str | None = None
    artifact_passwd: str | None = None
    # with an origin, False stops answering MQTT chunk requests: the files then reach only devices the origin lets
    # in (chunks are broadcast to every fleet device that subscribes), and devices that ignore `origin` get nothing
    artifact_chunks: bool = True
    # keep every stage's exported files under run_dir/artifacts (--keep-artifacts); False deletes a finished
    # stage's once the next stage is served (disk.prune_finished_stages)
    keep_artifacts: bool = False

    def validate(self) -> FleetSettings:
        """Raise ValueError naming the first bad setting, section by section."""
        for check in (_check_round_policy, _check_formats, _check_update_bounds, _check_artifact_serving,
                      _check_stage_memory):
            check(self)
        return self


def _check_round_policy(s: FleetSettings) -> None:
    """Quorum, deadlines and replacements: when a round closes and with whom."""
    check_quorum(s.quorum)
    if s.round_timeout_s <= 0:
        raise ValueError(f"round_timeout_s={s.round_timeout_s} must be positive")
    if not s.stage_ready_timeout_s >= 0:
        raise ValueError(f"stage_ready_timeout_s={s.stage_ready_timeout_s} must be 0 (do not wait for devices' "
                         "files at a stage start) or a positive number of seconds, e.g. 60")
    if isinstance(s.replacements, bool) or not isinstance(s.replacements, int) or s.replacements < 0:
        raise ValueError(f"replacements={s.replacements!r} must be a whole number >= 0: at most that many "
                         "replacement devices per round when sampled devices go offline (0 = none)")
    if s.start_timeout_s is not None and not s.start_timeout_s > 0:
        raise ValueError(f"start_timeout_s={s.start_timeout_s} must be a positive number of seconds (e.g. 10) "
                         "or None (wait for silent devices until the deadline)")


def _check_formats(s: FleetSettings) -> None:
    if s.formats == ["auto"]:  # fleet.json of runs started before formats were fixed at start
        s.formats = ["onnx"]
    bad = [f for f in s.formats if f not in ARTIFACT_FORMATS]
    if bad or not s.formats:
        raise ValueError(f"formats={s.formats} must be a non-empty list of {ARTIFACT_FORMATS}")


def _check_update_bounds(s: FleetSettings) -> None:
    """The bounds every device update is checked against on arrival."""
    if s.max_update_norm is not None and s.max_update_norm <= 0:
        raise ValueError(f"max_update_norm={s.max_update_norm} must be positive (or None for no bound)")
    if s.norm_bound_k is not None and s.norm_bound_k < 1:
        raise ValueError(f"norm_bound_k={s.norm_bound_k} must be at least 1 (e.g. 5), or None to turn the "
                         "adaptive norm bound off")
    if s.max_samples_per_update is not None and s.max_samples_per_update < 1:
        raise ValueError(f"max_samples_per_update={s.max_samples_per_update} must be a positive integer")


def _check_artifact_serving(s: FleetSettings) -> None:
    """Where devices fetch stage files: MQTT chunks, an HTTPS origin, or both."""
    if s.artifact_origin is not None:
        if not (s.artifact_origin.startswith("https://") and s.artifact_dir):
            raise ValueError(f"artifact_origin={s.artifact_origin!r} needs an https:// URL and artifact_dir, the "
                             "directory its web server serves (--artifacts URL --artifact-dir DIR)")
        P.check_origin(s.artifact_origin.rstrip("/") + "/")
    elif not s.artifact_chunks:
        raise ValueError("artifact_chunks=False (--no-mqtt-chunks) needs an artifact origin (--artifacts): "
                         "devices would have nowhere to fetch stage files from")


def _check_stage_memory(s: FleetSettings) -> None:
    for layers, mb in s.stage_peak_mb.items():
        if not str(layers).isdigit() or isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
            raise ValueError(f"stage_peak_mb={s.stage_peak_mb!r}: map a stage's layer count to its measured "
                             "peak in whole MiB, e.g. {\"4\": 524}")


def mqtt_settings(creds: Credentials, client_id: str, host: str | None = None, port: int | None = None,
                  **overrides) -> MqttSettings:
    return MqttSettings(host=host or creds.host, port=port or creds.port, username=creds.username,
                        password=creds.password, ca_file=creds.ca_file, client_id=client_id,
                        reconnect_min_s=0.2, reconnect_max_s=2.0, **overrides)
