"""`devft-edge`: one device of a devft fleet.

    devft-edge run --credentials creds.json --data shard.jsonl --cache DIR [--run RUN_ID]

The device logs in with its own credentials over TLS, follows the retained control
message of a run, fetches the stage's artifacts into its content-addressed cache
(every chunk and file checked against its sha256, and the manifest's hashes again
before training: never trains on unverified files), takes the round's global LoRA,
trains `local_steps` steps with ONNX Runtime on its JSONL shard, and sends the
delta (trained - received) with a fresh nonce and its telemetry. It repeats until
the control message says `done`.

When a control message carries a `prefetch` hint (the coordinator's guess at the next
stage's files, sent during a stage's last round), an idle device fetches those files into
its cache after it has answered its round; any newer control message cancels that fetch at
once (what arrived stays, as verified blobs or chunks), so the hint never delays training or
an upload. After fetching a stage's files on an `idle` or non-sampling control the device
says so in a `hello` status (`info.ready` = the artifact id), which lets the coordinator open
a stage's first round when its devices are ready; every later status repeats `ready`, so the
status the broker retains tells a restarted coordinator too.

Controls are answered at once from the MQTT thread (docs/protocol.md §6): a train control that
samples this device with `busy` naming its round, a stage whose files it lacks with a `hello`
naming them (`info.fetching`). The coordinator stops waiting for a device silent for its
`start_timeout_s`, and this device may be busy downloading or finishing another control then.

Training is deterministic given the control message: batches come from
`edge_runtime.sampler` exactly as the simulation draws them, ONNX Runtime
runs with a fixed thread count, so a repeated round gives the same delta.

Torch-free: numpy, tokenizers, safetensors, paho-mqtt and onnxruntime only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import protocol as P
from edge_runtime.backends import (
    FORMATS,
    Trainer,
    available_formats,
    onnx_runtime_problem,
    open_trainer,
    runtime_versions,
)
from edge_runtime.batching import IGNORE_INDEX, collate, join
from edge_runtime.checkpoint_blobs import CHECKPOINT, RECIPE, CheckpointAssemblyError, assemble_checkpoint
from edge_runtime.manifest import MANIFEST_NAME, ManifestError
from edge_runtime.mqtt import Message, MqttClient, MqttSettings, wait_published
from edge_runtime.sampler import round_draws
from edge_runtime.transfer import ArtifactCache, FetchCancelled, FetchError

log = logging.getLogger("devft.edge")

BACKENDS = (*FORMATS, "auto")
PARENT_ENV = "DEVFT_EXIT_WITH_PARENT"  # a pid: stop when it is no longer this process's parent
# How long the broker keeps this device's session (and queues control and global messages for it) while it is
# away: long enough to ride out a broker restart or a network blip; a device away longer resubscribes and gets
# the retained control and global, so the broker need not hold every round's global for a device that may
# never come back (issue #27, hole 8)
SESSION_EXPIRY_S = 600


class DeviceError(RuntimeError):
    """The device cannot take part in this round; the message says why."""


# --------------------------------------------------------------------------- data


@dataclass
class Shard:
    """The device's training examples: rendered prompt and completion strings."""

    prompts: list[str]
    completions: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def read_shard(path: str | Path) -> Shard:
    prompts, completions = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            prompts.append(str(rec["prompt"]))
            completions.append(str(rec["completion"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DeviceError(f"{path}:{n}: not a devft example record ({exc!r}); it needs prompt and completion") from None
    if not prompts:
        raise DeviceError(f"{path} holds no examples; a device needs a non-empty shard")
    return Shard(prompts, completions)


def encode(tokenizer: Any, shard: Shard, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example, exactly as the server builds them (edge_runtime.batching)."""
    return [join(tokenizer.encode(p, add_special_tokens=False).ids, tokenizer.encode(c, add_special_tokens=False).ids,
                 seq_len) for p, c in zip(shard.prompts, shard.completions)]


# --------------------------------------------------------------------------- backends


def pick_formats(requested: str) -> list[str]:
    """The artifact formats this device trains, in preference order (what its hello declares)."""
    if requested not in BACKENDS:
        raise DeviceError(f"backend {requested!r} is not one of {BACKENDS}")
    here = available_formats()
    if requested == "auto":
        if not here:
            raise DeviceError("no training runtime is installed: pip install 'devft[edge]' (plain onnxruntime)")
        return here
    if requested == "onnx" and (problem := onnx_runtime_problem()):
        raise DeviceError(f"--backend onnx: {problem}")
    if requested not in here:
        hint = {"onnx": "pip install 'devft[edge]'", "ort": "pip install 'devft[legacy-ort-training]' (x86_64 only)",
                "executorch": "pip install 'devft[edge-executorch]'"}[requested]
        raise DeviceError(f"--backend {requested}: its runtime is not installed here ({hint}); this device can run "
                          f"{here or 'nothing yet'}")
    return [requested]


def check_artifact_format(fmt: str, artifact_dir: Path) -> None:
    """The files must be in the format the coordinator announced for them (the manifest says which)."""
    try:
        built_for = json.loads((artifact_dir / MANIFEST_NAME).read_text())["backend"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise DeviceError(f"cannot read the format from {artifact_dir / MANIFEST_NAME}: {exc!r}") from None
    if built_for != fmt:
        raise DeviceError(f"the coordinator announced {fmt!r} artifacts but their manifest says {built_for!r}")


# --------------------------------------------------------------------------- device


REFUSED_EXIT = 4  # the coordinator refuses this device (a control message names it in `refused`)


def available_ram_mb() -> int | None:
    """MemAvailable from /proc/meminfo in MiB: what a new process can take without swapping (MemTotal also counts
    the OS and every other program); None where there is no /proc (the hello then declares no budget)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return max(1, int(line.split()[1]) // 1024)
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_capabilities(ram_mb: int | None = None) -> dict[str, Any]:
    """What every status declares about this device (docs/protocol.md, StatusMessage): platform, runtime, cores and
    `ram_mb`, the memory it offers training (`--ram-mb`, else `available_ram_mb`): the coordinator samples it only
    for stages whose memory need fits."""
    import platform

    caps: dict[str, Any] = {"platform": f"{platform.system()}-{platform.machine()}".lower()[:64],
                            "runtime": f"devft-edge (python {platform.python_version()})"[:64],
                            "cores": max(1, min(os.cpu_count() or 1, P.MAX_CORES))}
    ram = ram_mb if ram_mb is not None else available_ram_mb()
    if ram is not None:
        caps["ram_mb"] = ram
    return caps


def settings_from_credentials(path: str | Path, cache_dir: Path, host: str | None = None,
                              port: int | None = None) -> tuple[MqttSettings, str]:
    """MQTT settings and device name from the JSON that `devft fleet add-device` printed."""
    try:
        creds = json.loads(Path(path).read_text())
        user, password = creds["username"], creds["password"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise DeviceError(f"cannot read device credentials {path}: {exc!r}; use the JSON from "
                          "`devft fleet add-device`") from None
    ca_file = creds.get("ca_file")
    if not ca_file or not Path(ca_file).is_file():  # provisioned elsewhere: trust the inlined CA
        ca_file = str(cache_dir / "ca.pem")
        Path(ca_file).write_text(creds["ca_pem"])
    will = P.encode_status(P.StatusMessage(user, "offline", time.time()))
    settings = MqttSettings(host=host or creds["host"], port=int(port or creds["port"]), username=user,
                            password=password, ca_file=ca_file, client_id=creds.get("client_id") or user,
                            reconnect_min_s=0.2, reconnect_max_s=5.0, will_payload=will,
                            session_expiry_s=SESSION_EXPIRY_S)
    return settings, user


class Device:
    """Follows one run's control messages and answers the rounds this device is sampled for."""

    def __init__(self, settings: MqttSettings, device_id: str, shard: Shard, cache_dir: str | Path, *,
                 run_id: str | None = None, backend: str = "auto", threads: int = 1,
                 exit_after_rounds: int | None = None, shared_blobs: str | Path | None = None,
                 ram_mb: int | None = None) -> None:
        self.device_id = P.check_name("device_id", device_id)
        self.run_id = run_id
        self.shard = shard
        self.cache = ArtifactCache(cache_dir, shared=shared_blobs)
        self.formats = pick_formats(backend)
        # read once: package metadata lookups cost milliseconds per status; the capabilities go with the versions
        self.versions = {**runtime_versions(), **device_capabilities(ram_mb)}
        self.threads = threads
        self.exit_after_rounds = exit_after_rounds
        self.rounds_trained = 0
        self.stage_downloads: dict[str, int] = {}  # artifact id -> bytes this process downloaded for it
        self.stage_fetch_s: dict[str, float] = {}  # artifact id -> seconds this process spent fetching it
        self.prefetch_bytes = 0  # bytes this process fetched for prefetch hints
        self.prefetch_s = 0.0  # seconds this process spent fetching them
        self._prefetched: set[str] = set()  # artifact ids of hints fetched completely
        self._ready_sent: set[str] = set()  # artifact ids this process reported ready
        self._holding: str | None = None  # artifact id of the last stage files laid out here, verified
        self._acked: set[tuple] = set()  # (run, stage, round, session) of train controls acknowledged
        self._fetch_acked: set[str] = set()  # artifact ids whose fetch this device announced
        self._reconnects_seen = 0
        self._controls: queue.Queue[Message] = queue.Queue()
        self._control_arrived = threading.Event()  # cancels a prefetch: there is something newer to do
        self._globals: dict[tuple[str, int], bytes] = {}
        self._globals_cond = threading.Condition()
        self._answered: set[tuple] = set()
        self._encoded: dict[tuple[str, int], list] = {}
        self._trainer: Trainer | None = None  # the round's open session, freed once its update is sent
        self._stop = threading.Event()
        self._orphaned = False  # the local fleet's coordinator died (PARENT_ENV)
        self.settings = settings
        self.client: MqttClient | None = None

    # -- messages ------------------------------------------------------------------------

    def _on_control(self, msg: Message) -> None:
        if not msg.payload:
            return  # a retained control being cleared (a coordinator starting a fresh run)
        self._controls.put(msg)
        self._control_arrived.set()
        self._acknowledge(msg)

    def _acknowledge(self, msg: Message) -> None:
        """Answer a control at once, from the MQTT thread (this device may still be fetching files or finishing
        another control): a train control that samples it with a `busy` status naming its round, a stage whose
        files it lacks with a `hello` naming them in `fetching`. The coordinator stops waiting for a device that
        stays silent for its `start_timeout_s`."""
        try:
            ctrl = P.decode_control(msg.payload)
        except P.ProtocolError:
            return  # the main loop says why
        if ctrl.run_id != self.run_id or ctrl.state == "done":
            return
        if ctrl.state != "train" or self.device_id not in ctrl.sampled_clients:
            chosen = ctrl.artifact_for(self.formats)
            if chosen is not None and chosen[1].artifact_id not in (self._holding, *self._fetch_acked):
                self._fetch_acked.add(chosen[1].artifact_id)
                self._status("hello", fetching=chosen[1].artifact_id)
            return
        assert ctrl.hyperparams is not None  # decode_control guarantees it for "train"
        key = (ctrl.run_id, ctrl.stage, ctrl.round, ctrl.hyperparams.session)
        if key in self._acked or key in self._answered:
            return
        self._acked.add(key)
        self._status("busy", stage=ctrl.stage, round=ctrl.round)

    def _on_global(self, msg: Message) -> None:
        if not msg.payload:
            return  # a retained global being cleared
        try:
            run_id, _, rest = P.parse_topic(msg.topic)
            rnd = int(rest[0])
        except (P.ProtocolError, IndexError, ValueError):
            return
        with self._globals_cond:
            self._globals[(run_id, rnd)] = msg.payload
            for key in sorted(self._globals)[:-4]:  # keep the last few rounds only
                del self._globals[key]
            self._globals_cond.notify_all()

    def _global_for(self, ctrl: P.ControlMessage) -> P.GlobalMessage:
        """The round's global adapter: subscribed to for this round only (it is retained, so it arrives on
        subscribe), so the broker sends each round's adapter to the devices sampled for it, not to all."""
        key = (ctrl.run_id, ctrl.round)
        deadline = ctrl.deadline_unix or time.time() + 600
        topic = P.global_topic(ctrl.run_id, ctrl.round)
        seen = self.client.reconnects
        self._subscribe_global(topic)
        try:
            while True:
                with self._globals_cond:
                    left = deadline - time.time()
                    if key in self._globals:
                        payload = self._globals.pop(key)
                        break
                    if left <= 0 or self._stop.is_set():
                        raise DeviceError(f"no global adapter for round {ctrl.round} arrived before the deadline")
                    self._globals_cond.wait(min(left, 0.5))
                if self.client.reconnects != seen and self.client.connected:
                    # the retained adapter may have been in flight when the connection dropped (a broker
                    # restart); subscribing again makes the broker send it again (outside the lock: the
                    # message's callback takes it)
                    seen = self.client.reconnects
                    self._subscribe_global(topic)
        finally:
            self.client.unsubscribe(topic)
        glob = P.decode_global(payload)
        if (glob.run_id, glob.stage, glob.round) != (ctrl.run_id, ctrl.stage, ctrl.round):
            raise DeviceError(f"global message is for {glob.run_id}/{glob.stage}/{glob.round}, control says "
                              f"{ctrl.run_id}/{ctrl.stage}/{ctrl.round}")
        return glob

    def _subscribe_global(self, topic: str) -> None:
        try:
            self.client.subscribe(topic, self._on_global)
        except TimeoutError:  # no SUBACK (a broker restarting): MqttClient sends it again on reconnect
            log.warning("%s: the broker has not acknowledged the subscription to %s yet", self.device_id, topic)

    def _status(self, state: str, **info: Any) -> None:
        """Publish a retained status. Every one names the stage files held (`ready`), so the last status the
        broker keeps still says so: a coordinator that restarts reads it and need not wait for the files."""
        if self.client is None or self.run_id is None:
            return
        held = {"ready": self._holding} if self._holding else {}
        msg = P.StatusMessage(self.device_id, state, time.time(),
                              {"formats": self.formats, **self.versions, **held, **info})
        self.client.publish(P.status_topic(self.run_id, self.device_id), P.encode_status(msg), retain=True)

    # -- main loop -------------------------------------------------------------------------

    def run(self, connect_timeout_s: float = 60.0) -> int:
        ctrl_filter = P.control_topic(self.run_id) if self.run_id else f"{P.TOPIC_ROOT}/+/control"
        settings = self.settings
        if self.run_id:
            from dataclasses import replace

            hello = P.StatusMessage(self.device_id, "hello", time.time(),
                                    {"formats": self.formats, **self.versions, "reconnected": True})
            settings = replace(settings, will_topic=P.status_topic(self.run_id, self.device_id),
                               birth_topic=P.status_topic(self.run_id, self.device_id),
                               birth_payload=P.encode_status(hello))
        self.client = MqttClient(settings)
        self.client.subscribe(ctrl_filter, self._on_control)
        self.client.connect(connect_timeout_s)
        self._status("hello", examples=len(self.shard))
        log.info("%s connected to %s:%s, following %s", self.device_id, settings.host, settings.port,
                 self.run_id or "the first active run")
        try:
            return self._loop()
        finally:
            self._say_offline()
            self.client.close()

    def _say_offline(self, timeout_s: float = 5.0) -> None:
        """Publish the retained `offline` status and wait for the broker's ack before a clean disconnect.

        A clean DISCONNECT suppresses the will, so without this a device stopped by SIGTERM, Ctrl-C or
        `exit_after_rounds` looked alive until the round's deadline. A broker that is gone costs `timeout_s`."""
        if self.client is None or self.run_id is None or not self.client.connected or self._orphaned:
            return
        msg = P.StatusMessage(self.device_id, "offline", time.time(), {"formats": self.formats, **self.versions})
        try:
            info = self.client.publish(P.status_topic(self.run_id, self.device_id), P.encode_status(msg), retain=True)
            if not wait_published(info, timeout_s):
                log.warning("%s: the broker did not acknowledge the offline status within %.0f s", self.device_id,
                            timeout_s)
        except (ConnectionError, OSError, ValueError) as exc:
            log.warning("%s: could not publish the offline status: %s", self.device_id, exc)

    def _loop(self) -> int:
        # a device of a local fleet (`devft run --fleet local:N`) ends with its coordinator, even a killed one
        parent = int(os.environ.get(PARENT_ENV, "0") or 0)
        while not self._stop.is_set():
            if parent and os.getppid() != parent:
                log.warning("%s: the coordinator process %d is gone; stopping", self.device_id, parent)
                self._orphaned = True  # nobody to tell, and its broker went with it: no offline status
                return 1
            self._announce_after_reconnect()
            try:
                msg = self._controls.get(timeout=0.5)
            except queue.Empty:
                continue
            for later in iter(lambda: self._next_control(), None):  # act on the newest snapshot only
                msg = later
            try:
                ctrl = P.decode_control(msg.payload)
            except P.ProtocolError as exc:
                log.warning("ignoring malformed control message on %s: %s", msg.topic, exc)
                continue
            if self.run_id is None:
                if ctrl.state == "done":
                    continue  # an old run's final state
                self.run_id = ctrl.run_id
                log.info("%s following run %s", self.device_id, ctrl.run_id)
            if ctrl.run_id != self.run_id:
                continue
            if self.device_id in ctrl.refused and not msg.retain:  # a retained control may predate our hello
                log.error("%s: the coordinator refuses this device: %s", self.device_id, ctrl.refused[self.device_id])
                return REFUSED_EXIT
            if ctrl.state == "done":
                log.info("%s: run %s is done after %d rounds here", self.device_id, ctrl.run_id, self.rounds_trained)
                self._status("hello", finished=True)
                return 0
            try:
                self._act(ctrl)
            except (DeviceError, FetchError, ManifestError, P.ProtocolError, ValueError) as exc:
                log.error("%s: stage %d round %d abandoned: %s", self.device_id, ctrl.stage, ctrl.round, exc)
            self._prefetch(ctrl)
            if self.exit_after_rounds is not None and self.rounds_trained >= self.exit_after_rounds:
                return 0
        return 0

    def _announce_after_reconnect(self) -> None:
        """The birth `hello` sent on a reconnect is fixed when the device starts; follow it with a full status
        (the files held) so the retained one stays complete."""
        if self.client is not None and self.client.reconnects != self._reconnects_seen:
            self._reconnects_seen = self.client.reconnects
            self._status("hello", reconnected=True)

    def _next_control(self) -> Message | None:
        try:
            return self._controls.get_nowait()
        except queue.Empty:
            return None

    def _act(self, ctrl: P.ControlMessage) -> None:
        if not ctrl.artifacts:
            return
        if ctrl.artifact_for(self.formats) is None:
            raise DeviceError(f"the coordinator offers {sorted(ctrl.artifacts)} artifacts for stage {ctrl.stage}; this "
                              f"device runs {self.formats}: install the runtime of one of them")
        sampled = ctrl.state == "train" and self.device_id in ctrl.sampled_clients
        if not sampled:
            self._artifact_dir(ctrl)  # prefetch while idle or not sampled
            self._report_ready(ctrl)
            return
        assert ctrl.hyperparams is not None  # decode_control guarantees it for "train"
        key = (ctrl.run_id, ctrl.stage, ctrl.round, ctrl.hyperparams.session)
        if key in self._answered:
            return
        if ctrl.deadline_unix is not None and time.time() > ctrl.deadline_unix:
            log.info("%s: round %d deadline already passed; skipping", self.device_id, ctrl.round)
            return
        try:
            update = self.train_round(ctrl)
            self._send(update, ctrl)
        finally:
            self._trainer = None  # freeing an ONNX Runtime session takes tens of ms: after the update is out
        self._answered.add(key)
        self.rounds_trained += 1

    # -- artifacts -------------------------------------------------------------------------

    def _report_ready(self, ctrl: P.ControlMessage) -> None:
        """Tell the coordinator (once per artifact) that this stage's files are here and verified."""
        chosen = ctrl.artifact_for(self.formats)
        if chosen is not None and chosen[1].artifact_id not in self._ready_sent:
            self._ready_sent.add(chosen[1].artifact_id)
            self._status("hello", ready=chosen[1].artifact_id)

    def _prefetch(self, ctrl: P.ControlMessage) -> None:
        """Fetch the control's prefetch hint (the likely next stage) into the cache while there is nothing else
        to do. A newer control message cancels it at once; the hint is never trained on and every file is
        verified by hash, so a wrong or hostile hint costs bytes, not correctness."""
        chosen = ctrl.prefetch_for(self.formats)
        if chosen is None or chosen[1].artifact_id in self._prefetched or ctrl.run_id != self.run_id:
            return
        desc = chosen[1]
        self._control_arrived.clear()
        if not self._controls.empty() or self._stop.is_set():
            return  # something newer to act on first
        before, t0 = self.cache.bytes_downloaded, time.perf_counter()
        try:
            self.cache.fetch(self.client, ctrl.run_id, self.device_id, desc, cancel=self._control_arrived)
        except FetchCancelled:
            log.debug("%s: prefetch of %s cancelled by a new control message", self.device_id, desc.artifact_id[:12])
            return
        except (FetchError, OSError) as exc:
            log.warning("%s: prefetch of the next stage's files stopped (%s); they will be fetched when the stage "
                        "starts", self.device_id, exc)
            return
        finally:
            self.prefetch_bytes += self.cache.bytes_downloaded - before
            self.prefetch_s += time.perf_counter() - t0
        self._prefetched.add(desc.artifact_id)
        log.debug("%s: prefetched %s", self.device_id, desc.artifact_id[:12])

    def _artifact_dir(self, ctrl: P.ControlMessage) -> tuple[Path, int]:
        """Fetch (or find) the stage's files, verified, laid out as an artifact dir; bytes downloaded now."""
        chosen = ctrl.artifact_for(self.formats)
        assert chosen is not None  # _act checked
        fmt, desc = chosen
        before, t0 = self.cache.bytes_downloaded, time.perf_counter()
        self.cache.fetch(self.client, ctrl.run_id, self.device_id, desc)
        self.stage_fetch_s[desc.artifact_id] = self.stage_fetch_s.get(desc.artifact_id, 0.0) + time.perf_counter() - t0
        stage_root = self.cache.root / "stages" / desc.artifact_id
        if stage_root.exists():
            shutil.rmtree(stage_root)  # relink every time: a blob re-fetched after corruption is a new file
        self.cache.materialize(desc, stage_root)
        got = self.cache.bytes_downloaded - before
        self.stage_downloads[desc.artifact_id] = self.stage_downloads.get(desc.artifact_id, 0) + got
        manifests = [f.path for f in desc.files if f.path.rsplit("/", 1)[-1] == MANIFEST_NAME]
        if len(manifests) != 1:
            raise DeviceError(f"artifact {desc.artifact_id[:12]} has {len(manifests)} manifests; expected one")
        art_dir = stage_root / Path(manifests[0]).parent
        check_artifact_format(fmt, art_dir)
        self._holding = desc.artifact_id
        if fmt == "ort" and not (art_dir / CHECKPOINT).exists() and (art_dir / RECIPE).exists():
            self._rebuild_checkpoint(art_dir)
        # earlier stages' files are dead weight now (what this stage shares with them, and the hint, is kept)
        hint = ctrl.prefetch_for(self.formats)
        keep = {f.sha256 for f in (*desc.files, *(hint[1].files if hint else ()))}
        if (art_dir / RECIPE).exists():
            keep.add(json.loads((art_dir / RECIPE).read_text())["sha256"])
        self.cache.prune(keep, self.cache.root / "stages", desc.artifact_id)
        return art_dir, got

    def _rebuild_checkpoint(self, art_dir: Path) -> None:
        """The checkpoint came as tensor files: rebuild it once (kept as a verified blob), then link it."""
        want = json.loads((art_dir / RECIPE).read_text())["sha256"]
        if not self.cache.has(want):
            tmp = art_dir / ".checkpoint.building"
            try:
                assemble_checkpoint(art_dir, tmp)
            except CheckpointAssemblyError as exc:
                raise DeviceError(str(exc)) from None
            self.cache.add_file(tmp)
            tmp.unlink()
            log.debug("%s: rebuilt checkpoint %s from tensor files", self.device_id, want[:12])
        try:
            os.link(self.cache.blob_path(want), art_dir / CHECKPOINT)
        except OSError:
            shutil.copyfile(self.cache.blob_path(want), art_dir / CHECKPOINT)

    def _open_trainer(self, ctrl: P.ControlMessage, hp: P.TrainSettings) -> tuple[Trainer, Path, int]:
        """A trainer on verified files; a cache whose blob rotted since it was fetched is fetched again once."""
        fmt, desc = ctrl.artifact_for(self.formats) or ("", None)
        assert desc is not None

        def make(art_dir: Path) -> Trainer:
            return open_trainer(fmt, art_dir, lr=hp.lr, threads=self.threads, trainable=hp.trainable,
                                optimizer=hp.optimizer, micro_batch=hp.rows_per_run)

        art_dir, got = self._artifact_dir(ctrl)
        try:
            return make(art_dir), art_dir, got
        except ManifestError as exc:
            log.warning("%s: cached artifact failed verification (%s); fetching it again", self.device_id, exc)
            for f in desc.files:
                self.cache.recheck(f.sha256, f.size)  # a corrupt blob is deleted, so it is fetched again
            art_dir, got2 = self._artifact_dir(ctrl)
            return make(art_dir), art_dir, got + got2

    # -- training --------------------------------------------------------------------------

    def train_round(self, ctrl: P.ControlMessage) -> P.UpdateMessage:
        from edge_runtime.telemetry import TelemetryRecorder

        hp = ctrl.hyperparams
        if hp is None or self.device_id not in hp.seeds:
            raise DeviceError(f"the train control for round {ctrl.round} carries no seed for {self.device_id}")
        trainable = list(hp.trainable)
        key = (ctrl.run_id, ctrl.stage, ctrl.round, hp.session)
        if key not in self._acked:  # a device following the first active run learns its run id from this control
            self._acked.add(key)
            self._status("busy", stage=ctrl.stage, round=ctrl.round)
        started_unix, t0 = time.time(), time.perf_counter()
        fmt, desc = ctrl.artifact_for(self.formats) or ("", None)
        aid = desc.artifact_id if desc else ""
        fetched_before_s = self.stage_fetch_s.get(aid, 0.0)
        trainer, art_dir, downloaded = self._open_trainer(ctrl, hp)
        self._trainer = trainer  # kept alive until _act has sent the update
        glob = self._global_for(ctrl)
        trainer.set_lora({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in glob.tensors.items()})
        received = trainer.get_lora()
        unknown = sorted(set(trainable) - set(received))
        if unknown:
            raise DeviceError(f"control names trainable tensors the artifacts lack: {unknown[:3]}")
        # the onnx trainer leaves non-trainable tensors alone; the legacy ones update all, so restore those
        frozen = {k: v for k, v in received.items() if k not in set(trainable)} if fmt != "onnx" else {}
        seq_len = trainer.manifest.seq_len  # the run's one sequence length, carried in the manifest
        encoded = self._encoded_shard(art_dir, trainer, seq_len)
        pad = pad_id(trainer.manifest.model_config)
        losses: list[float] = []
        setup_s = time.perf_counter() - t0
        with TelemetryRecorder() as rec:
            for ids, labels, tokens in round_batches(encoded, hp, self.device_id, pad):
                if not (labels[:, 1:] != IGNORE_INDEX).any():
                    log.warning("%s: a batch has no completion tokens within seq_len %d; skipped", self.device_id,
                                seq_len)
                    continue
                with rec.step(tokens=tokens):
                    losses.append(trainer.train_step(ids, labels))
                    if frozen:  # e.g. FFA-LoRA: A stays at the received value, B trains against it
                        trainer.set_lora({**trainer.get_lora(), **frozen})
        trained = trainer.get_lora()
        delta = {k: (trained[k] - received[k]).astype(np.float32) for k in trainable}
        # started_unix and fetch_s let the coordinator split a round into transport and training
        telemetry = {**rec.report(), "train_s": time.perf_counter() - t0, "setup_s": setup_s,
                     "started_unix": started_unix, "fetch_s": self.stage_fetch_s.get(aid, 0.0) - fetched_before_s,
                     "stage_fetch_s": self.stage_fetch_s.get(aid, 0.0),
                     "backend": trainer.manifest.backend, "threads": self.threads, "process": os.getpid(),
                     "artifact_id": aid, "download_bytes": downloaded,
                     "stage_download_bytes": self.stage_downloads.get(aid, 0),
                     "prefetch_bytes": self.prefetch_bytes, "prefetch_s": self.prefetch_s,
                     "cache_bytes_downloaded_total": self.cache.bytes_downloaded,
                     "mqtt_payload_bytes_received": self.client.payload_bytes_received if self.client else None}
        loss = float(np.mean(losses)) if losses else float("nan")
        return P.UpdateMessage(ctrl.run_id, ctrl.stage, ctrl.round, self.device_id, secrets.token_hex(16),
                               len(self.shard), delta, {"train_loss": loss}, telemetry)

    def _encoded_shard(self, art_dir: Path, trainer: Trainer, seq_len: int) -> list:
        from tokenizers import Tokenizer

        name = trainer.manifest.tokenizer_file
        if name is None:
            raise DeviceError(f"artifacts in {art_dir} carry no tokenizer.json; the server must export with one")
        tok_sha = trainer.manifest.files[name].sha256
        key = (tok_sha, seq_len)
        if key not in self._encoded:
            self._encoded = {key: encode(Tokenizer.from_file(str(art_dir / name)), self.shard, seq_len)}
        return self._encoded[key]

    def _send(self, update: P.UpdateMessage, ctrl: P.ControlMessage) -> None:
        data = P.encode_update(update)
        info = self.client.publish(P.update_topic(ctrl.run_id, self.device_id), data)
        wait_until = max(ctrl.deadline_unix or 0.0, time.time()) + 60  # a restarting broker gets time to return
        while not wait_published(info, 1.0):
            if time.time() > wait_until or self._stop.is_set():
                log.error("%s: broker never acknowledged the update for round %d", self.device_id, ctrl.round)
                return
        tel = update.telemetry
        # the one line a device prints per round (stage and round 1-based, as the coordinator counts them)
        log.info("%s: stage %d round %d: %d steps in %.1f s (CPU %.1f s), submodel train loss %.4f, sent %.1f kB; "
                 "stage artifacts downloaded %.1f MB", self.device_id, ctrl.stage + 1, ctrl.round + 1,
                 tel.get("steps", 0), tel.get("train_s", 0.0), tel.get("cpu_time_s") or 0.0,
                 update.metrics["train_loss"], len(data) / 1e3, (tel.get("stage_download_bytes") or 0) / 1e6)
        self._status("hello", stage=ctrl.stage, round=ctrl.round)

    def stop(self) -> None:
        self._stop.set()


def round_batches(encoded: list[tuple[list[int], list[int]]], hp: P.TrainSettings, device_id: str,
                  pad: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """The round's batches as every device draws them: (input_ids, labels, real tokens) per local step.

    edge_runtime.sampler draws `batch_size` distinct examples per step (as the simulation does); a batch
    whose labels are all -100 after the first position is still yielded (the caller skips it, and says so)."""
    for idx in round_draws(hp.seeds[device_id], len(encoded), hp.batch_size, hp.local_steps):
        ids, labels = collate([encoded[i] for i in idx], pad)
        yield ids, labels, int(sum(len(encoded[i][0]) for i in idx))


def pad_id(model_config: dict) -> int:
    """Pads are labelled -100 and come after every real token, so any valid id is exact."""
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = model_config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devft-edge", description="A device of a devft fleet (torch-free).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="follow a run's rounds until it is done")
    p.add_argument("--credentials", required=True, help="device credentials JSON from `devft fleet add-device`")
    p.add_argument("--data", required=True, help="this device's JSONL shard (prompt, completion per line)")
    p.add_argument("--cache", required=True, help="content-addressed artifact cache directory (kept across runs)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="artifact format to train: onnx (portable, plain onnxruntime), ort (legacy ONNX Runtime "
                   "Training, x86_64), executorch; default auto: every one installed here, onnx first (declared "
                   "in the hello, so the coordinator serves one of them)")
    p.add_argument("--run", dest="run_id", help="run id to follow (default: the first active run seen)")
    p.add_argument("--host", help="override the broker host from the credentials")
    p.add_argument("--port", type=int, help="override the broker port from the credentials")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1; fixed for "
                   "reproducible deltas)")
    p.add_argument("--exit-after-rounds", type=int, help="stop after training this many rounds (tests)")
    p.add_argument("--ram-mb", type=int, help="memory this device offers training, in MiB, declared in its hello: "
                   "the coordinator samples it only for stages whose memory need fits (default: MemAvailable from "
                   "/proc/meminfo)")
    p.add_argument("--shared-blobs", metavar="DIR", help="content-addressed store shared with other devices on this "
                   "machine (same filesystem): each blob is kept once on disk, hard-linked into every cache")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    try:  # `devft-edge bench` (edge_runtime/bench.py), when present
        from edge_runtime.bench import register
    except ImportError:
        pass
    else:
        register(sub)
    return parser


class Stopped(Exception):
    """SIGTERM: leave whatever the device is doing (training, fetching, waiting), say offline, disconnect."""


def _stop_on_signal(device: Device):
    """A SIGTERM handler that interrupts the main thread once (a round may take minutes; the coordinator should
    learn at once that this device will not answer); a second SIGTERM during the shutdown is ignored."""
    def handler(signum, frame) -> None:
        if not device._stop.is_set():
            device.stop()
            raise Stopped()

    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        return args.func(args)
    # one line per round from this device; library logs (ONNX Runtime, telemetry probes) only with -v
    # (or DEVFT_VERBOSE=1, which `devft --verbose` passes on to the devices of a local fleet)
    verbose = args.verbose or os.environ.get("DEVFT_VERBOSE", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose:
        os.environ["DEVFT_VERBOSE"] = "1"  # ONNX Runtime sessions log at INFO (backends/ort_backend.py)
    else:
        log.setLevel(logging.INFO)
    try:
        if args.ram_mb is not None and not 1 <= args.ram_mb <= P.MAX_RAM_MB:
            raise DeviceError(f"--ram-mb {args.ram_mb} must be a whole number of MiB in [1, {P.MAX_RAM_MB}]")
        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        settings, device_id = settings_from_credentials(args.credentials, cache, args.host, args.port)
        device = Device(settings, device_id, read_shard(args.data), cache, run_id=args.run_id,
                        backend=args.backend, threads=args.threads, exit_after_rounds=args.exit_after_rounds,
                        shared_blobs=args.shared_blobs, ram_mb=args.ram_mb)
    except DeviceError as exc:
        print(f"devft-edge: error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_signal(device))
    try:
        return device.run()
    except Stopped:
        return 0  # asked to stop (SIGTERM), stopped cleanly: the offline status is out
    except KeyboardInterrupt:
        return 130
    except ConnectionError as exc:
        print(f"devft-edge: error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
