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

from .config import ConfigError, RunConfig

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
    p.add_argument("--quorum", type=float, default=None, help="fraction of sampled devices a round needs (default 0.6)")
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
    p.add_argument("--artifacts", metavar="URL", default=None,
                   help="serve stage files from an HTTPS origin as well as over MQTT chunks: with `serve`, the https:// "
                   "URL a web server serves --artifact-dir at (python -m server_sdk.origin run FLEET_DIR starts nginx "
                   "for it); with `run --fleet local:N`, `nginx` starts one here. Devices download there with their "
                   "own fleet login, checked per download (docs/protocol.md section 5)")
    p.add_argument("--artifact-dir", metavar="DIR", default=None,
                   help="the directory the --artifacts URL serves (the coordinator copies stage files into DIR/RUN/)")
    p.add_argument("--no-mqtt-chunks", action="store_true",
                   help="with --artifacts: serve stage files from the origin only (its per-device access control is "
                   "then the only way in; MQTT chunks reach every fleet device), not as MQTT chunks")
    p.add_argument("--keep-artifacts", action="store_true", help="keep every stage's exported artifacts under "
                   "RUN_DIR/artifacts (default: a finished stage's are deleted when the next starts)")


def _fleet_settings(args: argparse.Namespace, run_dir: Path):
    from .fleet import FleetSettings

    if args.keep_artifacts:
        from .disk import KEEP_ENV

        os.environ[KEEP_ENV] = "1"  # read where stages end (disk.prune_finished_stages)
    saved = run_dir / "fleet.json"
    settings = FleetSettings(**json.loads(saved.read_text())) if saved.exists() else FleetSettings()
    if args.round_timeout is not None:
        settings.round_timeout_s = args.round_timeout
    if args.quorum is not None:
        settings.quorum = args.quorum
    if args.replacements is not None:
        settings.replacements = args.replacements
    if args.start_timeout is not None:
        settings.start_timeout_s = args.start_timeout or None
    if args.max_update_norm is not None:
        settings.max_update_norm = args.max_update_norm
    if args.norm_bound_k is not None:
        settings.norm_bound_k = args.norm_bound_k or None
    if getattr(args, "artifacts", None) not in (None, "nginx"):
        settings.artifact_origin = args.artifacts.rstrip("/") + "/"
        settings.artifact_dir = args.artifact_dir
        if getattr(args, "fleet_dir", None):
            settings.artifact_passwd = str(Path(args.fleet_dir) / "passwd")
    if getattr(args, "no_mqtt_chunks", False) and args.artifacts != "nginx":  # nginx: run_local sets it
        settings.artifact_chunks = False
    if args.formats is not None:
        settings.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        return settings.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_local_fleet(args: argparse.Namespace, run_dir: Path, cfg: RunConfig) -> int:
    """`devft run --fleet local:N`: a secured broker, the coordinator and N devices on this machine."""
    from .fleet import QuorumNotReached
    from .local_fleet import run_local
    from .report import summary_text

    kind, _, count = args.fleet.partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--fleet {args.fleet!r}: use local:N (N devices on this machine); for real devices "
                          "run `devft serve --broker-url ... --fleet-dir ...`")
    from .broker import MosquittoNotFound, require_mosquitto

    try:
        require_mosquitto()
    except MosquittoNotFound as exc:
        raise ConfigError(f"--fleet local needs mosquitto: {exc}") from None
    n = int(count)
    if cfg.num_clients != n and not args.resume:
        print(f"devft: --fleet local:{n}: num_clients set to {n} (one data shard per device)", file=sys.stderr)
        cfg = cfg.with_overrides({"num_clients": n}).validate()
    try:
        report = run_local(cfg, run_dir, n, resume=bool(args.resume), progress=not args.quiet,
                           settings=_fleet_settings(args, run_dir), origin=args.artifacts == "nginx",
                           mqtt_chunks=not args.no_mqtt_chunks)
    except QuorumNotReached as exc:
        print(f"devft: error: {exc}", file=sys.stderr)
        return 1
    if report.get("interrupted"):
        return 0
    print(summary_text(report, run_dir))
    for name, d in sorted(report["fleet"]["devices"].items()):
        # report.json keys stages from 0 (as records do); people count them from 1
        down = ", ".join(f"stage {int(s) + 1}: {b / 1e6:.1f} MB" for s, b in d["stage_download_bytes"].items())
        print(f"  {name}: {d['rounds']} rounds, peak RSS {d['peak_rss_bytes'] / 2**20:.0f} MiB, "
              f"{d['energy_j']:.1f} J, downloaded {down}")
    if report["fleet"]["rejected"]:
        print(f"  rejected updates: {report['fleet']['rejected']} (see {report['fleet']['events']})")
    for r in report["fleet"]["replacements"]:
        print(f"  round {r['round'] + 1}: {r['device']} replaced {r['replaces']}, which went offline"
              f"{'' if r['accepted'] else ' (no update from the replacement either)'}")
    return 0


def serve(args: argparse.Namespace, run_dir: Path, cfg: RunConfig) -> int:
    """`devft serve`: coordinate a fleet over an existing broker."""
    from .broker import server_credentials
    from .fleet import QuorumNotReached, fleet_executor_factory
    from .report import summary_text
    from .rounds import run

    url = urlparse(args.broker_url)
    if url.scheme not in ("mqtts", "ssl", "tls") or not url.hostname:
        raise ConfigError(f"--broker-url {args.broker_url!r} must look like mqtts://HOST:PORT (TLS only)")
    if args.artifacts == "nginx":
        raise ConfigError("--artifacts nginx starts nginx for a local fleet only; with `serve`, start it with "
                          "`python -m server_sdk.origin run FLEET_DIR --dir DIR` and pass --artifacts https://HOST:8443/ "
                          "--artifact-dir DIR")
    creds = server_credentials(args.fleet_dir)
    settings = _fleet_settings(args, run_dir)
    _register_run(args.fleet_dir, settings.run_id or run_dir.name)
    factory = fleet_executor_factory(run_dir, creds, settings, host=url.hostname, port=url.port or 8883)
    try:
        report = run(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet, executor_factory=factory)
    except QuorumNotReached as exc:
        print(f"devft: error: {exc}", file=sys.stderr)
        return 1
    if report.get("interrupted"):
        return 0
    from .local_fleet import add_fleet_summary

    report = add_fleet_summary(run_dir, report)
    print(summary_text(report, run_dir))
    return 0


def _register_run(fleet_dir: str, run_id: str) -> None:
    """Devices may publish only under the fleet's registered runs (broker.register_run): register this one and
    reload the broker if it runs here; otherwise say how."""
    from .broker import BrokerError, register_run, reload_running_broker

    try:
        new = register_run(fleet_dir, run_id)
    except (BrokerError, OSError) as exc:
        raise ConfigError(f"cannot register run {run_id!r} with the fleet in {fleet_dir}: {exc}. Devices may publish "
                          "only under registered runs: run `python -m server_sdk.broker register-run "
                          f"{fleet_dir} {run_id}` as the fleet's owner, then reload the broker") from None
    if new and not reload_running_broker(fleet_dir):
        print(f"devft: registered run {run_id} with the fleet in {fleet_dir}; no broker of that fleet runs on this "
              "machine, so reload yours (SIGHUP to `python -m server_sdk.broker run`, or copy the new acl to the broker "
              "host) before devices start, or they may not publish under the run", file=sys.stderr)


def cmd_fleet_init(args: argparse.Namespace) -> int:
    from .broker import fleet_init

    fleet_init(args.dir, hostnames=args.hostname, port=args.port, bind_address=args.bind)
    print(f"fleet ready in {args.dir}: run the broker with `python -m server_sdk.broker run {args.dir}`, add devices "
          f"with `devft fleet add-device {args.dir} dev-000` (device dev-NNN trains data shard NNN)")
    return 0


def cmd_fleet_add_device(args: argparse.Namespace) -> int:
    import os

    from .broker import add_device

    creds = add_device(args.dir, args.name, host=args.host)
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
          "# a running broker picks the device up after SIGHUP (`kill -HUP` the `python -m server_sdk.broker run` "
          "process)", file=sys.stderr)
    return 0


def cmd_fleet_add_operator(args: argparse.Namespace) -> int:
    from .broker import BrokerError, add_operator

    try:
        creds = add_operator(args.dir, args.name)
    except BrokerError as exc:
        print(f"devft: error: {exc}", file=sys.stderr)
        return 2
    print(Path(args.dir) / "credentials" / f"{creds.username}.json")
    print("# it may read and publish every devft/ topic; a running broker picks it up after SIGHUP", file=sys.stderr)
    return 0
