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
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_runtime import protocol as P
from edge_runtime.backends import (
    Trainer,
    runtime_versions,
)
from edge_runtime.device_setup import (
    BACKENDS,
    REFUSED_EXIT,
    SESSION_EXPIRY_S,
    DeviceError,
    available_ram_mb,
    check_artifact_format,
    device_capabilities,
    pick_formats,
    settings_from_credentials,
)
from edge_runtime.device_training import RoundWork
from edge_runtime.fetch import ArtifactCache, FetchError
from edge_runtime.manifest import ManifestError
from edge_runtime.mqtt import Message, MqttClient, MqttSettings, wait_published
from edge_runtime.shard import Shard, encode, pad_id, read_shard, round_batches

__all__ = [  # devft-edge's public names, wherever they live (device_setup.py, shard.py, device_training.py)
    "BACKENDS", "PARENT_ENV", "REFUSED_EXIT", "SESSION_EXPIRY_S", "Device", "DeviceError", "Shard", "Stopped",
    "available_ram_mb", "build_parser", "check_artifact_format", "device_capabilities", "encode", "main",
    "pad_id", "pick_formats", "read_shard", "round_batches", "settings_from_credentials",
]

log = logging.getLogger("devft.edge")

PARENT_ENV = "DEVFT_EXIT_WITH_PARENT"  # a pid: stop when it is no longer this process's parent


class Device(RoundWork):
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
