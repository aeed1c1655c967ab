"""Transport benchmark: how much of a fleet round is transport and coordination, and what the wire costs.

    python -m benchmarks.transport                  # 8 devices, tiny random LLaMA (hidden 128), a few minutes

A real local fleet (server_sdk.fleet.local_fleet: mosquitto with TLS, passwords and the fleet ACL,
N `devft-edge` processes) runs a short DEVFT schedule through the normal round loop
(`rounds.run`) with a `FleetExecutor` that only adds stopwatches and byte counters.

Definitions (per round; every device is sampled in every round):

* round wall time W: the coordinator's `train_round` call, from publishing the global
  adapter until the last sampled device's update was accepted (aggregation and eval,
  which a simulation pays too, come after and are not in W).
* device training time of device d: `train_s - fetch_s` from its update telemetry, i.e.
  everything the device did inside the round except waiting for artifact chunks
  (opening the ONNX Runtime session, loading the global adapter, the optimizer steps).
* transport and coordination = W - training time of the critical device (the one whose
  update was accepted last): control/global delivery, the device's wait before it starts,
  artifact chunks still missing, update encoding, upload, decoding and validation.
  Its share of W is the headline number (goal <= 5%). A stricter variant counts only the
  optimizer steps (`duration_s` of the telemetry) as training.
* artifact throughput: per device, bytes it received for the stage's artifact divided by
  the seconds it spent in the fetch (`stage_fetch_s`: at the stage start and in its rounds).
* prefetch (`--no-prefetch` turns it off, for a side-by-side baseline): during a stage's last
  round the coordinator announces its guess at the next stage's files and devices fetch them
  when idle; a stage's first round opens once the devices report the stage's files ready
  (at most `stage_ready_timeout_s`). Per stage: the bytes each device prefetched for it and
  the coordinator's wait for readiness (part of the stage start, like the export, not of W).
* bytes on the wire: mosquitto's `$SYS/broker/bytes/received|sent` (MQTT packets, TLS
  records not included), before the coordinator connects and after the devices are gone,
  against the raw payload: tensor bytes of global adapters and updates, and artifact file
  bytes a device actually needed (files it did not hold from an earlier stage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edge_runtime.mqtt import MqttClient
from server_sdk.config import RunConfig
from server_sdk.fleet.coordinator import FleetExecutor
from server_sdk.fleet.serving import tokenizer_dir_of
from server_sdk.fleet.settings import FleetSettings, mqtt_settings

from .results_md import md_table, replace_block

RESULTS = Path(__file__).parent / "results"
SYS_TOPICS = ("$SYS/broker/bytes/received", "$SYS/broker/bytes/sent")
SYS_INTERVAL_S = 10  # mosquitto's default sys_interval


class MeasuredFleetExecutor(FleetExecutor):
    """A FleetExecutor with stopwatches and byte counters; the protocol and policy are unchanged."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[dict] = []
        self.stages: list[dict] = []
        self.published: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # kind -> [messages, bytes]

    def _publish(self, topic: str, payload: bytes, retain: bool = False, attempts: int = 6) -> None:
        kind = topic.split("/")[2]  # devft/<run>/<kind>/...
        self.published[kind][0] += 1
        self.published[kind][1] += len(payload)
        super()._publish(topic, payload, retain, attempts)

    def begin_stage(self, stage, plan, sub_model) -> int:
        sent_before, t0 = self.artifacts.bytes_sent, time.time()
        total = super().begin_stage(stage, plan, sub_model)
        files = [(f.path, f.sha256, f.size) for f in next(iter(self._artifacts.values())).files]
        self.stages.append({"stage": stage, "artifact_bytes": total, "files": files, "announced_unix": time.time(),
                            "export_serve_and_ready_s": time.time() - t0, "server_chunk_bytes_before": sent_before})
        return total

    def train_round(self, stage, rnd, sampled, global_lora, is_trainable, seeds):
        t0 = time.time()
        results = super().train_round(stage, rnd, sampled, global_lora, is_trainable, seeds)
        t1 = time.time()
        raw_global = sum(int(v.numel()) * 4 for v in global_lora.values())
        raw_update = sum(int(v.numel()) * 4 for k, v in global_lora.items() if is_trainable(k))
        self.rounds.append({"stage": stage, "round": self.wire_round(stage, rnd), "start_unix": t0, "end_unix": t1,
                            "wall_s": t1 - t0, "raw_global_bytes": raw_global, "raw_update_bytes": raw_update,
                            "devices": {r.telemetry["device"]: {**r.telemetry, "payload_bytes": r.payload_bytes}
                                        for r in results}})
        return results


class SysBytes:
    """The broker's cumulative byte counters, read on a server connection that may read $SYS/broker/bytes."""

    def __init__(self, creds, port: int) -> None:
        self.values: dict[str, int] = {}
        self.updated = threading.Event()
        self.client = MqttClient(mqtt_settings(creds, "transport-bench-sys", "localhost", port))
        for topic in SYS_TOPICS:
            self.client.subscribe(topic, self._on, qos=0)
        self.client.connect(30)

    def _on(self, msg) -> None:
        self.values[msg.topic.rsplit("/", 1)[-1]] = int(msg.payload)
        self.updated.set()

    def read_fresh(self) -> dict[str, int]:
        """The counters once a $SYS publication came after this call (mosquitto republishes only changed
        values, retained; `sent` changes every interval because it counts these very messages)."""
        self.updated.clear()
        if not self.updated.wait(2.5 * SYS_INTERVAL_S) or len(self.values) < 2:
            raise RuntimeError("no $SYS/broker/bytes counters arrived; is sys_interval disabled in mosquitto.conf?")
        time.sleep(0.5)  # both counters of one publication
        return dict(self.values)


def bench_config(args: argparse.Namespace) -> RunConfig:
    """The named config server_sdk/configs/transport.yaml with the sizes of the flags."""
    return RunConfig.load("transport").with_overrides({
        "model": f"tiny-random-L{args.layers}", "stages": args.stages, "rounds_per_stage": args.rounds,
        "num_clients": args.devices, "clients_per_round": args.devices, "local_steps": args.local_steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len})


def run_fleet(args: argparse.Namespace, work: Path) -> dict:
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.engine.rounds import run
    from server_sdk.fleet.local_fleet import LocalFleet

    cfg = bench_config(args)
    base = tiny_random_model(n_layers=args.layers, hidden=args.hidden, seed=0)
    run_dir = work / "transport"
    settings = FleetSettings(round_timeout_s=args.round_timeout, artifact_bytes_per_s=args.artifact_rate,
                             prefetch_next_stage=args.prefetch, stage_ready_timeout_s=60.0 if args.prefetch else 0.0)
    box: dict = {}
    with LocalFleet(run_dir / "fleet", args.devices) as fleet:
        # test-only: a login of its own (client ids are bound to usernames) that may read the byte counters
        from server_sdk.fleet.broker import Credentials, add_operator

        saved = fleet.dir / "credentials" / "bench-sys.json"  # --keep may reuse a fleet
        sys_creds = Credentials.load(saved) if saved.exists() else add_operator(fleet.dir, "bench-sys")
        with open(fleet.dir / "acl", "a") as f:
            f.write("\n# benchmarks.transport: byte counters\nuser bench-sys\ntopic read $SYS/broker/bytes/#\n")
        fleet.start_broker()
        counters = SysBytes(sys_creds, fleet.port)
        before = counters.read_fresh()

        def make(cfg, base, clients):
            ex = MeasuredFleetExecutor(cfg, run_dir, fleet.server, None, settings,  # the loop's rounds per stage
                                       host="localhost", tokenizer_dir=tokenizer_dir_of(base))
            for c, name in enumerate(fleet.names):
                fleet.start_device(name, run_dir / "data" / f"client_{c:03d}.jsonl", ex.run_id)
            box["executor"] = ex
            return ex

        t0 = time.time()
        report = run(cfg, run_dir, base=base, progress=False, executor_factory=make)
        total_s = time.time() - t0
        codes = fleet.wait_devices(60)
        after = counters.read_fresh()
        counters.client.close()
    ex: MeasuredFleetExecutor = box["executor"]
    return {"config": cfg.to_dict(), "hidden": args.hidden, "prefetch": args.prefetch, "total_s": total_s,
            "exit_codes": codes,
            "sys_before": before, "sys_after": after, "rounds": ex.rounds, "stages": ex.stages,
            "published": {k: {"messages": v[0], "bytes": v[1]} for k, v in ex.published.items()},
            "server_chunks": {"chunks": ex.artifacts.chunks_sent, "bytes": ex.artifacts.bytes_sent},
            "events": [json.loads(line) for line in (run_dir / "fleet_events.jsonl").read_text().splitlines()],
            "eval_loss": [r.get("eval_loss") for r in report["records"]],
            "round_loop_wall_s": [r["wall_seconds"] for r in report["records"] if r["stage"] >= 0]}


def analyse(raw: dict) -> dict:
    accepted_t = {(e["round"], e["device"]): e["t"] for e in raw["events"] if e["event"] == "accepted"}
    rounds = []
    loop_walls = raw.get("round_loop_wall_s") or [None] * len(raw["rounds"])
    for r, loop_wall in zip(raw["rounds"], loop_walls):
        devs = r["devices"]
        crit = max(devs, key=lambda d: accepted_t[(r["round"], d)])
        tel = devs[crit]
        train = tel["train_s"] - tel["fetch_s"]
        steps = tel["duration_s"]
        start_lag = tel["started_unix"] - r["start_unix"]
        upload = accepted_t[(r["round"], crit)] - (tel["started_unix"] + tel["train_s"])
        rounds.append({
            "stage": r["stage"], "round": r["round"], "wall_s": r["wall_s"], "critical_device": crit,
            "device_train_s": train, "device_steps_s": steps,
            "transport_s": r["wall_s"] - train, "transport_share": (r["wall_s"] - train) / r["wall_s"],
            "non_step_share": (r["wall_s"] - steps) / r["wall_s"],
            "critical_path": {"start_lag_s": start_lag, "fetch_in_round_s": tel["fetch_s"],
                              "setup_s": tel["setup_s"], "upload_and_validate_s": upload},
            "median_device_train_s": float(np.median([d["train_s"] - d["fetch_s"] for d in devs.values()])),
            "max_fetch_in_round_s": max(d["fetch_s"] for d in devs.values()),
            # the simulation's round loop around W: sampling, FedAvg, held-out eval, checkpoint
            "coordinator_outside_w_s": None if loop_wall is None else loop_wall - r["wall_s"],
            # the critical device finishing the stage's prefetch (and rebuilding the checkpoint) after the
            # train control came: part of its start lag in a stage's first round
            "critical_prefetch_s": tel["stage_fetch_s"] - tel["fetch_s"],
        })

    # artifact fetch: per stage and device, the last report of its process holds the stage totals
    seen: set[str] = set()
    stages = []
    ready_wait = {e["stage"]: e["waited_s"] for e in raw["events"] if e["event"] == "stage_ready"}
    prefetched = _prefetched_per_stage(raw["rounds"])
    for st in raw["stages"]:
        needed = sum(size for _, sha, size in st["files"] if sha not in seen)
        seen.update(sha for _, sha, _ in st["files"])
        per_dev: dict[str, tuple[int, float]] = {}
        for r in raw["rounds"]:
            if r["stage"] != st["stage"]:
                continue
            for d, tel in r["devices"].items():
                per_dev[d] = (tel["stage_download_bytes"], tel["stage_fetch_s"])
        rates = [b / s for b, s in per_dev.values() if s > 0 and b > 0]
        got = sum(b for b, _ in per_dev.values())
        slowest = max((s for _, s in per_dev.values()), default=0.0)
        stages.append({"stage": st["stage"], "artifact_bytes": st["artifact_bytes"], "needed_bytes": needed,
                       "files": len(st["files"]), "devices": len(per_dev),
                       "received_bytes_per_device": {d: b for d, (b, _) in per_dev.items()},
                       "fetch_s_per_device": {d: s for d, (_, s) in per_dev.items()},
                       "device_throughput_bytes_per_s": {"median": float(np.median(rates)) if rates else None,
                                                         "min": min(rates) if rates else None},
                       "fleet_goodput_bytes_per_s": (needed * len(per_dev) / slowest) if slowest else None,
                       "received_total_bytes": got, "needed_total_bytes": needed * len(per_dev),
                       "prefetched_bytes_per_device": prefetched.get(st["stage"], {}),
                       "ready_wait_s": ready_wait.get(st["stage"])})

    # bytes: broker counters vs raw payload
    wire_in = raw["sys_after"]["received"] - raw["sys_before"]["received"]
    wire_out = raw["sys_after"]["sent"] - raw["sys_before"]["sent"]
    n_updates = sum(len(r["devices"]) for r in raw["rounds"])
    n_dev = raw["config"]["num_clients"]
    raw_updates = sum(r["raw_update_bytes"] * len(r["devices"]) for r in raw["rounds"])
    raw_globals = sum(r["raw_global_bytes"] for r in raw["rounds"])
    update_msgs = sum(d["payload_bytes"] for r in raw["rounds"] for d in r["devices"].values())
    needed_files = sum(s["needed_total_bytes"] for s in stages)
    chunks_published = raw["server_chunks"]["bytes"]
    chunks_delivered = sum(s["received_total_bytes"] for s in stages)
    pub = raw["published"]
    payload_in = raw_updates + raw_globals + sum(s["needed_bytes"] for s in stages)  # one copy of each file up
    payload_out = raw_updates + raw_globals * n_dev + needed_files
    update_hdr = update_msgs - raw_updates
    glob_msgs = pub.get("global", {}).get("bytes", 0)
    ctrl_msgs = pub.get("control", {}).get("bytes", 0)
    # what is left once every known message body is subtracted: MQTT fixed headers, topics and
    # properties, PUBACKs, CONNECT/SUBSCRIBE/PING, fetch requests and device status, the $SYS readings
    other_in = wire_in - (chunks_published + update_msgs + glob_msgs + ctrl_msgs)
    # payload bytes the devices' MQTT clients took in (last report of each device process); what is not a
    # counted chunk, global or control message is chunks that came after the device stopped listening
    # for that file (its cache never saw them)
    last_seen: dict[tuple, int] = {}
    for r in raw["rounds"]:
        for d, tel in r["devices"].items():
            last_seen[(d, tel.get("process"))] = tel.get("mqtt_payload_bytes_received") or 0
    device_payload = sum(last_seen.values())
    late_chunks = max(0, device_payload - chunks_delivered - (glob_msgs + ctrl_msgs) * n_dev) if device_payload else 0
    other_out = wire_out - (chunks_delivered + late_chunks + update_msgs + (glob_msgs + ctrl_msgs) * n_dev)
    wire = {
        "by_cause_in": {"duplicate_chunk_publishes": chunks_published - sum(s["needed_bytes"] for s in stages),
                        "protocol_headers": update_hdr + (glob_msgs - raw_globals) + ctrl_msgs,
                        "mqtt_and_small_messages": other_in},
        "by_cause_out": {"unrequested_chunks_received": chunks_delivered - needed_files,
                         "chunks_after_unsubscribe": late_chunks,
                         "protocol_headers": update_hdr + (glob_msgs - raw_globals + ctrl_msgs) * n_dev,
                         "mqtt_and_small_messages": other_out},
        "broker_received_bytes": wire_in, "broker_sent_bytes": wire_out,
        "raw_payload_in_bytes": payload_in, "raw_payload_out_bytes": payload_out,
        "overhead_in": wire_in / payload_in - 1, "overhead_out": wire_out / payload_out - 1,
        "breakdown": {
            "updates": {"count": n_updates, "raw_tensor_bytes": raw_updates, "message_bytes": update_msgs},
            "globals": {"count": len(raw["rounds"]), "raw_tensor_bytes": raw_globals,
                        "message_bytes": pub.get("global", {}).get("bytes", 0),
                        "retained_clears": pub.get("global", {}).get("messages", 0) - len(raw["rounds"])},
            "control": pub.get("control", {"messages": 0, "bytes": 0}),
            "artifacts": {"needed_file_bytes_all_devices": needed_files,
                          "chunk_bytes_published_by_server": chunks_published,
                          "chunk_bytes_received_by_devices": chunks_delivered,
                          "unneeded_chunk_bytes_received": chunks_delivered - needed_files},
        },
    }
    shares = [r["transport_share"] for r in rounds]
    return {"rounds": rounds, "stages": stages, "wire": wire,
            "summary": {"transport_share_mean": float(np.mean(shares)), "transport_share_max": max(shares),
                        "transport_share_first_round_of_stage": [r["transport_share"] for r in rounds
                                                                if r["round"] in _first_rounds(raw)],
                        "goal": 0.05, "goal_met_every_round": max(shares) <= 0.05,
                        "goal_met_on_mean": float(np.mean(shares)) <= 0.05}}


def _prefetched_per_stage(rounds: list[dict]) -> dict[int, dict[str, int]]:
    """{stage: {device: bytes it prefetched for that stage}}: the growth of the device's `prefetch_bytes`
    (a per-process total) from the previous stage's last report to this stage's first."""
    last: dict[str, int] = {}
    out: dict[int, dict[str, int]] = {}
    for r in rounds:
        for d, tel in r["devices"].items():
            total = tel.get("prefetch_bytes") or 0
            out.setdefault(r["stage"], {}).setdefault(d, total - last.get(d, 0))
            last[d] = total
    return out


def _first_rounds(raw: dict) -> set[int]:
    first: dict[int, int] = {}
    for r in raw["rounds"]:
        first.setdefault(r["stage"], r["round"])
    return set(first.values())


def _rate(bytes_per_s: float | None) -> str:
    return "none" if not bytes_per_s else f"{bytes_per_s / 1e6:g} MB/s"


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:.2f}"


def table(result: dict) -> str:
    a = result["analysis"]
    lines = md_table(
        ["stage", "wire round", "W (s)", "critical device", "its training (s)", "its steps (s)",
         "transport+coord (s)", "share of W", "start lag (s)", "fetch in round (s)", "upload+validate (s)"],
        [[r["stage"], r["round"], f"{r['wall_s']:.2f}", r["critical_device"], f"{r['device_train_s']:.2f}",
          f"{r['device_steps_s']:.2f}", f"{r['transport_s']:.2f}", f"{r['transport_share']:.1%}",
          f"{r['critical_path']['start_lag_s']:.2f}", f"{r['critical_path']['fetch_in_round_s']:.2f}",
          f"{r['critical_path']['upload_and_validate_s']:.2f}"] for r in a["rounds"]])
    stage_rows = []
    for s in a["stages"]:
        rec = list(s["received_bytes_per_device"].values())
        fs = list(s["fetch_s_per_device"].values())
        tp = s["device_throughput_bytes_per_s"]
        pre = list((s.get("prefetched_bytes_per_device") or {}).values())
        wait = s.get("ready_wait_s")
        stage_rows.append([s["stage"], _mb(s["artifact_bytes"]), _mb(s["needed_bytes"]),
                           _mb(float(np.median(pre)) if pre else None),
                           _mb(float(np.median(rec)) if rec else None), f"{np.median(fs) if fs else 0:.2f}",
                           "-" if wait is None else f"{wait:.2f}",
                           f"{_mb(tp['median'])} / {_mb(tp['min'])}", _mb(s["fleet_goodput_bytes_per_s"])])
    lines += ["", *md_table(["stage", "artifact (MB)", "needed per device (MB)",
                             "prefetched per device before the stage (MB, median)",
                             "received per device at the stage start and in its rounds (MB, median)",
                             "fetch s per device (median)", "coordinator's wait for ready devices (s)",
                             "device throughput MB/s (median / min)", "fleet goodput MB/s"], stage_rows)]
    w = a["wire"]
    b = w["breakdown"]
    lines += ["", "| direction | MQTT bytes at the broker | raw payload | overhead |", "|---|---|---|---|",
              f"| into the broker | {w['broker_received_bytes']:,} | {w['raw_payload_in_bytes']:,} | "
              f"{w['overhead_in']:+.2%} |",
              f"| out of the broker | {w['broker_sent_bytes']:,} | {w['raw_payload_out_bytes']:,} | "
              f"{w['overhead_out']:+.2%} |",
              "", "| overhead by cause | into the broker | out of the broker |", "|---|---|---|",
              *(f"| {label} | {w['by_cause_in'].get(kin, 0):,} | {w['by_cause_out'].get(kout, 0):,} |"
                for label, kin, kout in (
                    ("artifact chunks published again / received unrequested", "duplicate_chunk_publishes",
                     "unrequested_chunks_received"),
                    ("artifact chunks queued to a device after it stopped listening", "-",
                     "chunks_after_unsubscribe"),
                    ("protocol headers (frame JSON, safetensors header, control JSON)", "protocol_headers",
                     "protocol_headers"),
                    ("MQTT framing, acks, fetch requests, status, connects", "mqtt_and_small_messages",
                     "mqtt_and_small_messages"))),
              "", "| message kind | count | raw bytes | message bytes (protocol) |", "|---|---|---|---|",
              f"| update | {b['updates']['count']} | {b['updates']['raw_tensor_bytes']:,} | "
              f"{b['updates']['message_bytes']:,} |",
              f"| global adapter | {b['globals']['count']} | {b['globals']['raw_tensor_bytes']:,} | "
              f"{b['globals']['message_bytes']:,} |",
              f"| control | {b['control']['messages']} | 0 | {b['control']['bytes']:,} |",
              f"| artifact chunks (server publishes) | - | {sum(s['needed_bytes'] for s in a['stages']):,} "
              f"(each needed file once) | {b['artifacts']['chunk_bytes_published_by_server']:,} |",
              f"| artifact chunks (devices receive) | - | {b['artifacts']['needed_file_bytes_all_devices']:,} "
              f"(needed) | {b['artifacts']['chunk_bytes_received_by_devices']:,} |"]
    return "\n".join(lines)


def write_markdown(path: Path, result: dict, command: str) -> None:
    s = result["analysis"]["summary"]
    cfg = result["raw"]["config"]
    section = "\n".join([
        "## Transport and coordination cost (benchmarks/transport.py)", "",
        f"Command: `{command}`  ", f"Date: {result['date']}  ", f"Machine: {result['machine']}  ",
        f"Workload: {cfg['num_clients']} devices (all sampled every round), tiny random LLaMA "
        f"{result['raw']['hidden']} hidden, {cfg['model']}, stages {cfg['stages']} x {cfg['rounds_per_stage']} "
        f"rounds, {cfg['local_steps']} local steps of batch {cfg['batch_size']} x seq {cfg['seq_len']}, LoRA r "
        f"{cfg['lora']['r']}; broker mosquitto with TLS, passwords and the fleet ACL; artifact upload rate limit "
        f"{_rate(result['artifact_rate'])}; next-stage prefetch and stage-ready wait "
        f"{'on' if result['raw'].get('prefetch', False) else 'off'}. Total run {result['raw']['total_s']:.0f} s.  ",
        f"Transport+coordination share of round wall time: mean {s['transport_share_mean']:.1%}, "
        f"max {s['transport_share_max']:.1%} (goal <= 5%: "
        f"{'met every round' if s['goal_met_every_round'] else 'met on the mean only' if s['goal_met_on_mean'] else 'not met'}).",
        "", table(result), "", "JSON: `benchmarks/results/transport.json`."])
    replace_block("transport", section, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rounds", type=int, default=2, help="rounds per stage")
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument("--artifact-rate", type=float, default=FleetSettings.artifact_bytes_per_s,
                   help="ArtifactServer upload limit in bytes/s (default: the fleet's default)")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="baseline: no next-stage prefetch hint and no wait for devices' files at a stage start")
    p.add_argument("--out", type=Path, default=RESULTS / "transport.json")
    p.add_argument("--markdown", default=str(Path(__file__).parent / "RESULTS.md"),
                   help="results page to update ('' for none)")
    p.add_argument("--keep", type=Path, help="keep the run directory here instead of a temporary one")
    p.add_argument("--from-json", type=Path, help="analyse the raw measurements of an earlier run again; no run")
    args = p.parse_args(argv)

    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["analysis"] = analyse(result["raw"])
    else:
        work = args.keep or Path(tempfile.mkdtemp(prefix="devft-transport-"))
        try:
            raw = run_fleet(args, work)
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                  "command": " ".join(["python -m benchmarks.transport", *(sys.argv[1:] if argv is None else argv)]),
                  "machine": f"{_cpu_name()} ({platform.machine()}, "
                             f"{os.cpu_count()} logical CPUs, shared with other jobs)",
                  "artifact_rate": args.artifact_rate, "analysis": analyse(raw), "raw": raw}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    print(table(result))
    s = result["analysis"]["summary"]
    print(f"\ntransport+coordination share: mean {s['transport_share_mean']:.1%}, max {s['transport_share_max']:.1%}")
    if args.markdown:
        write_markdown(Path(args.markdown), result, result.get("command", "python -m benchmarks.transport"))
    return 0 if not math.isnan(s["transport_share_mean"]) else 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _jsonable(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(main())
