"""The coordinator side of a real fleet: stage artifacts and global LoRA out over MQTT, device updates in.

`FleetExecutor` plugs into the one round loop (`simulation.run`) in place of the
in-process executor. Per stage it exports the submodel as ONNX Runtime Training
artifacts and serves them chunk by chunk; per round it publishes the global LoRA
and a control message, then collects, validates and returns the device updates.

Device names and shards: client index `c` (the data shard `data/client_{c:03d}.jsonl`)
is the device named `dev-{c:03d}`; `client_index` reads any trailing number, so a
fleet provisioned as `dev1`, `dev2` maps to clients 1 and 2.

Round policy (docs/protocol.md, "Coordinator"): a round ends when every sampled
device's update was accepted or at the deadline (`round_timeout_s` after the control
message). With fewer than `ceil(quorum * sampled)` accepted updates the round fails
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_runtime import protocol as P
from edge_runtime.mqtt import Message, MqttClient, MqttSettings, wait_published
from edge_runtime.transfer import ArtifactServer

from .broker import Credentials
from .config import RunConfig
from .data import Example
from .executor import ClientExecutor
from .lora import LoraState, to_peft_key
from .submodel import StagePlan
from .trainer import ClientResult

log = logging.getLogger(__name__)

_TRAILING_NUMBER = re.compile(r"(\d+)$")


class QuorumNotReached(RuntimeError):
    """Too few devices answered a round before its deadline."""


def device_name(client: int) -> str:
    """The device that holds client shard `client`."""
    return f"dev-{client:03d}"


def client_index(device: str) -> int:
    """`dev-003` -> 3 (any trailing number); raises ValueError for a name without one."""
    m = _TRAILING_NUMBER.search(device)
    if not m:
        raise ValueError(f"device name {device!r} has no trailing shard number; name devices dev-000, dev-001, ...")
    return int(m.group(1))


@dataclass
class FleetSettings:
    """How the coordinator talks to the fleet; saved as run_dir/fleet.json."""

    run_id: str = ""  # default: the run directory's name
    round_timeout_s: float = 120.0  # deadline of a round, from its control message
    quorum: float = 0.6  # fraction of sampled devices whose accepted updates a round needs
    max_update_norm: float | None = 1e3  # L2 bound on a delta; None = unbounded
    artifact_bytes_per_s: float | None = 20e6  # chunk upload rate limit of the ArtifactServer
    export_template_dir: str | None = None  # cached per-shape exports (default: DEVFT_CACHE/ort-templates)
    max_seq_len: int | None = None  # of the exported graphs; default: the run's seq_len
    per_tensor_checkpoint: bool = True  # send the checkpoint as tensor files (cross-stage dedupe)
    device_names: dict[str, str] = field(default_factory=dict)  # client index -> device name overrides

    def validate(self) -> FleetSettings:
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum={self.quorum} must lie in (0, 1], e.g. 0.6")
        if self.round_timeout_s <= 0:
            raise ValueError(f"round_timeout_s={self.round_timeout_s} must be positive")
        if self.max_update_norm is not None and self.max_update_norm <= 0:
            raise ValueError(f"max_update_norm={self.max_update_norm} must be positive (or None for no bound)")
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
                 tokenizer_dir: str | Path | None = None, connect_timeout_s: float = 30.0):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.settings = (settings or FleetSettings()).validate()
        self.run_id = P.check_name("run_id", self.settings.run_id or self.run_dir.name)
        self.tokenizer_dir = tokenizer_dir
        self.offsets = [sum(stage_rounds[:s]) for s in range(len(stage_rounds))]  # wire round = offset + round
        self.total_rounds = sum(stage_rounds)
        self.session = secrets.token_hex(8)  # this coordinator process; devices retrain after a restart
        self.events_path = self.run_dir / "fleet_events.jsonl"
        self.rejections: Counter[str] = Counter()
        self.device_status: dict[str, dict] = {}
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._artifact: P.ArtifactDescriptor | None = None
        self._stage = -1
        self._last_global: str | None = None
        self._rounds_done = 0
        self._nonces: set[str] = set()  # of accepted updates, for the whole run (this process)
        self._digests: dict[str, str] = {}  # nonce -> sha256 of the accepted payload
        self._events_lock = threading.Lock()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "fleet.json").write_text(json.dumps(asdict(self.settings), indent=1) + "\n")

        self.client = MqttClient(mqtt_settings(creds, f"{creds.username}-{self.run_id}", host, port))
        self.client.subscribe(P.update_topic(self.run_id, "+"), self._inbox.put)
        self.client.subscribe(P.status_topic(self.run_id, "+"), self._on_status)
        self.client.connect(connect_timeout_s)
        # chunks go out on their own connection so they never delay control messages or updates
        self._art_client = MqttClient(mqtt_settings(creds, f"{creds.username}-{self.run_id}-artifacts", host, port))
        self._art_client.connect(connect_timeout_s)
        self.artifacts = ArtifactServer(self._art_client, self.run_id,
                                        max_bytes_per_s=self.settings.artifact_bytes_per_s).start()

    # -- naming ---------------------------------------------------------------------------

    def device_of(self, client: int) -> str:
        return self.settings.device_names.get(str(client)) or device_name(client)

    def wire_round(self, stage: int, rnd: int) -> int:
        """Rounds are numbered across stages on the wire so every global topic is used once."""
        return self.offsets[stage] + rnd

    # -- stage ------------------------------------------------------------------------------

    def begin_stage(self, stage: int, plan: StagePlan, sub_model) -> int:
        from export.cached import export_stage_cached

        from .model import cache_root

        out = self.run_dir / "artifacts" / f"stage{stage}"
        templates = self.settings.export_template_dir or cache_root() / "ort-templates"
        t0 = time.perf_counter()
        export_stage_cached(sub_model, out, templates, run_id=self.run_id, stage=stage, groups=plan.groups,
                            anchors=plan.anchors, tokenizer_dir=self.tokenizer_dir,
                            max_seq_len=self.settings.max_seq_len or self.cfg.seq_len)
        return self.serve_stage(stage, out, export_s=round(time.perf_counter() - t0, 2))

    def serve_stage(self, stage: int, artifact_dir: Path, **info) -> int:
        """Register a stage's artifact files with the chunk server and announce them (state idle).

        With `per_tensor_checkpoint` the ORT checkpoint travels as tensor files that devices
        reassemble (edge_runtime/checkpoint_blobs.py), so tensors unchanged since the last
        stage (the embedding) are not downloaded again."""
        artifact_dir = Path(artifact_dir)
        if self.settings.per_tensor_checkpoint and (artifact_dir / "checkpoint").is_file():
            from edge_runtime.checkpoint_blobs import split_checkpoint

            split_dir = artifact_dir.with_name(artifact_dir.name + ".tensors")
            local = split_checkpoint(artifact_dir, split_dir)
        else:
            local = {p.relative_to(artifact_dir).as_posix(): p for p in sorted(artifact_dir.rglob("*")) if p.is_file()}
        files = {f"stage{stage}/{rel}": p for rel, p in local.items()}
        self._artifact = self.artifacts.add_files(files)
        self._stage = stage
        self._event("stage", stage=stage, artifact_id=self._artifact.artifact_id,
                    artifact_bytes=self._artifact.total_bytes, **info)
        # devices may start downloading while the first round is prepared
        self._publish_control(P.ControlMessage(self.run_id, stage, self.wire_round(stage, 0), "idle",
                                               artifact=self._artifact))
        return self._artifact.total_bytes

    # -- round ------------------------------------------------------------------------------

    def train_round(self, stage: int, rnd: int, sampled: list[int], global_lora: LoraState,
                    is_trainable: Callable[[str], bool], seeds: dict[int, int]) -> list[ClientResult]:
        if stage != self._stage or self._artifact is None:
            raise RuntimeError(f"train_round for stage {stage} before begin_stage({stage})")
        wr = self.wire_round(stage, rnd)
        names = {to_peft_key(k): k for k in global_lora}
        trained = sorted(p for p, k in names.items() if is_trainable(k))
        expected = {p: (tuple(global_lora[names[p]].shape), np.float32) for p in trained}
        wanted = {self.device_of(c): c for c in sampled}

        body = {p: global_lora[k].detach().float().cpu().numpy() for p, k in names.items()}
        self._publish(P.global_topic(self.run_id, wr), P.encode_global(P.GlobalMessage(self.run_id, stage, wr, body)),
                      retain=True)
        if self._last_global is not None:  # retained globals of old rounds are dead weight for new devices
            self._publish(self._last_global, b"", retain=True)
        self._last_global = P.global_topic(self.run_id, wr)
        self._drain_stale()
        deadline = time.time() + self.settings.round_timeout_s
        hyper = {"lr": self.cfg.lr, "local_steps": self.cfg.local_steps, "batch_size": self.cfg.batch_size,
                 "seq_len": self.cfg.seq_len, "trainable": trained, "session": self.session,
                 "seeds": {self.device_of(c): int(seeds[c]) for c in sampled}}
        self._publish_control(P.ControlMessage(self.run_id, stage, wr, "train", tuple(wanted), deadline, hyper,
                                               self._artifact))
        self._event("round_start", stage=stage, round=wr, sampled=list(wanted), deadline=deadline)

        # an update is at most the expected tensors plus a header; anything larger is refused unread
        limit = len(P.encode_tensors({p: np.zeros(s, np.float32) for p, (s, _) in expected.items()})) \
            + P.MAX_HEADER_BYTES + 4
        accepted: dict[str, ClientResult] = {}
        nonces = self._nonces
        while len(accepted) < len(wanted):
            left = deadline - time.time()
            if left <= 0:
                break
            try:
                msg = self._inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            result = self._handle_update(msg, stage, wr, wanted, expected, nonces, accepted, limit)
            if result is not None:
                accepted[self.device_of(result.client)] = result
        missing = sorted(set(wanted) - set(accepted))
        need = math.ceil(self.settings.quorum * len(wanted))
        self._event("round_end", stage=stage, round=wr, accepted=sorted(accepted), missing=missing, quorum=need)
        if len(accepted) < need:
            raise QuorumNotReached(
                f"stage {stage} round {rnd} (wire round {wr}): {len(accepted)} of {len(wanted)} sampled devices "
                f"answered by the deadline, quorum is {need} ({self.settings.quorum:.0%}); missing {missing}. "
                "Check the devices' logs and status, raise round_timeout_s or lower quorum, then resume the run "
                "with --resume (the checkpoint holds the previous round)")
        if missing:
            log.warning("round %d: no update from %s by the deadline; aggregating %d of %d", wr, missing,
                        len(accepted), len(wanted))
        self._rounds_done = wr + 1
        return sorted(accepted.values(), key=lambda r: r.client)

    def _handle_update(self, msg: Message, stage: int, wr: int, wanted: dict[str, int], expected: dict,
                       nonces: set[str], accepted: dict[str, ClientResult], limit: int) -> ClientResult | None:
        """Validate one update message; log and count a refusal, never raise."""
        try:
            sender = P.parse_topic(msg.topic)[2][0]
        except (P.ProtocolError, IndexError):
            self._reject("malformed", "?", f"update on unexpected topic {msg.topic!r}", len(msg.payload))
            return None
        if len(msg.payload) > limit:
            self._reject("oversized", sender, f"{len(msg.payload)} bytes, the bound for this round is {limit}",
                         len(msg.payload))
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
        if sender not in wanted:
            self._reject("not_sampled", sender, f"{sender} was not sampled for round {wr}", len(msg.payload))
            return None
        if sender in accepted:  # a restarted device trained the round again; its first answer stands
            self._event("duplicate", device=sender, round=wr, nonce=update.nonce, reason="second update")
            return None
        telemetry = dict(update.telemetry)
        loss = update.metrics.get("train_loss")
        self._event("accepted", device=sender, round=wr, bytes=len(msg.payload), norm=norm)
        return ClientResult(
            client=wanted[sender], num_samples=update.num_samples,
            delta={k: torch.from_numpy(np.array(update.tensors[p], dtype=np.float32))
                   for p, k in ((p, _canonical(p)) for p in expected)},
            train_loss=float(loss) if isinstance(loss, (int, float)) else float("nan"),
            seconds=float(telemetry.get("train_s", telemetry.get("duration_s", 0.0)) or 0.0),
            cpu_seconds=cpu if isinstance(cpu := telemetry.get("cpu_time_s"), (int, float)) and 0 <= cpu < 1e7 else None,
            payload_bytes=len(msg.payload), telemetry={"device": sender, **telemetry})

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
        self._publish(P.control_topic(self.run_id), P.encode_control(msg), retain=True)

    def _on_status(self, msg: Message) -> None:
        try:
            status = P.decode_status(msg.payload)
        except P.ProtocolError as exc:
            log.warning("ignoring malformed status on %s: %s", msg.topic, exc)
            return
        self.device_status[status.device_id] = {"state": status.state, "timestamp": status.timestamp,
                                                **status.info}

    def _reject(self, reason: str, device: str, detail: str, nbytes: int) -> None:
        self.rejections[reason] += 1
        log.warning("update from %s rejected (%s): %s", device, reason, detail)
        self._event("rejected", device=device, reason=reason, detail=detail, bytes=nbytes)

    def _event(self, kind: str, **fields) -> None:
        """One JSON line per coordinator decision in run_dir/fleet_events.jsonl (for people and tests)."""
        line = json.dumps({"t": round(time.time(), 3), "event": kind, **fields}, default=str)
        with self._events_lock, open(self.events_path, "a") as f:
            f.write(line + "\n")

    def close(self) -> None:
        """Tell devices the run is over (only when its last round is done), then disconnect."""
        try:
            if self._rounds_done >= self.total_rounds:
                self._publish_control(P.ControlMessage(self.run_id, max(self._stage, 0), self._rounds_done, "done"))
                self._event("done", rejections=dict(self.rejections))
        finally:
            self.artifacts.stop()
            self._art_client.close()
            self.client.close()


def _canonical(peft_key: str) -> str:
    from .lora import from_peft_key

    name = from_peft_key(peft_key)
    assert name is not None, peft_key
    return name


def fleet_executor_factory(run_dir: str | Path, creds: Credentials, settings: FleetSettings | None = None, *,
                           host: str | None = None, port: int | None = None,
                           on_ready: Callable[[FleetExecutor], None] | None = None):
    """An `executor_factory` for `simulation.run` that coordinates a real fleet.

    `on_ready` runs once the executor is connected and the client shards exist (e.g. to start
    local device processes)."""

    def make(cfg: RunConfig, base, clients: list[list[Example]]) -> FleetExecutor:
        from .strategies import make_strategy

        stages = make_strategy(cfg).stage_sizes(base.n_layers)
        executor = FleetExecutor(cfg, run_dir, creds, cfg.resolved_rounds(len(stages)), settings, host=host,
                                 port=port, tokenizer_dir=tokenizer_dir_of(base))
        if on_ready is not None:
            on_ready(executor)
        return executor

    return make


def tokenizer_dir_of(base) -> Path:
    """A directory with the base model's tokenizer.json (saved once under the run cache if needed)."""
    from .model import _smollm2_cache_dir, cache_root

    src = getattr(base.tokenizer, "name_or_path", "") or ""
    for cand in (Path(src), _smollm2_cache_dir()):
        if (cand / "tokenizer.json").is_file():
            return cand
    out = cache_root() / "tokenizers" / base.name
    if not (out / "tokenizer.json").is_file():
        base.tokenizer.save_pretrained(out)
    return out
