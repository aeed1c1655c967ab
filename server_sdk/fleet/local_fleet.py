"""A whole fleet on one machine: a secured mosquitto and N `devft-edge` processes.

`devft run --fleet local:N` uses it; so do the fault tests, which kill and restart
devices and the broker through it. Everything lives under one directory:

    <fleet_dir>/                 fleet_init output (CA, certs, passwd, acl, credentials/)
    <fleet_dir>/devices/<name>/  cache/ (content-addressed artifacts, hard links) and device.log
    <fleet_dir>/blobs/           the devices' shared blob store: each artifact file once on disk

While a run goes on, `LogRelay` prints each device's one line per round (and its errors)
above the progress bar; everything else a device logs stays in its device.log
(`--verbose` relays all of it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from server_sdk.fleet.broker import (
    BrokerProcess,
    Credentials,
    add_device,
    fleet_init,
    free_port,
    register_run,
    server_credentials,
)
from server_sdk.fleet.broker_config import fleet_queue_bound
from server_sdk.fleet.coordinator import fleet_executor_factory
from server_sdk.fleet.registry import device_name
from server_sdk.fleet.settings import FleetSettings
from server_sdk.fleet.telemetry_intake import clean_telemetry
from server_sdk.progress import note
from server_sdk.quiet import is_verbose

if TYPE_CHECKING:
    from server_sdk.engine.rounds import RunResult

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


class LocalFleet:
    """Broker and device processes for one run directory; `close()` stops what it started."""

    def __init__(self, fleet_dir: str | Path, n_devices: int, *, port: int | None = None,
                 run_id: str | None = None) -> None:
        """`run_id`: the run its devices may publish under (default: the name of the directory holding
        `fleet_dir`, i.e. the run directory's name, the coordinator's default run id); `start_device`
        registers others as it goes."""
        self.dir = Path(fleet_dir).resolve()
        self.n_devices = n_devices
        if not (self.dir / "fleet.json").exists():
            fleet_init(self.dir, hostnames=["localhost", "127.0.0.1"], port=port or free_port(),
                       bind_address="127.0.0.1")  # devices run here: nothing else need reach the broker
        default = self.dir.parent.name
        if run_id or re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", default):  # a directory name may be no run id
            register_run(self.dir, run_id or default)
        self.names = [device_name(c) for c in range(n_devices)]
        for name in self.names:
            if not (self.dir / "credentials" / f"{name}.json").exists():
                add_device(self.dir, name)
        self.port = json.loads((self.dir / "fleet.json").read_text())["port"]
        self.broker: BrokerProcess | None = None
        self.origin = None  # server_sdk.fleet.origin.NginxOrigin once start_origin ran
        self.devices: dict[str, subprocess.Popen] = {}

    @property
    def server(self) -> Credentials:
        return server_credentials(self.dir)

    def device_credentials(self, name: str) -> Path:
        return self.dir / "credentials" / f"{name}.json"

    def device_dir(self, name: str) -> Path:
        return self.dir / "devices" / name

    # -- broker ---------------------------------------------------------------------------

    def start_broker(self) -> BrokerProcess:
        """Start the fleet's mosquitto; it exits with this process, however this process ends (main thread)."""
        self.broker = BrokerProcess(self.dir, self.port, die_with_parent=True).start()
        return self.broker

    def start_origin(self):
        """Start nginx serving this fleet's artifact directory (server_sdk/fleet/origin.py) over TLS with the fleet's
        certificate; like the broker, it exits with this process (main thread). Returns the NginxOrigin."""
        from server_sdk.fleet.origin import NginxOrigin

        self.origin = NginxOrigin(self.dir, die_with_parent=True).start()
        return self.origin

    def origin_settings(self, settings: FleetSettings | None, mqtt_chunks: bool = True) -> FleetSettings:
        """`settings` with the running origin's URL, directory and this fleet's password file (and, with
        `mqtt_chunks` False, no MQTT chunks)."""

        assert self.origin is not None, "start_origin first"
        return replace(settings or FleetSettings(), artifact_origin=self.origin.url,
                       artifact_dir=str(self.origin.files), artifact_passwd=str(self.dir / "passwd"),
                       artifact_chunks=mqtt_chunks)

    def restart_broker(self) -> None:
        assert self.broker is not None, "start_broker first"
        self.broker.restart()

    # -- devices --------------------------------------------------------------------------

    def start_device(self, name: str, shard: str | Path, run_id: str, *, extra: list[str] | None = None,
                     python_code: str | None = None) -> subprocess.Popen:
        """Start `devft-edge run` for one device (its log: devices/<name>/device.log).

        `python_code` replaces the module entry point (tests use it to block torch imports);
        it receives the CLI arguments in sys.argv[1:]."""
        if register_run(self.dir, run_id) and self.broker is not None and self.broker.running:
            self.broker.reload()
        ddir = self.device_dir(name)
        ddir.mkdir(parents=True, exist_ok=True)
        # the device runs in its own directory, so a relative shard path (runs/NAME/data/...) must be resolved
        args = ["run", "--credentials", str(self.device_credentials(name)), "--data", str(Path(shard).resolve()),
                "--cache", str(ddir / "cache"), "--shared-blobs", str(self.dir / "blobs"), "--run", run_id,
                "--host", "localhost", *(extra or [])]
        cmd = [sys.executable, "-c", python_code, *args] if python_code else \
            [sys.executable, "-m", "edge_runtime.client", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "DEVFT_EXIT_WITH_PARENT": str(os.getpid()),  # devices stop if this coordinator dies
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        with open(ddir / "device.log", "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(ddir))
        self.devices[name] = proc
        return proc

    def kill_device(self, name: str) -> None:
        proc = self.devices.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def wait_devices(self, timeout_s: float) -> dict[str, int | None]:
        """Exit codes after waiting up to timeout_s for each device (None = still running)."""
        codes: dict[str, int | None] = {}
        for name, proc in self.devices.items():
            try:
                codes[name] = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def close(self) -> None:
        for proc in self.devices.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.devices.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.broker is not None:
            self.broker.stop()
        if self.origin is not None:
            self.origin.stop()

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# devft-edge's log format: "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DEVICE_LINE = re.compile(r"^\S+ \S+ (INFO|WARNING|ERROR|CRITICAL) devft\.edge: (.*)$")


class LogRelay:
    """Follows the devices' device.log files and hands chosen lines to `write` (e.g. tqdm.write).

    By default only the device's own INFO lines (one per round, plus connect and done) and its
    errors pass; with `everything` every line does. Polling the files, rather than piping the
    devices' output through this process, means a stalled terminal never blocks a device."""

    def __init__(self, fleet: LocalFleet, write: Callable[[str], None], *, everything: bool = False,
                 interval_s: float = 0.5) -> None:
        self.fleet, self.write, self.everything, self.interval_s = fleet, write, everything, interval_s
        self._offsets: dict[Path, int] = {}
        for name in fleet.names:  # a resumed run: earlier lines were shown by the earlier process
            log_path = fleet.device_dir(name) / "device.log"
            self._offsets[log_path] = log_path.stat().st_size if log_path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="device-log-relay", daemon=True)

    def start(self) -> LogRelay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.poll()  # the devices' last lines

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the relay is a convenience; the run must go on
                log.debug("device log relay failed", exc_info=True)

    def poll(self) -> None:
        for path, offset in list(self._offsets.items()):
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            complete = data[:data.rfind(b"\n") + 1]  # a half-written line waits for the next poll
            self._offsets[path] = offset + len(complete)
            for line in complete.decode(errors="replace").splitlines():
                shown = self.select(line)
                if shown is not None:
                    self.write(shown)

    def select(self, line: str) -> str | None:
        """The text to show for one device.log line, or None to keep it in the file only."""
        if self.everything:
            return line
        m = _DEVICE_LINE.match(line)
        if m is None:
            return line if line.startswith("devft-edge: error") else None
        level, message = m.groups()
        if level == "INFO":
            return message
        return f"{level.lower()}: {message}" if level in ("ERROR", "CRITICAL") else None


def run_local(cfg, run_dir: str | Path, n_devices: int, *, resume: bool = False, progress: bool = True,
              settings: FleetSettings | None = None, base=None, origin: bool = False,
              mqtt_chunks: bool = True) -> RunResult:
    """`devft run --fleet local:N`: broker, coordinator and N devices on this machine; with `origin`, nginx too,
    serving the stage files over HTTPS (`--artifacts nginx`; only there with `mqtt_chunks` False). A finished
    run's report gains the fleet section (add_fleet_summary)."""
    from server_sdk.engine.rounds import run

    run_dir = Path(run_dir)
    run_id = (settings.run_id if settings else "") or run_dir.name  # the coordinator's (FleetExecutor.run_id)
    with stop_on_sigterm(), LocalFleet(run_dir / "fleet", n_devices, run_id=run_id) as fleet:
        fleet.start_broker()
        settings = replace(settings or FleetSettings(), broker_queue_bytes=fleet_queue_bound(fleet.dir))
        if origin:
            fleet.start_origin()
            settings = fleet.origin_settings(settings, mqtt_chunks)

        def start_devices(executor) -> None:
            for c, name in enumerate(fleet.names):
                fleet.start_device(name, run_dir / "data" / f"client_{c:03d}.jsonl", executor.run_id)

        factory = fleet_executor_factory(run_dir, fleet.server, settings, host="localhost",
                                         on_ready=start_devices)
        relay = LogRelay(fleet, note, everything=is_verbose()).start() if progress else None
        try:
            result = run(cfg, run_dir, resume=resume, progress=progress, base=base, executor_factory=factory)
            codes = fleet.wait_devices(30)
        finally:
            if relay is not None:
                relay.stop()
    if not result.interrupted:
        result.report = add_fleet_summary(run_dir, result.report, codes)
    return result


class Terminated(SystemExit):
    """SIGTERM of `devft run --fleet local:N`: unwinds like Ctrl-C, so devices and the broker are stopped."""


@contextlib.contextmanager
def stop_on_sigterm():
    """While inside, SIGTERM raises `Terminated` (exit status 143) in the main thread, so `LocalFleet.close` stops
    the devices (each says offline) and the broker (which saves its persistence) before the process exits. The
    checkpoint of the last finished round stays, for `--resume`. Elsewhere than the main thread: a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the shutdown itself must not be interrupted
        raise Terminated(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_fleet_summary(run_dir: Path, report: dict, exit_codes: dict | None = None) -> dict:
    """report.json gains a `fleet` section: per device rounds, the stages it trained, what it declared (platform,
    runtime, ram_mb, cores) and why it was refused if it was, bytes downloaded per stage; each stage's memory need;
    refusals, replacements."""
    events = [json.loads(line) for line in (run_dir / "fleet_events.jsonl").read_text().splitlines() if line]
    devices = _device_rounds(report["records"])
    _add_declarations(devices, events)
    for d in devices.values():
        d["stages"] = sorted(d.get("stages", ()))
        for (stage, _), nbytes in d.pop("_by_process", {}).items():
            d["stage_download_bytes"][stage] = d["stage_download_bytes"].get(stage, 0) + nbytes
    rejected, replacements = _refusals_and_replacements(events)
    stages = {str(e["stage"]): e["memory"] for e in events if e["event"] == "stage" and e.get("memory")}
    report["fleet"] = {"devices": devices, "stages": stages, "rejected": rejected, "replacements": replacements,
                       "exit_codes": exit_codes or {}, "events": str(run_dir / "fleet_events.jsonl")}
    if (run_dir / "rig.json").exists():  # `devft rig`'s phones: emulated or measured, and what it saw of them
        report["rig"] = json.loads((run_dir / "rig.json").read_text())
    (run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _device_rounds(records: list[dict]) -> dict[str, dict]:
    """Per device, from the records' telemetry: rounds, stages, energy, peak RSS, and what each of its processes
    downloaded per stage (`_by_process`, summed by the caller)."""
    devices: dict[str, dict] = {}
    for rec in records:
        for device, raw in (rec.get("telemetry") or {}).items():
            tel, _ = clean_telemetry(raw)  # device-sent (checked on arrival; again for reports of older runs)
            d = devices.setdefault(device, {"rounds": 0, "stage_download_bytes": {}, "energy_j": 0.0,
                                                   "peak_rss_bytes": 0})
            d["rounds"] += 1
            d.setdefault("stages", set()).add(int(rec["stage"]))
            # a device process counts what it downloaded per stage (prefetch included); a restarted one anew
            seen = d.setdefault("_by_process", {})
            key = (str(rec["stage"]), tel.get("process"))
            seen[key] = max(seen.get(key, 0), tel.get("stage_download_bytes") or 0)
            d["energy_j"] += tel.get("energy_j") or 0.0
            d["peak_rss_bytes"] = max(d["peak_rss_bytes"], tel.get("peak_rss_bytes") or 0)
    return devices


def _refusals_and_replacements(events: list[dict]) -> tuple[dict[str, int], list[dict]]:
    """Refused updates counted by reason, and who stood in for a device that went offline mid-round."""
    rejected: dict[str, int] = {}
    replacements: list[dict] = []
    for e in events:
        if e["event"] == "rejected":
            rejected[e["reason"]] = rejected.get(e["reason"], 0) + 1
        elif e["event"] == "suppressed" and e.get("of") == "rejected":  # refusals counted, not logged one by one
            rejected[e["reason"]] = rejected.get(e["reason"], 0) + e["count"]
        elif e["event"] == "round_end":
            replacements += [{"stage": e["stage"], "round": e["round"], "device": by, "replaces": lost,
                              "accepted": by in e["accepted"]} for by, lost in (e.get("replacements") or {}).items()]
    return rejected, replacements


def _add_declarations(devices: dict[str, dict], events: list[dict]) -> None:
    """Each device's last checked declaration (`capabilities` events: platform, runtime, ram_mb, cores) and, when its
    last word from the coordinator was a refusal at hello, why; a device refused before it trained is added."""
    for e in events:
        device = e.get("device")
        if not isinstance(device, str):
            continue
        if e["event"] == "capabilities":
            d = devices.setdefault(device, {"rounds": 0, "stage_download_bytes": {}, "energy_j": 0.0,
                                            "peak_rss_bytes": 0})
            d.update({k: e.get(k) for k in ("platform", "runtime", "ram_mb", "cores")})
            d.pop("refused", None)  # a newer declaration; a refusal of it comes after
        elif e["event"] == "rejected" and e.get("message") == "hello" and e.get("reason") in ("memory",
                                                                                              "bad_capabilities"):
            devices.setdefault(device, {"rounds": 0, "stage_download_bytes": {}, "energy_j": 0.0,
                                        "peak_rss_bytes": 0})["refused"] = f"{e['reason']}: {e.get('detail', '')}"
        elif e["event"] == "refusal_cleared" and device in devices:
            devices[device].pop("refused", None)
