"""Artifact origin benchmark: N concurrent stage downloads over MQTT chunks, from nginx, and from the built-in server.

    python -m benchmarks.origin                       # 100 devices, an 8 MiB stage of 4 files, all three transports
    python -m benchmarks.origin --devices 20 --mb 4   # quicker

The same stage files (random bytes, content-addressed like a real stage's per-tensor files) are downloaded by N
devices at once, once per transport, on this machine:

* `mqtt`: the coordinator's ArtifactServer (its own MQTT connection, the fleet's default rate limit) behind a real
  Mosquitto with TLS, passwords and the fleet ACL; every device runs devft-edge's `ArtifactCache.fetch` over its
  own MQTT login (chunk requests, broadcast chunks);
* `nginx`: server_sdk/fleet/origin.py's nginx (TLS with the fleet certificate, 2 workers) with the per-download
  `auth_request` check against the coordinator (OriginAuth, in this process); devices run the same `fetch`, which
  follows the descriptor's `origin` over HTTPS;
* `builtin`: the web gateway's HTTPS server (server_sdk/fleet/web_gateway.py, Python's ThreadingHTTPServer, which
  serves extra directories the way benchmarks/web.py serves artifacts); no access check, so it is the built-in
  server's best case.

Devices are threads in `--workers` separate processes (so the server side's CPU is measured alone), each with its
own cache on /dev/shm (the device's fsyncs cost nothing there, the same for every transport). A transport's
clock starts when every device is connected and ready and stops when the last device holds every file, verified.

Measured per transport: time to all-downloaded; bytes delivered to the devices (chunk payloads or response
bodies, duplicates included; headers and TLS records not) and, for MQTT, the coordinator's upload to the
broker; server CPU seconds (mosquitto + this process's artifact thread; nginx's master and workers + this
process's auth endpoint; this process's HTTPS server), the server processes' peak RSS (mosquitto; nginx's master
and workers; sampled every 0.1 s) and this process's RSS growth over the transport (the ArtifactServer, the
origin's auth endpoint, the built-in server).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import psutil

from edge_runtime.protocol import ArtifactDescriptor

RESULTS = Path(__file__).parent / "results"
RUN = "bench"


# --------------------------------------------------------------------------- device side (worker processes)


def worker(config: dict) -> None:
    """Run `config["devices"]` as threads: connect (MQTT transports), report ready, wait for the start time in
    the `go` file, fetch, print one JSON line per device."""
    from edge_runtime.client import settings_from_credentials
    from edge_runtime.fetch import ArtifactCache
    from edge_runtime.mqtt import MqttClient

    desc = ArtifactDescriptor.from_json(config["descriptor"])
    results, clients = [], {}
    for name in config["devices"]:
        cache_dir = Path(config["cache_root"]) / name
        cache_dir.mkdir(parents=True, exist_ok=True)
        settings, _ = settings_from_credentials(Path(config["credentials"]) / f"{name}.json", cache_dir,
                                                host="localhost")
        settings = replace(settings, will_payload=None)
        clients[name] = MqttClient(settings)
        if config["transport"] == "mqtt":
            clients[name].connect(60)
    print(json.dumps({"ready": len(clients)}), flush=True)
    go = Path(config["go"])
    while not go.exists():
        time.sleep(0.01)
    start_at = float(go.read_text() or 0)
    while time.time() < start_at:
        time.sleep(0.001)

    def one(name: str) -> None:
        cache = ArtifactCache(Path(config["cache_root"]) / name / "cache")
        t0 = time.time()
        error = None
        try:
            cache.fetch(clients[name], RUN, name, desc)
        except Exception as exc:  # noqa: BLE001 - reported
            error = str(exc)[:300]
        results.append({"device": name, "start": t0, "end": time.time(), "bytes": cache.bytes_downloaded,
                        "rejected": cache.chunks_rejected, "error": error})

    threads = [threading.Thread(target=one, args=(n,)) for n in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients.values():
        c.close()
    for r in results:
        print(json.dumps(r), flush=True)


# --------------------------------------------------------------------------- server side


class Sampler:
    """CPU seconds and peak RSS of a set of processes (looked up again at each sample: nginx's workers)."""

    def __init__(self, pids, in_process: bool) -> None:
        self.pids = pids  # callable -> list of pids
        self.in_process = in_process
        self.me = psutil.Process()
        self.rss0 = self.me.memory_info().rss
        self.cpu0 = self._cpu()
        self.peak_rss = 0  # of the server processes (mosquitto, nginx's master and workers)
        self.peak_here = 0  # this process's growth: the ArtifactServer, OriginAuth or the built-in server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        out = []
        for pid in self.pids():
            try:
                out.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        return out

    def _cpu(self) -> float:
        total = 0.0
        for p in self._procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        if self.in_process:
            t = self.me.cpu_times()
            total += t.user + t.system
        return total

    def _rss(self) -> int:
        total = 0
        for p in self._procs():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._rss())
        if self.in_process:
            self.peak_here = max(self.peak_here, self.me.memory_info().rss - self.rss0)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {"cpu_s": round(self._cpu() - self.cpu0, 2), "peak_rss_mib": round(self.peak_rss / 2**20, 1),
                "coordinator_rss_growth_mib": round(self.peak_here / 2**20, 1)}


def make_stage(root: Path, mb: float, files: int) -> dict[str, Path]:
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    each = int(mb * 2**20 / files)
    for i in range(files):
        p = root / f"weights_{i}.bin"
        p.write_bytes(rng.integers(0, 256, each, dtype=np.uint8).tobytes())
        out[f"stage0/weights/{p.name}"] = p
    return out


def builtin_server(fleet: Path, served: Path):
    """The web gateway's HTTPS page server (make_handler + ThreadingHTTPServer over TLS, as WebGateway.start does)
    serving `served` at /bench/."""
    import ssl
    from http.server import ThreadingHTTPServer

    from server_sdk.fleet.broker import free_port
    from server_sdk.fleet.web_gateway import WEB_DIR, make_handler

    port = free_port()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(fleet / "server.pem", fleet / "server.key")
    ThreadingHTTPServer.request_queue_size = 256
    httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(WEB_DIR, 0, {f"/{RUN}/": served}))
    httpd.daemon_threads = True
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"https://localhost:{port}/{RUN}/"


def run_transport(kind: str, args, fleet: Path, names: list[str], files: dict[str, Path], desc, broker,
                  tmp: Path) -> dict:
    from edge_runtime.mqtt import MqttClient
    from server_sdk.fleet.artifact_server import ArtifactServer
    from server_sdk.fleet.broker import artifact_credentials, server_credentials
    from server_sdk.fleet.settings import mqtt_settings

    stop = []
    if kind == "mqtt":
        creds = artifact_credentials(server_credentials(fleet))
        client = MqttClient(mqtt_settings(creds, f"{creds.username}-{RUN}", "localhost"))
        client.connect(30)
        server = ArtifactServer(client, RUN, max_bytes_per_s=args.mqtt_rate or None).start()
        server.add_files(files)
        stop += [server.stop, client.close]
        sampler_pids, in_process = (lambda: [broker.proc.pid]), True
        offered = desc
    elif kind == "nginx":
        from server_sdk.fleet.origin import NginxOrigin, OriginAuth, OriginPublisher

        origin = NginxOrigin(fleet, files=tmp / "origin-files").start()
        offered = OriginPublisher(origin.files, origin.url, RUN).publish(desc, files)
        auth = OriginAuth(origin.files, RUN, fleet / "passwd", lambda: set(names)).start()
        stop += [auth.stop, origin.stop]

        def sampler_pids() -> list[int]:
            try:
                return [origin.proc.pid, *(c.pid for c in psutil.Process(origin.proc.pid).children())]
            except psutil.NoSuchProcess:
                return []
        in_process = True
    else:
        served = tmp / "builtin-files"
        served.mkdir(exist_ok=True)
        for e in desc.files:
            shutil.copyfile(files[e.path], served / e.sha256)
        httpd, url = builtin_server(fleet, served)
        offered = replace(desc, origin=url)
        stop += [httpd.shutdown]
        sampler_pids, in_process = (lambda: []), True

    cache_root = Path(tempfile.mkdtemp(prefix=f"devft-origin-bench-{kind}-", dir=args.cache_dir))
    go = tmp / f"go-{kind}"
    per = -(-len(names) // args.workers)
    procs = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}
    for w in range(args.workers):
        part = names[w * per:(w + 1) * per]
        if not part:
            continue
        config = {"devices": part, "descriptor": offered.to_json(), "credentials": str(fleet / "credentials"),
                  "cache_root": str(cache_root), "transport": kind, "go": str(go)}
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.origin", "--worker", json.dumps(config)],
                                      stdout=subprocess.PIPE, text=True, env=env))
    for p in procs:  # every device connected (MQTT) and ready
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a {kind} worker exited before it was ready")
    sampler = Sampler(sampler_pids, in_process).start()
    start_at = time.time() + 0.5
    go.write_text(repr(start_at))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=args.timeout)
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{\"device\"")]
    load = sampler.stop()
    upload = 0
    if kind == "mqtt":
        upload = server.bytes_sent
    for f in stop:
        f()
    shutil.rmtree(cache_root, ignore_errors=True)
    errors = [r for r in results if r["error"]]
    done = [r for r in results if not r["error"]]
    total = desc.total_bytes
    return {
        "transport": kind, "devices": len(names), "downloaded": len(done), "failed": len(errors),
        "first_error": errors[0]["error"] if errors else None,
        "all_downloaded_s": round(max(r["end"] for r in results) - start_at, 2) if results else None,
        "median_device_s": round(sorted(r["end"] - start_at for r in results)[len(results) // 2], 2),
        "delivered_mb": round(sum(r["bytes"] for r in results) / 1e6, 1),
        "needed_mb": round(len(names) * total / 1e6, 1),
        "upload_to_broker_mb": round(upload / 1e6, 1),
        "rejected_chunks": sum(r["rejected"] for r in results),
        **{f"server_{k}": v for k, v in load.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.origin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--mb", type=float, default=8.0, help="stage size in MiB (default 8)")
    parser.add_argument("--files", type=int, default=4, help="files in the stage (default 4)")
    parser.add_argument("--workers", type=int, default=4, help="device processes (default 4)")
    parser.add_argument("--transports", default="mqtt,nginx,builtin")
    parser.add_argument("--repeat", type=int, default=1, help="run every transport this many times, interleaved "
                        "(on a shared machine the spread says how far to trust one run)")
    parser.add_argument("--mqtt-rate", type=float, default=20e6,
                        help="ArtifactServer's upload limit in bytes/s (default 20e6, the fleet's; 0 = none)")
    parser.add_argument("--cache-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default=str(RESULTS / "origin.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    from edge_runtime.fetch import describe_files
    from server_sdk.fleet.broker import BrokerProcess, add_device, fleet_init, free_port, register_run

    tmp = Path(tempfile.mkdtemp(prefix="devft-origin-bench-"))
    tmp.chmod(0o755)
    os.environ.setdefault("DEVFT_BROKER_RUNTIME", str(tmp / "broker-rt"))
    os.environ.setdefault("DEVFT_ORIGIN_RUNTIME", str(tmp / "origin-rt"))
    for d in ("broker-rt", "origin-rt"):
        (tmp / d).mkdir(mode=0o755)
    fleet = tmp / "fleet"
    fleet_init(fleet, hostnames=["localhost"], port=free_port(), bind_address="127.0.0.1")
    register_run(fleet, RUN)
    names = [f"dev-{i:03d}" for i in range(args.devices)]
    for n in names:
        add_device(fleet, n)
    files = make_stage(tmp / "stage", args.mb, args.files)
    desc = describe_files(files)
    broker = BrokerProcess(fleet, die_with_parent=True).start()
    rows = []
    try:
        for rep in range(args.repeat):
            for kind in args.transports.split(","):
                row = {"run": rep + 1, **run_transport(kind, args, fleet, names, files, desc, broker, tmp)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    record = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.node(),
              "cpus": os.cpu_count(), "command": "python -m benchmarks.origin " + " ".join(argv or sys.argv[1:]),
              "stage_mb": round(desc.total_bytes / 1e6, 2), "files": args.files, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(record))
    return 0


def markdown(record: dict) -> str:
    from .results_md import md_table

    head = ["run", "transport", "downloaded", "all downloaded (s)", "median device (s)", "delivered MB (needed)",
            "coordinator -> broker MB", "server CPU s", "server process peak RSS MiB", "coordinator RSS growth MiB"]
    rows = [[r.get("run", 1), r["transport"], f"{r['downloaded']}/{r['devices']}", r["all_downloaded_s"], r["median_device_s"],
             f"{r['delivered_mb']} ({r['needed_mb']})", r["upload_to_broker_mb"] or "-", r["server_cpu_s"],
             r["server_peak_rss_mib"] if r["transport"] != "builtin" else "-",
             r.get("server_coordinator_rss_growth_mib", "-")] for r in record["rows"]]
    lines = [f"`{record['command']}` ({record['when']}, {record['cpus']} CPUs, stage {record['stage_mb']} MB "
             f"in {record['files']} files)", "", *md_table(head, rows)]
    times: dict[str, list[float]] = {}
    for r in record["rows"]:
        if r["failed"] == 0:
            times.setdefault(r["transport"], []).append(r["all_downloaded_s"])
    if times.get("nginx") and times.get("builtin"):
        ratios = [n / b for n, b in zip(times["nginx"], times["builtin"], strict=False)]
        lines += ["", "built-in server's throughput / nginx's (time to all downloaded, same run): "
                  + ", ".join(f"{x:.2f}" for x in ratios) + " (goal >= 0.8)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
