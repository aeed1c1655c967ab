"""What a devft-edge device needs before it can follow a run: the artifact formats it trains, its declared
capabilities (platform, runtime, cores, the RAM it offers), its MQTT settings from the credentials file, and
the error that says why it cannot take part. Part of edge_runtime/client.py, which re-exports it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from edge_runtime import protocol as P
from edge_runtime.backends import FORMATS, available_formats, onnx_runtime_problem
from edge_runtime.manifest import MANIFEST_NAME
from edge_runtime.mqtt import MqttSettings

BACKENDS = (*FORMATS, "auto")
# How long the broker keeps this device's session (and queues control and global messages for it) while it is
# away: long enough to ride out a broker restart or a network blip; a device away longer resubscribes and gets
# the retained control and global, so the broker need not hold every round's global for a device that may
# never come back (issue #27, hole 8)
SESSION_EXPIRY_S = 600


class DeviceError(RuntimeError):
    """The device cannot take part in this round; the message says why."""

def pick_formats(requested: str) -> list[str]:
    """The artifact formats this device trains, in preference order (what its hello declares)."""
    if requested not in BACKENDS:
        raise DeviceError(f"backend {requested!r} is not one of {BACKENDS}")
    here = available_formats()
    if requested == "auto":
        if not here:
            raise DeviceError("no training runtime is installed: pip install 'devft[edge]' (plain onnxruntime)")
        return here
    if requested == "onnx" and (problem := onnx_runtime_problem()):
        raise DeviceError(f"--backend onnx: {problem}")
    if requested not in here:
        hint = {"onnx": "pip install 'devft[edge]'", "ort": "pip install 'devft[legacy-ort-training]' (x86_64 only)",
                "executorch": "pip install 'devft[edge-executorch]'"}[requested]
        raise DeviceError(f"--backend {requested}: its runtime is not installed here ({hint}); this device can run "
                          f"{here or 'nothing yet'}")
    return [requested]


def check_artifact_format(fmt: str, artifact_dir: Path) -> None:
    """The files must be in the format the coordinator announced for them (the manifest says which)."""
    try:
        built_for = json.loads((artifact_dir / MANIFEST_NAME).read_text())["backend"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise DeviceError(f"cannot read the format from {artifact_dir / MANIFEST_NAME}: {exc!r}") from None
    if built_for != fmt:
        raise DeviceError(f"the coordinator announced {fmt!r} artifacts but their manifest says {built_for!r}")

REFUSED_EXIT = 4  # the coordinator refuses this device (a control message names it in `refused`)


def available_ram_mb() -> int | None:
    """MemAvailable from /proc/meminfo in MiB: what a new process can take without swapping (MemTotal also counts
    the OS and every other program); None where there is no /proc (the hello then declares no budget)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return max(1, int(line.split()[1]) // 1024)
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_capabilities(ram_mb: int | None = None) -> dict[str, Any]:
    """What every status declares about this device (docs/protocol.md, StatusMessage): platform, runtime, cores and
    `ram_mb`, the memory it offers training (`--ram-mb`, else `available_ram_mb`): the coordinator samples it only
    for stages whose memory need fits."""
    import platform

    caps: dict[str, Any] = {"platform": f"{platform.system()}-{platform.machine()}".lower()[:64],
                            "runtime": f"devft-edge (python {platform.python_version()})"[:64],
                            "cores": max(1, min(os.cpu_count() or 1, P.MAX_CORES))}
    ram = ram_mb if ram_mb is not None else available_ram_mb()
    if ram is not None:
        caps["ram_mb"] = ram
    return caps


def settings_from_credentials(path: str | Path, cache_dir: Path, host: str | None = None,
                              port: int | None = None) -> tuple[MqttSettings, str]:
    """MQTT settings and device name from the JSON that `devft fleet add-device` printed."""
    try:
        creds = json.loads(Path(path).read_text())
        user, password = creds["username"], creds["password"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise DeviceError(f"cannot read device credentials {path}: {exc!r}; use the JSON from "
                          "`devft fleet add-device`") from None
    ca_file = creds.get("ca_file")
    if not ca_file or not Path(ca_file).is_file():  # provisioned elsewhere: trust the inlined CA
        ca_file = str(cache_dir / "ca.pem")
        Path(ca_file).write_text(creds["ca_pem"])
    will = P.encode_status(P.StatusMessage(user, "offline", time.time()))
    settings = MqttSettings(host=host or creds["host"], port=int(port or creds["port"]), username=user,
                            password=password, ca_file=ca_file, client_id=creds.get("client_id") or user,
                            reconnect_min_s=0.2, reconnect_max_s=5.0, will_payload=will,
                            session_expiry_s=SESSION_EXPIRY_S)
    return settings, user
