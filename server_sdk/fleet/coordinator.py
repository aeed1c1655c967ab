"""The coordinator of a real fleet: `FleetExecutor`, the round engine's executor for devices over MQTT.

It plugs into the one round loop (`engine/rounds.run`) in place of the in-process executor: per stage it
serves the submodel's files, per round it publishes the global LoRA and a control message, then collects,
checks and returns the device updates. It is made of one part per concern, each a file of this room:

    settings.py   FleetSettings: deadlines, quorum, replacements, bounds, formats, artifact serving
    registry.py   the devices: names and shards, liveness, capabilities and refusals, replacements
    serving.py    stage files out (MQTT chunks, an HTTPS origin), next-stage prefetch, stage readiness
    closing.py    a round from its control message to its accepted updates; the round policy
    intake.py     every update's checks, and every norm and weight policy
    events.py     fleet_events.jsonl and log lines, bounded per device

This file holds their shared state (`__init__`), the wire round of a (stage, round), publishing, and
shutting down. Protocol: docs/protocol.md.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path

from edge_runtime import protocol as P
from edge_runtime.mqtt import Message, MqttClient, wait_published
from server_sdk.config import ConfigError, RunConfig
from server_sdk.data import Example
from server_sdk.engine.executor import ClientExecutor
from server_sdk.engine.warm import TemplateWarmer
from server_sdk.fleet.artifact_server import ArtifactServer
from server_sdk.fleet.broker import Credentials, artifact_credentials
from server_sdk.fleet.closing import RoundClosing
from server_sdk.fleet.events import FleetEvents
from server_sdk.fleet.intake import RoundGate, UpdateIntake
from server_sdk.fleet.janitor import RetainedJanitor
from server_sdk.fleet.origin import OriginAuth, OriginPublisher
from server_sdk.fleet.prefetch import Speculate, Speculation
from server_sdk.fleet.ratelimit import LogBudget
from server_sdk.fleet.registry import DeviceRegistry
from server_sdk.fleet.serving import StageServing, tokenizer_dir_of
from server_sdk.fleet.settings import FleetSettings, mqtt_settings

log = logging.getLogger(__name__)


class FleetExecutor(RoundClosing, StageServing, DeviceRegistry, UpdateIntake, FleetEvents, ClientExecutor):
    """Clients are devices reached over MQTT; see the module docstring for the round policy."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, creds: Credentials,
                 rounds_per_stage: list[int] | None,
                 settings: FleetSettings | None = None, *, host: str | None = None, port: int | None = None,
                 tokenizer_dir: str | Path | None = None, connect_timeout_s: float = 30.0,
                 shard_sizes: Mapping[int, int] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.settings = (settings or FleetSettings()).validate()
        self.run_id = P.check_name("run_id", self.settings.run_id or self.run_dir.name)
        self.tokenizer_dir = tokenizer_dir
        # rounds per stage, to number wire rounds: the round loop's own list once it calls follow_rounds_per_stage
        # (None: until then); a caller that drives rounds itself passes its own
        self.rounds_per_stage = list(rounds_per_stage or [])
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


    # -- naming ---------------------------------------------------------------------------


    def follow_rounds_per_stage(self, rounds_per_stage: list[int]) -> None:
        """Number wire rounds by the round loop's rounds per stage, which it changes in place when the strategy
        moves a stage's leftover rounds to the next stage (`schedule=auto`), and restores on a resume."""
        self.rounds_per_stage = rounds_per_stage

    def wire_round(self, stage: int, rnd: int) -> int:
        """Rounds are numbered across stages on the wire, so every global topic is used once: the rounds the
        stages before ran, plus the round. A replanned stage's rounds shift the next stage's numbers with it
        (numbering by the first schedule made a stage that took over leftover rounds overlap the next one); the
        number is the run's round count before this round, as report.json counts rounds."""
        return sum(self.rounds_per_stage[:stage]) + rnd

    # -- stage ------------------------------------------------------------------------------


    # -- prefetch ---------------------------------------------------------------------------


    def evaluate(self, *args, **kwargs) -> dict:
        """ClientExecutor.evaluate, here; then wait for the guess at the next stage (`_finish_speculation`)."""
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._finish_speculation()


    # -- round ------------------------------------------------------------------------------

            # else the guess announces itself on this round's train control when it is ready; see
            # _finish_speculation for who waits for it


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


    # -- capabilities and memory (docs/protocol.md §11, "Memory") ---------------------------------


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


def fleet_executor_factory(run_dir: str | Path, creds: Credentials, settings: FleetSettings | None = None, *,
                           host: str | None = None, port: int | None = None,
                           on_ready: Callable[[FleetExecutor], None] | None = None):
    """An `executor_factory` for `rounds.run` that coordinates a real fleet.

    `on_ready` runs once the executor is connected and the client shards exist (e.g. to start
    local device processes)."""

    def make(cfg: RunConfig, base, clients: list[list[Example]]) -> FleetExecutor:
        if cfg.precision != "fp32":
            raise ConfigError(f"precision={cfg.precision!r}: fleet devices train their fp32 graphs; precision applies "
                              "to simulated clients (in-process or --executor ray). Drop -o precision=... for a fleet run")
        legacy = sorted(set(settings.formats if settings is not None else ["onnx"]) - {"onnx", "auto"})
        if cfg.micro_batch is not None and cfg.micro_batch < cfg.batch_size and legacy:
            raise ConfigError(f"micro_batch={cfg.micro_batch}: only the portable onnx format trains in micro-batches; "
                              f"devices of {legacy} would abandon every round. Serve formats ['onnx'] or drop "
                              "-o micro_batch=...")

        # rounds per stage: the round loop's, through follow_rounds_per_stage (it resolves them, once)
        executor = FleetExecutor(cfg, run_dir, creds, None, settings, host=host,
                                 port=port, tokenizer_dir=tokenizer_dir_of(base),
                                 shard_sizes={c: len(shard) for c, shard in enumerate(clients)})
        if on_ready is not None:
            on_ready(executor)
        return executor

    return make
