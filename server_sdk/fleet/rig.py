"""`devft rig`: a fleet of phones joins a run through join links, emulated in headless Chromium or real over adb.

    devft rig FLEET_DIR --run RUN --run-dir runs/RUN --devices dev-002,dev-003 [--phone "Pixel 5"] [--throttle 4]
    devft rig FLEET_DIR --run RUN --run-dir runs/RUN --devices dev-002 --adb

For each device (dev-NNN trains the run's shard NNN, runs/RUN/data/client_NNN.jsonl, which the coordinator
writes when the run starts: start `devft serve` first) the rig makes the device's login if the fleet has
none, issues a one-time join link (server_sdk/fleet/web_join.py), and starts the web gateway on this machine
(server_sdk/fleet/web_gateway.py: the page over HTTPS, MQTT over secure WebSockets to the fleet's broker).

Emulated (the default): each link opens in a headless Chromium of its own (Debian's /usr/bin/chromium
through puppeteer-core: web/driver/rig.mjs) with its own profile directory, a phone's viewport and user
agent, and its CPU slowed `--throttle` times through the DevTools protocol. A desktop CPU slowed this way is
not a phone: its memory, thermal limits and WASM engine are the desktop's, and it measures no energy.

`--adb`: the same links open on Android phones attached over USB (`adb reverse` maps the gateway's ports to
the phone's localhost, `adb shell am start -a android.intent.action.VIEW -d URL` opens the browser), and the
rig samples each phone's battery (current and voltage from sysfs, `dumpsys battery` otherwise) until the
run's report appears. The phone's browser must trust the fleet's CA (ca.pem). Untested without a phone.

What the rig saw goes to RUN_DIR/rig.json and into report.json's `rig` section, each device labelled
`emulated` or `measured`; the devices' own telemetry is in report.json's records as for every device.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from server_sdk.config import ConfigError

WEB = Path(__file__).resolve().parents[2] / "web"
# where Android kernels expose the battery gauge (µA, µV); sign conventions differ between vendors
BATTERY_SYSFS = "/sys/class/power_supply/battery"
EMULATED_NOTE = ("emulated: a desktop CPU slowed by DevTools throttling in a phone's viewport and user agent; not a "
                 "phone's memory, thermals or energy (none is measured)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rig", help="phones join a run: emulated in headless Chromium, or real ones over adb",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("fleet_dir")
    p.add_argument("--run", required=True, metavar="RUN_ID", help="the run the phones join (its coordinator runs)")
    p.add_argument("--run-dir", required=True, help="the run's directory (its data/client_NNN.jsonl shards, and "
                   "report.json, which gains the rig's section)")
    p.add_argument("--devices", required=True, metavar="NAME[,NAME]", help="device names, dev-NNN (shard NNN)")
    p.add_argument("--phone", default="Pixel 5", help="puppeteer's phone profile for emulated devices")
    p.add_argument("--throttle", type=float, default=4.0, help="CPU slow-down of emulated devices (default 4)")
    p.add_argument("--adb", action="store_true", help="open the links on Android phones over USB instead (one "
                   "phone per device, in `adb devices` order); untested without a phone")
    p.add_argument("--https-port", type=int, default=0, help="the gateway's HTTPS port (default: a free one)")
    p.add_argument("--ws-port", type=int, default=0, help="the gateway's WSS port (default: a free one)")
    p.add_argument("--out", help="the rig's files: per-device profiles and results (default RUN_DIR/rig)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="give up after S seconds")
    p.set_defaults(func=cmd_rig)


def shard_of(run_dir: Path, name: str, wait_s: float = 120.0) -> Path:
    """dev-NNN's shard, runs/RUN/data/client_NNN.jsonl, waited for while the coordinator starts."""
    m = re.fullmatch(r"dev-(\d+)", name)
    if not m:
        raise ConfigError(f"device {name!r}: rig devices are named dev-NNN (they train the run's shard NNN)")
    shard = run_dir / "data" / f"client_{int(m.group(1)):03d}.jsonl"
    deadline = time.monotonic() + wait_s
    while not shard.is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"no shard {shard}: start the run's coordinator (`devft serve`) first; it writes one per "
                              "device, and dev-NNN trains shard NNN")
        time.sleep(0.5)
    return shard


def ensure_devices(fleet_dir: Path, names: list[str]) -> list[str]:
    """Make a login for each device the fleet does not know yet (and reload a broker running here); the new ones."""
    from server_sdk.fleet.broker import add_device, reload_running_broker

    new = [n for n in names if not (fleet_dir / "credentials" / f"{n}.json").is_file()]
    for name in new:
        add_device(fleet_dir, name)
    if new:
        reload_running_broker(fleet_dir)
    return new


def join_links(fleet_dir: Path, run_id: str, run_dir: Path, names: list[str], https_port: int,
               ttl_s: float) -> dict[str, str]:
    from server_sdk.fleet.web_join import issue, join_url

    return {n: join_url("localhost", https_port, issue(fleet_dir, n, run_id, shard_of(run_dir, n), ttl_s))
            for n in names}


def run_emulated(links: dict[str, str], spki: str, out: Path, phone: str, throttle: float,
                 timeout_s: float) -> dict[str, Any]:
    """web/driver/rig.mjs: one headless Chromium per device; what each page did and what the rig saw."""
    cmd = ["node", "driver/rig.mjs", "--spki", spki, "--out", str(out / "results"), "--profiles",
           str(out / "profiles"), "--phone", phone, "--throttle", f"{throttle:g}", "--timeout-s", f"{timeout_s:.0f}"]
    for name, url in links.items():
        cmd += ["--device", f"{name}={url}"]
    with open(out / "rig.log", "ab") as logf:
        subprocess.run(cmd, cwd=WEB, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout_s + 120)
    devices = {}
    for name in links:
        path = out / "results" / f"{name}.json"
        devices[name] = json.loads(path.read_text()) if path.exists() else {
            "device": name, "kind": "emulated", "measured": False, "error": f"no result: see {out / 'rig.log'}"}
        devices[name]["note"] = EMULATED_NOTE
    return devices


# --------------------------------------------------------------------------- real phones over adb (untested here)


def adb(serial: str, *args: str, timeout: float = 30) -> str:
    return subprocess.run(["adb", "-s", serial, *args], capture_output=True, text=True, timeout=timeout,
                          check=True).stdout


def adb_phones() -> list[str]:
    if shutil.which("adb") is None:
        raise ConfigError("--adb needs adb: `apt-get install adb`, then allow USB debugging on each phone")
    out = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.split()[0] for line in out.splitlines()[1:] if line.strip().endswith("\tdevice")]


def battery_sample(serial: str) -> dict[str, Any]:
    """One reading of a phone's battery: sysfs current_now (µA) and voltage_now (µV) where the kernel exposes them
    to the shell user, else what `dumpsys battery` says (level, voltage in mV; current only on some builds)."""
    sample: dict[str, Any] = {"t": time.time()}
    for key in ("current_now", "voltage_now"):
        try:
            sample[key] = int(adb(serial, "shell", "cat", f"{BATTERY_SYSFS}/{key}").strip())
        except (subprocess.SubprocessError, ValueError):
            pass
    if "current_now" not in sample:
        text = adb(serial, "shell", "dumpsys", "battery")
        for key, field in (("level", "level"), ("voltage_mv", "voltage"), ("current_now", "current now")):
            m = re.search(rf"^\s*{field}:\s*(-?\d+)", text, re.M)
            if m:
                sample[key] = int(m.group(1))
    return sample


def energy_j(samples: list[dict[str, Any]]) -> float | None:
    """Trapezoidal |I| x V over the samples with both (µA x µV); None when the phone exposes no current."""
    pts = [(s["t"], abs(s["current_now"]) * 1e-6 * (s["voltage_now"] * 1e-6 if "voltage_now" in s
                                                       else s["voltage_mv"] * 1e-3))
           for s in samples if "current_now" in s and ("voltage_now" in s or "voltage_mv" in s)]
    if len(pts) < 2:
        return None
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(pts, pts[1:]))


def run_adb(links: dict[str, str], ports: list[int], run_dir: Path, started: float, timeout_s: float,
            every_s: float = 5.0) -> dict[str, Any]:
    """Open each link on a phone (adb reverse for the gateway's ports) and sample batteries until the report."""
    phones = adb_phones()
    if len(phones) < len(links):
        raise ConfigError(f"--adb: {len(links)} devices but {len(phones)} phone(s) attached with USB debugging allowed")
    serial_of = dict(zip(links, phones))
    for name, url in links.items():
        for port in ports:
            adb(serial_of[name], "reverse", f"tcp:{port}", f"tcp:{port}")
        adb(serial_of[name], "shell", "am", "start", "-a", "android.intent.action.VIEW", "-d", f"'{url}'")
    samples: dict[str, list] = {name: [] for name in links}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not report_written(run_dir, started):
        for name in links:
            try:
                samples[name].append(battery_sample(serial_of[name]))
            except subprocess.SubprocessError as exc:
                samples[name].append({"t": time.time(), "error": str(exc)[:200]})
        time.sleep(every_s)
    return {name: {"device": name, "kind": "android", "measured": True, "serial": serial_of[name],
                   "battery": {"samples": samples[name], "energy_j": energy_j(samples[name]),
                               "source": f"{BATTERY_SYSFS}/current_now, voltage_now (or dumpsys battery)",
                               "note": "the phone charges over USB while attached: the current is the battery's "
                                       "net current, not the training's draw alone"}}
            for name in links}


# --------------------------------------------------------------------------- the run's report


def report_written(run_dir: Path, since: float) -> bool:
    path = run_dir / "report.json"
    return path.exists() and path.stat().st_mtime >= since


def merge_into_report(run_dir: Path, rig: dict[str, Any], started: float, wait_s: float = 120.0) -> bool:
    """report.json's `rig` section, once the coordinator has written the report (add_fleet_summary also reads
    rig.json, so a report rewritten later keeps it); False when no report appeared within wait_s."""
    deadline = time.monotonic() + wait_s
    while not report_written(run_dir, started):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    time.sleep(0.5)  # a report being written: let the writer finish
    path = run_dir / "report.json"
    report = json.loads(path.read_text())
    report["rig"] = rig
    tmp = path.with_suffix(".rig.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)
    return True


def cmd_rig(args: argparse.Namespace) -> int:
    fleet_dir, run_dir = Path(args.fleet_dir), Path(args.run_dir)
    if not (fleet_dir / "fleet.json").is_file():
        raise ConfigError(f"{fleet_dir} is not a fleet directory (no fleet.json): `devft fleet init {fleet_dir}` first")
    names = [n.strip() for n in args.devices.split(",") if n.strip()]
    out = Path(args.out or run_dir / "rig")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    new = ensure_devices(fleet_dir, names)
    if new:
        print(f"devft rig: made logins for {', '.join(new)}", file=sys.stderr)
    devices = _drive_devices(args, fleet_dir, run_dir, names, out, started)
    rig = {"mode": "adb" if args.adb else "emulated", "devices": devices,
           **({} if args.adb else {"phone": args.phone, "cpu_throttle": args.throttle})}
    (run_dir / "rig.json").write_text(json.dumps(rig, indent=1) + "\n")
    merged = merge_into_report(run_dir, rig, started)
    _print_devices(devices)
    print(f"devft rig: {run_dir / 'rig.json'}" + ("" if merged else " (no report.json appeared to add it to)"),
          file=sys.stderr)
    failed = [n for n, d in devices.items() if not args.adb and not d.get("done")]
    return 1 if failed else 0


def _drive_devices(args: argparse.Namespace, fleet_dir: Path, run_dir: Path, names: list[str], out: Path,
                   started: float) -> dict[str, Any]:
    """Start a web gateway, join the devices to the run through it (phones over adb or emulated ones) and
    return what each device recorded; the gateway stops however that ends."""
    from server_sdk.fleet.web_gateway import GatewayError, WebGateway, spki_sha256

    port = json.loads((fleet_dir / "fleet.json").read_text())["port"]
    gw = WebGateway(fleet_dir, port, ws_port=args.ws_port or None, https_port=args.https_port or None)
    try:
        gw.start()
    except GatewayError as exc:
        raise ConfigError(str(exc)) from None
    try:
        links = join_links(fleet_dir, args.run, run_dir, names, gw.https_port, args.timeout)
        print(f"devft rig: {len(links)} {'phone(s) over adb' if args.adb else 'emulated phone(s)'} joining run "
              f"{args.run} through {gw.page_url}", file=sys.stderr)
        if args.adb:
            return run_adb(links, [gw.https_port, gw.ws_port], run_dir, started, args.timeout)
        return run_emulated(links, spki_sha256(fleet_dir / "server.pem"), out, args.phone, args.throttle,
                            args.timeout)
    finally:
        gw.stop()


def _print_devices(devices: dict[str, Any]) -> None:
    for name, d in devices.items():
        state = "done" if d.get("done") else f"error: {d.get('error')}" if d.get("error") else "see its log"
        print(f"  {name} ({d['kind']}): {len(d.get('rounds', []))} round(s) recorded, {state}", file=sys.stderr)
