"""Browser devices' way into a fleet: MQTT over secure WebSockets, and the device page over HTTPS.

    python -m server_sdk.fleet.web_gateway run FLEET_DIR [--mqtt-port 8883] [--ws-port 8884] [--https-port 8443]

Debian's Mosquitto (2.0.11) is built without WebSockets, and a browser speaks MQTT only over
WebSockets. Debian's `websockify` (the noVNC project's WebSocket-to-TCP relay) terminates WSS with
the broker's certificate and relays every binary frame to a loopback port of this process, which
opens a TLS connection (verified against the fleet's CA) to the broker's ordinary TLS listener and
pipes the bytes: the browser's MQTT CONNECT reaches Mosquitto unchanged, with the same logins, the
same ACL and the same use_username_as_clientid as every other device, and no new path into the
fleet that skips them. (websockify's own `--ssl-target` hangs against Mosquitto's TLS 1.3: its
select loop misses bytes buffered inside the TLS layer, so the CONNACK never reaches the browser.)

The page, the device code and onnxruntime-web's WASM files are served by a
small HTTPS server with the headers WASM threads need (cross-origin isolation: COOP same-origin and
COEP require-corp) and nothing else: an allowlist of static directories, no credentials, no
listing, no query strings logged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import mimetypes
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from server_sdk.fleet.processes import free_port, run_in_foreground, set_parent_death_signal, stop_process

log = logging.getLogger("devft.web")

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
# URL prefix -> directory under web/: the page, the device code, and the three libraries it loads
SERVED = {
    "/app/": "app",
    "/src/": "src",
    "/node_modules/onnxruntime-web/dist/": "node_modules/onnxruntime-web/dist",
    "/node_modules/mqtt/dist/": "node_modules/mqtt/dist",
    "/node_modules/@huggingface/tokenizers/dist/": "node_modules/@huggingface/tokenizers/dist",
}
ISOLATION_HEADERS = {  # cross-origin isolated: SharedArrayBuffer, so onnxruntime-web can use WASM threads
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".html": "text/html",
         ".json": "application/json", ".css": "text/css", ".map": "application/json"}


class GatewayError(RuntimeError):
    pass


def resolve(web_dir: Path, url_path: str, extra: dict[str, Path] | None = None) -> Path | None:
    """The file a URL path names inside one of the served directories, or None (never outside them)."""
    roots = {**{prefix: web_dir / sub for prefix, sub in SERVED.items()}, **(extra or {})}
    for prefix, where in roots.items():
        if url_path.startswith(prefix):
            root = Path(where).resolve()
            rel = url_path[len(prefix):] or "index.html"
            target = (root / rel).resolve()
            if target.is_relative_to(root) and target.is_file():
                return target
            return None
    return None


def make_handler(web_dir: Path, ws_port: int, extra: dict[str, Path] | None = None,
                 fleet_dir: Path | None = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "devft-web"
        sys_version = ""
        fleet_dir: Path | None = None  # set below: join links redeem against this fleet's web/joins.json

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            if path in ("/", "/app"):
                self._send(302, b"", "text/plain", {"Location": "/app/"})
            elif path == "/app/config.json":  # where the page finds the broker's WebSocket gateway
                host = (self.headers.get("Host") or "localhost").rsplit(":", 1)[0]
                body = json.dumps({"mqtt_ws_url": f"wss://{host}:{ws_port}/"}).encode()
                self._send(200, body, "application/json")
            elif (target := resolve(web_dir, path, extra)) is not None:
                kind = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                self._send(200, target.read_bytes(), kind)
            else:
                self._send(404, b"not found\n", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/api/join" or self.fleet_dir is None:
                self._send(404, b"not found\n", "text/plain")
                return
            from server_sdk.fleet.web_join import JoinRefused, redeem

            size = int(self.headers.get("Content-Length") or 0)
            try:
                if not 0 < size <= 4096:
                    raise JoinRefused(400, "a join request is a small JSON object: {\"token\": \"...\"}")
                body = json.loads(self.rfile.read(size))
                host = (self.headers.get("Host") or "localhost").rsplit(":", 1)[0]
                answer = redeem(self.fleet_dir, body.get("token") if isinstance(body, dict) else None,
                                f"wss://{host}:{ws_port}/")
                self._send(200, json.dumps(answer).encode(), "application/json", {"Cache-Control": "no-store"})
            except JoinRefused as exc:
                self._send(exc.status, json.dumps({"error": str(exc)}).encode(), "application/json")
            except (ValueError, UnicodeDecodeError):
                self._send(400, json.dumps({"error": "a join request is JSON: {\"token\": \"...\"}"}).encode(),
                           "application/json")

        def _send(self, code: int, body: bytes, kind: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in {**ISOLATION_HEADERS, "Content-Type": kind, "Content-Length": str(len(body)),
                         **(extra or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            """Request lines without their query or fragment: a join token belongs in a fragment (which browsers
            never send), but a hand-made request could carry one in its line, and no token may reach a log."""
            log.debug("%s %s", self.address_string(), re.sub(r"[?#]\S*", "?...", fmt % args))

    Handler.fleet_dir = fleet_dir
    return Handler


def spki_sha256(cert_pem: Path) -> str:
    """Chromium's --ignore-certificate-errors-spki-list value for a certificate: trust exactly its key
    (headless test browsers; a phone instead trusts the fleet CA or a publicly trusted gateway certificate)."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(Path(cert_pem).read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def wait_port(host: str, port: int, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise GatewayError(f"{what} exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise GatewayError(f"{what} did not listen on {host}:{port} within {timeout_s}s")


def broker_address(fleet_dir: Path) -> str:
    """Where this machine reaches the fleet's broker: its bind address, or loopback when it binds to all."""
    try:
        bind = json.loads((fleet_dir / "fleet.json").read_text()).get("bind_address")
    except (OSError, ValueError):
        bind = None
    return bind if bind and bind not in ("0.0.0.0", "::") else "127.0.0.1"


class TlsForwarder:
    """Plain TCP on a loopback port -> TLS to the broker (chain verified against the fleet CA), in a thread."""

    def __init__(self, ca_file: Path, broker_port: int, broker_host: str = "127.0.0.1") -> None:
        self.ctx = ssl.create_default_context(cafile=str(ca_file))
        self.ctx.check_hostname = False  # our own broker on loopback: the chain check is what matters
        self.broker_host, self.broker_port = broker_host, broker_port
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> TlsForwarder:
        ready = threading.Event()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=self.loop.run_forever, name="devft-web-tls", daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        if not ready.wait(10):
            raise GatewayError("the loopback TLS forwarder did not start")
        return self

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(self.broker_host, self.broker_port, ssl=self.ctx)
        except OSError as exc:
            log.warning("cannot reach the broker at %s:%s: %s", self.broker_host, self.broker_port, exc)
            writer.close()
            return
        for w in (writer, up_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_w), copy(up_r, writer))

    def stop(self) -> None:
        if self._server is not None:
            self.loop.call_soon_threadsafe(self._server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


class WebGateway:
    """websockify (WSS -> the broker's TLS port) and the HTTPS page server for one fleet; `stop()` ends both."""

    def __init__(self, fleet_dir: str | Path, mqtt_port: int, *, ws_port: int | None = None,
                 https_port: int | None = None, bind: str = "127.0.0.1", cert: str | Path | None = None,
                 key: str | Path | None = None, web_dir: Path = WEB_DIR, extra: dict[str, Path] | None = None) -> None:
        """`extra` serves more directories under URL prefixes (benchmarks serve artifacts with it)."""
        self.dir = Path(fleet_dir).resolve()
        self.cert = Path(cert or self.dir / "server.pem")
        self.key = Path(key or self.dir / "server.key")
        self.mqtt_port, self.bind = mqtt_port, bind
        self.ws_port, self.https_port = ws_port or free_port(), https_port or free_port()
        self.web_dir, self.extra = web_dir, dict(extra or {})
        self.relay: subprocess.Popen | None = None
        self.forwarder: TlsForwarder | None = None
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def page_url(self) -> str:
        return f"https://localhost:{self.https_port}/app/"

    @property
    def ws_url(self) -> str:
        return f"wss://localhost:{self.ws_port}/"

    def start(self, timeout_s: float = 15.0) -> WebGateway:
        relay = shutil.which("websockify")
        if relay is None:
            raise GatewayError("websockify is not installed: `apt-get install websockify` (scripts/setup.sh does)")
        if not (self.web_dir / "node_modules" / "onnxruntime-web").is_dir():
            raise GatewayError(f"{self.web_dir}/node_modules is missing: run scripts/setup.sh (npm ci in web/)")
        self.forwarder = TlsForwarder(self.dir / "ca.pem", self.mqtt_port, broker_address(self.dir)).start()
        logf = open(self.dir / "websockify.log", "ab")  # noqa: SIM115 (kept open for the relay's life)
        self.relay = subprocess.Popen([relay, "--cert", str(self.cert), "--key", str(self.key), "--ssl-only",
                                       f"{self.bind}:{self.ws_port}", f"127.0.0.1:{self.forwarder.port}"],
                                      stdout=logf, stderr=subprocess.STDOUT, preexec_fn=set_parent_death_signal)
        logf.close()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        handler = make_handler(self.web_dir, self.ws_port, self.extra, self.dir)
        self.httpd = ThreadingHTTPServer((self.bind, self.https_port), handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, name="devft-web", daemon=True).start()
        try:
            wait_port(self.bind, self.ws_port, timeout_s, "websockify", self.relay)
        except GatewayError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        stop_process(self.relay, timeout_s=10)
        self.relay = None
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder = None

    def __enter__(self) -> WebGateway:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server_sdk.fleet.web_gateway", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="relay WSS to the broker and serve the device page until interrupted")
    p.add_argument("fleet_dir")
    p.add_argument("--mqtt-port", type=int, help="the broker's TLS port (default: fleet.json's)")
    p.add_argument("--ws-port", type=int, default=8884)
    p.add_argument("--https-port", type=int, default=8443)
    p.add_argument("--bind", default="0.0.0.0", help="address both listeners bind to")
    j = sub.add_parser("join", help="a one-time join link for a browser device (server_sdk/fleet/web_join.py)")
    j.add_argument("fleet_dir")
    j.add_argument("device", help="a device added with `devft fleet add-device`")
    j.add_argument("--run", required=True, help="the run id the device follows")
    j.add_argument("--data", help="the device's shard (runs/RUN/data/client_NNN.jsonl), handed to the page once")
    j.add_argument("--host", default="localhost", help="the gateway's host name as the phone reaches it")
    j.add_argument("--https-port", type=int, default=8443)
    j.add_argument("--ttl-hours", type=float, default=24.0)
    r = sub.add_parser("revoke", help="revoke a device's unused join links")
    r.add_argument("fleet_dir")
    r.add_argument("device")
    args = parser.parse_args(argv)
    if args.command in ("join", "revoke"):
        from server_sdk.fleet.web_join import JoinRefused, issue, join_url, revoke

        if args.command == "revoke":
            print(f"revoked {revoke(args.fleet_dir, args.device)} join link(s) of {args.device}")
            return 0
        try:
            token = issue(args.fleet_dir, args.device, args.run, args.data, args.ttl_hours * 3600)
        except JoinRefused as exc:
            print(f"web_gateway: error: {exc}", file=sys.stderr)
            return 2
        print(join_url(args.host, args.https_port, token))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = args.mqtt_port or json.loads((Path(args.fleet_dir) / "fleet.json").read_text())["port"]
    gw = WebGateway(args.fleet_dir, port, ws_port=args.ws_port, https_port=args.https_port, bind=args.bind)
    return run_in_foreground("web_gateway", gw.start, gw.stop, lambda: gw.relay is not None and gw.relay.poll() is None,
                             GatewayError, lambda: f"device page: https://<this host>:{gw.https_port}/app/   "
                                                   f"MQTT over WSS: wss://<this host>:{gw.ws_port}/")


if __name__ == "__main__":
    sys.exit(main())
