"""Edge brokers: Mosquitto processes near the devices, bridged over TLS to the fleet's broker (issue #27).

One Mosquitto process holds a few thousand TLS connections; past that, or when devices sit on other
networks, devices connect to an edge broker instead, and one bridge connection per edge carries their
traffic to the fleet's broker (the "core", which the coordinator uses). Mosquitto's own bridge does the
forwarding; devft writes its configuration.

    python -m server_sdk.fleet.bridge add fleet/ edge1 --port 8884 --core-host broker.lan   # once, on the core's machine
    python -m server_sdk.fleet.bridge run fleet/ edge1                                       # copy fleet/edges/edge1/ there

An edge is a fleet directory of its own, `fleet/edges/<name>/`: the fleet's CA, server certificate,
password file and ACL (copied from the core at every start, so the same device logins and the same
per-device ACL apply at the edge: a device can publish only its own update, status and fetch topics of
the registered runs, whichever broker it uses), its own persistence, and a bridge section:

    topic devft/+/control in 1           the coordinator's control, global adapters and artifact chunks
    topic devft/+/global/# in 1          come in (retained ones stay retained at the edge: the bridge
    topic devft/+/artifacts/# in 0       speaks Mosquitto's bridge protocol, try_private)
    topic devft/+/update/+ out 1         device updates, statuses (wills included) and chunk requests go
    topic devft/+/status/+ out 1         out to the core
    topic devft/+/fetch/+ out 1

The bridge logs into the core as `bridge-<name>`, an operator login (the server's rights, add_operator):
the core trusts the edge to have checked each device's ACL, so an edge's machine and its bridge
password (in its mosquitto.conf, mode 0600, read by the mosquitto user only) are as sensitive as the
core's. The bridge is TLS, verifying the core's certificate against the fleet CA. Nothing of the
coordinator changes: it sees the same topics, device ids and wills.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
from pathlib import Path

from edge_runtime.protocol import TOPIC_ROOT, check_name
from server_sdk.fleet.broker import (
    BROKER_FILES,
    DEFAULT_TLS_PORT,
    BrokerError,
    BrokerProcess,
    add_operator,
    load_settings,
    serve_until_signalled,
    write_private,
)

EDGES = "edges"
# (topic pattern, direction, QoS) of every bridge: what the coordinator sends comes in, what devices send goes out
BRIDGE_TOPICS = (("+/control", "in", 1), ("+/global/#", "in", 1), ("+/artifacts/#", "in", 0),
                 ("+/update/+", "out", 1), ("+/status/+", "out", 1), ("+/fetch/+", "out", 1))


def edge_dir(fleet_dir: str | Path, name: str) -> Path:
    return Path(fleet_dir) / EDGES / check_name("edge name", name)


def add_edge(fleet_dir: str | Path, name: str, *, port: int = DEFAULT_TLS_PORT + 1, core_host: str = "localhost",
             core_port: int | None = None, bind_address: str | None = None) -> Path:
    """Make edge broker `name` of the fleet: its bridge login on the core and its directory (returned)."""
    fleet = Path(fleet_dir)
    core = load_settings(fleet)
    out = edge_dir(fleet, name)
    if out.exists():
        raise BrokerError(f"{out} exists: edge {name!r} was added already (delete the directory to start over)")
    creds = add_operator(fleet, f"bridge-{name}")
    out.mkdir(parents=True)
    (out / "data").mkdir()
    settings = {"hostnames": core["hostnames"], "port": port, "bind_address": bind_address,
                "plaintext_loopback_port": None, "server_users": core.get("server_users"),
                "fleet_id": secrets.token_hex(8), "runs": core.get("runs"),
                "bridge": {"name": name, "core_host": core_host, "core_port": core_port or core["port"],
                           "username": creds.username}}
    (out / "fleet.json").write_text(json.dumps(settings, indent=2))
    write_private(out / "bridge.json", json.dumps({"password": creds.password}))
    sync_edge(fleet, name)
    return out


def sync_edge(fleet_dir: str | Path, name: str) -> None:
    """Copy the core's certificates, passwords and ACL (and its registered runs) to the edge's directory."""
    fleet, out = Path(fleet_dir), edge_dir(fleet_dir, name)
    for f in BROKER_FILES:
        shutil.copyfile(fleet / f, out / f)
    (out / "server.key").chmod(0o600)
    (out / "passwd").chmod(0o600)
    settings = load_settings(out)
    settings["runs"] = load_settings(fleet).get("runs")
    (out / "fleet.json").write_text(json.dumps(settings, indent=2))


def bridge_lines(edge: Path, runtime: Path) -> list[str]:
    """The mosquitto.conf bridge section of the edge whose directory is `edge` (files staged in `runtime`)."""
    bridge = load_settings(edge)["bridge"]
    password = json.loads((edge / "bridge.json").read_text())["password"]
    user = bridge["username"]
    return [
        f"connection devft-{bridge['name']}",
        f"address {bridge['core_host']}:{bridge['core_port']}",
        f"remote_username {user}",
        f"remote_password {password}",
        f"remote_clientid {user}",  # the core binds client ids to logins anyway
        f"bridge_cafile {runtime / 'ca.pem'}",
        "bridge_tls_version tlsv1.2",
        "bridge_insecure false",  # the core's certificate must name core_host
        "bridge_protocol_version mqttv311",
        "try_private true",  # Mosquitto's bridge flag: retained messages stay retained across the bridge
        "cleansession false",  # QoS 1 messages queued while the bridge is down are kept on both sides
        "restart_timeout 1 30",  # reconnect with backoff from 1 s to 30 s
        "start_type automatic",
        *(f"topic {TOPIC_ROOT}/{pattern} {direction} {qos}" for pattern, direction, qos in BRIDGE_TOPICS),
        "",
    ]


class EdgeBroker(BrokerProcess):
    """The mosquitto of an edge: a BrokerProcess on the edge's directory, synced from the core when the edge
    directory sits inside the core's fleet directory (on the core's machine)."""

    def __init__(self, fleet_dir: str | Path, name: str, port: int | None = None, **kw) -> None:
        self.fleet, self.name = Path(fleet_dir), name
        super().__init__(edge_dir(fleet_dir, name), port, **kw)

    def config_extra(self, runtime: Path) -> list[str]:
        return bridge_lines(self.fleet_dir, runtime)

    def start(self, timeout_s: float = 10.0) -> EdgeBroker:
        if (self.fleet / "fleet.json").exists():
            sync_edge(self.fleet, self.name)
        super().start(timeout_s)
        return self


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server_sdk.fleet.bridge", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_add = sub.add_parser("add", help="make an edge broker: its bridge login on the core and fleet/edges/NAME/")
    p_add.add_argument("dir")
    p_add.add_argument("name")
    p_add.add_argument("--port", type=int, default=DEFAULT_TLS_PORT + 1, help="the edge's TLS port for devices")
    p_add.add_argument("--core-host", default="localhost", help="the core broker's host, as its certificate names it")
    p_add.add_argument("--core-port", type=int, default=None, help="the core's TLS port (default: the fleet's)")
    p_add.add_argument("--bind", default=None, help="address the edge listens on (default: all interfaces)")
    p_run = sub.add_parser("run", help="run the edge's mosquitto until SIGTERM or Ctrl-C")
    p_run.add_argument("dir")
    p_run.add_argument("name")
    p_run.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "add":
        out = add_edge(args.dir, args.name, port=args.port, core_host=args.core_host, core_port=args.core_port,
                       bind_address=args.bind)
        print(f"edge {args.name} ready in {out}; devices connect to it on port {args.port} with their own credentials")
        return 0
    edge = EdgeBroker(args.dir, args.name, args.port, die_with_parent=True)
    return serve_until_signalled(edge, lambda b: print(f"edge mosquitto (pid {b.proc.pid}) on port {b.port}, bridged "
                                                       f"to {load_settings(b.fleet_dir)['bridge']['core_host']}",
                                                       flush=True))


if __name__ == "__main__":
    raise SystemExit(main())
