"""Stage artifacts from a real web server: nginx serves the content-addressed files, devices fetch them over HTTPS.

    python -m server_sdk.fleet.origin run FLEET_DIR [--dir DIR] [--port 8443] [--bind 0.0.0.0]
    devft serve ... --artifacts https://HOST:8443/ --artifact-dir DIR

Over MQTT (server_sdk/fleet/artifact_server.py) every chunk of every stage file goes through the broker to every
device fetching it: fine for a few devices and zero set-up, but at a hundred concurrent stage downloads the
broker and the coordinator carry the whole stage a hundred times. Stage files are static and named by their
hash, which is what web servers and CDNs serve best. With an origin:

* the coordinator copies each stage file to `DIR/<run>/<sha256>` (`publish`) and puts the base URL
  `https://HOST:PORT/<run>/` in the artifact descriptor (`origin`, docs/protocol.md section 5); the device
  downloads `origin + sha256` and checks every chunk and the whole file against the descriptor, exactly as for
  MQTT chunks, so the web server is not trusted with the bytes;
* access control is per device and per run: nginx asks the coordinator on every download (`auth_request`)
  over a Unix socket, `DIR/.auth/<run>.sock` (`OriginAuth`). The device authenticates with its own fleet login
  (MQTT username and password, HTTP Basic over TLS); the coordinator checks it against the fleet's Mosquitto
  password file as it is at that moment, and that the device is enrolled in the run (one of its client
  devices). Removing a device from the fleet or the run takes effect at its next request; no URL can be
  shared or replayed by another device, and no new secret is provisioned. (nginx's secure_link would need a
  per-device signed URL delivered over a per-device channel the protocol does not have, and expiry alone
  does not revoke; client-certificate TLS needs device certificates, which the fleet does not issue.) The MQTT
  chunk server keeps serving the same files to every fleet device unless the coordinator runs with
  `--no-mqtt-chunks` (FleetSettings.artifact_chunks), which leaves this check the only way to a run's files.
* browser devices fetch from the device page's origin: nginx answers CORS preflights itself (no login in them)
  and marks files cross-origin readable; the GET still needs the device's login.
* TLS uses the fleet's broker certificate and CA (server.pem / server.key / ca.pem from `fleet init`), so a
  device trusts the origin with the CA it already holds.

`NginxOrigin` runs Debian's nginx on a generated configuration in a runtime directory, like broker.py runs
mosquitto: started by root, nginx's workers run as `www-data` and the files live under
/var/lib/devft-origin/ (readable by them); it dies with its parent when asked (`die_with_parent`).
"""

from __future__ import annotations

import argparse
import base64
import grp
import hashlib
import hmac
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from edge_runtime.fetch import sha256_file
from edge_runtime.protocol import ArtifactDescriptor, check_name
from server_sdk.fleet.processes import free_port, run_in_foreground, set_parent_death_signal, stop_process
from server_sdk.fleet.ratelimit import LogBudget, cut

log = logging.getLogger(__name__)

RUNTIME_ROOT = "/var/lib/devft-origin"  # started by root: nginx's config, logs and (by default) files live here
WORKER_USER = "www-data"
_URI_RE = re.compile(r"^/([A-Za-z0-9_-][A-Za-z0-9_.-]{0,63})/([0-9a-f]{64})$")


class OriginError(RuntimeError):
    pass


# --------------------------------------------------------------------------- publishing


class OriginPublisher:
    """Copies a run's stage files into the served directory, each once, under its sha256.

    A copy, not a link: the served file must not be the run directory's own (a tampered origin file must not
    change what the coordinator exported), and nginx's workers need to read it. A file already there is checked
    against its name once per process (then by size, mtime and inode) and replaced when it does not match."""

    def __init__(self, root: str | Path, base_url: str, run_id: str) -> None:
        self.root = Path(root)
        self.run_id = check_name("run_id", run_id)
        self.url = base_url.rstrip("/") + f"/{run_id}/"
        self.dir = self.root / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self._verified: dict[str, tuple[int, int, int]] = {}
        self.bytes_copied = 0

    def publish(self, descriptor: ArtifactDescriptor, files: dict[str, Path]) -> ArtifactDescriptor:
        """Put every file of `descriptor` ({path: local file} in `files`) on the origin; the descriptor with
        `origin` set."""
        from dataclasses import replace

        for e in descriptor.files:
            self._put(e.sha256, e.size, Path(files[e.path]))
        return replace(descriptor, origin=self.url)

    def _put(self, sha: str, size: int, src: Path) -> None:
        dst = self.dir / sha
        try:
            st = dst.stat()
            key = (st.st_size, st.st_mtime_ns, st.st_ino)
            if self._verified.get(sha) == key or (st.st_size == size and sha256_file(dst) == sha):
                self._verified[sha] = key
                return
            log.warning("origin file %s does not hash to its name; replacing it", dst)
        except FileNotFoundError:
            pass
        tmp = dst.with_name(f".{sha}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != sha:
            tmp.unlink(missing_ok=True)
            raise OriginError(f"{src} changed while it was published (it no longer hashes to {sha})")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
        st = dst.stat()
        self._verified[sha] = (st.st_size, st.st_mtime_ns, st.st_ino)
        self.bytes_copied += size

    def prune(self, keep: Collection[str]) -> int:
        """Delete the run's served files not in `keep` (an old stage's); bytes freed."""
        freed = 0
        for p in list(self.dir.iterdir()):
            if len(p.name) == 64 and p.name not in keep:
                freed += p.stat().st_size
                p.unlink(missing_ok=True)
                self._verified.pop(p.name, None)
        return freed


# --------------------------------------------------------------------------- access control


def check_password(passwd_file: Path, user: str, password: str) -> bool:
    """Whether `password` is `user`'s in a Mosquitto password file ($7$: PBKDF2-SHA512, Mosquitto 2; $6$:
    salted SHA-512, Mosquitto 1.x). Read at every call: a device removed from the fleet is refused at once."""
    try:
        lines = passwd_file.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        name, _, stored = line.partition(":")
        if name != user:
            continue
        parts = stored.split("$")
        try:
            if len(parts) == 5 and parts[1] == "7":
                salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
                got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(want))
            elif len(parts) == 4 and parts[1] == "6":
                salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
                got = hashlib.sha512(password.encode() + salt).digest()
            else:
                return False
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(got, want)
    return False


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 1024  # a stage start is a burst of downloads: nginx's checks must queue, not be refused


class OriginAuth:
    """nginx's `auth_request` target for one run: 204 when the request's HTTP Basic login is a device enrolled in
    the run (`enrolled()`) whose password the fleet's password file accepts, else 401/403. Listens on
    `DIR/.auth/<run>.sock`, which only nginx's workers (and this user) may open.

    Verified logins are remembered by (user, sha256 of the password, the password file's mtime), so a stage's
    downloads cost one PBKDF2 per device, and a change to the password file forgets them all."""

    def __init__(self, root: str | Path, run_id: str, passwd_file: str | Path,
                 enrolled: Callable[[], Collection[str]]) -> None:
        self.run_id = check_name("run_id", run_id)
        self.passwd_file = Path(passwd_file)
        self.enrolled = enrolled
        self.sock_dir = Path(root) / ".auth"
        self.sock_path = self.sock_dir / f"{run_id}.sock"
        self.allowed = 0
        self.refused: dict[str, int] = {}
        self._ok: set[tuple] = set()
        self._log_budget = LogBudget()
        self._server: _UnixHTTPServer | None = None

    def decide(self, uri: str, authorization: str | None) -> tuple[int, str]:
        """(HTTP status, reason) for a download of `uri` with this Authorization header."""
        m = _URI_RE.match(uri.split("?", 1)[0])
        if m is None or m.group(1) != self.run_id:
            return 403, "not a file of this run"
        if not authorization or not authorization.startswith("Basic "):
            return 401, "no login (HTTP Basic with the device's fleet login)"
        try:
            user, _, password = base64.b64decode(authorization[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return 401, "malformed Basic credentials"
        try:
            mtime = self.passwd_file.stat().st_mtime_ns
        except OSError:
            mtime = None
        key = (user, hashlib.sha256(password.encode()).hexdigest(), mtime)
        if key not in self._ok:
            if not check_password(self.passwd_file, user, password):
                return 401, f"wrong login for {cut(user, 64)!r}"
            self._ok.add(key)
        if user not in self.enrolled():
            return 403, f"{cut(user, 64)} is not enrolled in run {self.run_id}"
        return 204, "ok"

    def start(self) -> OriginAuth:
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.sock_dir, 0o755)
        self.sock_path.unlink(missing_ok=True)
        auth = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                uri = self.headers.get("X-Original-URI") or ""
                code, why = auth.decide(uri, self.headers.get("Authorization"))
                auth._count(code, why, uri)
                self.send_response(code)
                if code == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="devft"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def address_string(self) -> str:
                return "nginx"

            def log_message(self, fmt: str, *args) -> None:
                pass

        self._server = _UnixHTTPServer(str(self.sock_path), Handler)
        os.chmod(self.sock_path, 0o660)  # nginx's workers (this user, or the group www-data) and nobody else
        try:
            os.chown(self.sock_path, -1, grp.getgrnam(WORKER_USER).gr_gid)
        except (KeyError, PermissionError):  # no www-data, or this user is not in its group: nginx runs as this user
            if os.geteuid() != 0:
                log.info("artifact origin: %s is only reachable by %s; nginx started by root (workers as %s) "
                         "cannot ask this coordinator, run it as this user", self.sock_path,
                         pwd.getpwuid(os.geteuid()).pw_name, WORKER_USER)
        threading.Thread(target=self._server.serve_forever, name=f"origin-auth-{self.run_id}", daemon=True).start()
        return self

    def _count(self, code: int, why: str, uri: str) -> None:
        if code == 204:
            self.allowed += 1
            return
        self.refused[why] = self.refused.get(why, 0) + 1
        verdict, skipped = self._log_budget.take(("origin", why))
        if verdict == "full":
            log.warning("artifact origin refused %s (HTTP %d): %s", cut(uri, 100), code, why)
        elif verdict == "summary":
            log.warning("artifact origin: %d more refusals (%s) since the last line", skipped, why)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.sock_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- nginx


def worker_user() -> str:
    """The account nginx's workers run as: never root (Debian's nginx package creates www-data)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(WORKER_USER)
        return WORKER_USER
    except KeyError:
        raise OriginError("no www-data user to run nginx's workers as: install Debian's nginx package "
                          "(`apt-get install nginx-light`; scripts/setup.sh does)") from None


def require_nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if path is None:
        raise OriginError("nginx is not installed: `apt-get install nginx-light` (scripts/setup.sh does)")
    return path


def runtime_dir(fleet_dir: str | Path) -> Path:
    """Where nginx's config, pid, logs and temp files live: the fleet's own `origin/` directory, or, started by
    root, /var/lib/devft-origin/<fleet>-<id>/ (traversable by nginx's workers; DEVFT_ORIGIN_RUNTIME overrides)."""
    fleet = Path(fleet_dir).resolve()
    if os.geteuid() != 0:
        return fleet / "origin"
    try:
        fleet_id = json.loads((fleet / "fleet.json").read_text()).get("fleet_id") or ""
    except (OSError, ValueError, AttributeError):
        fleet_id = ""
    if not re.fullmatch(r"[0-9a-f]{12,64}", str(fleet_id)):
        fleet_id = hashlib.sha256(str(fleet).encode()).hexdigest()[:12]
    return Path(os.environ.get("DEVFT_ORIGIN_RUNTIME") or RUNTIME_ROOT) / f"{fleet.name}-{fleet_id}"


def nginx_config(runtime: Path, files: Path, port: int, bind: str, cert: Path, key: str | Path,
                 workers: int = 2) -> str:
    """The whole nginx.conf: one TLS server that serves `files/<run>/<sha256>` to devices nginx's auth_request
    subrequest to the run's coordinator (OriginAuth) lets through, and answers 404 to everything else."""
    user = f"user {worker_user()};\n" if os.geteuid() == 0 else ""
    t = runtime / "tmp"
    return f"""# generated by server_sdk/fleet/origin.py at every start; edits are lost
{user}worker_processes {workers};
pid {runtime / 'nginx.pid'};
error_log {runtime / 'error.log'} warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    log_format devft '$remote_addr $remote_user [$time_iso8601] "$request_method $uri" $status $body_bytes_sent';
    access_log {runtime / 'access.log'} devft buffer=64k flush=1s;
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen {bind}:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:devft:10m;
        root {files};
        location ~ "^/(?<devft_run>[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,63}})/[0-9a-f]{{64}}$" {{
            # browser devices fetch from the device page's origin (the web gateway): CORS, the login in a header
            # (never cookies), so any page may ask but only a device's own login gets a file
            if ($request_method = OPTIONS) {{
                add_header Access-Control-Allow-Origin "*";
                add_header Access-Control-Allow-Headers "Authorization, Range";
                add_header Access-Control-Max-Age 600;
                return 204;
            }}
            auth_request /_devft_auth;
            add_header Cache-Control "private, immutable" always;
            add_header Access-Control-Allow-Origin "*" always;
            add_header Cross-Origin-Resource-Policy cross-origin always;
        }}
        location = /_devft_auth {{
            internal;
            proxy_pass http://unix:{files}/.auth/$devft_run.sock:/check;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
        }}
        location / {{ return 404; }}
    }}
}}
"""


class NginxOrigin:
    """nginx serving a fleet's artifact directory over TLS with the fleet's certificate; `stop()` ends it.

    `files` defaults to `<runtime>/files`. With `die_with_parent` (the main thread only, as for the broker) Linux
    sends nginx's master SIGTERM when this process dies, even by SIGKILL; the workers follow their master."""

    def __init__(self, fleet_dir: str | Path, *, files: str | Path | None = None, port: int | None = None,
                 bind: str = "127.0.0.1", host: str = "localhost", die_with_parent: bool = False) -> None:
        self.fleet_dir = Path(fleet_dir).resolve()
        self.runtime = runtime_dir(self.fleet_dir)
        self.files = Path(files).resolve() if files else self.runtime / "files"
        self.port = port or free_port()
        self.bind, self.host = bind, host
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/"

    def start(self, timeout_s: float = 10.0) -> NginxOrigin:
        nginx = require_nginx()
        for d in (self.runtime, self.runtime / "tmp", self.files):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        key = self.runtime / "server.key"  # nginx's master reads it (as root, before the workers drop root)
        shutil.copyfile(self.fleet_dir / "server.key", key)
        os.chmod(key, 0o600)
        shutil.copyfile(self.fleet_dir / "server.pem", self.runtime / "server.pem")
        conf = self.runtime / "nginx.conf"
        conf.write_text(nginx_config(self.runtime, self.files, self.port, self.bind, self.runtime / "server.pem", key))
        log_path = self.runtime / "nginx.log"
        out = open(log_path, "ab")  # noqa: SIM115 - owned by the child process
        with_parent = self.die_with_parent and threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen([nginx, "-p", str(self.runtime), "-e", str(self.runtime / "error.log"),
                                      "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=set_parent_death_signal if with_parent else None)  # its workers exit with it
        out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                errors = (self.runtime / "error.log").read_text(errors="replace")[-2000:] \
                    if (self.runtime / "error.log").exists() else ""
                raise OriginError(f"nginx exited with code {self.proc.returncode} on start; {log_path}:\n"
                                  + log_path.read_text(errors="replace")[-2000:] + errors)
            try:
                with socket.create_connection((_loopback(self.bind), self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise OriginError(f"nginx did not listen on port {self.port} within {timeout_s}s; see {self.runtime}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGQUIT: nginx's graceful stop (workers finish the downloads in flight); SIGKILL after timeout_s."""
        stop_process(self.proc, signal.SIGQUIT, timeout_s)

    def __enter__(self) -> NginxOrigin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _loopback(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "::") else bind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server_sdk.fleet.origin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="serve a fleet's artifact directory with nginx until interrupted")
    p.add_argument("fleet_dir")
    p.add_argument("--dir", help="the artifact directory (devft serve --artifact-dir; default: the runtime dir's "
                   "files/)")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--host", default="localhost", help="the host name devices reach it by (printed URL)")
    args = parser.parse_args(argv)
    origin = NginxOrigin(args.fleet_dir, files=args.dir, port=args.port, bind=args.bind, host=args.host,
                         die_with_parent=True)
    return run_in_foreground("origin", origin.start, origin.stop,
                             lambda: origin.proc is not None and origin.proc.poll() is None, OriginError,
                             lambda: f"artifact origin: devft serve ... --artifacts {origin.url} --artifact-dir {origin.files}")


if __name__ == "__main__":
    sys.exit(main())
