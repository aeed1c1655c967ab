"""mosquitto.conf and the runtime directory mosquitto reads it from: the account it runs as (never root),
where its files and persistence live when root starts it, and the per-client bounds of what it queues.

Part of the broker (server_sdk/fleet/broker.py re-exports every public name here).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from edge_runtime.protocol import MAX_UPDATE_BYTES
from server_sdk.fleet.broker_setup import BrokerError, load_settings, mosquitto_version

BROKER_FILES = ("ca.pem", "server.pem", "server.key", "passwd", "acl")  # all mosquitto reads
RUNTIME_ROOT = "/var/lib/devft-broker"  # where a broker started by root keeps its files (DEVFT_BROKER_RUNTIME)
# per client (device or coordinator connection), queued beyond the 20 messages in flight: QoS 1 messages for an
# offline session, or for an online one that reads slower than they come. Room for a burst of updates to the
# coordinator (4 full-size ones); fleet.json's `max_queued_bytes` overrides it
# Per-client queue bounds, for every client alike (Mosquitto 2.0 has no per-user limits): the bytes bound is what
# caps a device's share of the broker's memory; the count is high because the coordinator's own connection takes
# bursts of small messages (a thousand devices' statuses at a stage start; 1,000 dropped statuses in a test)
MAX_QUEUED_MESSAGES = 100_000
MAX_QUEUED_BYTES = 4 * MAX_UPDATE_BYTES


def queued_bytes_bound(settings: dict) -> int:
    """The broker's per-client queue bound in bytes, from a fleet's settings (fleet.json): what it may hold for the
    coordinator's connection while a round's updates arrive faster than the coordinator reads them."""
    return int(settings.get("max_queued_bytes") or MAX_QUEUED_BYTES)


def fleet_queue_bound(fleet_dir: str | Path) -> int:
    """queued_bytes_bound of the fleet in fleet_dir."""
    return queued_bytes_bound(load_settings(Path(fleet_dir)))


def broker_user() -> str:
    """The account mosquitto runs as: never root.

    Started by root, mosquitto switches to this user before it reads its files; otherwise it
    cannot switch and keeps the invoking user."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("mosquitto", os.environ.get("SUDO_USER")):
        if not name or name == "root":
            continue
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise BrokerError(
        "refusing to run mosquitto as root, and there is no `mosquitto` system user (nor SUDO_USER) to run it as; "
        "install Debian's mosquitto package (it creates the user), `adduser --system --group mosquitto`, "
        "or start the broker as an unprivileged user"
    )


def runtime_dir(fleet_dir: str | Path) -> Path:
    """The directory mosquitto reads its files from and keeps persistence in (see the module docstring).

    Keyed by the random `fleet_id` that fleet_init writes into fleet.json, not by the path: a fleet made
    anew where a deleted one was (a run directory deleted and rerun under the same name) must not inherit the
    old broker's persistence, stale retained `done` included (issue #27, hole 12). Fleets made before the id
    existed keep their path-keyed directory."""
    fleet = Path(fleet_dir).resolve()
    if os.geteuid() != 0:
        return fleet
    root = Path(os.environ.get("DEVFT_BROKER_RUNTIME") or RUNTIME_ROOT)
    try:
        fleet_id = json.loads((fleet / "fleet.json").read_text()).get("fleet_id")
    except (OSError, ValueError, AttributeError):
        fleet_id = None
    if not (isinstance(fleet_id, str) and re.fullmatch(r"[0-9a-f]{12,64}", fleet_id)):
        fleet_id = hashlib.sha256(str(fleet).encode()).hexdigest()[:12]
    return root / f"{fleet.name}-{fleet_id}"


def stage_runtime(fleet: Path, user: str) -> Path:
    """Copy what mosquitto reads into its runtime directory, owned by `user` (a no-op unless we are root)."""
    rt = runtime_dir(fleet)
    if rt == fleet:
        return fleet
    pw = pwd.getpwnam(user)
    rt.parent.mkdir(parents=True, exist_ok=True)
    rt.mkdir(mode=0o700, exist_ok=True)
    (rt / "data").mkdir(mode=0o700, exist_ok=True)
    for name in BROKER_FILES:
        tmp = rt / f".{name}.tmp"
        shutil.copyfile(fleet / name, tmp)
        os.chmod(tmp, 0o600)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        os.replace(tmp, rt / name)
    for path in (rt, rt / "data", *(rt / "data").iterdir()):
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return rt


def write_config(fleet_dir: str | Path, port: int | None = None, bind_address: str | None = None,
                 extra: Callable[[Path], list[str]] | None = None) -> Path:
    """(Re)generate mosquitto.conf for `port` and `bind_address` (default: the fleet's settings), plus the
    lines `extra(runtime directory)` returns (an edge broker's bridge, server_sdk/fleet/bridge.py).

    Also stages the broker's files into its runtime directory when we are root."""
    fleet = Path(fleet_dir).resolve()
    settings = load_settings(fleet)
    port = port or settings["port"]
    bind = bind_address or settings.get("bind_address")
    user = broker_user()
    rt = stage_runtime(fleet, user)
    lines = [
        "# generated by server_sdk.fleet.broker.write_config - edits are overwritten",
        f"user {user}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {rt / 'passwd'}",
        f"acl_file {rt / 'acl'}",
        "persistence true",
        f"persistence_location {rt / 'data'}/",
        "autosave_interval 10",
        # what the broker may hold for one client while it is away or slow (issue #27, hole 8): chunks are QoS 0
        # and never queued for an offline session; control and global are retained (a device resubscribing gets
        # the newest), so a full queue drops nothing a device needs
        "queue_qos0_messages false",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {queued_bytes_bound(settings)}",
        # and not for ever: a session (its subscriptions and queue) goes 1 h after its client left, whatever
        # expiry the client asked for (devft-edge asks for 10 min; a coordinator resubscribes when it starts)
        "persistent_client_expiration 1h",
        "max_inflight_messages 20",
        # a message's last segment leaves at once instead of waiting for the client's delayed ACK (40 ms); 2.0+
        *(["set_tcp_nodelay true"] if (mosquitto_version() or (2,)) >= (2,) else []),
        f"max_packet_size {MAX_UPDATE_BYTES + 64 * 1024}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "",
        f"listener {port} {bind}" if bind else f"listener {port}",
        "use_username_as_clientid true",  # a listener option: no login can take over another's session
        f"cafile {rt / 'ca.pem'}",
        f"certfile {rt / 'server.pem'}",
        f"keyfile {rt / 'server.key'}",
        "tls_version tlsv1.2",
        "",
    ]
    loop_port = settings.get("plaintext_loopback_port")
    if loop_port:
        lines += [f"listener {loop_port} 127.0.0.1", "use_username_as_clientid true", ""]
    if extra is not None:
        lines += extra(rt)
    conf = rt / "mosquitto.conf"
    conf.write_text("\n".join(lines))
    if rt != fleet:
        pw = pwd.getpwnam(user)
        os.chown(conf, pw.pw_uid, pw.pw_gid)
    return conf

