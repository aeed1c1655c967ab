"""The coordinator side of a real fleet: stage artifacts and global LoRA out over MQTT, device updates in.

`FleetExecutor` plugs into the one round loop (`rounds.run`) in place of the
in-process executor. Per stage it exports the submodel as ONNX Runtime Training
artifacts and serves them chunk by chunk; per round it publishes the global LoRA
and a control message, then collects, validates and returns the device updates.

Device names and shards: client index `c` (the data shard `data/client_{c:03d}.jsonl`)
is the device named `dev-{c:03d}`; `client_index` reads any trailing number, so a
fleet provisioned as `dev1`, `dev2` maps to clients 1 and 2.

Round policy (docs/protocol.md, "Coordinator"): a round ends when every sampled
device's update was accepted or the device was seen offline (its MQTT will, a retained
`offline` status) and the quorum is met, or at the deadline (`round_timeout_s` after
the control message).
Then updates whose norm is more than `norm_bound_k` times the round's lower median
norm are refused (`norm_outlier`), and each update's weight is its claimed
`num_samples` capped by the shard the coordinator wrote for that client (or
`max_samples_per_update`, or else the round's lower median claim).
Stage starts (docs/protocol.md §11, "Prefetch"): during a stage's last round the coordinator
announces its guess at the next stage's files as a `prefetch` hint (server_sdk/fleet/prefetch.py; a
guess still exporting when the round's updates are in is announced while the round is aggregated
and evaluated, and `evaluate` waits for it), and a stage's first round opens once every live
device reported the stage's files ready, or after `stage_ready_timeout_s`.
With `replacements` > 0, once sampled devices seen offline leave the round unable to reach its
quorum, the coordinator samples up to that many replacement devices (`choose_replacements`: live,
not yet in the round, holding the stage's files first; drawn from the run seed, the stage's draw key
and the round) and republishes the round's train control with them added, same deadline; their
updates pass the same checks. The quorum stays `ceil(quorum * sampled)` of the original sample.
With fewer than `ceil(quorum * sampled)` accepted updates the round fails
with `QuorumNotReached`; the checkpoint still holds the previous round, so
`devft serve --resume` (or `devft run --resume`) repeats it. Retrying in-process would
only wait for the same absent devices again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from edge_runtime import protocol as P
from edge_runtime.mqtt import Message, MqttClient, MqttSettings, wait_published
from edge_runtime.protocol import ARTIFACT_FORMATS
from export import StageInfo, export_artifacts
from export.common import json_config
from export.memory import predicted_peak_mb
from server_sdk.config import ConfigError, RunConfig
from server_sdk.data import Example
from server_sdk.engine.executor import ClientExecutor, QuorumNotReached
from server_sdk.engine.model import cache_root, smollm2_cache_dir
from server_sdk.engine.warm import TemplateWarmer
from server_sdk.fleet.artifact_server import ArtifactServer
from server_sdk.fleet.broker import Credentials, artifact_credentials
from server_sdk.fleet.janitor import RetainedJanitor
from server_sdk.fleet.origin import OriginAuth, OriginPublisher
from server_sdk.fleet.prefetch import Speculate, Speculation
from server_sdk.fleet.ratelimit import LogBudget, cut
from server_sdk.fleet.telemetry_intake import clean_telemetry, number
from server_sdk.method.aggregation import FedAvgSum, RoundResults, adamw_norm_bound, cap_samples, lower_median, norm_outliers
from server_sdk.method.lora import LoraState, to_peft_key
from server_sdk.method.strategies.base import ClientResult
from server_sdk.method.submodel import StagePlan
from server_sdk.progress import note

log = logging.getLogger(__name__)

_TRAILING_NUMBER = re.compile(r"(\d+)$")


# An "offline" status (a device's will) lets a round stop waiting for that device OFFLINE_CONFIRM_S after it
# arrived, unless the device said hello meanwhile. A restarting broker publishes the wills of every device,
# though devices come straight back; so while our own connection is down no device counts as offline, and
# a will that arrived within RESTART_GRACE_S of our own reconnect counts only RESTART_GRACE_S after it
# (a device killed during a broker restart costs that, not the deadline).
OFFLINE_CONFIRM_S = 1.0
RESTART_GRACE_S = 10.0
# the guess at the next stage (prefetch) starts once the round's devices report they started training, or
# after this long: its export would otherwise compete with their start on a machine they share
GUESS_AFTER_START_MAX_S = 1.0


class StageDoesNotFit(QuorumNotReached):
    """No connected device declares the memory a stage needs: no round of it can reach a quorum, so it fails at
    once, naming the stage, its need and the largest budget a device declared (rather than waiting out deadlines)."""


# at most this many devices are named in the control message's `refused` (each entry <= 400 characters); the
# fleet's ACL binds a status topic to its login, so only provisioned devices can get there
MAX_TOLD = 1000
RETELL_S = 10.0  # an unchanged refusal is republished at most this often per device (docs/protocol.md §11, "Memory")


# an update message waits in the coordinator's inbox only while its round is open and its sender sampled; each
# sampled device may have this many of the round's largest updates waiting at once (its update and a QoS 1
# redelivery of it), counted in bytes
MAX_QUEUED_PER_DEVICE = 2


@dataclass
class RoundGate:
    """What the open round takes into the inbox as updates arrive (on paho's thread, before any decoding):
    messages of `wanted` devices up to `limit` bytes, at most MAX_QUEUED_PER_DEVICE x `limit` bytes waiting per
    device. So the inbox holds at most sampled devices x MAX_QUEUED_PER_DEVICE x limit bytes, whatever devices
    publish."""

    wire_round: int
    wanted: set[str]
    limit: int  # bytes of an update of this round: the expected tensors plus a header
    norm_bound: float | None  # adamw_norm_bound of the round (None: the optimiser gives none)
    queued: Counter[str] = field(default_factory=Counter)  # bytes waiting in the inbox, per device


def device_name(client: int) -> str:
    """The device that holds client shard `client`."""
    return f"dev-{client:03d}"


def client_index(device: str) -> int:
    """`dev-003` -> 3 (any trailing number); raises ValueError for a name without one."""
    m = _TRAILING_NUMBER.search(device)
    if not m:
        raise ValueError(f"device name {device!r} has no trailing shard number; name devices dev-000, dev-001, ...")
    return int(m.group(1))


def replacement_order(seed: int, key: int, rnd: int, num_clients: int) -> list[int]:
    """Every client, in the order replacements for round `rnd` of the stage whose draw key is `key` are tried
    (a draw of its own, independent of rounds.sample_clients')."""
    rng = np.random.default_rng([seed, 23, key, rnd])
    return [int(c) for c in rng.permutation(num_clients)]


def choose_replacements(order: Sequence[str], taken: Collection[str], live: Collection[str],
                        ready: Collection[str], n: int) -> list[str]:
    """Up to `n` devices of `order` that are `live` and not `taken` (already in the round), those `ready`
    (holding the stage's files) first, each group in `order`."""
    free = [d for d in order if d in live and d not in taken]
    return ([d for d in free if d in ready] + [d for d in free if d not in ready])[:max(n, 0)]


@dataclass
class FleetSettings:
    """How the coordinator talks to the fleet; saved as run_dir/fleet.json."""

    run_id: str = ""  # default: the run directory's name
    round_timeout_s: float = 120.0  # deadline of a round, from its control message
    quorum: float = 0.6  # fraction of sampled devices whose accepted updates a round needs
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

    def validate(self) -> FleetSettings:
        if self.formats == ["auto"]:  # fleet.json of runs started before formats were fixed at start
            self.formats = ["onnx"]
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum={self.quorum} must lie in (0, 1], e.g. 0.6")
        if self.round_timeout_s <= 0:
            raise ValueError(f"round_timeout_s={self.round_timeout_s} must be positive")
        bad = [f for f in self.formats if f not in ARTIFACT_FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats={self.formats} must be a non-empty list of {ARTIFACT_FORMATS}")
        if self.max_update_norm is not None and self.max_update_norm <= 0:
            raise ValueError(f"max_update_norm={self.max_update_norm} must be positive (or None for no bound)")
        if self.norm_bound_k is not None and self.norm_bound_k < 1:
            raise ValueError(f"norm_bound_k={self.norm_bound_k} must be at least 1 (e.g. 5), or None to turn the "
                             "adaptive norm bound off")
        if self.max_samples_per_update is not None and self.max_samples_per_update < 1:
            raise ValueError(f"max_samples_per_update={self.max_samples_per_update} must be a positive integer")
        if not self.stage_ready_timeout_s >= 0:
            raise ValueError(f"stage_ready_timeout_s={self.stage_ready_timeout_s} must be 0 (do not wait for devices' "
                             "files at a stage start) or a positive number of seconds, e.g. 60")
        if isinstance(self.replacements, bool) or not isinstance(self.replacements, int) or self.replacements < 0:
            raise ValueError(f"replacements={self.replacements!r} must be a whole number >= 0: at most that many "
                             "replacement devices per round when sampled devices go offline (0 = none)")
        if self.artifact_origin is not None:
            if not (self.artifact_origin.startswith("https://") and self.artifact_dir):
                raise ValueError(f"artifact_origin={self.artifact_origin!r} needs an https:// URL and artifact_dir, the "
                                 "directory its web server serves (--artifacts URL --artifact-dir DIR)")
            P.check_origin(self.artifact_origin.rstrip("/") + "/")
        elif not self.artifact_chunks:
            raise ValueError("artifact_chunks=False (--no-mqtt-chunks) needs an artifact origin (--artifacts): "
                             "devices would have nowhere to fetch stage files from")
        if self.start_timeout_s is not None and not self.start_timeout_s > 0:
            raise ValueError(f"start_timeout_s={self.start_timeout_s} must be a positive number of seconds (e.g. 10) "
                             "or None (wait for silent devices until the deadline)")
        for layers, mb in self.stage_peak_mb.items():
            if not str(layers).isdigit() or isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
                raise ValueError(f"stage_peak_mb={self.stage_peak_mb!r}: map a stage's layer count to its measured "
                                 "peak in whole MiB, e.g. {\"4\": 524}")
        return self


def mqtt_settings(creds: Credentials, client_id: str, host: str | None = None, port: int | None = None,
                  **overrides) -> MqttSettings:
    return MqttSettings(host=host or creds.host, port=port or creds.port, username=creds.username,
                        password=creds.password, ca_file=creds.ca_file, client_id=client_id,
                        reconnect_min_s=0.2, reconnect_max_s=2.0, **overrides)


class FleetExecutor(ClientExecutor):
    """Clients are devices reached over MQTT; see the module docstring for the round policy."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, creds: Credentials, stage_rounds: list[int],
                 settings: FleetSettings | None = None, *, host: str | None = None, port: int | None = None,
                 tokenizer_dir: str | Path | None = None, connect_timeout_s: float = 30.0,
                 shard_sizes: Mapping[int, int] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.settings = (settings or FleetSettings()).validate()
        self.run_id = P.check_name("run_id", self.settings.run_id or self.run_dir.name)
        self.tokenizer_dir = tokenizer_dir
        self.schedule = list(stage_rounds)  # rounds per stage; the round loop's own list once it calls follow_schedule
        self.session = secrets.token_hex(8)  # this coordinator process; devices retrain after a restart
        self.events_path = self.run_dir / "fleet_events.jsonl"
        self.rejections: Counter[str] = Counter()
        self.device_status: dict[str, dict] = {}
        self.shard_sizes = dict(shard_sizes or {})  # client -> examples in the shard this coordinator wrote
        self._offline: dict[str, float] = {}  # device whose last status is "offline" -> when that arrived
        self._status_lock = threading.Lock()
        # every accepted status bumps _status_seq and notifies _status_changed: the stage-ready wait and the
        # next-stage guess wake on it instead of polling
        self._status_changed = threading.Condition(self._status_lock)
        self._status_seq = 0
        # liveness of sampled devices (start_timeout_s), under _status_lock: the wire round open now, when each
        # device of it was asked (sampled, or drawn as a replacement), who acknowledged it, and the devices
        # marked unresponsive (-> when), which no round or stage start waits for until they send a status again
        self._open_round: int | None = None
        self._asked: dict[str, float] = {}
        self._acked: set[str] = set()
        self._silent: dict[str, float] = {}
        self._heard: dict[str, float] = {}  # device -> when its last status arrived (this coordinator's clock)
        self._idle_at = 0.0  # when the current stage's idle control went out
        self._refused: dict[str, tuple] = {}  # device -> the formats it offered, none of them served
        # what a device can make the coordinator write over and over is bounded per (device, reason) (ratelimit.py)
        self._log_budget = LogBudget()
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._weights_refused: set[str] = set()  # devices refused at hello for the run's weight scheme
        self._gate: RoundGate | None = None  # the open round's intake; None between rounds
        self._gate_lock = threading.Lock()
        self._artifacts: dict[str, P.ArtifactDescriptor] = {}
        self._stage = -1
        self._draw_key = 0  # the current stage's StagePlan.draw_key: keys replacement draws and their seeds
        self._control: P.ControlMessage | None = None  # the current round's train control, as last published
        # the prefetch hint, replacements and refusals all republish it; every control goes out under it
        self._control_lock = threading.RLock()
        self._last_control: P.ControlMessage | None = None  # as last published (refusals republish it)
        # memory (docs/protocol.md §11, "Memory"): the current stage's need, every stage's need by layer count,
        # each device's checked capabilities, and the devices refused with why (told in every control message)
        self._need: dict | None = None
        self._run_needs: dict[int, dict] = {}
        self._caps: dict[str, dict] = {}
        self._told: dict[str, str] = {}
        self._told_at: dict[str, float] = {}  # device -> when its refusal last went out
        self._tell_wake = threading.Event()
        self._closing = threading.Event()
        self._next_guess: tuple[int, Speculate] | None = None  # set by prefetch_stage for the next train_round
        self._speculation: Speculation | None = None
        self._warmer: TemplateWarmer | None = None
        self._last_global: str | None = None
        self._rounds_done = 0  # the wire round after the last one completed
        self._run_finished = False  # the round loop ran the run's last round (run_finished): close() says done
        self._nonces: set[str] = set()  # of accepted updates, for the whole run (this process)
        self._digests: dict[str, str] = {}  # nonce -> sha256 of the accepted payload
        self._events_lock = threading.Lock()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "fleet.json").write_text(json.dumps(asdict(self.settings), indent=1) + "\n")

        self.client = MqttClient(mqtt_settings(creds, f"{creds.username}-{self.run_id}", host, port))
        self.client.subscribe(P.update_topic(self.run_id, "+"), self._on_update)
        self.client.subscribe(P.status_topic(self.run_id, "+"), self._on_status)
        self.client.connect(connect_timeout_s)
        self.janitor = RetainedJanitor(self.client, self.run_id, on_clear=self._retained_cleared).start()  # janitor.py
        # chunks go out on their own connection so they never delay control messages or updates; the broker
        # binds client ids to usernames, so that connection logs in as the coordinator's second user
        art_creds = artifact_credentials(creds)
        self._art_client = MqttClient(mqtt_settings(art_creds, f"{art_creds.username}-{self.run_id}", host, port))
        self._art_client.connect(connect_timeout_s)
        self.artifacts = ArtifactServer(self._art_client, self.run_id, max_bytes_per_s=self.settings.artifact_bytes_per_s)
        if self.settings.artifact_chunks:  # else it only describes files: no chunk request is answered
            self.artifacts.start()
        self._teller = threading.Thread(target=self._tell_loop, name="fleet-refusals", daemon=True)
        self._teller.start()
        self.origin: OriginPublisher | None = None
        self.origin_auth: OriginAuth | None = None
        if self.settings.artifact_origin:
            self._start_origin(creds)

    def _start_origin(self, creds: Credentials) -> None:
        """Publish stage files to the HTTPS origin as well, and answer its per-download access checks: a device may
        download while it is one of the run's devices and its fleet login holds (server_sdk/fleet/origin.py)."""
        s = self.settings
        passwd = Path(s.artifact_passwd) if s.artifact_passwd else Path(creds.ca_file or ".").parent / "passwd"
        if not passwd.is_file():
            raise ValueError(f"the artifact origin checks device logins against the fleet's password file; {passwd} "
                             "does not exist (set artifact_passwd to FLEET_DIR/passwd)")
        enrolled = frozenset(self.device_of(c) for c in range(self.cfg.num_clients))
        self.origin = OriginPublisher(s.artifact_dir, s.artifact_origin, self.run_id)
        self.origin_auth = OriginAuth(s.artifact_dir, self.run_id, passwd, lambda: enrolled).start()

    def _offer(self, files: Mapping[str, Path]) -> P.ArtifactDescriptor:
        """Register files with the MQTT chunk server and, with an origin, publish them there; the descriptor."""
        descriptor = self.artifacts.add_files(files)
        return self.origin.publish(descriptor, dict(files)) if self.origin is not None else descriptor

    # -- naming ---------------------------------------------------------------------------

    def device_of(self, client: int) -> str:
        return self.settings.device_names.get(str(client)) or device_name(client)

    def follow_schedule(self, rounds: list[int]) -> None:
        """Number wire rounds by the round loop's schedule, which it changes in place when the strategy moves a
        stage's leftover rounds to the next stage (`schedule=auto`), and restores on a resume."""
        self.schedule = rounds

    def wire_round(self, stage: int, rnd: int) -> int:
        """Rounds are numbered across stages on the wire, so every global topic is used once: the rounds the
        stages before ran, plus the round. A replanned stage's rounds shift the next stage's numbers with it
        (numbering by the first schedule made a stage that took over leftover rounds overlap the next one); the
        number is the run's round count before this round, as report.json counts rounds."""
        return sum(self.schedule[:stage]) + rnd

    # -- stage ------------------------------------------------------------------------------

    def stage_formats(self) -> list[str]:
        """The formats to export each stage: those the coordinator was started with (`formats`), never what
        devices declare (a hello declaring only `ort` once made it export a format it could not build)."""
        return list(self.settings.formats)

    def begin_stage(self, stage: int, plan: StagePlan, sub_model) -> int:
        """Export the stage's submodel in every format the fleet needs, serve it, and wait (at most
        `stage_ready_timeout_s`) until the devices hold it."""
        self._finish_speculation()
        dirs, seconds = self._export(stage, plan, sub_model, "")
        config = json_config(sub_model)
        total = self.serve_stage(stage, dirs, self.stage_need(config, int(config["num_hidden_layers"])),
                                 export_s=seconds)
        self._draw_key = plan.draw_key  # rounds.py's key of the stage's client draws and seeds
        self._await_ready(stage, plan.draw_key)
        return total

    def expect_stages(self, config: dict, stage_sizes: list[int]) -> None:
        """Trace the graphs of the stages after the first in a background process (server_sdk/engine/warm.py): on a
        machine's first run that is most of each stage start, and the first stage's rounds hide it."""
        self._run_needs = {n: self.stage_need(config, n) for n in stage_sizes}
        for device in list(self._caps):  # hellos that came before the needs were known
            self._check_memory(device)
        if self.settings.trace_ahead and "onnx" in self.stage_formats() and len(stage_sizes) > 1:
            self._warmer = TemplateWarmer(config, stage_sizes[1:], self.cfg.lora, self.cfg.seq_len,
                                          self.settings.export_template_dir or cache_root()).start()

    def _export(self, stage: int, plan: StagePlan, sub_model, prefix: str) -> tuple[dict[str, Path], dict]:
        """The stage's artifacts per format under artifacts/stage<N>/<prefix><format>; seconds each took."""
        dirs, seconds = {}, {}
        for fmt in self.stage_formats():
            t0 = time.perf_counter()
            dirs[fmt] = export_artifacts(
                fmt, sub_model, self.run_dir / "artifacts" / f"stage{stage}" / f"{prefix}{fmt}",
                StageInfo(run_id=self.run_id, stage=stage, groups=plan.groups, anchors=plan.anchors,
                          tokenizer_dir=self.tokenizer_dir),
                seq_len=self.cfg.seq_len, template_root=self.settings.export_template_dir or cache_root(),
                weights=self.cfg.weights if fmt == "onnx" else "fp32")  # others: the dequantized values, as fp32
            seconds[fmt] = round(time.perf_counter() - t0, 2)
        return dirs, seconds

    # -- prefetch ---------------------------------------------------------------------------

    def prefetch_stage(self, stage: int, speculate: Speculate) -> None:
        """The next train_round (a stage's last) also guesses stage `stage` and announces its files as a hint."""
        if self.settings.prefetch_next_stage:
            self._next_guess = (stage, speculate)

    def _devices_started(self, devices: Collection[str], wr: int, timeout_s: float = GUESS_AFTER_START_MAX_S) -> None:
        """Return once every one of `devices` has reported a status of wire round `wr` (`busy` when it starts
        training) or gone offline, or after timeout_s. The guess at the next stage waits here: its export takes
        the CPU for a second or more, and on a machine it shares with devices (a local fleet) it would delay
        their start. A device's status only times this background work; a device that never reports delays
        the guess by timeout_s at most."""
        def started() -> bool:
            return all(self.device_status.get(d, {}).get("round") == wr or d in self._offline or d in self._silent
                       for d in devices)

        with self._status_changed:
            self._status_changed.wait_for(started, timeout=timeout_s)

    def _start_speculation(self, wait: Callable[[], object] | None = None) -> None:
        if self._next_guess is None:
            return
        stage, speculate = self._next_guess
        self._next_guess = None

        def announce(plan: StagePlan, sub_model) -> None:
            t0 = time.perf_counter()
            dirs, _ = self._export(stage, plan, sub_model, "prefetch-")
            hint = {fmt: self._offer(_served_files(fmt, d, stage, False)) for fmt, d in dirs.items()}
            self._event("prefetch", stage=stage, groups=plan.groups, seconds=round(time.perf_counter() - t0, 2),
                        artifacts={f: {"artifact_id": d.artifact_id, "bytes": d.total_bytes} for f, d in hint.items()})
            self._update_control(lambda c: replace(c, prefetch=hint))

        self._speculation = Speculation(stage, speculate, announce, wait=wait).start()

    def _finish_speculation(self) -> None:
        """Wait until the guess at the next stage is announced, then let the round's train control go.

        A round's updates do not wait for its guess: the guess may still be exporting while the round loop
        aggregates and evaluates (which draw no random numbers and only read the frozen weights the guess
        shares), and `evaluate` calls this before the loop goes on to plan the next stage, so the run's
        numbers are those of a run without prefetch. `begin_stage`, `train_round` and `close` call it too."""
        if self._speculation is not None:
            self._speculation.join(1.0)
            if self._speculation.running():  # say why the run does not go on although the round's devices answered
                note(f"preparing stage {self._speculation.stage + 1}'s files so devices can fetch "
                     "them early (a machine's first trace of a new graph shape can take minutes; later runs reuse it)")
                self._speculation.join()
            self._speculation = None
        with self._control_lock:
            self._control = None  # the round is over: nothing republishes its train control any more

    def evaluate(self, *args, **kwargs) -> dict:
        """ClientExecutor.evaluate, here; then wait for the guess at the next stage (`_finish_speculation`)."""
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._finish_speculation()

    def _await_ready(self, stage: int, draw_key: int) -> None:
        """Wait until the live devices and those the stage's first round samples reported this stage's files
        ready (`info.ready` in a status), at most `stage_ready_timeout_s`, so the stage's first round does not
        start while devices still download."""
        timeout = self.settings.stage_ready_timeout_s
        if not timeout:
            return
        from server_sdk.engine.rounds import sample_clients

        first = {self.device_of(c) for c in sample_clients(self.cfg, draw_key, 0, self._pool())}
        t0 = time.time()
        while True:
            seen = self._status_seq  # read before looking: a status arriving meanwhile wakes the wait below
            waiting = self._not_ready(first)
            if self._mark_silent_at_stage_start(stage, waiting):
                waiting = self._not_ready(first)
            left = timeout - (time.time() - t0)
            if not waiting or left <= 0:
                break
            # a device's `ready` status wakes this at once; a device seen offline counts only OFFLINE_CONFIRM_S
            # after its will arrived, which no message announces: look again at least every 0.25 s
            with self._status_changed:
                self._status_changed.wait_for(lambda seen=seen: self._status_seq != seen, timeout=min(left, 0.25))
        self._event("stage_ready", stage=stage, waited_s=round(time.time() - t0, 3), not_ready=sorted(waiting))
        if waiting:
            log.warning("stage %d: %s did not report its files ready within %.0f s; opening the round anyway", stage,
                        sorted(waiting), timeout)

    def _mark_silent_at_stage_start(self, stage: int, waiting: Collection[str]) -> bool:
        """Mark unresponsive the devices the stage start waits for that said something before the stage's idle
        control and nothing in the `start_timeout_s` since (devft-edge answers an idle control for files it lacks
        at once with a `hello` naming them in `info.fetching`). Devices never heard from are still waited for."""
        limit = self.settings.start_timeout_s
        since = self._heard_since()
        if limit is None or since is None or time.time() - max(self._idle_at, since) < limit:
            return False
        with self._status_lock:
            late = sorted(d for d in waiting if d in self._heard and self._heard[d] < self._idle_at)
            for d in late:
                self._silent[d] = time.time()
        for d in late:
            self._limited(("unresponsive", d), "stage %d: %s sent nothing within %.0f s of the stage's start "
                          "(start_timeout_s); not waiting for its files, nor in rounds until it sends a status",
                          (stage, d, limit), "unresponsive", device=d, stage=stage, start_timeout_s=limit)
        return bool(late)

    def _not_ready(self, expected: set[str]) -> set[str]:
        """Devices that said hello or are `expected`, are not offline or unresponsive, run a served format (as far
        as their hello says), and have not reported the stage's files ready."""
        offline = self._offline_now()
        with self._status_lock:
            statuses = {d: {} for d in expected} | dict(self.device_status)
            offline |= set(self._silent)
        return {device for device, st in statuses.items() if st.get("state") != "offline" and device not in offline
                and self._runs_served(st) and self._fits(device) and not self._holds_stage(st)}

    def _holds_stage(self, status: dict) -> bool:
        """Whether a device's status reports one of this stage's artifacts ready (`info.ready`, device-sent)."""
        ready = status.get("ready")
        return isinstance(ready, str) and ready in {d.artifact_id for d in self._artifacts.values()}

    def _runs_served(self, status: dict) -> bool:
        """Whether a device runs a format served this stage, as far as its hello says (none said: assume so);
        the portable format counts only if the device also runs the run's weight scheme (`runs_weights`)."""
        formats = status.get("formats")
        return not isinstance(formats, list) or any(f in self._artifacts and (f != "onnx" or self.runs_weights(status))
                                                    for f in formats if isinstance(f, str))

    def runs_weights(self, status: dict) -> bool:
        """Whether a device's hello declares the run's frozen-weight scheme (`weights`: comma-separated, device-sent).
        fp32 needs no declaration; a device that declares none (an older runtime) runs fp32 only."""
        declared = status.get("weights")
        return self.cfg.weights == "fp32" or (isinstance(declared, str) and self.cfg.weights in declared.split(","))

    def serve_stage(self, stage: int, artifact_dirs: Mapping[str, Path], memory: dict | None = None, **info) -> int:
        """Register a stage's artifact files (per format) with the chunk server and announce them (state idle).
        `memory` is the stage's memory need (`stage_need`; None: every device fits).

        Returns the bytes of the portable (or first) format: what one device downloads at most.
        Files travel as `_served_files` lays them out, so tensors unchanged since the last stage
        (the embedding) are not downloaded again."""
        self._finish_speculation()  # its late announce must not come after this stage's control
        self._artifacts = {fmt: self._offer(_served_files(fmt, Path(d), stage, self.settings.per_tensor_checkpoint))
                           for fmt, d in artifact_dirs.items()}
        if self.origin is not None:  # an earlier stage's files (and a wrong guess's) leave the origin
            self.origin.prune({f.sha256 for d in self._artifacts.values() for f in d.files})
        self._stage = stage
        self._need = memory
        self._draw_key = stage  # begin_stage then sets the plan's (serve_stage alone: tests)
        self._idle_at = time.time()  # devices that said hello before it must say something after it
        self._event("stage", stage=stage, artifacts={f: {"artifact_id": d.artifact_id, "bytes": d.total_bytes}
                                                     for f, d in self._artifacts.items()},
                    **({"memory": memory} if memory else {}), **info)
        # devices may start downloading while the first round is prepared
        self._publish_control(P.ControlMessage(self.run_id, stage, self.wire_round(stage, 0), "idle",
                                               artifacts=self._artifacts))
        return next(iter(self._artifacts.values())).total_bytes

    # -- round ------------------------------------------------------------------------------

    def train_round(self, stage: int, rnd: int, sampled: list[int], global_lora: LoraState,
                    is_trainable: Callable[[str], bool], seeds: dict[int, int]) -> list[ClientResult]:
        if stage != self._stage or not self._artifacts:
            raise RuntimeError(f"train_round for stage {stage} before begin_stage({stage})")
        self._finish_speculation()  # the last round's guess, when no evaluation came in between
        wr = self.wire_round(stage, rnd)
        names = {to_peft_key(k): k for k in global_lora}
        trained = sorted(p for p, k in names.items() if is_trainable(k))
        expected = {p: (tuple(global_lora[names[p]].shape), np.float32) for p in trained}
        wanted = {self.device_of(c): c for c in sampled}
        # an update is at most the expected tensors plus a header; anything larger is refused unread
        limit = len(P.encode_tensors({p: np.zeros(s, np.float32) for p, (s, _) in expected.items()})) \
            + P.MAX_HEADER_BYTES + 4
        numel = sum(math.prod(s) for s, _ in expected.values())

        body = {p: global_lora[k].detach().float().cpu().numpy() for p, k in names.items()}
        self._publish(P.global_topic(self.run_id, wr), P.encode_global(P.GlobalMessage(self.run_id, stage, wr, body)),
                      retain=True)
        if self._last_global is not None:  # retained globals of old rounds are dead weight for new devices
            self._publish(self._last_global, b"", retain=True)
        self._last_global = P.global_topic(self.run_id, wr)
        self._drain_stale()
        deadline = time.time() + self.settings.round_timeout_s
        hyper = P.TrainSettings(lr=self.cfg.lr, local_steps=self.cfg.local_steps, batch_size=self.cfg.batch_size,
                                trainable=tuple(trained), session=self.session, optimizer=self.cfg.optimizer,
                                seeds={self.device_of(c): int(seeds[c]) for c in sampled})
        with self._gate_lock:
            bound = adamw_norm_bound(hyper.lr, hyper.local_steps, numel) \
                if self.settings.adamw_norm_bound and hyper.optimizer == "adamw" else None
            self._gate = RoundGate(wr, set(wanted), limit, bound)
        silent = self._open(wr, wanted)
        with self._control_lock:
            self._control = P.ControlMessage(self.run_id, stage, wr, "train", tuple(wanted), deadline, hyper,
                                             self._artifacts)
            self._publish_control(self._control)
        self._event("round_start", stage=stage, round=wr, sampled=list(wanted), deadline=deadline,
                    **({"unresponsive": silent} if silent else {}))
        self._start_speculation(wait=lambda: self._devices_started(list(wanted), wr))
        try:
            return self._collect(stage, rnd, wr, wanted, expected, deadline)
        finally:
            with self._gate_lock:
                self._gate = None  # updates arriving from now on are refused on arrival, unqueued
            with self._status_lock:
                self._open_round, self._asked = None, {}
            if self._speculation is None:
                with self._control_lock:
                    self._control = None
            # else the guess announces itself on this round's train control when it is ready; see
            # _finish_speculation for who waits for it

    def _open(self, wr: int, wanted: Collection[str]) -> list[str]:
        """Open wire round `wr` for the liveness check (start_timeout_s): its devices are asked now, none has
        acknowledged it yet. Returns those of them marked unresponsive, which the round does not wait for."""
        with self._status_lock:
            self._open_round, self._acked = wr, set()
            self._asked = dict.fromkeys(wanted, time.time())
            silent = sorted(d for d in wanted if d in self._silent)
        if silent:
            log.warning("round %d: %s sampled but unresponsive since an earlier round; not waiting for them unless "
                        "they acknowledge this one", wr, silent)
        return silent

    def _mark_silent(self, accepted: Collection[str]) -> None:
        """Mark the devices of the open round that let `start_timeout_s` pass without acknowledging it (a status
        naming the round) or answering: unresponsive, until they send a status again."""
        limit = self.settings.start_timeout_s
        since = self._heard_since()
        if limit is None or since is None:
            return
        now = time.time()
        with self._status_lock:
            for d in accepted:  # an accepted update is a sign of life too
                self._silent.pop(d, None)
            late = sorted(d for d, asked in self._asked.items() if now - max(asked, since) >= limit
                          and d not in self._acked and d not in accepted and d not in self._silent
                          and d not in self._offline)
            for d in late:
                self._silent[d] = now
            wr = self._open_round
        for d in late:
            self._limited(("unresponsive", d), "round %s: %s did not acknowledge the round within %.0f s "
                          "(start_timeout_s); not waiting for it, nor in later rounds until it sends a status",
                          (wr, d, limit), "unresponsive", device=d, round=wr, start_timeout_s=limit)

    def _heard_since(self) -> float | None:
        """Since when this coordinator could hear devices: None while its connection is down, the reconnect
        time after one (statuses were held up meanwhile, as during a broker restart), else 0."""
        if not self.client.connected:
            return None
        return self.client.connected_at if self.client.reconnects else 0.0

    def _lost(self, wanted: Collection[str], accepted: Collection[str]) -> set[str]:
        """Devices of the round it need not wait for: seen offline (`_offline_now`), unresponsive (`_mark_silent`),
        or running no format served this stage (as their hello says)."""
        self._mark_silent(accepted)
        with self._status_lock:
            silent = set(self._silent)
            statuses = {d: self.device_status.get(d, {}) for d in wanted}
        unserved = {d for d, st in statuses.items() if not (self._runs_served(st) and self._fits(d))}
        return ((self._offline_now() | silent) & set(wanted)) | unserved

    def _update_control(self, change: Callable[[P.ControlMessage], P.ControlMessage]) -> None:
        """Republish the round's train control with `change` applied (the prefetch hint, replacements), one change
        at a time so neither undoes the other."""
        with self._control_lock:
            if self._control is not None:
                self._control = change(self._control)
                self._publish_control(self._control)

    def _collect(self, stage: int, rnd: int, wr: int, wanted: dict[str, int], expected: dict,
                 deadline: float) -> list[ClientResult]:
        """Take updates until the round may close, then apply the round-level checks and the quorum.

        Under FedAvg each accepted delta goes into the round's running sum at once (RoundResults.folded) when
        no round-level check can still refuse or reweigh it; the results then carry no deltas."""
        gate = self._gate
        fold = FedAvgSum() if self._folds(gate) else None
        accepted: dict[str, ClientResult] = {}
        norms: dict[str, float] = {}
        nonces = self._nonces
        sampled = len(wanted)
        need = math.ceil(self.settings.quorum * sampled)  # of the original sample, replacements or not
        wanted = dict(wanted)  # replacements join it
        replaced: dict[str, str] = {}  # replacement device -> the device it stands in for
        while True:
            if self.settings.replacements:
                self._replace_lost(wr, rnd, wanted, accepted, need, replaced)
            if not self._still_waiting(wanted, accepted, need):
                break
            left = deadline - time.time()
            if left <= 0:
                break
            try:
                msg = self._inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            with self._gate_lock:
                gate.queued[msg.topic.rsplit("/", 1)[-1]] -= len(msg.payload)
            answer = self._handle_update(msg, stage, wr, wanted, expected, nonces, accepted, gate)
            if answer is not None:
                result, norm = answer
                if self.device_of(result.client) in replaced:
                    result.telemetry["replaces"] = replaced[self.device_of(result.client)]
                if fold is not None:
                    fold.add(result.num_samples, result.delta)
                    result = replace(result, delta={})
                accepted[self.device_of(result.client)] = result
                norms[self.device_of(result.client)] = norm
        if fold is None:  # else (_folds) neither can change anything
            self._refuse_norm_outliers(accepted, norms, wr, gate.norm_bound)
            self._cap_unknown_weights(accepted)
        missing = sorted(set(wanted) - set(accepted))
        offline = sorted(set(missing) & self._offline_now())
        self._event("round_end", stage=stage, round=wr, accepted=sorted(accepted), missing=missing, offline=offline,
                    **self._silent_of(missing),
                    quorum=need, weights={d: r.num_samples for d, r in sorted(accepted.items())},
                    **({"replacements": replaced} if replaced else {}))
        if len(accepted) < need:
            spare = (f", {len(replaced)} replacement(s) {sorted(replaced)} drawn" if replaced else
                     ", no live device to replace them" if self.settings.replacements else "")
            raise QuorumNotReached(
                f"stage {stage} round {rnd} (wire round {wr}): {len(accepted)} of {sampled} sampled devices "
                f"answered by the deadline{spare}, quorum is {need} ({self.settings.quorum:.0%}); missing {missing}. "
                "Check the devices' logs and status, raise round_timeout_s or lower quorum"
                f"{'' if self.settings.replacements else ' (or allow replacements)'}, then resume the run "
                "with --resume (the checkpoint holds the previous round)")
        if missing:
            log.warning("round %d: no update from %s (offline, unresponsive or past the deadline); aggregating "
                        "%d of %d", wr, missing, len(accepted), sampled)
        self._rounds_done = wr + 1
        results = RoundResults(sorted(accepted.values(), key=lambda r: r.client))
        results.folded = fold
        return results

    def _folds(self, gate: RoundGate) -> bool:
        """Whether a round may sum deltas as they arrive: FedAvg, and no check at the round's end can refuse or
        reweigh an accepted update (the AdamW bound is the adaptive bound's floor, so every update under it
        passes that; every client has a known weight cap, so no weight waits for the round's lower median)."""
        return (self.cfg.aggregation == "fedavg" and gate.norm_bound is not None
                and all(self._weight_cap(c) is not None for c in range(self.cfg.num_clients)))

    def _handle_update(self, msg: Message, stage: int, wr: int, wanted: dict[str, int], expected: dict,
                       nonces: set[str], accepted: dict[str, ClientResult],
                       gate: RoundGate) -> tuple[ClientResult, float] | None:
        """Validate one update message, returning it with its norm; log and count a refusal, never raise."""
        try:
            sender = P.parse_topic(msg.topic)[2][0]
        except (P.ProtocolError, IndexError):
            self._reject("malformed", "?", f"update on unexpected topic {msg.topic!r}", len(msg.payload))
            return None
        try:
            update = P.decode_update(msg.payload)
        except P.ProtocolError as exc:
            self._reject("malformed", sender, str(exc), len(msg.payload))
            return None
        digest = hashlib.sha256(msg.payload).hexdigest()
        if self._digests.get(update.nonce) == digest:  # the same message delivered twice (QoS 1): not a replay
            self._event("duplicate", device=sender, round=update.round, nonce=update.nonce)
            return None
        try:
            norm = P.validate_update(update, expected, self.run_id, stage, wr, nonces,
                                     self.settings.max_update_norm, sender=sender)
        except P.UpdateRejected as exc:
            self._reject(exc.reason, sender, str(exc), len(msg.payload))
            return None
        self._digests[update.nonce] = digest
        if gate.norm_bound is not None and norm > gate.norm_bound:
            self._reject("norm_exceeded", sender, f"update L2 norm {norm:.4g} is over {gate.norm_bound:.4g}, the most "
                         f"the round's trainable tensors can move in {self.cfg.local_steps} AdamW steps at lr "
                         f"{self.cfg.lr:g} (aggregation.adamw_norm_bound)", len(msg.payload))
            return None
        if sender not in wanted:
            self._reject("not_sampled", sender, f"{sender} was not sampled for round {wr}", len(msg.payload))
            return None
        if sender in accepted:  # a restarted device trained the round again; its first answer stands
            self._event("duplicate", device=sender, round=wr, nonce=update.nonce, reason="second update")
            return None
        telemetry, dropped = clean_telemetry(update.telemetry)  # device-sent: only checked fields are kept
        if dropped:
            self._event("telemetry_dropped", device=sender, round=wr, keys=dropped[:20], count=len(dropped))
        loss = number(update.metrics.get("train_loss"), -1e30, 1e30)
        client = wanted[sender]
        weight = cap_samples(update.num_samples, self._weight_cap(client))
        self._event("accepted", device=sender, round=wr, bytes=len(msg.payload), norm=norm, weight=weight,
                    **({"claimed_samples": update.num_samples} if weight != update.num_samples else {}))
        return ClientResult(
            client=client, num_samples=weight,
            delta={k: torch.from_numpy(np.array(update.tensors[p], dtype=np.float32))
                   for p, k in ((p, _canonical(p)) for p in expected)},
            train_loss=float("nan") if loss is None else loss,
            seconds=number(telemetry.get("train_s", telemetry.get("duration_s")), 0, 1e7) or 0.0,
            cpu_seconds=number(telemetry.get("cpu_time_s"), 0, 1e7),
            payload_bytes=len(msg.payload), telemetry={**telemetry, "device": sender}), norm

    def _replace_lost(self, wr: int, rnd: int, wanted: dict[str, int], accepted: dict[str, ClientResult],
                      need: int, replaced: dict[str, str]) -> None:
        """When devices seen offline leave the round unable to reach `need`, sample replacements (at most
        `replacements` per round) and send them the round's train control; `wanted` and `replaced` grow."""
        gone = self._lost(wanted, accepted)
        lost = [d for d in wanted if d not in accepted and d in gone]
        short = need - (len(wanted) - len(lost))  # accepted + still possible, against the quorum
        budget = self.settings.replacements - len(replaced)
        if short <= 0 or budget <= 0:
            return
        stand_ins = set(replaced.values())
        uncovered = [d for d in lost if d not in stand_ins]  # a lost replacement is itself replaced
        order = [self.device_of(c) for c in replacement_order(self.cfg.seed, self._draw_key, rnd, self.cfg.num_clients)]
        with self._status_lock:
            statuses = dict(self.device_status)
            gone = set(self._offline) | set(self._silent)
        live = {d for d, st in statuses.items() if d not in gone and st.get("state") != "offline"
                and self._runs_served(st) and self._fits(d)}
        ready = {d for d, st in statuses.items() if self._holds_stage(st)}
        chosen = choose_replacements(order, wanted, live, ready, min(short, budget, len(uncovered)))
        if not chosen:
            return
        from server_sdk.engine.rounds import client_seed

        clients = {self.device_of(c): c for c in range(self.cfg.num_clients)}
        seeds = {}
        with self._gate_lock:
            self._gate.wanted.update(chosen)
        with self._status_lock:
            self._asked.update(dict.fromkeys(chosen, time.time()))
        for device, lost_device in zip(chosen, uncovered):
            client = clients[device]
            wanted[device] = client
            replaced[device] = lost_device
            seeds[device] = int(client_seed(self.cfg.seed, self._draw_key, rnd, client))
            self._event("replacement", round=wr, device=device, replaces=lost_device, seed=seeds[device],
                        ready=device in ready)
        log.warning("round %d: %s went offline and the quorum of %d is out of reach; sampled %s in their place", wr,
                    uncovered[:len(chosen)], need, chosen)
        self._update_control(lambda c: replace(
            c, sampled_clients=(*c.sampled_clients, *chosen),
            hyperparams=replace(c.hyperparams, seeds={**c.hyperparams.seeds, **seeds})))

    def _still_waiting(self, wanted: dict[str, int], accepted: dict[str, ClientResult], need: int) -> bool:
        """Wait while a sampled device may still answer: it has not answered and is not lost (`_lost`: seen
        offline, unresponsive, or running no served format).

        Lost devices end the wait early only once the quorum is met: a round that would fail anyway
        waits out its deadline, in case the devices come back (after a broker restart, say)."""
        unanswered = set(wanted) - set(accepted)
        if not unanswered:
            return False
        return bool(unanswered - self._lost(wanted, accepted)) or len(accepted) < need

    def _silent_of(self, missing: Collection[str]) -> dict:
        """round_end's `unresponsive`: the missing devices marked unresponsive (when any)."""
        with self._status_lock:
            silent = sorted(d for d in missing if d in self._silent)
        return {"unresponsive": silent} if silent else {}

    def _cap_unknown_weights(self, accepted: dict[str, ClientResult]) -> None:
        """A client without a known shard or cap weighs at most the round's lower median claim."""
        unknown = [d for d, r in accepted.items() if self._weight_cap(r.client) is None]
        if not unknown:
            return
        cap = int(lower_median([float(r.num_samples) for r in accepted.values()]))
        for d in unknown:
            accepted[d] = replace(accepted[d], num_samples=min(accepted[d].num_samples, cap))

    def _weight_cap(self, client: int) -> int | None:
        return self.shard_sizes.get(client, self.settings.max_samples_per_update)

    def _refuse_norm_outliers(self, accepted: dict[str, ClientResult], norms: dict[str, float], wr: int,
                              floor: float | None) -> None:
        """Refuse updates longer than `norm_bound_k` x the round's lower median norm (the fleet's own scale), a
        bound never below `floor` (the round's adamw_norm_bound): aggregation.norm_outliers."""
        k = self.settings.norm_bound_k
        if k is None or len(accepted) < 2:
            return
        outliers, bound = norm_outliers({d: norms[d] for d in accepted}, k, floor or 0.0)
        for device in outliers:
            result = accepted.pop(device)
            self._reject("norm_outlier", device, f"update L2 norm {norms[device]:.4g} is over {k:g} x the round's "
                         f"lower median norm ({bound:.4g}) in round {wr}", result.payload_bytes or 0)

    def _on_update(self, msg: Message) -> None:
        """An update arrived (paho's thread): queue it for the open round, or refuse it now, unread.

        Only what the open round can use waits in the inbox (RoundGate). A retained update was planted
        before this coordinator subscribed (by a device, even before the run existed): it is refused here,
        and the janitor (server_sdk/fleet/janitor.py) deletes it from the broker, so it cannot come back on a resume."""
        sender = msg.topic.rsplit("/", 1)[-1]
        if not msg.payload:
            return  # a retained update being deleted (by the janitor)
        if msg.retain:
            self._reject("retained", sender, "a retained update (published with the MQTT retain flag before this "
                         "coordinator subscribed); the janitor deletes it from the broker", len(msg.payload))
            return
        with self._gate_lock:
            why = self._refusal(self._gate, sender, len(msg.payload))
            if why is None:
                self._gate.queued[sender] += len(msg.payload)
                self._inbox.put(msg)
                return
        self._reject(*why, len(msg.payload))

    @staticmethod
    def _refusal(gate: RoundGate | None, sender: str, size: int) -> tuple[str, str, str] | None:
        """(reason, device, detail) when an arriving update may not wait in the inbox; None when it may."""
        if gate is None:
            return "stale_round", sender, "arrived while no round was open"
        if sender not in gate.wanted:
            return "not_sampled", sender, f"{sender} was not sampled for round {gate.wire_round}"
        if size > gate.limit:
            return "oversized", sender, f"{size} bytes, the bound for this round is {gate.limit}"
        if gate.queued[sender] + size > MAX_QUEUED_PER_DEVICE * gate.limit:
            return "flood", sender, (f"{gate.queued[sender]} bytes of {sender}'s updates already wait to be read; "
                                     f"the bound is {MAX_QUEUED_PER_DEVICE} x {gate.limit}")
        return None

    def _drain_stale(self) -> None:
        """Updates still queued from earlier rounds: refuse them now, with their reason, before the new round."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            sender = msg.topic.rsplit("/", 1)[-1]
            try:
                upd = P.decode_update(msg.payload)
                detail = f"round {upd.round} stage {upd.stage} arrived after its round closed"
            except P.ProtocolError as exc:
                self._reject("malformed", sender, str(exc), len(msg.payload))
                continue
            self._reject("stale_round", sender, detail, len(msg.payload))

    # -- plumbing --------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, retain: bool = False, attempts: int = 6) -> None:
        """QoS 1 publish that waits for the broker's ack; a restarting broker gets a few chances."""
        info = self.client.publish(topic, payload, retain=retain)
        for _ in range(attempts):
            try:
                if wait_published(info, 10.0):
                    return
            except Exception:  # noqa: BLE001 - logged below, then retried
                log.exception("waiting for the broker to acknowledge %s", topic)
            log.warning("broker has not acknowledged %s yet; still waiting (is it restarting?)", topic)
        raise TimeoutError(f"broker did not acknowledge the publish to {topic} within {10 * attempts}s")

    def _publish_control(self, msg: P.ControlMessage) -> None:
        """Publish a control with the devices refused so far (`refused`); the last one is kept for `_tell_loop`."""
        with self._control_lock:
            msg = replace(msg, refused=dict(self._told))
            self._last_control = msg
            self._publish(P.control_topic(self.run_id), P.encode_control(msg), retain=True)

    def _tell_loop(self) -> None:
        """Republish the retained control when a device is refused (or no longer is), so it learns why at once.
        Off paho's thread: a publish waits for the broker's ack, which paho's thread delivers."""
        while not self._closing.is_set():
            if not self._tell_wake.wait(0.5):
                continue
            self._tell_wake.clear()
            with self._control_lock:
                if self._last_control is None or self._closing.is_set():
                    continue
                try:
                    self._publish_control(self._last_control)
                except Exception:  # noqa: BLE001 - the next control carries the refusal anyway
                    log.exception("republishing the control message with the refused devices")
            self._closing.wait(1.0)  # refusals arriving meanwhile go out together, at most one control a second

    def _offline_now(self) -> set[str]:
        """Devices the current round need not wait for (see OFFLINE_CONFIRM_S and RESTART_GRACE_S)."""
        if not self.client.connected:
            return set()
        now = time.time()
        reconnected = self.client.connected_at if self.client.reconnects else None
        with self._status_lock:
            arrivals = dict(self._offline)
        gone = set()
        for device, arrived in arrivals.items():
            counts_from = arrived + OFFLINE_CONFIRM_S
            if reconnected is not None and abs(reconnected - arrived) < RESTART_GRACE_S:
                counts_from = max(counts_from, reconnected + RESTART_GRACE_S)
            if counts_from <= now:
                gone.add(device)
        return gone

    def _on_status(self, msg: Message) -> None:
        """Record a device's status; an `offline` one (its will) lets a round stop waiting for it, any other one
        ends its `unresponsive` mark, one naming the open round acknowledges that round (start_timeout_s).

        The status must name the device its topic names (the broker's ACL binds the topic to the
        login), otherwise it is logged as rejected and dropped."""
        try:
            sender = P.parse_topic(msg.topic)[2][0]
            status = P.validate_status(P.decode_status(msg.payload), sender)
        except (P.ProtocolError, IndexError) as exc:
            reason = exc.reason if isinstance(exc, P.StatusRejected) else "malformed"
            device = cut(msg.topic.rsplit("/", 1)[-1], 64)
            self.rejections[reason] += 1
            self._limited(("rejected", device, reason), "status from %s rejected (%s): %s", (device, reason, exc),
                          "rejected", device=device, reason=reason, detail=cut(str(exc)), bytes=len(msg.payload),
                          message="status")
            return
        device, live = status.device_id, status.state != "offline"
        with self._status_lock:
            was_offline = device in self._offline
            if not live and not was_offline:
                self._offline[device] = time.time()
            elif live:
                self._offline.pop(device, None)
            revived = live and self._silent.pop(device, None) is not None
            self._heard[device] = time.time()
            if live and self._open_round is not None and status.info.get("round") == self._open_round:
                self._acked.add(device)
            # `info` is the device's to fill; it cannot override the state or the time the status itself carries
            self.device_status[device] = {**status.info, "state": status.state, "timestamp": status.timestamp}
            self._status_seq += 1
            self._status_changed.notify_all()
        if (not live) != was_offline:
            self._limited(("status", device, status.state), None, (), "status", device=device, state=status.state)
        if revived:
            self._limited(("status", device, "responsive"), "%s sent a status again; rounds wait for it again",
                          (device,), "status", device=device, state=status.state, was="unresponsive")
        self._check_formats(device, status.info.get("formats"))
        if status.state == "hello":
            self._check_weights(device, status.info)
        if live:
            self._check_capabilities(device, status.info)

    # -- capabilities and memory (docs/protocol.md §11, "Memory") ---------------------------------

    def stage_need(self, config: dict, layers: int) -> dict:
        """The memory a device must declare (`ram_mb`) to train an `layers`-layer stage: the measured peak the
        operator gave (`stage_peak_mb`), else the peak predicted from the model's shapes, the run's batch size,
        sequence length, LoRA rank and weight scheme (export/memory.py, with its margin)."""
        measured = self.settings.stage_peak_mb.get(str(layers))
        if measured:
            return {"layers": layers, "need_mb": int(measured), "source": "measured: --stage-peak-mb"}
        weights = self.cfg.weights if self.stage_formats() == ["onnx"] else "fp32"  # the others carry fp32
        return {"layers": layers, **predicted_peak_mb(config, layers, batch=self.cfg.batch_size,
                                                      seq=self.cfg.seq_len, rank=self.cfg.lora.r, weights=weights)}

    def _check_capabilities(self, device: str, info: dict) -> None:
        """Check what a status declares about the device (P.check_capabilities): a bad declaration refuses the
        device (never sampled, told why) until it sends a good one; a good one is recorded (an event per change,
        for the report), then checked against the run's stages (`_check_memory`)."""
        try:
            caps = P.check_capabilities(info)
        except P.StatusRejected as exc:
            self._caps.pop(device, None)
            self._refuse(device, exc.reason, f"{str(exc).split(': ', 1)[-1]}; fix the device's declaration and "
                         "restart it")
            return
        if caps != self._caps.get(device):
            self._caps[device] = caps
            self._limited(("capabilities", device), None, (), "capabilities", device=device, **caps)
        self._check_memory(device)

    def _check_memory(self, device: str) -> None:
        """Refuse a device whose declared `ram_mb` fits no stage of the run; clear an earlier refusal otherwise."""
        ram = self._caps.get(device, {}).get("ram_mb")
        if device not in self._caps:
            return
        smallest = min(self._run_needs.values(), key=lambda n: n["need_mb"], default=None)
        if ram is not None and smallest is not None and ram < smallest["need_mb"]:
            self._refuse(device, "memory", f"{device} declares ram_mb {ram} MiB; the smallest stage of this run "
                         f"({smallest['layers']} layers) needs {smallest['need_mb']} MiB ({smallest['source']}), so "
                         "it is never sampled. Declare what the device can give training (devft-edge --ram-mb, the web "
                         "device's ramMb) if it has more, or run smaller stages, batch_size or seq_len")
        elif device in self._told:
            self._told.pop(device)
            self._write_event("refusal_cleared", {"device": device})
            self._tell_wake.set()

    def _refuse(self, device: str, reason: str, detail: str) -> None:
        """Refuse a device: it is never sampled, stage starts do not wait for it, and every control message names it
        in `refused` with why (republished now), so the device can say so and stop."""
        why = cut(f"{reason}: {detail}", P.MAX_REFUSAL_CHARS)
        if self._told.get(device) == why:
            # a device heeds only a control published after it subscribed (a retained one may be stale), so a
            # restarted device is told again, at most once per RETELL_S (a status costs it nothing, a control does)
            if time.time() - self._told_at.get(device, 0.0) >= RETELL_S:
                self._told_at[device] = time.time()
                self._tell_wake.set()
            return
        self._told_at[device] = time.time()
        if device not in self._told and len(self._told) >= MAX_TOLD:
            log.warning("refusing %s (%s) without telling it: %d devices are named already", device, reason, MAX_TOLD)
        else:
            self._told[device] = why
            self._tell_wake.set()
        self.rejections[reason] += 1
        self._limited(("rejected", device, reason), "device %s refused (%s): %s", (device, reason, detail), "rejected",
                      device=device, reason=reason, detail=cut(detail, P.MAX_REFUSAL_CHARS), message="hello")

    def _fits(self, device: str) -> bool:
        """Whether the device may train the current stage: not refused, and its declared `ram_mb` (if any) is at least
        the stage's need (no need known yet: every device fits)."""
        if device in self._told:
            return False
        ram = self._caps.get(device, {}).get("ram_mb")
        return ram is None or self._need is None or ram >= self._need["need_mb"]

    def _pool(self) -> list[int] | None:
        """The clients whose devices fit the current stage (`_fits`); None when all do (the plain draw)."""
        fit = [c for c in range(self.cfg.num_clients) if self._fits(self.device_of(c))]
        return None if len(fit) == self.cfg.num_clients else fit

    def eligible_clients(self, stage: int) -> list[int] | None:
        """The round loop samples only these clients (None: all). Raises StageDoesNotFit when no connected device
        fits the stage (or no device at all may take it): the stage could only wait out its deadlines."""
        pool = self._pool()
        with self._status_lock:
            connected = {d for d, st in self.device_status.items()
                         if st.get("state") != "offline" and d not in self._offline}
        if pool == [] or (connected and not any(self._fits(d) for d in connected)):
            need = self._need or {}
            budgets = {d: c["ram_mb"] for d, c in self._caps.items() if "ram_mb" in c}
            top = max(budgets, key=budgets.get, default=None)
            seen = f"{budgets[top]} MiB ({top})" if top else "none declared"
            refused = sorted(d for d in connected if d in self._told)
            raise StageDoesNotFit(
                f"stage {stage + 1} ({need.get('layers')} layers) needs {need.get('need_mb')} MiB per device "
                f"({need.get('source')}{', ' + need['margin'] if 'margin' in need else ''}), and no connected device "
                f"may train it: the largest budget a device declared is {seen}"
                f"{f'; refused: {refused}' if refused else ''}. Add devices with more memory, give the devices' "
                "declared budget if it is too low (devft-edge --ram-mb), lower batch_size or seq_len, or use "
                "smaller stages; then resume with --resume")
        return pool

    def _check_formats(self, device: str, declared) -> None:
        """Refuse a device whose hello declares only formats this coordinator does not serve: say so once (per
        change), naming what it offers, what is served and the flag that changes it. Rounds and stage starts
        do not wait for it (`_runs_served`); nothing it declares changes what is exported."""
        if not isinstance(declared, list):
            self._refused.pop(device, None)
            return
        offered = tuple(cut(f, 32) for f in declared[:8] if isinstance(f, str))
        if any(f in self.settings.formats for f in offered):
            self._refused.pop(device, None)
            return
        if self._refused.get(device) == offered:
            return
        self._refused[device] = offered
        self._limited(("refused", device), "refusing %s: it runs %s, this coordinator serves %s only (start it with "
                      "--formats %s, FleetSettings.formats, to serve another); it is never waited for",
                      (device, list(offered), self.settings.formats, ",".join(self.settings.formats + ["FORMAT"])),
                      "refused", device=device, offered=list(offered), served=list(self.settings.formats),
                      reason="format_not_served", fix="--formats (FleetSettings.formats)")

    def _check_weights(self, device: str, info: dict) -> None:
        """Refuse, once per device, a device whose hello does not declare the run's frozen-weight scheme
        (`runs_weights`): it is never sampled for the portable format."""
        if self.runs_weights(info) or device in self._weights_refused:
            return
        self._weights_refused.add(device)
        self.rejections["weights_scheme"] += 1
        detail = (f"the run's frozen weights are {self.cfg.weights}; the device declares "
                  f"{cut(str(info.get('weights', 'none (fp32 only)')), 40)}: it is not sampled for the portable "
                  "format (update its devft runtime)")
        self._limited(("rejected", device, "weights_scheme"), "device %s refused at hello (weights_scheme): %s",
                      (device, detail), "rejected", device=device, reason="weights_scheme", detail=detail,
                      message="hello")

    def _retained_cleared(self, **fields) -> None:
        self._event("retained_cleared", **fields)

    def _reject(self, reason: str, device: str, detail: str, nbytes: int) -> None:
        self.rejections[reason] += 1
        key = ("rejected", device, reason) if reason != "norm_outlier" else None  # that one: once per round at most
        self._limited(key, "update from %s rejected (%s): %s", (device, reason, cut(detail)), "rejected",
                      device=device, reason=reason, detail=cut(detail), bytes=nbytes)

    def _limited(self, key, warning: str | None, args: tuple, kind: str, **fields) -> None:
        """An event (and a log warning) a device can cause at will: the first few per `key` in full, then a
        `suppressed` summary with the count at most once per period (ratelimit.LogBudget); key None = always."""
        verdict, skipped = ("full", 0) if key is None else self._log_budget.take(key)
        if verdict == "full":
            if warning is not None:
                log.warning(warning, *args)
            self._write_event(kind, fields)
        elif verdict == "summary":
            self._summary(key, skipped)

    def _summary(self, key: tuple, count: int) -> None:
        kind, device, *rest = key
        what = f"{kind} {rest[0]}" if rest else kind
        log.warning("%s: %d more %s since the last line (not logged one by one)", device, count, what)
        self._write_event("suppressed", {"of": kind, "device": device, **({"reason": rest[0]} if rest else {}),
                                         "count": count})

    def _event(self, kind: str, **fields) -> None:
        """One JSON line per coordinator decision in run_dir/fleet_events.jsonl (for people and tests); a
        `duplicate` (a device can resend an update at will) is bounded per device like a refusal."""
        if kind == "duplicate":
            self._limited(("duplicate", fields.get("device")), None, (), kind, **fields)
        else:
            self._write_event(kind, fields)

    def _write_event(self, kind: str, fields: dict) -> None:
        line = json.dumps({"t": round(time.time(), 3), "event": kind, **fields}, default=str)
        with self._events_lock, open(self.events_path, "a") as f:
            f.write(line + "\n")

    def run_finished(self) -> None:
        """The round loop ran the run's last round: close() tells devices the run is done."""
        self._run_finished = True

    def close(self) -> None:
        """Tell devices the run is over (only when its last round is done: run_finished), then disconnect."""
        self._finish_speculation()
        try:
            if self._run_finished:
                self._publish_control(P.ControlMessage(self.run_id, max(self._stage, 0), self._rounds_done, "done"))
                self._event("done", rejections=dict(self.rejections))
        finally:
            self._closing.set()
            self._teller.join(5)
            if self._warmer is not None:
                self._warmer.stop()
            for key, count in self._log_budget.pending().items():
                self._summary(key, count)
            self.janitor.stop()
            self.artifacts.stop()
            if self.origin_auth is not None:
                self.origin_auth.stop()
            self._art_client.close()
            self.client.close()


def _served_files(fmt: str, artifact_dir: Path, stage: int, per_tensor_checkpoint: bool) -> dict[str, Path]:
    """{path on the device: local file} of one format's artifact directory, under stage<N>/.

    Legacy ort checkpoints travel as tensor files with `per_tensor_checkpoint` (edge_runtime/
    checkpoint_blobs.py); the onnx format already keeps every frozen tensor in its own file."""
    if fmt == "ort" and per_tensor_checkpoint and (artifact_dir / "checkpoint").is_file():
        from server_sdk.fleet.checkpoint_split import split_checkpoint

        local = split_checkpoint(artifact_dir, artifact_dir.with_name(artifact_dir.name + ".tensors"))
    else:
        local = {p.relative_to(artifact_dir).as_posix(): p for p in sorted(artifact_dir.rglob("*")) if p.is_file()}
    return {f"stage{stage}/{rel}": p for rel, p in local.items()}


def _canonical(peft_key: str) -> str:
    from server_sdk.method.lora import from_peft_key

    name = from_peft_key(peft_key)
    assert name is not None, peft_key
    return name


def fleet_executor_factory(run_dir: str | Path, creds: Credentials, settings: FleetSettings | None = None, *,
                           host: str | None = None, port: int | None = None,
                           on_ready: Callable[[FleetExecutor], None] | None = None):
    """An `executor_factory` for `rounds.run` that coordinates a real fleet.

    `on_ready` runs once the executor is connected and the client shards exist (e.g. to start
    local device processes)."""

    def make(cfg: RunConfig, base, clients: list[list[Example]]) -> FleetExecutor:
        from server_sdk.method.strategies import make_strategy

        if cfg.precision != "fp32":
            raise ConfigError(f"precision={cfg.precision!r}: fleet devices train their fp32 graphs; precision applies "
                              "to simulated clients (in-process or --executor ray). Drop -o precision=... for a fleet run")

        stages = make_strategy(cfg).stage_sizes(base.n_layers)
        executor = FleetExecutor(cfg, run_dir, creds, cfg.resolved_rounds(len(stages)), settings, host=host,
                                 port=port, tokenizer_dir=tokenizer_dir_of(base),
                                 shard_sizes={c: len(shard) for c, shard in enumerate(clients)})
        if on_ready is not None:
            on_ready(executor)
        return executor

    return make


def tokenizer_dir_of(base) -> Path:
    """A directory with the base model's tokenizer.json (saved once under the run cache if needed)."""

    src = getattr(base.tokenizer, "name_or_path", "") or ""
    for cand in (Path(src), smollm2_cache_dir()):
        if (cand / "tokenizer.json").is_file():
            return cand
    out = cache_root() / "tokenizers" / base.name
    if not (out / "tokenizer.json").is_file():
        base.tokenizer.save_pretrained(out)
    return out
