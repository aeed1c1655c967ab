"""One-time join links for browser devices: a phone opens a URL and becomes a fleet device.

    devft fleet add-device FLEET_DIR dev-004 --web --run demo --data runs/demo/data/client_004.jsonl
    python -m server_sdk.fleet.web_gateway join FLEET_DIR dev-004 --run demo --data ...   (an existing device)

print `https://HOST:8443/app/#join=<token>` (add-device also writes it as a QR code PNG a phone's camera
opens). The token travels in the URL's fragment, which a
browser never sends to a server, so it appears in no access line; the page posts it once to
`/api/join` and gets the device's credentials, its run and its shard back, and keeps them in the
browser. The fleet stores only the token's sha256 (web/joins.json, mode 0600), so a stolen file
enrols nobody. A token works once, until it expires (24 h by default), and not after `revoke`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from edge_runtime.protocol import check_name

JOINS = Path("web") / "joins.json"
DEFAULT_TTL_S = 24 * 3600
_lock = threading.Lock()


class JoinRefused(Exception):
    """A join the gateway must refuse; `status` is the HTTP status, the message says why and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _load(fleet: Path) -> dict[str, Any]:
    path = fleet / JOINS
    return json.loads(path.read_text()) if path.exists() else {}


def _save(fleet: Path, joins: dict[str, Any]) -> None:
    path = fleet / JOINS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(joins, f, indent=1)
    tmp.replace(path)


def issue(fleet_dir: str | Path, device: str, run_id: str, shard: str | Path | None = None,
          ttl_s: float = DEFAULT_TTL_S) -> str:
    """A new one-time token for `device` (whose credentials `devft fleet add-device` wrote) in run `run_id`."""
    fleet = Path(fleet_dir)
    check_name("device name", device)
    check_name("run id", run_id)
    if not (fleet / "credentials" / f"{device}.json").is_file():
        raise JoinRefused(400, f"{device} has no credentials in {fleet}: run `devft fleet add-device {fleet} {device}` "
                               "first")
    if shard is not None and not Path(shard).is_file():
        raise JoinRefused(400, f"shard {shard} does not exist (the coordinator writes runs/RUN/data/client_NNN.jsonl)")
    token = secrets.token_urlsafe(32)
    with _lock:
        joins = _load(fleet)
        joins[_digest(token)] = {"device": device, "run_id": run_id, "shard": str(Path(shard).resolve()) if shard else
                                 None, "expires_unix": time.time() + ttl_s, "used_unix": None, "revoked": False}
        _save(fleet, joins)
    return token


def join_url(host: str, https_port: int, token: str) -> str:
    """The link a browser opens: the device page, the token in the fragment (never sent in a request line)."""
    return f"https://{host}:{https_port}/app/#join={token}"


def write_qr(url: str, path: str | Path, scale: int = 8, border: int = 4) -> Path:
    """`url` as a QR code PNG at `path` (mode 0600: it holds a live join token), for a phone's camera.

    segno (pure Python) picks the smallest version for the URL at error correction level M; each module
    is `scale` pixels with a `border`-module quiet zone."""
    import io

    import segno

    buf = io.BytesIO()
    segno.make_qr(url, error="m").save(buf, kind="png", scale=scale, border=border)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    return path


def revoke(fleet_dir: str | Path, device: str) -> int:
    """Revoke every unused token of `device`; how many were revoked."""
    fleet = Path(fleet_dir)
    with _lock:
        joins = _load(fleet)
        hit = [j for j in joins.values() if j["device"] == device and not j["used_unix"] and not j["revoked"]]
        for j in hit:
            j["revoked"] = True
        _save(fleet, joins)
    return len(hit)


def redeem(fleet_dir: str | Path, token: Any, ws_url: str) -> dict[str, Any]:
    """What the page needs, once per token: credentials, run id, shard text and the broker's WSS URL."""
    fleet = Path(fleet_dir)
    if not isinstance(token, str) or not 16 <= len(token) <= 128:
        raise JoinRefused(400, "a join request needs the token of a join link ({\"token\": \"...\"})")
    with _lock:
        joins = _load(fleet)
        entry = joins.get(_digest(token))
        if entry is None:
            raise JoinRefused(403, "this join link is not valid (mistyped or forged); ask the fleet's operator for one")
        if entry["revoked"]:
            raise JoinRefused(410, "this join link was revoked; ask the fleet's operator for a new one")
        if entry["used_unix"]:
            raise JoinRefused(410, "this join link was already used; each link enrols one browser once: ask the "
                                   "fleet's operator for a new one")
        if time.time() > entry["expires_unix"]:
            raise JoinRefused(410, "this join link has expired; ask the fleet's operator for a new one")
        creds = json.loads((fleet / "credentials" / f"{entry['device']}.json").read_text())
        shard = Path(entry["shard"]).read_text() if entry["shard"] else None
        entry["used_unix"] = time.time()
        _save(fleet, joins)
    return {"credentials": {k: creds[k] for k in ("username", "password", "client_id", "ca_pem") if k in creds},
            "run_id": entry["run_id"], "shard_text": shard, "mqtt_ws_url": ws_url}
