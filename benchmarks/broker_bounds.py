"""What one device can make a real Mosquitto hold (issue #27, holes 3 and 8), old settings against new, in one run.

    python -m benchmarks.broker_bounds            # about half a minute; --mb sets the sizes

Two cases, each first as the code before the fix behaved, then as it behaves now, on fresh brokers:

* hole 8, offline device: dev2 subscribes to the run's artifact chunks with a persistent session and goes
  away; dev1 downloads a `--mb` MB file from the ArtifactServer. Measured: the chunk bytes the broker hands
  dev2 when it comes back (what it had queued for it) and mosquitto's RSS after the download. Before:
  chunks at QoS 1. Now: chunks at QoS 0, never queued for an offline session.
* hole 3, retained messages: dev1 publishes ten `--mb` MB retained messages on its own update topic under
  ten different run ids. Measured: what the broker keeps retained, its RSS, and its persistence file after
  a save. Before: the ACL of a fleet without registered runs (every run id). Now: only registered runs.

RSS is mosquitto's VmRSS from /proc; the persistence file is mosquitto.db after the broker's SIGTERM save.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

from edge_runtime import protocol as P
from edge_runtime.fetch import ArtifactCache
from edge_runtime.mqtt import MqttClient
from server_sdk.fleet import artifact_server
from server_sdk.fleet.artifact_server import ArtifactServer
from server_sdk.fleet.broker import (
    BrokerProcess,
    add_device,
    artifact_credentials,
    fleet_init,
    free_port,
    register_run,
    runtime_dir,
    write_acl,
)
from tests.broker_fixtures import settings_for

RUN = "bounds"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_fleet(root: Path, legacy_acl: bool) -> tuple[Path, dict]:
    fleet = root / ("legacy" if legacy_acl else "now") / "fleet"
    fleet_init(fleet, hostnames=["localhost"], port=free_port(), bind_address="127.0.0.1")
    register_run(fleet, RUN)
    if legacy_acl:  # what fleets had before runs were registered: devices write under any run id
        settings = json.loads((fleet / "fleet.json").read_text())
        settings.pop("runs")
        write_acl(fleet, settings)
    creds = {name: add_device(fleet, name) for name in ("dev1", "dev2")}
    return fleet, creds


def connect(creds, **kw) -> MqttClient:
    client = MqttClient(settings_for(creds, **kw))
    client.connect(10)
    return client


def offline_device(root: Path, mb: int, chunk_qos: int) -> dict:
    fleet, devs = make_fleet(root / f"qos{chunk_qos}", legacy_acl=False)
    from server_sdk.fleet.broker import server_credentials

    broker = BrokerProcess(fleet).start()
    artifact_server.CHUNK_QOS = chunk_qos
    try:
        rss0 = rss_mb(broker.proc.pid)
        blob = root / f"blob{chunk_qos}.bin"
        blob.write_bytes(os.urandom(mb * 2**20))
        art = connect(artifact_credentials(server_credentials(fleet)))
        server = ArtifactServer(art, RUN, max_bytes_per_s=None).start()
        entry = server.add_file(blob, "stage0/blob.bin")
        away = connect(devs["dev2"])
        away.subscribe(f"devft/{RUN}/artifacts/#")
        away.close()
        dev1 = connect(devs["dev1"])
        t0 = time.perf_counter()
        ArtifactCache(root / f"cache{chunk_qos}").fetch_file(dev1, RUN, "dev1", entry)
        fetch_s = time.perf_counter() - t0
        time.sleep(1.0)
        rss1 = rss_mb(broker.proc.pid)
        got = []
        back = MqttClient(settings_for(devs["dev2"]))
        back.subscribe(f"devft/{RUN}/artifacts/#", lambda m: got.append(len(m.payload)))
        back.connect(10)
        time.sleep(2.0)
        server.stop()
        for c in (back, dev1, art):
            c.close()
        return {"chunk_qos": chunk_qos, "file_mb": mb, "fetch_s": round(fetch_s, 2),
                "queued_for_offline_device_mb": round(sum(got) / 2**20, 1), "queued_messages": len(got),
                "broker_rss_mb_before": round(rss0, 1), "broker_rss_mb_after_download": round(rss1, 1)}
    finally:
        artifact_server.CHUNK_QOS = 0
        broker.stop()


def retained_flood(root: Path, mb: int, legacy_acl: bool) -> dict:
    fleet, devs = make_fleet(root / "flood", legacy_acl)
    broker = BrokerProcess(fleet).start()
    try:
        rss0 = rss_mb(broker.proc.pid)
        dev1 = connect(devs["dev1"])
        payload = secrets.token_bytes(mb * 2**20)
        for i in range(10):
            dev1.publish(P.update_topic(f"junk{i}", "dev1"), payload, retain=True, wait_s=60)
        time.sleep(1.0)
        rss1 = rss_mb(broker.proc.pid)
        refused = len(dev1.refused)
        dev1.close()
    finally:
        broker.stop()
    db = runtime_dir(fleet) / "data" / "mosquitto.db"
    return {"acl": "every run id (before)" if legacy_acl else "registered runs (now)", "messages": 10,
            "message_mb": mb, "refused": refused, "broker_rss_mb_before": round(rss0, 1),
            "broker_rss_mb_after": round(rss1, 1),
            "persistence_mb": round(db.stat().st_size / 2**20, 2) if db.exists() else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=20, help="file size (hole 8) and retained message size (hole 3), MB")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="devft-broker-bounds-"))
    root.chmod(0o755)
    os.environ.setdefault("DEVFT_BROKER_RUNTIME", str(root / "runtime"))
    results = {"offline_device": [offline_device(root, args.mb, q) for q in (1, 0)],
               "retained_flood": [retained_flood(root, args.mb, legacy) for legacy in (True, False)]}
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
