"""Run a secured Mosquitto broker for a device fleet.

`fleet_init` creates everything the broker needs in one directory: a private
CA, a server certificate, a password file, an ACL and the persistence store.
`add_device` registers a device and returns what it needs to connect.
`start_broker` runs mosquitto on that directory and waits until it listens.

The ACL is the security boundary: a device may publish only on its own
update/status/fetch topics and read only what the server broadcasts, so a
compromised device cannot impersonate another one or read others' updates.

Layout of a fleet directory:

    fleet.json            settings (hostnames, port, server user)
    ca.pem / ca.key       the fleet CA (keep ca.key off devices)
    server.pem / .key     broker TLS certificate for the hostnames
    passwd / acl          mosquitto password file and ACL
    mosquitto.conf        generated at every start
    data/                 mosquitto persistence (sessions, queued QoS 1 messages)
    credentials/<user>.json  connection details for the server and each device
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_runtime.protocol import MAX_UPDATE_BYTES, TOPIC_ROOT, check_name

SERVER_USER = "server"
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


def _write_private(path: Path, data: bytes | str) -> None:
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
    _write_private(fleet / "ca.key", ca_key.private_bytes(pem, pkcs8, nokey))
    (fleet / "server.pem").write_bytes(srv_cert.public_bytes(pem))
    _write_private(fleet / "server.key", srv_key.private_bytes(pem, pkcs8, nokey))


def acl_text() -> str:
    """The fleet ACL. `%u` is the authenticated username (= device name)."""
    r = TOPIC_ROOT
    return "\n".join(
        [
            "# generated by server_sdk.broker - devices may only write their own topics",
            f"user {SERVER_USER}",
            f"topic readwrite {r}/#",
            "",
            "# every other authenticated user is a device",
            f"pattern read {r}/+/control",
            f"pattern read {r}/+/global/#",
            f"pattern read {r}/+/artifacts/#",
            f"pattern write {r}/+/update/%u",
            f"pattern readwrite {r}/+/status/%u",
            f"pattern write {r}/+/fetch/%u",
            "",
        ]
    )


def _load_settings(fleet: Path) -> dict:
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


def _credentials(
    fleet: Path, user: str, password: str, settings: dict, host: str | None, port: int | None
) -> Credentials:
    r = TOPIC_ROOT
    if user == SERVER_USER:
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
        client_id=user,
        publish_topics=pub,
        subscribe_topics=sub,
    )
    _write_private(fleet / "credentials" / f"{user}.json", creds.to_json())
    return creds


def fleet_init(
    fleet_dir: str | Path,
    *,
    hostnames: list[str] | None = None,
    port: int = DEFAULT_TLS_PORT,
    plaintext_loopback_port: int | None = None,
    cert_days: int = 825,
) -> Credentials:
    """Create CA, server cert, ACL, password file and the server user; returns the server's credentials.

    `hostnames` go into the server certificate; devices must connect using one of
    them. `plaintext_loopback_port` adds an unencrypted listener on 127.0.0.1 only
    (still password protected), off by default.
    """
    require_mosquitto()
    fleet = Path(fleet_dir)
    if (fleet / "fleet.json").exists():
        raise BrokerError(f"{fleet} already holds a fleet; use add_device or delete the directory to start over")
    hostnames = hostnames or ["localhost", "127.0.0.1", socket.gethostname()]
    fleet.mkdir(parents=True, exist_ok=True)
    (fleet / "data").mkdir(exist_ok=True)
    settings = {"hostnames": hostnames, "port": port, "plaintext_loopback_port": plaintext_loopback_port}
    (fleet / "fleet.json").write_text(json.dumps(settings, indent=2))
    _make_certs(fleet, hostnames, cert_days)
    (fleet / "acl").write_text(acl_text())
    password = secrets.token_urlsafe(24)
    _passwd(fleet, SERVER_USER, password)
    return _credentials(fleet, SERVER_USER, password, settings, None, None)


def add_device(fleet_dir: str | Path, name: str, *, host: str | None = None, port: int | None = None) -> Credentials:
    """Register a device (random password) and return what it needs to connect.

    A running broker picks the new user up on `BrokerProcess.reload()`.
    """
    fleet = Path(fleet_dir)
    check_name("device name", name)
    if name == SERVER_USER:
        raise BrokerError(f"{name!r} is reserved for the server; pick another device name")
    settings = _load_settings(fleet)
    password = secrets.token_urlsafe(24)
    _passwd(fleet, name, password)
    return _credentials(fleet, name, password, settings, host, port)


def server_credentials(fleet_dir: str | Path) -> Credentials:
    return Credentials.load(Path(fleet_dir) / "credentials" / f"{SERVER_USER}.json")


def write_config(fleet_dir: str | Path, port: int | None = None) -> Path:
    """(Re)generate mosquitto.conf for `port` (default: the port from fleet_init)."""
    fleet = Path(fleet_dir).resolve()
    settings = _load_settings(fleet)
    port = port or settings["port"]
    user = pwd.getpwuid(os.getuid()).pw_name
    lines = [
        "# generated by server_sdk.broker.write_config - edits are overwritten",
        f"user {user}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {fleet / 'passwd'}",
        f"acl_file {fleet / 'acl'}",
        "persistence true",
        f"persistence_location {fleet / 'data'}/",
        "autosave_interval 10",
        "max_queued_messages 10000",
        "max_inflight_messages 20",
        f"max_packet_size {MAX_UPDATE_BYTES + 64 * 1024}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "",
        f"listener {port}",
        f"cafile {fleet / 'ca.pem'}",
        f"certfile {fleet / 'server.pem'}",
        f"keyfile {fleet / 'server.key'}",
        "tls_version tlsv1.2",
        "",
    ]
    loop_port = settings.get("plaintext_loopback_port")
    if loop_port:
        lines += [f"listener {loop_port} 127.0.0.1", ""]
    conf = fleet / "mosquitto.conf"
    conf.write_text("\n".join(lines))
    return conf


# --------------------------------------------------------------------------- process


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class BrokerProcess:
    """A mosquitto process serving one fleet directory."""

    def __init__(self, fleet_dir: str | Path, port: int | None = None) -> None:
        self.fleet_dir = Path(fleet_dir).resolve()
        self.port = port or _load_settings(self.fleet_dir)["port"]
        self.log_path = self.fleet_dir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> BrokerProcess:
        broker_bin, _ = require_mosquitto()
        if _listening(self.port):
            raise BrokerError(f"port {self.port} is already in use; pick another port for this fleet")
        conf = write_config(self.fleet_dir, self.port)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen([broker_bin, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with code {self.proc.returncode} on start; log {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if _listening(self.port):
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
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.start(timeout_s)

    def reload(self) -> None:
        """SIGHUP: re-read password file and ACL (after add_device)."""
        if self.proc is None or self.proc.poll() is not None:
            raise BrokerError("broker is not running; start it before reload")
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


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m server_sdk.broker init|add-device|run ...` for operators."""
    parser = argparse.ArgumentParser(prog="python -m server_sdk.broker", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="create CA, certs, ACL and the server user")
    p_init.add_argument("dir")
    p_init.add_argument("--hostname", action="append", help="broker hostname/IP for the cert (repeatable)")
    p_init.add_argument("--port", type=int, default=DEFAULT_TLS_PORT)
    p_init.add_argument("--plaintext-loopback-port", type=int, default=None)
    p_add = sub.add_parser("add-device", help="register a device and print its credentials JSON")
    p_add.add_argument("dir")
    p_add.add_argument("name")
    p_add.add_argument("--host", default=None, help="hostname the device should connect to")
    p_run = sub.add_parser("run", help="run mosquitto for the fleet until Ctrl-C")
    p_run.add_argument("dir")
    p_run.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "init":
        creds = fleet_init(
            args.dir, hostnames=args.hostname, port=args.port, plaintext_loopback_port=args.plaintext_loopback_port
        )
        print(f"fleet ready in {args.dir}; server credentials in {args.dir}/credentials/{creds.username}.json")
    elif args.cmd == "add-device":
        print(add_device(args.dir, args.name, host=args.host).to_json())
    else:
        broker = start_broker(args.dir, args.port)
        print(f"mosquitto listening on port {broker.port} (TLS); log {broker.log_path}; Ctrl-C stops it")
        try:
            broker.proc.wait()
        except KeyboardInterrupt:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
