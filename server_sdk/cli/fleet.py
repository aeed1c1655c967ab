"""The fleet side of the `devft` command line.

cli.py defines `run` (with `--fleet local:N` and the fleet settings added here) and `serve`,
and calls `run_local_fleet` / `serve` below; `register(subparsers)` adds `fleet init|add-device|add-operator`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from server_sdk.config import DEFAULT_QUORUM, ConfigError, RunConfig

FLEET_HELP = ("train on devices instead of simulated clients: local:N starts a secured mosquitto and N "
              "devft-edge processes on this machine")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet", help="provision a fleet: CA, broker certificate, device credentials")
    fsub = p.add_subparsers(dest="fleet_command", required=True)
    q = fsub.add_parser("init", help="create the CA, the broker certificate, ACL and the server user in DIR")
    q.add_argument("dir")
    q.add_argument("--hostname", action="append", help="broker hostname or IP devices connect to (repeatable)")
    q.add_argument("--port", type=int, default=8883)
    q.add_argument("--bind", metavar="ADDRESS",
                   help="address the broker listens on (default: all interfaces; 127.0.0.1 keeps it on this machine)")
    q.set_defaults(func=cmd_fleet_init)
    q = fsub.add_parser("add-device", help="register a device and write the credentials file it needs (mode 0600)")
    q.add_argument("dir")
    q.add_argument("name", help="device name; dev-003 trains client shard 3 (data/client_003.jsonl)")
    q.add_argument("--host", help="hostname the device should connect to (default: the first from init)")
    q.add_argument("--out", metavar="PATH",
                   help="also write the credentials here (mode 0600), e.g. onto the device's provisioning media")
    w = q.add_argument_group("a browser device (a phone): --web prints a one-time join link and writes its QR code")
    w.add_argument("--web", action="store_true", help="enrol a browser: print a join link (a one-time token, not the "
                   "password) for the device page that `python -m server_sdk.fleet.web_gateway run DIR` serves, and write "
                   "it as a QR code PNG")
    w.add_argument("--run", metavar="RUN_ID", help="the run the browser device follows (required with --web)")
    w.add_argument("--data", metavar="SHARD", help="the device's shard, e.g. runs/RUN/data/client_003.jsonl, "
                   "handed to the page once with its credentials")
    w.add_argument("--web-host", metavar="HOST", help="the gateway's host name as the phone reaches it (default: "
                   "--host, else the fleet's first host name); it must be one the fleet certificate names")
    w.add_argument("--https-port", type=int, default=8443, help="the gateway's HTTPS port (default 8443)")
    w.add_argument("--ttl-hours", type=float, default=24.0, help="the link expires after this (default 24)")
    w.add_argument("--qr", metavar="PNG", help="where the QR code goes (default DIR/web/NAME-join.png, mode 0600)")
    q.set_defaults(func=cmd_fleet_add_device)
    q = fsub.add_parser("add-operator", help="another login with the server's rights (a monitor, a conformance "
                        "kit, a benchmark's observer); writes its credentials file (mode 0600)")
    q.add_argument("dir")
    q.add_argument("name", help="operator name (not a device's)")
    q.set_defaults(func=cmd_fleet_add_operator)


def add_fleet_settings(p: argparse.ArgumentParser) -> None:
    """The round policy options of `run --fleet` and `serve` (defaults: FleetSettings)."""
    p.add_argument("--round-timeout", type=float, default=None, metavar="S",
                   help="seconds devices have to answer a round (default 120)")
    p.add_argument("--quorum", type=float, default=None,
                   help=f"fraction of sampled devices a round needs (default {DEFAULT_QUORUM})")
    p.add_argument("--replacements", type=int, default=None, metavar="N",
                   help="sample up to N replacement devices per round when sampled devices go offline and the quorum "
                   "can no longer be met (default 0: the round fails instead)")
    p.add_argument("--start-timeout", type=float, default=None, metavar="S",
                   help="seconds a sampled device has to acknowledge a round (devft-edge does when the train control "
                   "arrives); one that does not is not waited for, nor in later rounds and stage starts until it "
                   "sends a status again (default 10; 0 = wait for silent devices until the deadline)")
    p.add_argument("--max-update-norm", type=float, default=None,
                   help="hard L2 bound on a device delta, checked on arrival (default 1000)")
    p.add_argument("--norm-bound-k", type=float, default=None, metavar="K",
                   help="refuse deltas over K x the round's lower median norm (default 5; 0 turns it off)")
    p.add_argument("--formats", metavar="FMT[,FMT]", default=None,
                   help="artifact formats served each stage: onnx (portable, plain onnxruntime), ort (legacy ONNX "
                   "Runtime Training), executorch; default onnx. A device running none of them is refused at its "
                   "hello (event `refused`); what devices declare never adds a format")
    p.add_argument("--stage-peak-mb", metavar="LAYERS=MIB[,...]", default=None,
                   help="measured peak memory of a stage's training on the fleet's runtime, by its layer count, e.g. "
                   "4=524,8=850 (python -m benchmarks.device): that stage's memory need; the others' is predicted "
                   "from the model's shapes. A device is sampled for a stage only if its declared ram_mb covers it")
    p.add_argument("--artifacts", metavar="URL", default=None,
                   help="serve stage files from an HTTPS origin as well as over MQTT chunks: with `serve`, the https:// "
                   "URL a web server serves --artifact-dir at (python -m server_sdk.fleet.origin run FLEET_DIR starts nginx "
                   "for it); with `run --fleet local:N`, `nginx` starts one here. Devices download there with their "
                   "own fleet login, checked per download (docs/protocol.md section 5)")
    p.add_argument("--artifact-dir", metavar="DIR", default=None,
                   help="the directory the --artifacts URL serves (the coordinator copies stage files into DIR/RUN/)")
    p.add_argument("--no-mqtt-chunks", action="store_true",
                   help="with --artifacts: serve stage files from the origin only (its per-device access control is "
                   "then the only way in; MQTT chunks reach every fleet device), not as MQTT chunks")
    p.add_argument("--keep-artifacts", action="store_true", help="keep every stage's exported artifacts under "
                   "RUN_DIR/artifacts (default: a finished stage's are deleted when the next starts)")


# round policy flags -> FleetSettings fields; a flag left out keeps the saved (resume) or default value.
# ZERO_IS_OFF: 0 turns the setting off (None)
POLICY_FLAGS = {"round_timeout": "round_timeout_s", "quorum": "quorum", "replacements": "replacements",
                "max_update_norm": "max_update_norm"}
ZERO_IS_OFF = {"start_timeout": "start_timeout_s", "norm_bound_k": "norm_bound_k"}


def _fleet_settings(args: argparse.Namespace, run_dir: Path):
    """The run's FleetSettings: those saved in run_dir/fleet.json (a resumed run) or the defaults, with the
    command line's flags on top, validated."""
    from server_sdk.fleet.settings import FleetSettings

    saved = run_dir / "fleet.json"
    settings = FleetSettings(**json.loads(saved.read_text())) if saved.exists() else FleetSettings()
    for flag, name in POLICY_FLAGS.items():
        if getattr(args, flag) is not None:
            setattr(settings, name, getattr(args, flag))
    for flag, name in ZERO_IS_OFF.items():
        if getattr(args, flag) is not None:
            setattr(settings, name, getattr(args, flag) or None)
    _artifact_flags(args, settings)
    try:
        return settings.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _artifact_flags(args: argparse.Namespace, settings) -> None:
    """--artifacts, --artifact-dir, --no-mqtt-chunks, --keep-artifacts, --formats, --stage-peak-mb: what the
    fleet serves and how."""
    if getattr(args, "artifacts", None) not in (None, "nginx"):
        settings.artifact_origin = args.artifacts.rstrip("/") + "/"
        settings.artifact_dir = args.artifact_dir
        if getattr(args, "fleet_dir", None):
            settings.artifact_passwd = str(Path(args.fleet_dir) / "passwd")
    if getattr(args, "no_mqtt_chunks", False) and args.artifacts != "nginx":  # nginx: run_local sets it
        settings.artifact_chunks = False
    if args.keep_artifacts:
        settings.keep_artifacts = True
    if args.formats is not None:
        settings.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.stage_peak_mb is not None:
        try:
            settings.stage_peak_mb = {k.strip(): int(v) for k, v in (p.split("=") for p in args.stage_peak_mb.split(","))}
        except ValueError:
            raise ConfigError(f"--stage-peak-mb {args.stage_peak_mb!r}: give LAYERS=MIB pairs, e.g. 4=524,8=850") from None


def _local_fleet_size(fleet: str) -> int:
    """N of `--fleet local:N`, once mosquitto is known to be installed."""
    kind, _, count = fleet.partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--fleet {fleet!r}: use local:N (N devices on this machine); for real devices "
                          "run `devft serve --broker-url ... --fleet-dir ...`")
    from server_sdk.fleet.broker import MosquittoNotFound, require_mosquitto

    try:
        require_mosquitto()
    except MosquittoNotFound as exc:
        raise ConfigError(f"--fleet local needs mosquitto: {exc}") from None
    return int(count)


def run_local_fleet(args: argparse.Namespace, run_dir: Path, cfg: RunConfig) -> int:
    """`devft run --fleet local:N`: a secured broker, the coordinator and N devices on this machine."""
    from server_sdk.engine.executor import QuorumNotReached
    from server_sdk.engine.report import summary_text
    from server_sdk.fleet.local_fleet import run_local

    n = _local_fleet_size(args.fleet)
    if cfg.num_clients != n and not args.resume:
        print(f"devft: --fleet local:{n}: num_clients set to {n} (one data shard per device)", file=sys.stderr)
        cfg = cfg.with_overrides({"num_clients": n}).validate()
    try:
        result = run_local(cfg, run_dir, n, resume=bool(args.resume), progress=not args.quiet,
                           settings=_fleet_settings(args, run_dir), origin=args.artifacts == "nginx",
                           mqtt_chunks=not args.no_mqtt_chunks)
    except QuorumNotReached as exc:
        print(f"devft: error: {exc}", file=sys.stderr)
        return 1
    if result.interrupted:
        return 0
    report = result.report
    print(summary_text(report, run_dir))
    _print_devices(report["fleet"])
    return 0


def _print_devices(fleet: dict) -> None:
    """What each device did, and the updates refused and devices replaced (report.json's `fleet`)."""
    for name, d in sorted(fleet["devices"].items()):
        # report.json keys stages from 0 (as records do); people count them from 1
        down = ", ".join(f"stage {int(s) + 1}: {b / 1e6:.1f} MB" for s, b in d["stage_download_bytes"].items())
        declared = f"{d.get('platform') or '-'}, {d.get('runtime') or '-'}, {d.get('ram_mb') or '-'} MiB offered"
        trained = ", ".join(str(s + 1) for s in d.get("stages") or []) or "none"
        print(f"  {name}: {d['rounds']} rounds in stages {trained} ({declared}), peak RSS "
              f"{d['peak_rss_bytes'] / 2**20:.0f} MiB, {d['energy_j']:.1f} J, downloaded {down}"
              + (f"; refused: {d['refused']}" if d.get("refused") else ""))
    if fleet["rejected"]:
        print(f"  rejected updates: {fleet['rejected']} (see {fleet['events']})")
    for r in fleet["replacements"]:
        print(f"  round {r['round'] + 1}: {r['device']} replaced {r['replaces']}, which went offline"
              f"{'' if r['accepted'] else ' (no update from the replacement either)'}")


def serve(args: argparse.Namespace, run_dir: Path, cfg: RunConfig) -> int:
    """`devft serve`: coordinate a fleet over an existing broker."""
    from server_sdk.engine.executor import QuorumNotReached
    from server_sdk.engine.report import summary_text
    from server_sdk.engine.rounds import run
    from server_sdk.fleet.broker import server_credentials
    from server_sdk.fleet.broker_config import fleet_queue_bound
    from server_sdk.fleet.coordinator import fleet_executor_factory

    url = urlparse(args.broker_url)
    if url.scheme not in ("mqtts", "ssl", "tls") or not url.hostname:
        raise ConfigError(f"--broker-url {args.broker_url!r} must look like mqtts://HOST:PORT (TLS only)")
    if args.artifacts == "nginx":
        raise ConfigError("--artifacts nginx starts nginx for a local fleet only; with `serve`, start it with "
                          "`python -m server_sdk.fleet.origin run FLEET_DIR --dir DIR` and pass --artifacts https://HOST:8443/ "
                          "--artifact-dir DIR")
    creds = server_credentials(args.fleet_dir)
    settings = _fleet_settings(args, run_dir)
    settings.broker_queue_bytes = fleet_queue_bound(args.fleet_dir)  # the broker the fleet directory describes
    _register_run(args.fleet_dir, settings.run_id or run_dir.name)
    factory = fleet_executor_factory(run_dir, creds, settings, host=url.hostname, port=url.port or 8883)
    try:
        result = run(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet, executor_factory=factory)
    except QuorumNotReached as exc:
        print(f"devft: error: {exc}", file=sys.stderr)
        return 1
    if result.interrupted:
        return 0
    from server_sdk.fleet.local_fleet import add_fleet_summary

    report = add_fleet_summary(run_dir, result.report)
    print(summary_text(report, run_dir))
    return 0


def _register_run(fleet_dir: str, run_id: str) -> None:
    """Devices may publish only under the fleet's registered runs (broker.register_run): register this one and
    reload the broker if it runs here; otherwise say how."""
    from server_sdk.fleet.broker import BrokerError, register_run, reload_running_broker

    try:
        new = register_run(fleet_dir, run_id)
    except (BrokerError, OSError) as exc:
        raise ConfigError(f"cannot register run {run_id!r} with the fleet in {fleet_dir}: {exc}. Devices may publish "
                          "only under registered runs: run `python -m server_sdk.fleet.broker register-run "
                          f"{fleet_dir} {run_id}` as the fleet's owner, then reload the broker") from None
    if new and not reload_running_broker(fleet_dir):
        print(f"devft: registered run {run_id} with the fleet in {fleet_dir}; no broker of that fleet runs on this "
              "machine, so reload yours (SIGHUP to `python -m server_sdk.fleet.broker run`, or copy the new acl to the broker "
              "host) before devices start, or they may not publish under the run", file=sys.stderr)


def cmd_fleet_init(args: argparse.Namespace) -> int:
    from server_sdk.fleet.broker import fleet_init

    fleet_init(args.dir, hostnames=args.hostname, port=args.port, bind_address=args.bind)
    print(f"fleet ready in {args.dir}: run the broker with `python -m server_sdk.fleet.broker run {args.dir}`, add devices "
          f"with `devft fleet add-device {args.dir} dev-000` (device dev-NNN trains data shard NNN)")
    return 0


def cmd_fleet_add_device(args: argparse.Namespace) -> int:

    from server_sdk.fleet.broker import add_device

    if args.web and not args.run:
        raise ConfigError("--web needs --run RUN_ID: a join link enrols the browser into one run")
    if not args.web and (args.run or args.data or args.qr):
        raise ConfigError("--run, --data and --qr belong to --web (a browser device's join link)")
    if args.web:
        from edge_runtime.protocol import ProtocolError, check_name

        try:
            check_name("run id", args.run)
        except ProtocolError as exc:
            raise ConfigError(f"--run: {exc}") from None
    if args.data and not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data}: no such shard (the coordinator writes runs/RUN/data/client_NNN.jsonl "
                          "when the run starts: start `devft serve` first)")
    creds = add_device(args.dir, args.name, host=args.host)
    if args.web:
        return _web_join(args, creds)
    path = Path(args.dir) / "credentials" / f"{creds.username}.json"
    if args.out:  # never through the shell: a redirect would create the file world-readable
        path = Path(args.out)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(creds.to_json())
        os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    print(path)
    print(f"# {path} holds the device's password (mode 0600): copy it to the device as creds.json, then run "
          "there:\n"
          "#   devft-edge run --credentials creds.json --data client_NNN.jsonl --cache ~/.cache/devft-edge "
          "--run RUN_NAME\n"
          "# a running broker picks the device up after SIGHUP (`kill -HUP` the `python -m server_sdk.fleet.broker run` "
          "process)", file=sys.stderr)
    return 0


def _web_join(args: argparse.Namespace, creds) -> int:
    """`add-device --web`: the device's one-time join link on stdout and as a QR code; no password printed."""
    from server_sdk.fleet.web_join import JoinRefused, issue, join_url, write_qr

    try:
        token = issue(args.dir, creds.username, args.run, args.data, args.ttl_hours * 3600)
    except JoinRefused as exc:
        raise ConfigError(str(exc)) from None
    url = join_url(args.web_host or creds.host, args.https_port, token)
    qr = write_qr(url, args.qr or Path(args.dir) / "web" / f"{creds.username}-join.png")
    print(url)
    print(f"# open the link on the phone, or scan {qr} (mode 0600) with its camera: the page exchanges the one-time "
          f"token for {creds.username}'s credentials and keeps them in the browser. The link works once, for "
          f"{args.ttl_hours:g} h; `python -m server_sdk.fleet.web_gateway revoke {args.dir} {creds.username}` withdraws it.\n"
          f"# the phone reaches the page through `python -m server_sdk.fleet.web_gateway run {args.dir}` (HTTPS :8443, MQTT "
          "over WSS :8884) and must trust the fleet's CA (ca.pem) or a publicly trusted gateway certificate; a "
          "running broker picks the device up after SIGHUP", file=sys.stderr)
    return 0


def cmd_fleet_add_operator(args: argparse.Namespace) -> int:
    from server_sdk.fleet.broker import BrokerError, add_operator

    try:
        creds = add_operator(args.dir, args.name)
    except BrokerError as exc:
        print(f"devft: error: {exc}", file=sys.stderr)
        return 2
    print(Path(args.dir) / "credentials" / f"{creds.username}.json")
    print("# it may read and publish every devft/ topic; a running broker picks it up after SIGHUP", file=sys.stderr)
    return 0
