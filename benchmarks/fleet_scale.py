"""A thousand devices on one coordinator (issue #27): fleet-scale load on a real Mosquitto and the real coordinator.

    python -m benchmarks.fleet_scale --profile smoke      # 50 devices, tiny updates, 2 rounds (tests/test_fleet_scale.py)
    nice -n 5 python -m benchmarks.fleet_scale            # 100, 300 and 1,000 devices; tiny and SmolLM2 full-model updates

N protocol-level devices log in with their own TLS credentials (the fleet's passwords and ACL), say
hello, claim the stage's files, and answer every round they are sampled for with a valid, precomputed
update after a fixed compute delay instead of training. They subscribe as devft-edge does (the control
topic and every round's global adapter), so the broker's fan-out is the real one. The coordinator is
`server_sdk.fleet.coordinator.FleetExecutor` in this process, driven round by round as `rounds.run` drives it
(sample, train_round, FedAvg); it holds no model and evaluates nothing, so its memory is the fleet's share
of a real coordinator's (which also holds the base model: SmolLM2-135M's weights are about 540 MB).

Per N it reports: the time until every device's hello was handled, per round the coordinator's CPU seconds
and RSS, the time from the round's last accepted update to the next round's train control ("overhead",
FedAvg included, evaluation not), the broker's CPU seconds and RSS, and per device the messages and bytes it
received. Devices run in worker processes of `--devices-per-process` each; file-descriptor limits are raised
to the hard limit for this process, its workers and the broker it starts.
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
        # a thousand devices coming back after a broker restart: backoff from 1 s to 10 s (paho adds no jitter)
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
        self.client.subscribe(P.control_topic(RUN), self._on_control)
        if not on_demand:  # devft-edge today: every round's global adapter, sampled or not
            self.client.subscribe(P.global_topic(RUN, "+"), self._on_global)

    def start(self) -> None:
        self.client.connect(60)
        self._status("hello")

    def _status(self, state: str, **info) -> None:
        msg = P.StatusMessage(self.name, state, time.time(), {"formats": ["onnx"], "ready": self.ready, **info})
        self.client.publish(P.status_topic(RUN, self.name), P.encode_status(msg), retain=True)

    def _count(self, kind: str, payload: bytes) -> None:
        self.received[kind] += 1
        self.received_bytes[kind] += len(payload)

    def _on_global(self, msg) -> None:
        self._count("global", msg.payload)
        if msg.payload:
            with self.cond:
                self.globals[int(msg.topic.rsplit("/", 1)[-1])] = msg.payload
                self.cond.notify_all()

    def _on_control(self, msg) -> None:
        self._count("control", msg.payload)
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
        if self.on_demand:  # only the round it trains (the retained global arrives on subscribe); not from
            self.client.subscribe(P.global_topic(RUN, ctrl.round), self._on_global)  # paho's thread: it waits
        time.sleep(self.delay_s)
        with self.cond:
            if not self.cond.wait_for(lambda: ctrl.round in self.globals, timeout=60):
                return
            glob = P.decode_global(self.globals.pop(ctrl.round))
        if self.on_demand:
            self.client.unsubscribe(P.global_topic(RUN, ctrl.round))
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
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stats(pid: int) -> tuple[float, int]:
    import psutil

    p = psutil.Process(pid)
    t = p.cpu_times()
    return t.user + t.system, p.memory_info().rss


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


def run_scale(n: int, kind: str, rounds: int, sample_frac: float, delay_s: float, per_process: int,
              work: Path, on_demand: bool = False, edges: int = 0, restart: bool = False) -> dict:
    """One fleet of n devices (behind `edges` edge brokers, or on the core): connect them, run `rounds` rounds,
    return the measurements. With `restart` the broker is restarted 0.3 s into round 1 (devices computing): every
    device must come back and the round complete with every sampled update."""
    import torch

    from server_sdk.config import RunConfig
    from server_sdk.engine.rounds import client_seed, sample_clients
    from server_sdk.fleet.broker import BrokerProcess, server_credentials
    from server_sdk.fleet.coordinator import FleetExecutor
    from server_sdk.fleet.settings import FleetSettings
    from server_sdk.method.aggregation import aggregate
    from server_sdk.method.lora import to_peft_key

    fleet = make_fleet(n)
    port = _free_port()
    edge_brokers = start_edges(fleet, edges, port)  # before the core starts: their bridge logins are in its passwd
    broker = BrokerProcess(fleet, port).start()
    for edge in edge_brokers:
        edge.start()
    shutil.rmtree(work, ignore_errors=True)
    (work / "art").mkdir(parents=True)
    (work / "art" / "manifest.json").write_text("{}")
    sampled_n = max(1, math.ceil(sample_frac * n))
    cfg = RunConfig(model="tiny-random-L4", num_clients=n, clients_per_round=sampled_n, lr=LR,
                    local_steps=LOCAL_STEPS, rounds_per_stage=rounds)
    settings = FleetSettings(run_id=RUN, round_timeout_s=120, quorum=1.0, artifact_bytes_per_s=None,
                             stage_ready_timeout_s=0, prefetch_next_stage=False, trace_ahead=False)
    b_cpu0, _ = _proc_stats(broker.proc.pid)
    ex = FleetExecutor(cfg, work / "run", server_credentials(fleet), [rounds], settings, host="localhost",
                       port=port, shard_sizes={c: 64 for c in range(n)})
    workers = []
    try:
        ex.serve_stage(0, {"onnx": work / "art"})
        names = [f"dev-{c:03d}" for c in range(n)]
        t0 = time.time()
        ctx = mp.get_context("spawn")
        for w, i in enumerate(range(0, n, per_process)):
            parent, child = ctx.Pipe()
            paths = [str(fleet / "credentials" / f"{d}.json") for d in names[i:i + per_process]]
            device_port = edge_brokers[w % len(edge_brokers)].port if edge_brokers else port
            proc = ctx.Process(target=device_worker, args=(paths, device_port, delay_s, on_demand, child), daemon=True)
            proc.start()
            workers.append((proc, parent))
        for _, conn in workers:
            if not conn.poll(600):
                raise TimeoutError("a device worker did not connect its devices within 600 s")
            conn.recv()
        connected_s = time.time() - t0
        deadline = time.time() + 300
        while len(ex.device_status) < n and time.time() < deadline:
            time.sleep(0.05)
        hello_s = time.time() - t0
        shapes = lora_shapes(kind)
        glob = {k: torch.zeros(s) for k, s in shapes.items()}
        per_round = []
        restarted_at = None
        for r in range(rounds):
            sampled = sample_clients(cfg, 0, r)
            seeds = {c: client_seed(cfg.seed, 0, r, c) for c in sampled}
            cpu0, b_cpu_r0 = time.process_time(), _proc_stats(broker.proc.pid)[0]
            t_round = time.time()
            if restart and r == 1:
                restarted_at = t_round + 0.3
                threading.Timer(0.3, broker.restart, kwargs={"timeout_s": 60}).start()
            results = ex.train_round(0, r, sampled, glob, lambda k: True, seeds)
            glob = aggregate("fedavg", glob, results)
            t_done = time.time()
            b_cpu, b_rss = _proc_stats(broker.proc.pid)
            _, rss = _proc_stats(os.getpid())
            per_round.append({"round": r, "accepted": len(results), "wall_s": t_done - t_round,
                              "coordinator_cpu_s": time.process_time() - cpu0, "coordinator_rss_bytes": rss,
                              "broker_cpu_s": None if restart and r == 1 else b_cpu - b_cpu_r0, "broker_rss_bytes": b_rss,
                              "aggregated_unix": t_done})
        events = [json.loads(x) for x in (work / "run" / "fleet_events.jsonl").read_text().splitlines()]
        _overheads(per_round, events)
        for _, conn in workers:
            conn.send("stop")
        stats: dict[str, dict] = {}
        for _, conn in workers:
            if conn.poll(120):
                stats.update(conn.recv()[1])
        b_cpu1, b_rss1 = _proc_stats(broker.proc.pid)
        edge_stats = [dict(zip(("cpu_s", "rss_bytes"), _proc_stats(e.proc.pid))) for e in edge_brokers]
    finally:
        ex.close()
        for proc, _ in workers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        broker.stop()
        for edge in edge_brokers:
            edge.stop()
    update_bytes = len(P.encode_tensors({to_peft_key(k): np.zeros(s, np.float32) for k, s in shapes.items()}))
    msgs = [sum(s["received"].values()) for s in stats.values()]
    back = [s["connected_at"] for s in stats.values() if restarted_at and (s["connected_at"] or 0) > restarted_at]
    nbytes = [sum(s["received_bytes"].values()) for s in stats.values()]
    return {"devices": n, "update": kind, "globals": "sampled" if on_demand else "every", "edges": edges,
            "restart": restart,
            "edge_brokers": edge_stats, "update_bytes": update_bytes,
            "sampled_per_round": sampled_n,
            "rounds": rounds, "compute_delay_s": delay_s, "connect_s": connected_s, "all_hellos_s": hello_s,
            "hellos_seen": len(ex.device_status), "per_round": per_round,
            "overhead_s_max": max((r["overhead_s"] for r in per_round if r.get("overhead_s") is not None),
                                  default=None),
            "coordinator_rss_bytes_max": max(r["coordinator_rss_bytes"] for r in per_round),
            "broker_cpu_s_per_round_mean": float(np.mean([r["broker_cpu_s"] for r in per_round
                                                          if r["broker_cpu_s"] is not None])),
            "coordinator_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "broker_cpu_s_total": None if restart else b_cpu1 - b_cpu0, "broker_rss_bytes_end": b_rss1,
            "device_messages_received": {"min": min(msgs, default=0), "max": max(msgs, default=0),
                                         "mean": float(np.mean(msgs)) if msgs else 0.0},
            "device_bytes_received": {"min": min(nbytes, default=0), "max": max(nbytes, default=0),
                                      "mean": float(np.mean(nbytes)) if nbytes else 0.0},
            "device_reconnects": sum(s["reconnects"] for s in stats.values()),
            "broker_restart": None if restarted_at is None else {
                "devices_back": len(back), "all_back_s": max(back) - restarted_at if back else None,
                "round_accepted": per_round[1]["accepted"], "round_sampled": sampled_n},
            "devices_reporting": len(stats)}


def _overheads(per_round: list[dict], events: list[dict]) -> None:
    """Per round: its last accepted update's arrival, and the seconds from it to the next round's train control."""
    starts = {e["round"]: e["t"] for e in events if e["event"] == "round_start"}
    for rec in per_round:
        accepted = [e["t"] for e in events if e["event"] == "accepted" and e["round"] == rec["round"]]
        rec["last_update_unix"] = max(accepted) if accepted else None
        nxt = starts.get(rec["round"] + 1)
        rec["overhead_s"] = nxt - rec["last_update_unix"] if nxt and accepted else None


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict], command: str) -> str:
    mib = 2**20
    lines = [f"Command: `{command}`", "",
             "Protocol-level devices (real TLS logins and ACL, valid precomputed updates after a compute delay), "
             "a real Mosquitto and the real coordinator (FleetExecutor, FedAvg; no model, no evaluation). "
             "Overhead: from a round's last accepted update to the next round's train control.", ""]
    lines += md_table(
        ["devices", "update", "globals to", "edge brokers", "sampled", "all hellos (s)", "overhead max (s)",
         "coordinator CPU s / round",
         "coordinator RSS max (MiB)", "broker CPU s / round", "broker RSS (MiB)", "msgs / device", "MB / device"],
        [[r["devices"], f"{r['update']} ({r['update_bytes'] / mib:.2f} MiB)", r["globals"], r["edges"],
          r["sampled_per_round"],
          f"{r['all_hellos_s']:.1f}", "-" if r["overhead_s_max"] is None else f"{r['overhead_s_max']:.2f}",
          f"{np.mean([p['coordinator_cpu_s'] for p in r['per_round']]):.2f}",
          f"{r['coordinator_rss_bytes_max'] / mib:.0f}",
          f"{r['broker_cpu_s_per_round_mean']:.2f}", f"{r['broker_rss_bytes_end'] / mib:.0f}",
          f"{r['device_messages_received']['mean']:.0f}", f"{r['device_bytes_received']['mean'] / 1e6:.1f}"]
         for r in rows])
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (kind, mode), marker in zip(((k, m) for k in UPDATE_SHAPES for m in GLOBALS), "os^v"):
        sel = sorted((r for r in rows if (r["update"], r["globals"]) == (kind, mode)), key=lambda r: r["devices"])
        if not sel:
            continue
        xs, label = [r["devices"] for r in sel], f"{kind}, globals to {mode}"
        axes[0].plot(xs, [r["coordinator_rss_bytes_max"] / 2**20 for r in sel], marker=marker, label=label)
        axes[1].plot(xs, [r["overhead_s_max"] or 0 for r in sel], marker=marker, label=label)
        axes[2].plot(xs, [r["device_bytes_received"]["mean"] / 1e6 for r in sel], marker=marker, label=label)
    for ax, title in zip(axes, ("coordinator RSS (MiB)", "round overhead, max (s)", "MB received per device")):
        ax.set_xlabel("devices connected")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, "Fleet scale: one coordinator, one Mosquitto, 10% of devices sampled per round")


# each configuration: (devices, update size, globals to, edge brokers, broker restarted in round 1)
PROFILES = {
    "smoke": [(50, "tiny", "every", 0, False)],
    "standard": [
        (100, "tiny", "every", 0, False), (300, "tiny", "every", 0, False), (1000, "tiny", "every", 0, False),
        (1000, "tiny", "sampled", 0, False), (1000, "tiny", "sampled", 2, False),
        (100, "smollm2", "every", 0, False), (100, "smollm2", "sampled", 0, False),
        (300, "smollm2", "sampled", 0, False), (1000, "smollm2", "sampled", 0, False),
        (1000, "tiny", "sampled", 0, True),
    ],
}
GLOBALS = ("every", "sampled")
KEYS = ("devices", "update", "globals", "edges", "restart")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="standard")
    p.add_argument("--devices", help="comma-separated device counts: run these instead of the profile's list, "
                   "each with every --updates, --globals and --edges value")
    p.add_argument("--updates", default="tiny", help="with --devices: update sizes from tiny, smollm2 (default tiny)")
    p.add_argument("--globals", default="sampled", help="with --devices: every (each device receives every round's "
                   "global adapter, as devft-edge did before), sampled (only the rounds it trains; default)")
    p.add_argument("--edges", default="0", help="with --devices: edge broker counts (0 = devices on the fleet's "
                   "broker, K = spread over K edge brokers bridged to it; default 0)")
    p.add_argument("--restart", action="store_true", help="with --devices: restart the broker in round 1")
    p.add_argument("--rounds", type=int, default=None, help="rounds per fleet (default 3; smoke 2)")
    p.add_argument("--sample", type=float, default=0.1, help="fraction of devices sampled per round (default 0.1)")
    p.add_argument("--delay", type=float, default=1.0, help="a device's compute delay before it answers (s)")
    p.add_argument("--devices-per-process", type=int, default=250)
    args = p.parse_args(argv)
    if args.devices:
        configs = [(int(n), k, m, int(e), args.restart) for k in args.updates.split(",")
                   for m in args.globals.split(",") for e in args.edges.split(",") for n in args.devices.split(",")]
    else:
        configs = PROFILES[args.profile]
    bad = [c for c in configs if c[1] not in UPDATE_SHAPES or c[2] not in GLOBALS]
    if bad:
        p.error(f"unknown update size or globals in {bad}; sizes {list(UPDATE_SHAPES)}, globals {list(GLOBALS)}")
    rounds = args.rounds or (2 if args.profile == "smoke" else 3)
    fds = raise_fd_limit()
    most = max(c[0] for c in configs)
    if fds < 2 * most + 64:
        p.error(f"the file-descriptor limit is {fds}; {most} devices need about {2 * most + 64} "
                "(raise the hard limit: ulimit -Hn, or LimitNOFILE= in a systemd unit)")
    tag = "" if args.profile == "standard" and not args.devices else f"-{args.profile}"
    out_json = RESULTS / f"fleet-scale{tag}.json"
    done = {tuple(r[k] for k in KEYS): r for r in (json.loads(out_json.read_text())["rows"] if out_json.exists() else [])
            if all(k in r for k in KEYS)}
    command = ("python -m benchmarks.fleet_scale " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    rows = []
    for n, kind, mode, edges, restart in configs:
        if (n, kind, mode, edges, restart) in done and not args.devices:  # resume: a finished configuration is kept
            rows.append(done[(n, kind, mode, edges, restart)])
            continue
        print(f"[fleet-scale] {n} devices, {kind} updates, globals to {mode} devices, {edges} edge brokers"
              f"{', broker restarted in round 1' if restart else ''}, {rounds} rounds ...", flush=True)
        row = run_scale(n, kind, rounds, args.sample, args.delay, args.devices_per_process,
                        CACHE / f"work-{n}-{kind}", on_demand=mode == "sampled", edges=edges, restart=restart)
        rows.append(row)
        print(f"[fleet-scale] {n} devices, {kind}: all hellos {row['all_hellos_s']:.1f} s, overhead max "
              f"{row['overhead_s_max']} s, coordinator RSS {row['coordinator_rss_bytes_max'] / 2**20:.0f} MiB, "
              f"broker RSS {row['broker_rss_bytes_end'] / 2**20:.0f} MiB"
              + (f", restart: {row['broker_restart']}" if restart else ""), flush=True)
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
