"""A thousand devices on one coordinator (issue #27): fleet-scale load on a real Mosquitto and the real coordinator.

    python -m benchmarks.fleet_scale --profile smoke      # 50 devices, tiny updates, 2 rounds (tests/test_fleet_scale.py)
    nice -n 10 python -m benchmarks.fleet_scale           # the standard profile: 100, 300 and 1,000 devices, tiny and
                                                          # SmolLM2 full-model updates, faults at 1,000 (about 40 min)
    python -m benchmarks.fleet_scale --devices 1000 --fault coordinator   # one configuration

N protocol-level devices log in with their own TLS credentials (the fleet's passwords and ACL), say
hello, claim the stage's files, and answer every round they are sampled for with a valid, precomputed
update after a fixed compute delay instead of training. They subscribe as devft-edge does (the control
topic, and the global adapter of the rounds they train: `--globals sampled`; `every` is the old client), so
the broker's fan-out is the real one. The coordinator is `server_sdk.fleet.coordinator.FleetExecutor` driven round by
round as `rounds.run` drives it (sample, train_round, FedAvg, a checkpoint); it holds no model and evaluates
nothing, so its memory is the fleet's share of a real coordinator's (which also holds the base model:
SmolLM2-135M's weights are about 540 MB). It runs in this process, or in a child process for the
coordinator-crash fault.

Per N it reports: the time until every device's hello was handled, per round the coordinator's CPU seconds
and RSS (and its peak, sampled every 50 ms), the time from the round's last accepted update to the next
round's train control ("overhead", FedAvg and the checkpoint included, evaluation not), the broker's CPU
seconds and RSS, per device the messages and bytes it received, and the updates devices sent against those
the coordinator accepted (the broker drops messages for the coordinator once its per-client queue bound,
`--queue-mib`, is full). Faults (`--fault`, in round 1 while the sampled devices compute): `broker` restarts
the broker (every device must come back: they reconnect with backoff and jitter), `coordinator` SIGKILLs the
coordinator and starts a resumed one from its checkpoint, `deaths` crashes 10% of the sampled devices.
Devices run in worker processes of `--devices-per-process` each (a paho thread per device); file-descriptor
limits are raised to the hard limit for this process, its workers and the broker it starts. Each
configuration's row is kept under benchmarks/results/cache/fleet-scale/rows/ (git-ignored), so a rerun of
the same command resumes; `--fresh` measures again.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge_runtime import protocol as P
from edge_runtime.mqtt import MqttClient

from .results_md import RESULTS_MD, md_table, replace_block, save_figure, write_atomic

RESULTS = Path(os.environ.get("DEVFT_BENCH_RESULTS", Path(__file__).parent / "results"))
CACHE = RESULTS / "cache" / "fleet-scale"
RUN = "scale"
LR, LOCAL_STEPS = 1e-3, 5
# (layers, hidden, intermediate, key/value width, LoRA rank) of the adapters the updates carry
UPDATE_SHAPES = {"tiny": (4, 32, 64, 16, 2), "smollm2": (30, 576, 1536, 192, 8)}


def lora_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """Canonical LoRA tensor names -> shapes of a full-model adapter (every projection of every layer)."""
    layers, hidden, inter, kv, r = UPDATE_SHAPES[kind]
    io = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
          "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    shapes = {}
    for i in range(layers):
        for module, (d_in, d_out) in io.items():
            part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            shapes[f"layers.{i}.{part}.{module}.lora_A"] = (r, d_in)
            shapes[f"layers.{i}.{part}.{module}.lora_B"] = (d_out, r)
    return shapes


def raise_fd_limit() -> int:
    """The soft file-descriptor limit raised to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- devices


class LoadDevice:
    """One device at the protocol level: hello, ready, the train acknowledgement, a valid update; no training."""

    def __init__(self, creds, port: int, delay_s: float, on_demand: bool):
        from server_sdk.fleet.settings import mqtt_settings

        self.name, self.delay_s, self.on_demand = creds.username, delay_s, on_demand
        offline = P.encode_status(P.StatusMessage(self.name, "offline", time.time()))
        # a thousand devices coming back after a broker restart: backoff from 1 s to 10 s, with MqttClient's jitter
        self.client = MqttClient(replace(mqtt_settings(creds, self.name, "localhost", port,
                                                       will_topic=P.status_topic(RUN, self.name), will_payload=offline),
                                         reconnect_min_s=1.0, reconnect_max_s=10.0))
        self.received: Counter[str] = Counter()
        self.received_bytes: Counter[str] = Counter()
        self.sent = 0
        self.globals: dict[int, bytes] = {}
        self.cond = threading.Condition()
        self.answered: set[tuple[int, str]] = set()
        self.ready = ""
        self.dead = False
        self.client.subscribe(P.control_topic(RUN), self._on_control)
        if not on_demand:  # devft-edge today: every round's global adapter, sampled or not
            self.client.subscribe(P.global_topic(RUN, "+"), self._on_global)

    def start(self) -> None:
        self.client.connect(60)
        self._status("hello")

    def _status(self, state: str, **info) -> None:
        msg = P.StatusMessage(self.name, state, time.time(), {"formats": ["onnx"], "ready": self.ready, **info})
        self.client.publish(P.status_topic(RUN, self.name), P.encode_status(msg), retain=True)

    def _subscribe_global(self, rnd: int) -> None:
        try:
            self.client.subscribe(P.global_topic(RUN, rnd), self._on_global)
        except TimeoutError:  # a busy or restarting broker: as devft-edge, wait for the global until the deadline
            pass

    def _count(self, kind: str, payload: bytes) -> None:
        self.received[kind] += 1
        self.received_bytes[kind] += len(payload)

    def _on_global(self, msg) -> None:
        self._count("global", msg.payload)
        if msg.payload:
            with self.cond:
                self.globals[int(msg.topic.rsplit("/", 1)[-1])] = msg.payload
                self.cond.notify_all()

    def die(self) -> None:
        """Vanish as a crashed or unplugged device does: the connection drops without a DISCONNECT, so the broker
        publishes the device's will (its offline status), and it never comes back nor answers."""
        self.dead = True
        self.client._client.on_disconnect = None  # MqttClient's would set its (jittered) reconnect delay again
        self.client._client.reconnect_delay_set(3600, 3600)  # paho's loop would reconnect at once otherwise
        sock = self.client._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _on_control(self, msg) -> None:
        self._count("control", msg.payload)
        if not msg.payload or self.dead:  # a retained control deleted (a new coordinator's janitor)
            return
        ctrl = P.decode_control(msg.payload)
        offered = ctrl.artifact_for(["onnx"])
        if offered and offered[1].artifact_id != self.ready:  # claims the stage's files (it never fetches them)
            self.ready = offered[1].artifact_id
            self._status("hello")
        if ctrl.state != "train" or self.name not in ctrl.sampled_clients:
            return
        key = (ctrl.round, ctrl.hyperparams.session)
        if key in self.answered:
            return
        self.answered.add(key)
        self._status("busy", stage=ctrl.stage, round=ctrl.round)
        threading.Thread(target=self._answer, args=(ctrl,), daemon=True).start()

    def _answer(self, ctrl) -> None:
        seen = self.client.reconnects
        if self.on_demand:  # only the round it trains (the retained global arrives on subscribe); not from
            self._subscribe_global(ctrl.round)  # paho's thread: it waits for the SUBACK
        time.sleep(self.delay_s)
        deadline = ctrl.deadline_unix or time.time() + 60
        while True:  # as devft-edge: wait until the deadline, subscribing again after a reconnect
            with self.cond:
                if self.cond.wait_for(lambda: ctrl.round in self.globals, timeout=0.5):
                    glob = P.decode_global(self.globals[ctrl.round])  # kept: a resumed coordinator asks again
                    break
            if self.dead or time.time() > deadline:
                return
            if self.on_demand and self.client.reconnects != seen and self.client.connected:
                seen = self.client.reconnects
                self._subscribe_global(ctrl.round)
        if self.dead:
            return
        if self.on_demand:
            self.client.unsubscribe(P.global_topic(RUN, ctrl.round))
        with self.cond:  # only this round's and the next one's: a device holds little
            for old in [r for r in self.globals if r < ctrl.round]:
                del self.globals[old]
        if self.dead:
            return
        body = _update_body({k: v.shape for k, v in glob.tensors.items() if k in set(ctrl.hyperparams.trainable)})
        header = {"version": P.PROTOCOL_VERSION, "kind": "update", "run_id": RUN, "stage": ctrl.stage,
                  "round": ctrl.round, "device_id": self.name, "nonce": secrets.token_hex(16), "num_samples": 64,
                  "metrics": {"train_loss": 1.0}, "telemetry": {"steps": LOCAL_STEPS}}
        self.client.publish(P.update_topic(RUN, self.name), P.frame(header, body))
        self.sent += 1
        self._status("hello", stage=ctrl.stage, round=ctrl.round)


_BODIES: dict[tuple, bytes] = {}


def _update_body(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """A valid delta's safetensors body: every coordinate moved by 0.3 x lr (a third of AdamW's bound), cached."""
    key = tuple(sorted(shapes.items()))
    if key not in _BODIES:
        rng = np.random.default_rng(0)
        _BODIES[key] = P.encode_tensors({k: (np.sign(rng.standard_normal(s)) * 0.3 * LR).astype(np.float32)
                                         for k, s in shapes.items()})
    return _BODIES[key]


def device_worker(cred_paths: list[str], port: int, delay_s: float, on_demand: bool, conn) -> None:
    """A worker process: run its devices until told to stop, then send what each received."""
    from server_sdk.fleet.broker import Credentials

    raise_fd_limit()
    devices = [LoadDevice(Credentials.load(p), port, delay_s, on_demand) for p in cred_paths]
    started = []
    for d in devices:
        d.start()
        started.append(d)
    conn.send(("connected", len(started)))
    by_name = {d.name: d for d in devices}
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        if cmd[0] == "die":  # ("die", names): those devices crash now (fault "deaths")
            for name in cmd[1]:
                by_name[name].die()
        if cmd[0] == "back":  # ("back", t): how many devices are connected on a connection made after t
            conn.send(("back", sum(d.client.connected and (d.client.connected_at or 0) > cmd[1] for d in devices)))
    conn.send(("stats", {d.name: {"received": dict(d.received), "received_bytes": dict(d.received_bytes),
                                  "updates_sent": d.sent, "reconnects": d.client.reconnects,
                                  "connected_at": d.client.connected_at} for d in devices}))
    for d in devices:
        d.client.close()


# --------------------------------------------------------------------------- fleet and coordinator


def make_fleet(n: int) -> Path:
    """A fleet directory with devices dev-000 .. dev-<n-1>, cached under CACHE (logins take a while to hash)."""
    from server_sdk.fleet.broker import add_device, fleet_init, register_run

    fleet = CACHE / f"fleet-{n}"
    done = fleet / "devices.done"
    if not done.exists():
        shutil.rmtree(fleet, ignore_errors=True)
        fleet_init(fleet, hostnames=["localhost", "127.0.0.1"], port=_free_port(), bind_address="127.0.0.1")
        for c in range(n):
            add_device(fleet, f"dev-{c:03d}")
        done.write_text(str(n))
    register_run(fleet, RUN)  # devices publish only under the fleet's registered runs
    return fleet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stats(pid: int) -> tuple[float, int]:
    import psutil

    p = psutil.Process(pid)
    t = p.cpu_times()
    return t.user + t.system, p.memory_info().rss


def fresh_broker_state(fleet: Path) -> None:
    """Delete the broker's persistence (sessions, their subscriptions and queues, retained messages) that an
    earlier configuration on the same cached fleet left: a device's persistent session kept the subscription to
    every round's global adapter of a `--globals every` run, so in the next run every device received every
    9.4 MiB SmolLM2 global (9.4 GB a round through the broker, which stalled)."""
    from server_sdk.fleet.broker import runtime_dir

    (runtime_dir(fleet) / "data" / "mosquitto.db").unlink(missing_ok=True)


def set_queue_bound(fleet: Path, mib: int) -> None:
    """The broker's per-client queue bound for the next start: fleet.json `max_queued_bytes` (docs/protocol.md
    section 8: raise it for fleets whose round bursts are larger than 256 MiB), or the default for 0."""
    path = fleet / "fleet.json"
    settings = json.loads(path.read_text())
    settings.pop("max_queued_bytes", None)
    if mib:
        settings["max_queued_bytes"] = mib * 2**20
    path.write_text(json.dumps(settings, indent=2))


class PeakRss:
    """The highest RSS of the process `pid()` names (a restarted broker: the new one), sampled every 50 ms."""

    def __init__(self, pid):
        self.pid, self.peak, self._on = pid, 0, True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while self._on:
            try:
                self.peak = max(self.peak, _proc_stats(self.pid())[1])
            except Exception:  # noqa: BLE001 - between a broker's stop and its restart
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        self._on = False


def _alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def start_edges(fleet: Path, count: int, core_port: int) -> list:
    """`count` edge brokers bridged to the core on `core_port` (server_sdk/fleet/bridge.py), each on a free port."""
    from server_sdk.fleet.bridge import EdgeBroker, add_edge, edge_dir

    edges = []
    for e in range(count):
        name, port = f"edge{e}", _free_port()
        if not edge_dir(fleet, name).exists():
            add_edge(fleet, name, port=port, core_host="localhost", core_port=core_port)
        settings_path = edge_dir(fleet, name) / "fleet.json"
        settings = json.loads(settings_path.read_text())
        settings["port"], settings["bridge"]["core_port"] = port, core_port
        settings_path.write_text(json.dumps(settings, indent=2))
        edges.append(EdgeBroker(fleet, name, port))
    return edges


class Coordinator:
    """The coordinator's side, as `rounds.run` drives it: FleetExecutor serving stage 0, per round sample,
    train_round, FedAvg and a checkpoint of the global adapter (server_sdk/engine/checkpoint.py, what `devft serve
    --resume` restarts from). It holds no model and evaluates nothing. With spec["resume"] it starts from the
    checkpoint and, as a resumed `devft serve` does at its stage start, waits (at most 60 s) for the devices'
    stage-ready statuses (FleetExecutor._await_ready)."""

    def __init__(self, spec: dict):
        import torch

        from server_sdk.config import RunConfig
        from server_sdk.engine import checkpoint
        from server_sdk.fleet.broker import server_credentials
        from server_sdk.fleet.coordinator import FleetExecutor
        from server_sdk.fleet.settings import FleetSettings

        n, self.spec = spec["devices"], spec
        self._peak = PeakRss(os.getpid)  # while this coordinator runs (ru_maxrss would count earlier configurations)
        self.cfg = RunConfig(model="tiny-random-L4", num_clients=n, clients_per_round=spec["sampled"], lr=LR,
                             local_steps=LOCAL_STEPS, rounds_per_stage=spec["rounds"])
        settings = FleetSettings(run_id=RUN, round_timeout_s=ROUND_TIMEOUT_S, quorum=spec["quorum"],
                                 artifact_bytes_per_s=None, stage_ready_timeout_s=60 if spec["resume"] else 0,
                                 prefetch_next_stage=False, trace_ahead=False)
        self.run_dir = Path(spec["work"]) / "run"
        self.ex = FleetExecutor(self.cfg, self.run_dir, server_credentials(spec["fleet"]), [spec["rounds"]],
                                settings, host="localhost", port=spec["port"], shard_sizes={c: 64 for c in range(n)})
        self.ex.serve_stage(0, {"onnx": Path(spec["work"]) / "art"})
        self.glob = {k: torch.zeros(s) for k, s in lora_shapes(spec["update"]).items()}
        if spec["resume"]:
            meta, tensors = checkpoint.load(self.run_dir)
            self.glob = tensors["global"]
            self.ex._await_ready(0, 0)

    def hellos(self, n: int, timeout_s: float) -> int:
        """Wait until `n` devices said hello (at most `timeout_s`); how many did."""
        deadline = time.time() + timeout_s
        while len(self.ex.device_status) < n and time.time() < deadline:
            time.sleep(0.05)
        return len(self.ex.device_status)

    def round(self, r: int, broker_pid: int) -> dict:
        """Run round `r` to its close, aggregate and checkpoint it; its measurements."""
        from server_sdk.engine import checkpoint
        from server_sdk.engine.executor import QuorumNotReached
        from server_sdk.method.aggregation import aggregate
        from server_sdk.method.strategies.base import client_seed, sample_clients

        sampled = sample_clients(self.cfg, 0, r)
        seeds = {c: client_seed(self.cfg.seed, 0, r, c) for c in sampled}
        cpu0, b_cpu0 = time.process_time(), _proc_stats(broker_pid)[0]
        t_round = time.time()
        failed = None
        try:
            results = self.ex.train_round(0, r, sampled, self.glob, lambda k: True, seeds)
            self.glob = aggregate("fedavg", self.glob, results)
            checkpoint.save(self.run_dir, {"round": r}, {"global": self.glob})
            accepted = len(results)
        except (QuorumNotReached, TimeoutError) as exc:  # recorded (TimeoutError: the broker did not acknowledge
            failed = f"{type(exc).__name__}: {str(exc)[:400]}"  # a publish); the next round goes on from the last global
            accepted = sum(e["event"] == "accepted" and e["round"] == r for e in _events(Path(self.spec["work"])))
        t_done = time.time()
        b_cpu, b_rss = _proc_stats(broker_pid) if _alive(broker_pid) else (None, None)  # restarted: a new pid
        _, rss = _proc_stats(os.getpid())
        return {"round": r, "accepted": accepted, **({"failed": failed} if failed else {}),
                "wall_s": t_done - t_round, "started_unix": t_round,
                "coordinator_cpu_s": time.process_time() - cpu0, "coordinator_rss_bytes": rss,
                "broker_cpu_s": None if b_cpu is None else b_cpu - b_cpu0, "broker_rss_bytes": b_rss,
                "aggregated_unix": t_done}

    def seen(self) -> int:
        return len(self.ex.device_status)

    def peak_rss(self) -> int:
        return self._peak.peak

    def close(self) -> None:
        self._peak.stop()
        self.ex.close()

    def call(self, name: str, *args):
        return getattr(self, name)(*args)


def _coordinator_main(spec: dict, conn) -> None:
    """A Coordinator in its own process (fault "coordinator"): answers ("method", args) calls until killed."""
    raise_fd_limit()
    coord = Coordinator(spec)
    conn.send(("ready", time.time()))
    while True:
        name, args = conn.recv()
        try:
            conn.send(("ok", coord.call(name, *args)))
        except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        if name == "close":
            return


class CoordinatorProcess:
    """A Coordinator run as a child process, so that its crash is a real SIGKILL: no clean disconnect, nothing
    flushed, the broker keeps its session and queues what arrives for it meanwhile."""

    def __init__(self, spec: dict, timeout_s: float = 300):
        ctx = mp.get_context("spawn")
        self.started = time.time()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_coordinator_main, args=(spec, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"the coordinator process did not start within {timeout_s} s")
        self.ready = self.conn.recv()[1]

    def send(self, name: str, *args) -> None:
        self.conn.send((name, args))

    def result(self, timeout_s: float = 600):
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"the coordinator process did not answer within {timeout_s} s")
        tag, value = self.conn.recv()
        if tag == "error":
            raise RuntimeError(f"in the coordinator process: {value}")
        return value

    def call(self, name: str, *args):
        self.send(name, *args)
        return self.result()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("close")
            except (TimeoutError, RuntimeError, OSError):
                pass
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()


def _events(work: Path) -> list[dict]:
    path = work / "run" / "fleet_events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def _wait_event(work: Path, pred, timeout_s: float) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        hit = next((e for e in reversed(_events(work)) if pred(e)), None)
        if hit is not None:
            return hit
        time.sleep(0.05)
    raise TimeoutError(f"no matching coordinator event within {timeout_s} s")


def start_workers(names: list[str], fleet: Path, ports: list[int], per_process: int, delay_s: float,
                  on_demand: bool) -> list:
    """Device worker processes of `per_process` devices each, worker w on ports[w % len(ports)]."""
    ctx = mp.get_context("spawn")
    workers = []
    for w, i in enumerate(range(0, len(names), per_process)):
        parent, child = ctx.Pipe()
        paths = [str(fleet / "credentials" / f"{d}.json") for d in names[i:i + per_process]]
        proc = ctx.Process(target=device_worker, args=(paths, ports[w % len(ports)], delay_s, on_demand, child),
                           daemon=True)
        proc.start()
        workers.append((proc, parent, names[i:i + per_process]))
    return workers


def wait_back(workers: list, at: float, n: int, timeout_s: float) -> bool:
    """Wait until all n devices are connected on connections made after `at` (a broker restart)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for _, conn, _ in workers:
            conn.send(("back", at))
        if sum(conn.recv()[1] for _, conn, _ in workers) >= n:
            return True
        time.sleep(0.5)
    return False


def kill_devices(workers: list, doomed: set[str]) -> None:
    """Tell each worker which of its devices crash now (fault "deaths")."""
    for _, conn, names in workers:
        mine = [d for d in names if d in doomed]
        if mine:
            conn.send(("die", mine))


def run_scale(n: int, kind: str, rounds: int, sample_frac: float, delay_s: float, per_process: int,
              work: Path, on_demand: bool = False, edges: int = 0, fault: str = "none", queue_mib: int = 0) -> dict:
    """One fleet of n devices (behind `edges` edge brokers, or on the core): connect them, run `rounds` rounds,
    return the measurements. Faults (FAULTS), all in round 1, 0.3 s after its train control, while the sampled
    devices compute: "broker" restarts the broker (every device must come back, the round close with every
    sampled update); "coordinator" SIGKILLs the coordinator process and starts a resumed one from the checkpoint
    (restart to first round measured; the round then closes with every sampled update); "deaths" crashes 10% of
    the round's sampled devices (the round must close on their wills, quorum 0.8, well before the deadline)."""
    from server_sdk.fleet.broker import BrokerProcess
    from server_sdk.method.lora import to_peft_key
    from server_sdk.method.strategies.base import sample_clients

    fleet = make_fleet(n)
    set_queue_bound(fleet, queue_mib)
    fresh_broker_state(fleet)
    port = _free_port()
    edge_brokers = start_edges(fleet, edges, port)  # before the core starts: their bridge logins are in its passwd
    broker_started = time.time()
    broker = BrokerProcess(fleet, port).start()
    for edge in edge_brokers:
        edge.start()
    shutil.rmtree(work, ignore_errors=True)
    (work / "art").mkdir(parents=True)
    (work / "art" / "manifest.json").write_text("{}")
    sampled_n = max(1, math.ceil(sample_frac * n))
    spec = {"devices": n, "sampled": sampled_n, "rounds": rounds, "update": kind, "fleet": str(fleet), "port": port,
            "work": str(work), "quorum": DEATHS_QUORUM if fault == "deaths" else 1.0, "resume": False}
    b_cpu0, _ = _proc_stats(broker.proc.pid)
    broker_peak = PeakRss(lambda: broker.proc.pid)
    coord = CoordinatorProcess(spec) if fault == "coordinator" else Coordinator(spec)
    workers = []
    fault_info: dict = {}
    try:
        names = [f"dev-{c:03d}" for c in range(n)]
        t0 = time.time()
        workers = start_workers(names, fleet, [e.port for e in edge_brokers] or [port], per_process, delay_s,
                                on_demand)
        for _, conn, _ in workers:
            if not conn.poll(600):
                raise TimeoutError("a device worker did not connect its devices within 600 s")
            conn.recv()
        connected_s = time.time() - t0
        seen = coord.call("hellos", n, 300)
        hello_s = time.time() - t0
        per_round = []
        for r in range(rounds):
            if r == 1 and fault == "coordinator":
                coord, rec, fault_info = crash_coordinator(coord, spec, work, broker.proc.pid)
            else:
                if r == 1 and fault == "broker":
                    fault_info["at"] = time.time() + 0.3
                    threading.Timer(0.3, broker.restart, kwargs={"timeout_s": 60}).start()
                if r == 1 and fault == "deaths":
                    fault_info = deaths_plan(spec, sample_clients, names, time.time() + 0.3)
                    threading.Timer(0.3, kill_devices, args=(workers, set(fault_info["devices"]))).start()
                rec = coord.call("round", r, broker.proc.pid)
            if r == 1 and fault == "broker":
                rec["broker_cpu_s"] = None  # the restarted broker's CPU counts from zero
            per_round.append(rec)
        if fault == "broker":  # every device back, however long its backoff
            fault_info["all_back_by_end"] = wait_back(workers, fault_info["at"], n, 120)
        events = _events(work)
        _overheads(per_round, events)
        for _, conn, _ in workers:
            conn.send("stop")
        stats: dict[str, dict] = {}
        for _, conn, _ in workers:
            if conn.poll(120):
                stats.update(conn.recv()[1])
        b_cpu1, b_rss1 = _proc_stats(broker.proc.pid)
        edge_stats = [dict(zip(("cpu_s", "rss_bytes"), _proc_stats(e.proc.pid))) for e in edge_brokers]
        seen, peak = coord.call("seen"), coord.call("peak_rss")
    finally:
        broker_peak.stop()
        coord.close()
        for proc, _, _ in workers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        broker.stop()
        for edge in edge_brokers:
            edge.stop()
    update_bytes = len(P.encode_tensors({to_peft_key(k): np.zeros(s, np.float32)
                                         for k, s in lora_shapes(kind).items()}))
    msgs = [sum(s["received"].values()) for s in stats.values()]
    nbytes = [sum(s["received_bytes"].values()) for s in stats.values()]
    row = {"devices": n, "update": kind, "globals": "sampled" if on_demand else "every", "edges": edges,
           "fault": fault, "queue_mib": queue_mib, "restart": fault == "broker",
           "edge_brokers": edge_stats, "update_bytes": update_bytes,
           "sampled_per_round": sampled_n,
           "rounds": rounds, "compute_delay_s": delay_s, "connect_s": connected_s, "all_hellos_s": hello_s,
           "hellos_seen": seen, "per_round": per_round,
           "overhead_s_max": max((r["overhead_s"] for r in per_round if r.get("overhead_s") is not None),
                                 default=None),
           "coordinator_rss_bytes_max": max(r["coordinator_rss_bytes"] for r in per_round),
           "broker_cpu_s_per_round_mean": float(np.mean([r["broker_cpu_s"] for r in per_round
                                                         if r["broker_cpu_s"] is not None])),
           "coordinator_peak_rss_bytes": peak,
           "broker_cpu_s_total": None if fault == "broker" else b_cpu1 - b_cpu0, "broker_rss_bytes_end": b_rss1,
           "broker_peak_rss_bytes": broker_peak.peak,
           "device_messages_received": {"min": min(msgs, default=0), "max": max(msgs, default=0),
                                        "mean": float(np.mean(msgs)) if msgs else 0.0},
           "device_bytes_received": {"min": min(nbytes, default=0), "max": max(nbytes, default=0),
                                     "mean": float(np.mean(nbytes)) if nbytes else 0.0},
           "device_reconnects": sum(s["reconnects"] for s in stats.values()),
           # updates devices published that the coordinator never accepted (dropped by the broker, or too late)
           "updates_sent": sum(s["updates_sent"] for s in stats.values()),
           "updates_accepted": sum(e["event"] == "accepted" for e in events),
           "broker_dropped_for_coordinator": _dropped(fleet, broker_started),
           "rounds_failed": sum("failed" in r for r in per_round),
           "load_average_end": os.getloadavg()[0],  # of this machine (2 cores, shared): what the timings ran beside
           "broker_restart": None, "coordinator_crash": None, "device_deaths": None,
           "devices_reporting": len(stats)}
    if fault == "broker":
        at = fault_info["at"]
        back = [s["connected_at"] for s in stats.values() if (s["connected_at"] or 0) > at]
        row["broker_restart"] = {"devices_back": len(back), "all_back_s": max(back) - at if back else None,
                                 "all_back_by_end": fault_info["all_back_by_end"],
                                 "round_accepted": per_round[1]["accepted"], "round_sampled": sampled_n,
                                 "round_wall_s": per_round[1]["wall_s"]}
    elif fault == "coordinator":
        row["coordinator_crash"] = {**fault_info, "round_accepted": per_round[1]["accepted"],
                                    "round_sampled": sampled_n}
    elif fault == "deaths":
        end = next(e for e in events if e["event"] == "round_end" and e["round"] == 1)
        row["device_deaths"] = {**fault_info, "round_accepted": per_round[1]["accepted"], "round_sampled": sampled_n,
                                "round_missing": end["missing"], "round_offline": end["offline"],
                                "closed_after_deaths_s": end["t"] - fault_info["at"],
                                "deadline_s": ROUND_TIMEOUT_S, "quorum": DEATHS_QUORUM}
    return row


def _dropped(fleet: Path, since: float) -> bool:
    """Whether the broker said, since `since`, that it dropped messages for the coordinator's connection (its
    per-client queue bound, max_queued_bytes, was full)."""
    log = fleet / "mosquitto.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    stamps = [x.split(":", 1)[0] for x in lines if "being dropped for client server" in x]
    return any(t.isdigit() and int(t) >= int(since) for t in stamps)


def crash_coordinator(coord: CoordinatorProcess, spec: dict, work: Path, broker_pid: int):
    """Round 1 with a coordinator crash: SIGKILL 0.3 s after its train control, a resumed coordinator started at
    once; that one's round 1 record, and the crash's measurements."""
    coord.send("round", 1, broker_pid)
    _wait_event(work, lambda e: e["event"] == "round_start" and e["round"] == 1, 120)
    time.sleep(0.3)
    killed = time.time()
    coord.kill()
    resumed = CoordinatorProcess({**spec, "resume": True})
    rec = resumed.call("round", 1, broker_pid)
    events = _events(work)
    first = min(e["t"] for e in events if e["event"] == "round_start" and e["round"] == 1 and e["t"] > killed)
    ready = [e for e in events if e["event"] == "stage_ready" and e["t"] > killed]
    return resumed, rec, {
        "at": killed, "restart_to_ready_s": resumed.ready - resumed.started,
        "restart_to_first_round_s": first - resumed.started,
        "stage_ready_wait_s": ready[0]["waited_s"] if ready else None,
        "not_ready": len(ready[0]["not_ready"]) if ready else None,
        "round_closed_after_restart_s": rec["aggregated_unix"] - resumed.started}


def deaths_plan(spec: dict, sample_clients, names: list[str], at: float) -> dict:
    """10% (at least one) of round 1's sampled devices, who crash at `at`."""
    from server_sdk.config import RunConfig

    cfg = RunConfig(model="tiny-random-L4", num_clients=spec["devices"], clients_per_round=spec["sampled"])
    sampled = [names[c] for c in sample_clients(cfg, 0, 1)]
    doomed = sampled[::10][:max(1, math.ceil(0.1 * len(sampled)))]
    return {"at": at, "devices": doomed, "killed": len(doomed)}


def _overheads(per_round: list[dict], events: list[dict]) -> None:
    """Per round: its last accepted update's arrival, and the seconds from it to the next round's first train
    control after it (a resumed coordinator opens its round again; that is not the round's overhead)."""
    for rec in per_round:
        accepted = [e["t"] for e in events if e["event"] == "accepted" and e["round"] == rec["round"]]
        rec["last_update_unix"] = last = max(accepted) if accepted else None
        nxt = [e["t"] for e in events if e["event"] == "round_start" and e["round"] == rec["round"] + 1
               and last is not None and e["t"] >= last]
        rec["overhead_s"] = min(nxt) - last if nxt else None


# --------------------------------------------------------------------------- report


def _mean_of(rows: list[dict], key: str) -> float:
    return float(np.mean([p[key] for p in rows]))


def markdown(rows: list[dict], command: str) -> str:
    mib = 2**20
    lines = [f"Command: `{command}`", "",
             "Protocol-level devices (real TLS logins and ACL, valid precomputed updates after a compute delay), "
             "a real Mosquitto and the real coordinator (FleetExecutor, FedAvg, a checkpoint per round; no model, no "
             "evaluation). Overhead: from a round's last accepted update to the next round's train control.", ""]
    plain = [r for r in rows if r.get("fault", "none") == "none"]
    lines += [] if not plain else md_table(
        ["devices", "update", "globals to", "edge brokers", "broker queue bound (MiB)", "sampled", "all hellos (s)",
         "overhead max (s)", "coordinator CPU s / round", "coordinator RSS max (MiB)", "coordinator peak RSS (MiB)",
         "broker CPU s / round", "broker RSS end / peak (MiB)", "updates accepted / sent", "rounds short of quorum",
         "msgs / device", "MB / device", "load avg"],
        [[r["devices"], f"{r['update']} ({r['update_bytes'] / mib:.2f} MiB)", r["globals"], r["edges"],
          r.get("queue_mib") or 256, r["sampled_per_round"],
          f"{r['all_hellos_s']:.1f}", "-" if r["overhead_s_max"] is None else f"{r['overhead_s_max']:.2f}",
          f"{_mean_of(r['per_round'], 'coordinator_cpu_s'):.2f}", f"{r['coordinator_rss_bytes_max'] / mib:.0f}",
          f"{r['coordinator_peak_rss_bytes'] / mib:.0f}",
          f"{r['broker_cpu_s_per_round_mean']:.2f}",
          f"{r['broker_rss_bytes_end'] / mib:.0f} / {r['broker_peak_rss_bytes'] / mib:.0f}"
          if r.get("broker_peak_rss_bytes") else f"{r['broker_rss_bytes_end'] / mib:.0f}",
          f"{r['updates_accepted']} / {r['updates_sent']}"
          + (" (broker dropped)" if r["broker_dropped_for_coordinator"] else ""),
          f"{r['rounds_failed']} / {r['rounds']}",
          f"{r['device_messages_received']['mean']:.0f}", f"{r['device_bytes_received']['mean'] / 1e6:.1f}",
          f"{r['load_average_end']:.0f}"]
         for r in plain])
    faults = [r for r in rows if r.get("fault", "none") != "none"]
    if faults:
        lines += ["", "Faults, each in round 1, 0.3 s after its train control (the sampled devices computing):", ""]
        lines += md_table(["devices", "update", "sampled", "fault", "what happened", "round 1 accepted / sampled",
                           "round 1 wall (s)", "overhead max (s)", "updates accepted / sent (all rounds)"],
                          [[r["devices"], r["update"], r["sampled_per_round"], r["fault"], _fault_text(r),
                            f"{r['per_round'][1]['accepted']} / {r['sampled_per_round']}",
                            f"{r['per_round'][1]['wall_s']:.1f}",
                            "-" if r["overhead_s_max"] is None else f"{r['overhead_s_max']:.2f}",
                            f"{r['updates_accepted']} / {r['updates_sent']}"] for r in faults])
    return "\n".join(lines) + "\n"


def _fault_text(r: dict) -> str:
    if r["fault"] == "broker":
        b = r["broker_restart"]
        back = "-" if b["all_back_s"] is None else f"{b['all_back_s']:.1f}"
        return f"broker restarted: {b['devices_back']} of {r['devices']} devices back within {back} s"
    if r["fault"] == "coordinator":
        c = r["coordinator_crash"]
        wait = "" if c["stage_ready_wait_s"] is None else f" (stage-ready wait {c['stage_ready_wait_s']:.1f} s)"
        return (f"coordinator SIGKILLed, resumed from its checkpoint: {c['restart_to_first_round_s']:.1f} s from "
                f"restart to the round's control{wait}, round closed {c['round_closed_after_restart_s']:.1f} s "
                "after restart")
    d = r["device_deaths"]
    return (f"{d['killed']} sampled devices crashed: the round closed {d['closed_after_deaths_s']:.1f} s later "
            f"(deadline {d['deadline_s']:.0f} s, quorum {d['quorum']:.0%}); {len(d['round_offline'])} seen offline")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    plain = [r for r in rows if r.get("fault", "none") == "none" and not r["edges"] and not r.get("queue_mib")]
    for (kind, mode), marker in zip(((k, m) for k in UPDATE_SHAPES for m in GLOBALS), "os^v"):
        sel = sorted((r for r in plain if (r["update"], r["globals"]) == (kind, mode)), key=lambda r: r["devices"])
        if not sel:
            continue
        xs, label = [r["devices"] for r in sel], f"{kind}, globals to {mode}"
        axes[0].plot(xs, [r["coordinator_rss_bytes_max"] / 2**20 for r in sel], marker=marker, label=label)
        axes[1].plot(xs, [r["overhead_s_max"] or 0 for r in sel], marker=marker, label=label)
        axes[2].plot(xs, [r["all_hellos_s"] for r in sel], marker=marker, label=label)
        axes[3].plot(xs, [r["device_bytes_received"]["mean"] / 1e6 for r in sel], marker=marker, label=label)
    for r in rows:  # a raised broker queue bound: a point of its own
        if r.get("queue_mib") and r.get("fault", "none") == "none" and not r["edges"]:
            label = f"{r['update']}, queue bound {r['queue_mib']} MiB"
            axes[0].plot([r["devices"]], [r["coordinator_rss_bytes_max"] / 2**20], "D", label=label)
            axes[1].plot([r["devices"]], [r["overhead_s_max"] or 0], "D", label=label)
    axes[1].set_yscale("symlog", linthresh=1.0)
    axes[0].axhline(1536, color="grey", ls="--", lw=0.8, label="goal: 1.5 GB")
    axes[1].axhline(1.0, color="grey", ls="--", lw=0.8, label="goal: 1 s")
    for ax, title in zip(axes, ("coordinator RSS (MiB)", "round overhead, max (s)", "all devices' hellos (s)",
                                "MB received per device")):
        ax.set_xlabel("devices connected")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save_figure(fig, path, "Fleet scale: one coordinator, one Mosquitto, 10% of devices sampled per round")


ROUND_TIMEOUT_S = 120.0  # a round's deadline: what a fault must not cost
DEATHS_QUORUM = 0.8  # fault "deaths": 10% of the sampled devices crash, so a quorum of 1.0 could never close it
FAULTS = ("none", "broker", "coordinator", "deaths")
# each configuration: (devices, update size, globals to, edge brokers, fault in round 1, the broker's per-client
# queue bound in MiB: 0 = the default 256 MiB)
PROFILES = {
    "smoke": [(50, "tiny", "every", 0, "none", 0)],
    "standard": [
        (100, "tiny", "sampled", 0, "none", 0), (300, "tiny", "sampled", 0, "none", 0),
        (1000, "tiny", "sampled", 0, "none", 0),
        (100, "smollm2", "sampled", 0, "none", 0), (300, "smollm2", "sampled", 0, "none", 0),
        (1000, "smollm2", "sampled", 0, "none", 0), (1000, "smollm2", "sampled", 0, "none", 1024),
        (1000, "tiny", "every", 0, "none", 0), (1000, "tiny", "sampled", 2, "none", 0),
        (1000, "tiny", "sampled", 0, "broker", 0), (1000, "tiny", "sampled", 0, "coordinator", 0),
        (1000, "tiny", "sampled", 0, "deaths", 0),
    ],
}
GLOBALS = ("every", "sampled")
KEYS = ("devices", "update", "globals", "edges", "fault", "queue_mib")


def row_cache(config: tuple, rounds: int, sample: float, delay: float, per_process: int) -> Path:
    """Where one configuration's finished row is kept (git-ignored), so a rerun of the command resumes."""
    n, kind, mode, edges, fault, queue = config
    q = f"-q{queue}" if queue else ""
    return CACHE / "rows" / f"{n}-{kind}-{mode}-e{edges}-{fault}{q}-r{rounds}-s{sample:g}-d{delay:g}-p{per_process}.json"


# the comma-separated lists that, with --devices, make the configurations (every combination runs): flag, default, help
DEVICES_LISTS = (
    ("--updates", "tiny", "update sizes from tiny, smollm2 (default tiny)"),
    ("--globals", "sampled", "every (each device receives every round's global adapter, as devft-edge did before), "
                             "sampled (only the rounds it trains; default)"),
    ("--edges", "0", "edge broker counts (0 = devices on the fleet's broker, K = spread over K edge brokers bridged "
                     "to it; default 0)"),
    ("--fault", "none", "faults in round 1, comma-separated from none, broker (restart the broker), coordinator "
                        "(SIGKILL the coordinator process, resume it from its checkpoint), deaths (10%% of the round's "
                        "sampled devices crash); default none"),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="standard")
    p.add_argument("--devices", help="comma-separated device counts: run these instead of the profile's list, "
                   "each with every --updates, --globals and --edges value")
    for flag, default, text in DEVICES_LISTS:
        p.add_argument(flag, default=default, help=f"with --devices: {text}")
    p.add_argument("--queue-mib", type=int, default=0, help="with --devices: the broker's per-client queue bound "
                   "(fleet.json max_queued_bytes, in MiB) for these runs; 0 = the fleet's default, 256 MiB")
    p.add_argument("--restart", action="store_true", help="with --devices: the same as --fault broker")
    p.add_argument("--rounds", type=int, default=None, help="rounds per fleet (default 3; smoke 2)")
    p.add_argument("--sample", type=float, default=0.1, help="fraction of devices sampled per round (default 0.1)")
    p.add_argument("--delay", type=float, default=1.0, help="a device's compute delay before it answers (s)")
    p.add_argument("--devices-per-process", type=int, default=250)
    p.add_argument("--fresh", action="store_true", help="measure every configuration again (default: a "
                   "configuration finished before with the same settings is read from benchmarks/results/cache/)")
    args = p.parse_args(argv)
    if args.devices:
        faults = ["broker"] if args.restart else args.fault.split(",")
        configs = [(int(n), k, m, int(e), f, args.queue_mib) for f in faults for k in args.updates.split(",")
                   for m in args.globals.split(",") for e in args.edges.split(",") for n in args.devices.split(",")]
    else:
        configs = PROFILES[args.profile]
    bad = [c for c in configs if c[1] not in UPDATE_SHAPES or c[2] not in GLOBALS or c[4] not in FAULTS]
    if bad:
        p.error(f"unknown update size, globals or fault in {bad}; sizes {list(UPDATE_SHAPES)}, globals "
                f"{list(GLOBALS)}, faults {list(FAULTS)}")
    if any(c[4] != "none" and args.rounds is not None and args.rounds < 2 for c in configs):
        p.error("a fault happens in round 1: --rounds must be at least 2")
    rounds = args.rounds or (2 if args.profile == "smoke" else 3)
    fds = raise_fd_limit()
    most = max(c[0] for c in configs)
    if fds < 2 * most + 64:
        p.error(f"the file-descriptor limit is {fds}; {most} devices need about {2 * most + 64} "
                "(raise the hard limit: ulimit -Hn, or LimitNOFILE= in a systemd unit)")
    tag = "" if args.profile == "standard" and not args.devices else f"-{args.profile}"
    out_json = RESULTS / f"fleet-scale{tag}.json"
    command = ("python -m benchmarks.fleet_scale " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    rows = []
    for config in configs:
        n, kind, mode, edges, fault, queue = config
        cached = row_cache(config, rounds, args.sample, args.delay, args.devices_per_process)
        if cached.exists() and not args.fresh:  # resume: a finished configuration is kept
            rows.append(json.loads(cached.read_text()))
            continue
        print(f"[fleet-scale] {n} devices, {kind} updates, globals to {mode} devices, {edges} edge brokers"
              f"{'' if fault == 'none' else f', fault {fault} in round 1'}, {rounds} rounds ...", flush=True)
        t0 = time.time()
        row = run_scale(n, kind, rounds, args.sample, args.delay, args.devices_per_process,
                        CACHE / f"work-{n}-{kind}", on_demand=mode == "sampled", edges=edges, fault=fault,
                        queue_mib=queue)
        row["bench_wall_s"] = time.time() - t0
        rows.append(row)
        fault_line = "" if fault == "none" else f", {_fault_text(row)}"
        print(f"[fleet-scale] {n} devices, {kind}: all hellos {row['all_hellos_s']:.1f} s, overhead max "
              f"{row['overhead_s_max']} s, coordinator RSS {row['coordinator_rss_bytes_max'] / 2**20:.0f} MiB, "
              f"broker RSS {row['broker_rss_bytes_end'] / 2**20:.0f} MiB{fault_line} ({row['bench_wall_s']:.0f} s)",
              flush=True)
        write_atomic(cached, json.dumps(row, indent=1) + "\n")
        write_atomic(out_json, json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    summary = {"command": command, "rows": rows, "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_atomic(out_json, json.dumps(summary, indent=1) + "\n")
    plot(rows, out_json.with_suffix(".png"))
    md = markdown(rows, command)
    if not tag and "DEVFT_BENCH_RESULTS" not in os.environ:
        replace_block("fleet-scale", "### A thousand devices on one coordinator (issue #27, benchmarks/fleet_scale.py)"
                      f"\n\n{md}\n![fleet scale](results/fleet-scale.png)\n\nJSON: `benchmarks/results/fleet-scale.json`."
                      f" Generated {summary['generated']}.", RESULTS_MD)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
