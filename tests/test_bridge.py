"""Issue #27: an edge broker bridged over TLS to the fleet's broker (server_sdk/fleet/bridge.py), real mosquittos.

Devices log into the edge with their own credentials; the coordinator stays on the core. A round closes on
updates that crossed the bridge, the per-device ACL holds at the edge, retained control reaches a device that
connects to the edge later, and a device's will crosses the bridge as its offline status.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_runtime import protocol as P
from server_sdk.config import RunConfig
from server_sdk.fleet.bridge import EdgeBroker, add_edge
from server_sdk.fleet.broker import BrokerProcess
from server_sdk.fleet.coordinator import FleetExecutor
from server_sdk.fleet.settings import FleetSettings
from tests.broker_fixtures import free_port
from tests.test_fleet import DEVICE_WITH_WILL, RUN, _good, _run_round, _update, events, wait_for

pytest_plugins = ("tests.broker_fixtures",)  # fleet, clients


def test_devices_behind_an_edge_broker_train_a_round_with_the_acl_kept(fleet, clients, tmp_path):
    core = BrokerProcess(fleet.dir, fleet.port).start()
    edge_port = free_port()
    add_edge(fleet.dir, "edge1", port=edge_port, core_host="localhost", core_port=fleet.port)
    core.reload()  # the bridge's login
    time.sleep(0.5)
    edge = EdgeBroker(fleet.dir, "edge1").start()
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    ex = FleetExecutor(RunConfig(lr=2e-2, local_steps=2, batch_size=2), tmp_path / "run", fleet.server, [3],
                       FleetSettings(run_id=RUN, round_timeout_s=30, artifact_bytes_per_s=None, stage_ready_timeout_s=0,
                                     device_names={"1": "dev1", "2": "dev2"}), host="localhost")
    at_edge = {name: clients(fleet.devices[name], port=edge_port) for name in ("dev1", "dev2")}
    try:
        ex.serve_stage(0, {"onnx": tmp_path / "art"})
        controls: queue.Queue = queue.Queue()
        at_edge["dev1"].subscribe(P.control_topic(RUN), controls.put)  # retained at the core, through the bridge
        assert P.decode_control(controls.get(timeout=15).payload).state == "idle"

        # the per-device ACL holds at the edge: dev2 cannot speak for dev1
        at_edge["dev2"].publish(P.update_topic(RUN, "dev1"), b"x", wait_s=10)  # acknowledged, dropped (0x87)
        worker, box = _run_round(ex, 1, [1, 2])
        for name, conn in at_edge.items():
            conn.publish(P.update_topic(RUN, name), P.encode_update(_update(name, 1, _good(int(name[-1])))), wait_s=10)
        worker.join(40)
        assert "error" not in box, box.get("error")
        assert [r.client for r in box["results"]] == [1, 2]
        assert not [e for e in events(ex.run_dir) if e["event"] == "rejected"]  # the forged one never crossed

        for conn in at_edge.values():
            conn.close()
        # a device connecting to the edge later still gets the current (retained) control
        late: queue.Queue = queue.Queue()
        probe = clients(fleet.devices["dev2"], port=edge_port)
        probe.subscribe(P.control_topic(RUN), late.put)
        assert P.decode_control(late.get(timeout=15).payload).round == 1

        # a device killed behind the edge: the edge publishes its will, which reaches the coordinator
        creds = fleet.devices["dev1"]
        proc = subprocess.Popen([sys.executable, "-c", DEVICE_WITH_WILL, "dev1", str(edge_port), creds.password,
                                 creds.ca_file, RUN], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout.readline().strip() == "training"
            wait_for(lambda: ex.device_status.get("dev1", {}).get("state") == "busy", 30, "dev1's busy via the bridge")
            proc.send_signal(signal.SIGKILL)
            wait_for(lambda: ex.device_status.get("dev1", {}).get("state") == "offline", 30, "dev1's will via the bridge")
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    finally:
        ex.close()
        edge.stop()
        core.stop()
