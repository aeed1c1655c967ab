"""A fleet directory's keys and logins for its Mosquitto broker: the private CA and the server certificate,
the ACL (the security boundary: see server_sdk/fleet/broker.py's docstring), the password file, the server
users and each device's credentials file, and the runs devices may publish under.

Part of the broker (server_sdk/fleet/broker.py re-exports every public name here); broker_config.py writes
mosquitto.conf from what this module sets up.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_runtime.protocol import TOPIC_ROOT, check_name

SERVER_USER = "server"
ARTIFACTS_SUFFIX = "-artifacts"  # the coordinator's second connection (artifact chunks) logs in as server-artifacts
DEFAULT_TLS_PORT = 8883


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


def upgrade_fleet(fleet: Path) -> None:
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

