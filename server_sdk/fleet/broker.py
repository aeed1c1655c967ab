"""Run a secured Mosquitto broker for a device fleet.

`fleet_init` creates everything the broker needs in one directory: a private
CA, a server certificate, a password file, an ACL and the persistence store.
`add_device` registers a device and returns what it needs to connect.
`start_broker` runs mosquitto on that directory and waits until it listens.

The ACL is the security boundary: a device may publish only on its own
update/status/fetch topics, only under the fleet's registered runs (`register_run`),
and read only what the server broadcasts, so a compromised device cannot
impersonate another one, read others' updates, or park retained messages under
made-up run ids. mosquitto.conf bounds what the broker queues per client
(`write_config`; docs/protocol.md §8 states the per-device bounds).
The broker takes every client id from the username (`use_username_as_clientid`),
so no login can take over another one's session; the coordinator's two
connections log in as two server users (`server`, `server-artifacts`).

Layout of a fleet directory:

    fleet.json            settings (hostnames, port, bind address, server users, runs, fleet_id)
    broker.pid            the mosquitto serving the fleet (reload_running_broker, stop_stale_broker)
    ca.pem                the fleet CA certificate
    ca/ca.key             the CA private key: the broker never reads it; keep it off devices
    server.pem / .key     broker TLS certificate for the hostnames
    passwd / acl          mosquitto password file and ACL
    mosquitto.conf        generated at every start (in the runtime directory when started by root)
    data/                 mosquitto persistence (sessions, queued QoS 1 messages)
    credentials/<user>.json  connection details for the server and each device (mode 0600)

Mosquitto never runs as root. Started by root, it runs as the `mosquitto` system
user (else the sudo caller), and reads copies of only the files it needs
(ca.pem, server.pem, server.key, passwd, acl) from a runtime directory that user
owns, `/var/lib/devft-broker/<fleet>-<fleet_id>/` (`DEVFT_BROKER_RUNTIME` overrides the
parent; the id is random, from fleet.json, so a fleet made anew never finds an old one's
persistence), where its persistence lives too; the fleet directory itself may stay
private to root. Started by anyone else, it runs as that user on the fleet directory.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import functools
import hashlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_runtime.protocol import MAX_UPDATE_BYTES, TOPIC_ROOT, check_name

SERVER_USER = "server"
ARTIFACTS_SUFFIX = "-artifacts"  # the coordinator's second connection (artifact chunks) logs in as server-artifacts
DEFAULT_TLS_PORT = 8883
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


class MosquittoNotFound(RuntimeError):
    pass


class BrokerError(RuntimeError):
    pass


def require_mosquitto() -> tuple[str, str]:
    """Paths of `mosquitto` and `mosquitto_passwd`, or a clear install hint."""
    broker = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )
    passwd = shutil.which("mosquitto_passwd") or (
        "/usr/bin/mosquitto_passwd" if os.path.exists("/usr/bin/mosquitto_passwd") else None
    )
    if broker is None or passwd is None:
        raise MosquittoNotFound(
            "mosquitto broker not found (need `mosquitto` and `mosquitto_passwd`). "
            "Install it with `sudo apt-get install mosquitto mosquitto-clients` "
            "(macOS: `brew install mosquitto`), then run `sudo systemctl disable --now mosquitto` "
            "if you do not want the system service on port 1883."
        )
    return broker, passwd


@functools.cache
def mosquitto_version() -> tuple[int, ...] | None:
    """The installed mosquitto's version, e.g. (2, 0, 11); None when it is missing or does not say."""
    try:
        broker, _ = require_mosquitto()
        out = subprocess.run([broker, "-h"], capture_output=True, text=True, timeout=10).stdout
    except (MosquittoNotFound, OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"mosquitto version (\d+(?:\.\d+)*)", out)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


@dataclass(frozen=True)
class Credentials:
    """Everything one client needs to connect; written to credentials/<user>.json."""

    username: str
    password: str
    host: str
    port: int
    ca_file: str
    ca_pem: str
    client_id: str
    publish_topics: list[str] = field(default_factory=list)
    subscribe_topics: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def load(path: str | Path) -> Credentials:
        return Credentials(**json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- init


def write_private(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, mode) as f:
        f.write(data)


def _make_certs(fleet: Path, hostnames: list[str], days: int) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"devft fleet CA {fleet.name}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    nokey = serialization.NoEncryption()
    (fleet / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (fleet / "ca").mkdir(mode=0o700, exist_ok=True)
    write_private(fleet / "ca" / "ca.key", ca_key.private_bytes(pem, pkcs8, nokey))
    (fleet / "server.pem").write_bytes(srv_cert.public_bytes(pem))
    write_private(fleet / "server.key", srv_key.private_bytes(pem, pkcs8, nokey))


def acl_text(server_users: tuple[str, ...] = (SERVER_USER, SERVER_USER + ARTIFACTS_SUFFIX),
             runs: tuple[str, ...] | None = ()) -> str:
    """The fleet ACL. `%u` is the authenticated username (= device name = client id).

    Devices write only their own topics, and only under the fleet's registered `runs` (`register_run`):
    Mosquitto cannot refuse the retain flag per topic, so a device allowed every run id could leave a
    retained message of up to max_packet_size under as many run ids as it likes (issue #27, hole 3).
    `runs=None` is the ACL of fleets made before runs were registered: every run id."""
    r = TOPIC_ROOT
    servers = [line for user in server_users for line in (f"user {user}", f"topic readwrite {r}/#", "")]
    writable = ["+"] if runs is None else [check_name("run id", run) for run in runs]
    writes = [line for run in writable for line in (f"pattern write {r}/{run}/update/%u",
                                                    f"pattern write {r}/{run}/status/%u",
                                                    f"pattern write {r}/{run}/fetch/%u")]
    return "\n".join(
        [
            "# generated by server_sdk.fleet.broker - devices may only write their own topics, under registered runs",
            *servers,
            "# every other authenticated user is a device",
            f"pattern read {r}/+/control",
            f"pattern read {r}/+/global/#",
            f"pattern read {r}/+/artifacts/#",
            f"pattern read {r}/+/status/%u",
            *(writes or ["# no run registered yet: devices may publish nowhere (register_run)"]),
            "",
        ]
    )


def write_acl(fleet: Path, settings: dict) -> None:
    """(Re)write the fleet's acl from its settings: server users, and the registered runs (`runs`; without
    the key, the every-run ACL of older fleets)."""
    runs = settings.get("runs")
    (fleet / "acl").write_text(acl_text(tuple(_server_users(settings)), None if runs is None else tuple(runs)))


def register_run(fleet_dir: str | Path, run_id: str) -> bool:
    """Let the fleet's devices publish under `run_id` (their own update, status and fetch topics); returns
    whether the run is new. A running broker applies it on reload (`reload_running_broker`).

    `devft serve` and local fleets register their run; an operator may run
    `python -m server_sdk.fleet.broker register-run FLEET RUN` before starting devices."""
    fleet = Path(fleet_dir)
    check_name("run id", run_id)
    settings = load_settings(fleet)
    runs = list(settings.get("runs") or [])
    if run_id in runs:
        return False
    settings["runs"] = [*runs, run_id]
    (fleet / "fleet.json").write_text(json.dumps(settings, indent=2))
    write_acl(fleet, settings)
    return True


def reload_running_broker(fleet_dir: str | Path) -> bool:
    """SIGHUP the mosquitto serving this fleet (found by its pid file) so it rereads passwords and ACL;
    False when none runs here (a broker elsewhere, or started by another user: reload it there)."""
    fleet = Path(fleet_dir).resolve()
    try:
        pid = int(json.loads((fleet / PID_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not _mosquitto_of(pid, runtime_dir(fleet) / "mosquitto.conf") or not _catches_sighup(pid):
        return False
    if os.geteuid() == 0:
        _stage_runtime(fleet, broker_user())  # mosquitto reads the copies
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        return False
    return True


def load_settings(fleet: Path) -> dict:
    path = fleet / "fleet.json"
    if not path.exists():
        raise BrokerError(f"{fleet} is not a fleet directory (no fleet.json); run fleet_init({str(fleet)!r}) first")
    return json.loads(path.read_text())


def _passwd(fleet: Path, user: str, password: str) -> None:
    _, passwd_bin = require_mosquitto()
    pw_file = fleet / "passwd"
    args = [passwd_bin, "-b", str(pw_file), user, password]
    if not pw_file.exists():
        args.insert(1, "-c")
    res = subprocess.run(args, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise BrokerError(f"mosquitto_passwd failed for user {user!r}: {res.stderr.strip() or res.stdout.strip()}")
    os.chmod(pw_file, 0o600)


def _server_users(settings: dict) -> list[str]:
    """Logins with the server's rights; fleets made before server users existed have only `server`."""
    return list(settings.get("server_users") or [SERVER_USER])


def _credentials(
    fleet: Path, user: str, password: str, settings: dict, host: str | None, port: int | None
) -> Credentials:
    r = TOPIC_ROOT
    if user in _server_users(settings):
        pub, sub = [f"{r}/#"], [f"{r}/#"]
    else:
        pub = [f"{r}/+/update/{user}", f"{r}/+/status/{user}", f"{r}/+/fetch/{user}"]
        sub = [f"{r}/+/control", f"{r}/+/global/#", f"{r}/+/artifacts/#"]
    creds = Credentials(
        username=user,
        password=password,
        host=host or settings["hostnames"][0],
        port=port or settings["port"],
        ca_file=str((fleet / "ca.pem").resolve()),
        ca_pem=(fleet / "ca.pem").read_text(),
        client_id=user,  # the broker uses the username as client id whatever a client sends
        publish_topics=pub,
        subscribe_topics=sub,
    )
    (fleet / "credentials").mkdir(mode=0o700, exist_ok=True)
    write_private(fleet / "credentials" / f"{user}.json", creds.to_json())
    return creds


def fleet_init(
    fleet_dir: str | Path,
    *,
    hostnames: list[str] | None = None,
    port: int = DEFAULT_TLS_PORT,
    plaintext_loopback_port: int | None = None,
    bind_address: str | None = None,
    cert_days: int = 825,
) -> Credentials:
    """Create CA, server cert, ACL, password file and the server users; returns the server's credentials.

    `hostnames` go into the server certificate; devices must connect using one of
    them. `bind_address` is the address the TLS listener binds to (None: all
    interfaces, which a fleet on a network needs; 127.0.0.1 for a fleet on this
    machine). `plaintext_loopback_port` adds an unencrypted listener on 127.0.0.1
    only (still password protected), off by default.
    """
    require_mosquitto()
    fleet = Path(fleet_dir)
    if (fleet / "fleet.json").exists():
        raise BrokerError(f"{fleet} already holds a fleet; use add_device or delete the directory to start over")
    if bind_address is not None:
        try:
            ipaddress.ip_address(bind_address)
        except ValueError:
            raise BrokerError(f"bind address {bind_address!r} is not an IP address; use e.g. 127.0.0.1, "
                              "a LAN address of this machine, or leave it unset for all interfaces") from None
    hostnames = hostnames or ["localhost", "127.0.0.1", socket.gethostname()]
    fleet.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(fleet / "data", ignore_errors=True)  # a new fleet starts with an empty broker
    (fleet / "data").mkdir()
    server_users = [SERVER_USER, SERVER_USER + ARTIFACTS_SUFFIX]
    settings = {"hostnames": hostnames, "port": port, "plaintext_loopback_port": plaintext_loopback_port,
                "bind_address": bind_address, "server_users": server_users,
                "fleet_id": secrets.token_hex(8),  # keys the broker's runtime directory (runtime_dir)
                "runs": []}  # run ids devices may publish under (register_run)
    (fleet / "fleet.json").write_text(json.dumps(settings, indent=2))
    _make_certs(fleet, hostnames, cert_days)
    write_acl(fleet, settings)
    password = secrets.token_urlsafe(24)
    for user in server_users:  # one principal, two connections: the same password
        _passwd(fleet, user, password)
    return _credentials(fleet, SERVER_USER, password, settings, None, None)


def artifact_credentials(creds: Credentials) -> Credentials:
    """The login of the coordinator's artifact connection: `<server user>-artifacts`, same password.

    With client ids bound to usernames, two connections of one user would disconnect each other."""
    user = creds.username + ARTIFACTS_SUFFIX
    return replace(creds, username=user, client_id=user)


def add_device(fleet_dir: str | Path, name: str, *, host: str | None = None, port: int | None = None) -> Credentials:
    """Register a device (random password) and return what it needs to connect.

    A running broker picks the new user up on `BrokerProcess.reload()`.
    """
    fleet = Path(fleet_dir)
    check_name("device name", name)
    settings = load_settings(fleet)
    if name in _server_users(settings) or name in (SERVER_USER, SERVER_USER + ARTIFACTS_SUFFIX):
        raise BrokerError(f"{name!r} is reserved for the server; pick another device name")
    password = secrets.token_urlsafe(24)
    _passwd(fleet, name, password)
    return _credentials(fleet, name, password, settings, host, port)


def add_operator(fleet_dir: str | Path, name: str) -> Credentials:
    """Another login with the server's rights (a monitor, a second coordinator, a benchmark's observer).

    Every MQTT connection needs its own login now that client ids are bound to usernames.
    A running broker picks it up on `BrokerProcess.reload()`."""
    fleet = Path(fleet_dir)
    check_name("operator name", name)
    settings = load_settings(fleet)
    users = _server_users(settings)
    if name in users:
        raise BrokerError(f"{name!r} is already a server user of {fleet}")
    if (fleet / "credentials" / f"{name}.json").exists():
        raise BrokerError(f"{name!r} is a device of {fleet}; pick another operator name")
    settings["server_users"] = [*users, name]
    (fleet / "fleet.json").write_text(json.dumps(settings, indent=2))
    if "runs" in settings:
        write_acl(fleet, settings)
    else:  # a fleet from before runs were registered keeps its ACL as it is
        with open(fleet / "acl", "a") as f:
            f.write(f"\nuser {name}\ntopic readwrite {TOPIC_ROOT}/#\n")
    password = secrets.token_urlsafe(24)
    _passwd(fleet, name, password)
    return _credentials(fleet, name, password, settings, None, None)


def _upgrade(fleet: Path) -> None:
    """Fleets made before client ids were bound to usernames lack the artifact connection's login."""
    settings = load_settings(fleet)
    if "server_users" in settings or not (fleet / "credentials" / f"{SERVER_USER}.json").exists():
        return
    server = Credentials.load(fleet / "credentials" / f"{SERVER_USER}.json")
    user = SERVER_USER + ARTIFACTS_SUFFIX
    _passwd(fleet, user, server.password)
    with open(fleet / "acl", "a") as f:
        f.write(f"\nuser {user}\ntopic readwrite {TOPIC_ROOT}/#\n")
    settings["server_users"] = [SERVER_USER, user]
    (fleet / "fleet.json").write_text(json.dumps(settings, indent=2))


def server_credentials(fleet_dir: str | Path) -> Credentials:
    return Credentials.load(Path(fleet_dir) / "credentials" / f"{SERVER_USER}.json")


# --------------------------------------------------------------------------- config


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


def _stage_runtime(fleet: Path, user: str) -> Path:
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


def _listen_host(bind_address: str | None) -> str:
    return "127.0.0.1" if bind_address in (None, "0.0.0.0", "::") else bind_address


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
    rt = _stage_runtime(fleet, user)
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
        f"max_queued_bytes {int(settings.get('max_queued_bytes') or MAX_QUEUED_BYTES)}",
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


# --------------------------------------------------------------------------- process


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port free on loopback now (for a broker, a gateway or an origin this process starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_stop_signal(running: Callable[[], bool]) -> None:
    """Block while `running()` holds, until SIGTERM or SIGINT (the foreground `run` commands of the origin and the
    web gateway); the previous handlers are restored."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running() and not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: the signal handlers of `run` (and `devft run`) still stop mosquitto


_PRCTL = _find_prctl()  # looked up here: the child of a threaded parent should do as little as possible


def set_parent_death_signal() -> None:
    """A subprocess's preexec_fn (mosquitto, nginx, the web gateway's relay): Linux sends the child SIGTERM when
    its parent dies, even by SIGKILL. prctl was looked up at import, so the child does no more than this call."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _catches_sighup(pid: int) -> bool:
    """Whether mosquitto has installed its SIGHUP handler: it listens before it does, and until then a reload's
    SIGHUP would kill it (the default action). Where /proc cannot say, assume so."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    m = re.search(r"^SigCgt:\s*([0-9a-fA-F]+)$", status, re.M)
    return m is None or bool(int(m.group(1), 16) & (1 << (signal.SIGHUP - 1)))


PID_FILE = "broker.pid"  # in the fleet directory: the mosquitto serving it, so a later start can find a stale one


def _mosquitto_of(pid: int, conf: Path) -> bool:
    """Whether `pid` is a live mosquitto started on `conf` (this fleet's generated config)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(args) and Path(args[0].decode(errors="replace")).name == "mosquitto" and str(conf).encode() in args


def stop_stale_broker(fleet_dir: str | Path, timeout_s: float = 10.0) -> int | None:
    """Stop a mosquitto left running for this fleet by a process that died without stopping it (SIGKILL of a
    `devft run --fleet local:N` before it set the parent-death signal, a crash of an older version).

    Only the pid in the fleet's pid file, and only if it is a mosquitto running this fleet's config; returns it."""
    fleet = Path(fleet_dir).resolve()
    try:
        pid = int(json.loads((fleet / PID_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _mosquitto_of(pid, runtime_dir(fleet) / "mosquitto.conf"):
        return None
    os.kill(pid, signal.SIGTERM)  # mosquitto saves its persistence on SIGTERM
    deadline = time.monotonic() + timeout_s
    while _mosquitto_of(pid, runtime_dir(fleet) / "mosquitto.conf") and time.monotonic() < deadline:
        time.sleep(0.05)
    if _mosquitto_of(pid, runtime_dir(fleet) / "mosquitto.conf"):
        os.kill(pid, signal.SIGKILL)
    return pid


class BrokerProcess:
    """A mosquitto process serving one fleet directory.

    `die_with_parent` makes mosquitto exit when this process dies, even by SIGKILL (the `run` command,
    `devft run --fleet local:N`). Linux ties that signal to the thread that forked, so it applies only
    when the main thread starts the broker; a worker thread's broker would die with the thread.
    `start` writes the fleet's pid file and first stops a stale mosquitto of the same fleet
    (`stop_stale_broker`) that still holds the port."""

    def __init__(self, fleet_dir: str | Path, port: int | None = None, *, bind_address: str | None = None,
                 die_with_parent: bool = False) -> None:
        self.fleet_dir = Path(fleet_dir).resolve()
        settings = load_settings(self.fleet_dir)
        self.port = port or settings["port"]
        self.bind_address = bind_address or settings.get("bind_address")
        self.log_path = self.fleet_dir / "mosquitto.log"
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None

    @property
    def runtime_dir(self) -> Path:
        return runtime_dir(self.fleet_dir)

    def config_extra(self, runtime: Path) -> list[str]:
        """Lines added to mosquitto.conf (an edge broker's bridge: server_sdk/fleet/bridge.py)."""
        return []

    def start(self, timeout_s: float = 10.0) -> BrokerProcess:
        broker_bin, _ = require_mosquitto()
        host = _listen_host(self.bind_address)
        if _listening(self.port, host) and stop_stale_broker(self.fleet_dir) is not None:
            log_stale = f"stopped a stale mosquitto of {self.fleet_dir} that still held port {self.port}"
            print(f"devft: {log_stale}", file=sys.stderr)
            deadline = time.monotonic() + timeout_s
            while _listening(self.port, host) and time.monotonic() < deadline:
                time.sleep(0.05)
        if _listening(self.port, host):
            raise BrokerError(f"port {self.port} is already in use; pick another port for this fleet")
        _upgrade(self.fleet_dir)
        conf = write_config(self.fleet_dir, self.port, self.bind_address, extra=self.config_extra)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        # as root, start it as its user outright: it never holds root, and the parent-death signal
        # survives (a set-uid inside mosquitto would clear it)
        account = pwd.getpwnam(broker_user()) if os.geteuid() == 0 else None
        with_parent = self.die_with_parent and threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen([broker_bin, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=set_parent_death_signal if with_parent else None,
                                     user=account.pw_uid if account else None,
                                     group=account.pw_gid if account else None,
                                     extra_groups=[] if account else None)
        log.close()
        write_private(self.fleet_dir / PID_FILE, json.dumps({"pid": self.proc.pid, "port": self.port}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with code {self.proc.returncode} on start; log {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if _listening(self.port, host) and _catches_sighup(self.proc.pid):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout_s}s; see {self.log_path}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, so mosquitto saves sessions and queued messages to disk."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout_s: float = 10.0) -> BrokerProcess:
        self.stop()
        deadline = time.monotonic() + timeout_s
        while _listening(self.port, _listen_host(self.bind_address)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.start(timeout_s)

    def reload(self) -> None:
        """SIGHUP: re-read password file and ACL (after add_device)."""
        if self.proc is None or self.proc.poll() is not None:
            raise BrokerError("broker is not running; start it before reload")
        if os.geteuid() == 0:
            _stage_runtime(self.fleet_dir, broker_user())  # mosquitto reads the copies
        self.proc.send_signal(signal.SIGHUP)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_broker(fleet_dir: str | Path, port: int | None = None, timeout_s: float = 10.0) -> BrokerProcess:
    """Start mosquitto for a fleet and return once it accepts TCP connections."""
    return BrokerProcess(fleet_dir, port).start(timeout_s)


def stop_broker(broker: BrokerProcess) -> None:
    broker.stop()


def restart_broker(broker: BrokerProcess) -> BrokerProcess:
    return broker.restart()


def serve_until_signalled(broker: BrokerProcess, on_ready: Callable[[BrokerProcess], None] | None = None) -> int:
    """Start the broker and run until SIGTERM/SIGINT (then stop mosquitto and wait for it) or until it exits.

    The handlers are in place before mosquitto starts, so no signal can orphan it. SIGHUP reloads
    passwords and ACL. Returns mosquitto's exit code, or 0 after a signal."""
    stop = threading.Event()
    reload = threading.Event()

    def on_stop(signum, frame) -> None:
        stop.set()

    def on_hup(signum, frame) -> None:
        reload.set()

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        broker.start()
        if on_ready is not None:
            on_ready(broker)
        while not stop.is_set() and broker.running:
            stop.wait(0.2)
            if reload.is_set():
                reload.clear()
                broker.reload()
        if stop.is_set():
            broker.stop()
            return 0
        return broker.proc.returncode if broker.proc is not None else 1
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m server_sdk.fleet.broker init|add-device|add-operator|run ...` for operators."""
    parser = argparse.ArgumentParser(prog="python -m server_sdk.fleet.broker", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="create CA, certs, ACL and the server users")
    p_init.add_argument("dir")
    p_init.add_argument("--hostname", action="append", help="broker hostname/IP for the cert (repeatable)")
    p_init.add_argument("--port", type=int, default=DEFAULT_TLS_PORT)
    p_init.add_argument("--bind", default=None, help="address the TLS listener binds to (default: all interfaces)")
    p_init.add_argument("--plaintext-loopback-port", type=int, default=None)
    p_add = sub.add_parser("add-device", help="register a device; writes its credentials file (mode 0600)")
    p_add.add_argument("dir")
    p_add.add_argument("name")
    p_add.add_argument("--host", default=None, help="hostname the device should connect to")
    p_op = sub.add_parser("add-operator", help="another login with the server's rights (a monitor, an outside "
                          "tool); writes its credentials file (mode 0600)")
    p_op.add_argument("dir")
    p_op.add_argument("name")
    p_reg = sub.add_parser("register-run", help="let the fleet's devices publish under a run id (and reload a "
                           "broker of this fleet running here); `devft serve` does it for its run")
    p_reg.add_argument("dir")
    p_reg.add_argument("run_id")
    p_run = sub.add_parser("run", help="run mosquitto for the fleet until SIGTERM or Ctrl-C")
    p_run.add_argument("dir")
    p_run.add_argument("--port", type=int, default=None)
    p_run.add_argument("--bind", default=None, help="address to listen on (default: the fleet's setting)")
    args = parser.parse_args(argv)
    if args.cmd == "init":
        creds = fleet_init(args.dir, hostnames=args.hostname, port=args.port, bind_address=args.bind,
                           plaintext_loopback_port=args.plaintext_loopback_port)
        print(f"fleet ready in {args.dir}; server credentials in {args.dir}/credentials/{creds.username}.json")
    elif args.cmd == "register-run":
        new = register_run(args.dir, args.run_id)
        reloaded = reload_running_broker(args.dir)
        print(f"run {args.run_id} {'registered' if new else 'was already registered'} in {args.dir}; "
              + ("the broker running here reloaded its ACL" if reloaded else
                 "no broker of this fleet runs here: reload yours (SIGHUP) so devices may publish under it"))
    elif args.cmd == "add-device":
        creds = add_device(args.dir, args.name, host=args.host)
        print(Path(args.dir) / "credentials" / f"{creds.username}.json")
    elif args.cmd == "add-operator":
        creds = add_operator(args.dir, args.name)
        print(Path(args.dir) / "credentials" / f"{creds.username}.json")
    else:
        def announce(broker: BrokerProcess) -> None:
            print(f"mosquitto (pid {broker.proc.pid}) listening on {broker.bind_address or '*'}:{broker.port} "
                  f"(TLS); log {broker.log_path}; SIGTERM or Ctrl-C stops it", flush=True)

        broker = BrokerProcess(args.dir, args.port, bind_address=args.bind, die_with_parent=True)
        return serve_until_signalled(broker, announce)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
