"""Issue #27, the broker's holes: what one device (or a stopped process) can leave behind in a real Mosquitto.

Clean exits say offline (hole 4), artifact chunks are never queued for offline sessions (hole 8), a local
fleet never leaks its mosquitto (hole 10), a new fleet never inherits an old broker's persistence and a fresh
run clears stale retained state (hole 12), and devices may publish only under the fleet's registered runs,
where retained messages on update and fetch topics are swept (hole 3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_runtime import protocol as P
from tests import test_fleet as fleet_tests
from tests.test_fleet import RUN, _good, _run_round, _update, events, wait_for

pytest_plugins = ("tests.broker_fixtures",)  # fleet, clients
coordinator = fleet_tests.coordinator  # the fixture: a FleetExecutor on a broker with devices dev1 .. dev5
REPO = Path(__file__).resolve().parents[1]

# a real devft-edge whose training takes two minutes: it is stopped meanwhile
SLOW_DEVICE = """
import sys, time
from edge_runtime import client
def slow(self, ctrl):
    print("training", flush=True)
    time.sleep(120)
client.Device.train_round = slow
sys.exit(client.main(sys.argv[1:]))
"""


def _shard(path: Path) -> Path:
    path.write_text(json.dumps({"prompt": "Q: 1+1?", "completion": "2"}) + "\n")
    return path


def test_a_device_stopped_with_sigterm_mid_round_says_offline_and_costs_seconds(coordinator, fleet, clients,
                                                                                   tmp_path):
    """Hole 4: a clean exit sends no will, so devft-edge publishes its retained `offline` status itself."""
    import signal

    ex = coordinator
    ex.settings.round_timeout_s = 60.0
    ex.settings.quorum = 0.5
    cmd = [sys.executable, "-c", SLOW_DEVICE, "run", "--credentials", str(fleet.dir / "credentials" / "dev2.json"),
           "--data", str(_shard(tmp_path / "shard.jsonl")), "--cache", str(tmp_path / "cache"), "--run", RUN,
           "--host", "localhost"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: ex.device_status.get("dev2", {}).get("state") == "hello", 30, "dev2's hello")
        worker, box = _run_round(ex, 1, [1, 2])
        for line in proc.stdout:  # the device's log lines, then its print
            if line.strip() == "training":
                break
        clients(fleet.devices["dev1"]).publish(P.update_topic(RUN, "dev1"), P.encode_update(_update("dev1", 1,
                                               _good(1))), wait_s=10)
        wait_for(lambda: any(e["event"] == "accepted" for e in events(ex.run_dir)), 10, "dev1's update")
        stopped_at = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stdout.read()
        worker.join(70)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert "error" not in box, box.get("error")
    end = next(e for e in events(ex.run_dir) if e["event"] == "round_end")
    assert end["missing"] == ["dev2"] and end["offline"] == ["dev2"]
    # a behaviour check, not a benchmark: the round must not wait for its 60 s deadline
    assert end["t"] - stopped_at < 15.0, f"the round waited {end['t'] - stopped_at:.1f}s after the SIGTERM"


def test_artifact_chunks_are_never_queued_for_an_offline_device(fleet, broker, clients, tmp_path):
    """Hole 8: a device whose persistent session holds a chunk subscription goes away while another device
    downloads a file; the broker queues none of the chunks for it (QoS 0), only the retained control (QoS 1)."""
    import os

    from edge_runtime.fetch import ArtifactCache
    from server_sdk.fleet.artifact_server import ArtifactServer
    from server_sdk.fleet.broker import artifact_credentials

    blob = tmp_path / "weights.bin"
    blob.write_bytes(os.urandom(6 * 64 * 1024))
    server = ArtifactServer(clients(artifact_credentials(fleet.server)), RUN, max_bytes_per_s=None).start()
    try:
        entry = server.add_file(blob, "stage0/weights.bin", chunk_size=64 * 1024)
        away = clients(fleet.devices["dev2"])  # clean_start false, a session that outlives the connection
        away.subscribe(f"devft/{RUN}/artifacts/#")
        away.subscribe(P.control_topic(RUN))
        away.close()
        ArtifactCache(tmp_path / "cache").fetch_file(clients(fleet.devices["dev1"]), RUN, "dev1", entry,
                                                      chunk_timeout_s=2.0)
        assert server.chunks_sent >= 6
        clients(fleet.server).publish(P.control_topic(RUN), b"while you were away", retain=True, wait_s=5)
        back = clients(fleet.devices["dev2"], connect=False)
        got: list = []
        for topic_filter in (f"devft/{RUN}/artifacts/#", P.control_topic(RUN)):  # queued messages carry their ids
            back.subscribe(topic_filter, got.append)
        back.connect(10)
        assert back.session_present
        wait_for(lambda: any(m.topic == P.control_topic(RUN) for m in got), 10, "the queued control")
        time.sleep(1.0)  # queued messages come in order right after the CONNACK; give stragglers a moment
        chunks = [m.topic for m in got if "/artifacts/" in m.topic]
        assert chunks == [], f"the broker queued {len(chunks)} chunks for an offline device"
    finally:
        server.stop()


# a local fleet's coordinator, as far as the broker is concerned: starts the fleet's mosquitto, then waits
FLEET_PARENT = """
import sys, time
from server_sdk.fleet.broker import BrokerProcess
from server_sdk.fleet.local_fleet import LocalFleet
fleet = LocalFleet(sys.argv[1], 1)
if sys.argv[2] == "local":
    broker = fleet.start_broker()
else:  # what versions before the parent-death signal did: nothing stops mosquitto when this process dies
    broker = BrokerProcess(fleet.dir, fleet.port).start()
print(broker.proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _start_parent(fleet_dir: Path, how: str) -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", FLEET_PARENT, str(fleet_dir), how], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    return parent, int(parent.stdout.readline())


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_local_fleet_killed_or_terminated_takes_its_broker_along(tmp_path, sig):
    """Hole 10: the broker of `devft run --fleet local:N` dies with it, and the fleet starts again on its port."""
    import os
    import signal

    from server_sdk.fleet.local_fleet import LocalFleet

    parent, broker_pid = _start_parent(tmp_path / "fleet", "local")
    try:
        parent.send_signal(getattr(signal, sig))
        parent.wait(10)
        wait_for(lambda: not _alive(broker_pid), 10, f"mosquitto to stop after the {sig} of its parent")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        if _alive(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)
    with LocalFleet(tmp_path / "fleet", 1) as again:  # the resume: same fleet, same port
        assert again.start_broker().running


def test_a_stale_broker_of_the_same_fleet_is_stopped_on_the_next_start(tmp_path):
    """Hole 10: a mosquitto left behind (by an older version, say) no longer blocks `--resume` with
    "port ... is already in use": the fleet's pid file names it, and only that process is stopped."""
    import os
    import signal

    from server_sdk.fleet.local_fleet import LocalFleet

    parent, broker_pid = _start_parent(tmp_path / "fleet", "plain")
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        time.sleep(0.5)
        assert _alive(broker_pid), "the scenario needs a leaked mosquitto"
        with LocalFleet(tmp_path / "fleet", 1) as again:
            broker = again.start_broker()
            assert broker.running and broker.proc.pid != broker_pid
            assert not _alive(broker_pid)
    finally:
        parent.stdout.close()
        if _alive(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)


def _retained(client, topic_filter: str, timeout_s: float = 10.0) -> dict[str, bytes]:
    """What the broker holds retained under `topic_filter` (seen by a fresh subscription of `client`)."""
    import secrets
    import threading

    got: dict[str, bytes] = {}
    back = threading.Event()
    marker = f"devft/probe/{secrets.token_hex(4)}"
    client.subscribe(marker, lambda m: back.set())
    client.subscribe(topic_filter, lambda m: got.__setitem__(m.topic, m.payload) if m.retain and m.payload else None)
    client.publish(marker, b"x", wait_s=5)
    assert back.wait(timeout_s), "the probe's marker never came back"
    client.unsubscribe(topic_filter)
    client.unsubscribe(marker)
    return got


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="only a broker started by root keeps its persistence "
                    "outside the fleet directory (DEVFT_BROKER_RUNTIME); otherwise deleting the run deletes it too")
def test_a_fleet_made_anew_at_the_same_path_does_not_inherit_the_old_brokers_persistence(tmp_path, clients):
    """Hole 12: delete a run directory, rerun under the same name: no stale retained `done` tells devices to exit."""
    import shutil

    from server_sdk.fleet.broker import runtime_dir
    from server_sdk.fleet.local_fleet import LocalFleet

    done = P.encode_control(P.ControlMessage("same", 0, 3, "done"))
    with LocalFleet(tmp_path / "same" / "fleet", 1) as old:
        old.start_broker()
        old_runtime = runtime_dir(old.dir)
        clients(old.server).publish(P.control_topic("same"), done, retain=True, wait_s=5)
    assert list((old_runtime / "data").iterdir()), "the old broker saved its persistence"
    shutil.rmtree(tmp_path / "same")
    with LocalFleet(tmp_path / "same" / "fleet", 1) as new:
        new.start_broker()
        assert _retained(clients(new.server), P.control_topic("same")) == {}
        assert runtime_dir(new.dir) != old_runtime


def test_a_starting_coordinator_sweeps_retained_messages_nobody_should_find(fleet, clients, tmp_path):
    """Holes 12 and 3: a previous run's retained control and global go when a coordinator of the run id starts,
    and so do retained updates and chunk requests a device planted, and a retained status the coordinator would
    refuse; the devices' own statuses stay."""
    from server_sdk.config import RunConfig
    from server_sdk.fleet.broker import BrokerProcess, add_operator
    from server_sdk.fleet.coordinator import FleetExecutor
    from server_sdk.fleet.settings import FleetSettings

    observer = add_operator(fleet.dir, "observer")
    broker = BrokerProcess(fleet.dir, fleet.port).start()
    ex = None
    try:
        probe = clients(observer)
        probe.publish(P.control_topic(RUN), P.encode_control(P.ControlMessage(RUN, 0, 3, "done")), retain=True,
                      wait_s=5)
        probe.publish(P.global_topic(RUN, 3), b"an old round's adapter", retain=True, wait_s=5)
        dev1, dev2 = clients(fleet.devices["dev1"]), clients(fleet.devices["dev2"])
        dev1.publish(P.update_topic(RUN, "dev1"), b"u" * 2_000_000, retain=True, wait_s=10)
        dev1.publish(P.fetch_topic(RUN, "dev1"), b"f" * 100_000, retain=True, wait_s=5)
        hello = P.encode_status(P.StatusMessage("dev2", "hello", time.time()))
        dev2.publish(P.status_topic(RUN, "dev2"), hello, retain=True, wait_s=5)
        dev1.publish(P.status_topic(RUN, "dev1"), b"s" * (P.MAX_STATUS_BYTES + 1), retain=True, wait_s=5)
        planted = _retained(probe, f"devft/{RUN}/#")
        assert len(planted) == 6, sorted(planted)
        ex = FleetExecutor(RunConfig(), tmp_path / "run", fleet.server, [1], FleetSettings(run_id=RUN),
                           host="localhost")
        assert _retained(probe, f"devft/{RUN}/#") == {P.status_topic(RUN, "dev2"): hello}
        cleared = [e for e in events(ex.run_dir) if e["event"] == "retained_cleared"]
        assert cleared and cleared[0]["counts"] == {"control": 1, "global": 1, "update": 1, "fetch": 1, "status": 1}
        # and while it runs: the next sweep takes what a device plants meanwhile
        dev1.publish(P.update_topic(RUN, "dev1"), b"again", retain=True, wait_s=5)
        assert ex.janitor.sweep() == {"update": 1}
        assert _retained(probe, P.update_topic(RUN, "+")) == {}
    finally:
        if ex is not None:
            ex.close()
        broker.stop()


def test_devices_publish_only_under_the_fleets_registered_runs(fleet, broker, clients, caplog):
    """Hole 3: ten 20 MB retained messages under ten made-up run ids grew Mosquitto by 220 MB. Now a device may
    publish its own topics under registered runs only; everything else is refused (0x87) and nothing is kept."""
    from server_sdk.fleet.broker import register_run, reload_running_broker

    dev1 = clients(fleet.devices["dev1"])
    probe = clients(fleet.server)
    big = b"x" * 2_000_000
    with caplog.at_level("ERROR", logger="edge_runtime.mqtt"):
        for run in ("future-run", "junk0", "junk1"):
            for topic in (P.update_topic(run, "dev1"), P.status_topic(run, "dev1"), P.fetch_topic(run, "dev1")):
                dev1.publish(topic, big, retain=True, wait_s=10)
        wait_for(lambda: len(dev1.refused) == 9, 10, "nine refusals")
    assert {reason for _, reason in dev1.refused} == {"Not authorized"}
    assert "registered with the fleet" in caplog.text  # the device's log says why and what to do
    assert _retained(probe, "devft/#") == {}
    dev1.publish(P.status_topic(RUN, "dev1"), P.encode_status(P.StatusMessage("dev1", "hello", time.time())),
                 retain=True, wait_s=5)
    assert list(_retained(probe, "devft/#")) == [P.status_topic(RUN, "dev1")]  # a registered run works as before
    # registering a run (what `devft serve` does) opens it, on the running broker too
    assert register_run(fleet.dir, "future-run") and reload_running_broker(fleet.dir)
    assert "devft/future-run/update/%u" in (fleet.dir / "acl").read_text()

    def accepted() -> bool:
        dev1.publish(P.update_topic("future-run", "dev1"), b"u", retain=True, wait_s=5)
        return P.update_topic("future-run", "dev1") in _retained(probe, "devft/future-run/#")

    wait_for(accepted, 10, "the reloaded ACL")


def test_devft_run_fleet_local_stopped_with_sigterm_stops_everything_and_resumes(tmp_path):
    """Hole 10, end to end: SIGTERM of `devft run --fleet local:2` mid-run stops its devices and its mosquitto
    and exits 143; `--resume` then starts the broker again on the fleet's port and finishes the run."""
    import os
    import signal

    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.local_fleet import REPO_ROOT
    from tests.test_fleet import fleet_cfg

    tiny = tiny_random_model(n_layers=4, hidden=32, seed=0)
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    fleet_cfg(model=str(tmp_path / "model"), rounds_per_stage=[2, 1], num_clients=2, clients_per_round=2,
              torch_threads=1).to_json(tmp_path / "cfg.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cli = [sys.executable, "-m", "server_sdk.cli.main", "run", "--fleet", "local:2", "--quiet", "--round-timeout", "120"]
    run_dir = tmp_path / "cli"
    with open(tmp_path / "run.log", "ab") as logf:
        first = subprocess.Popen([*cli, "--config", str(tmp_path / "cfg.json"), "--name", "cli", "--runs-dir",
                                  str(tmp_path)], stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: any(e["event"] == "round_start" for e in events(run_dir)), 300, "the first round")
            broker_pid = json.loads((run_dir / "fleet" / "broker.pid").read_text())["pid"]
            device_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                           and _parent_of(int(p.name)) == first.pid and b"edge_runtime.client" in _cmdline(p)]
            assert len(device_pids) == 2 and _alive(broker_pid)
            first.send_signal(signal.SIGTERM)
            assert first.wait(60) == 128 + signal.SIGTERM
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        assert not _alive(broker_pid) and not any(_alive(p) for p in device_pids)
        resumed = subprocess.run([*cli, "--resume", str(run_dir)], stdout=logf, stderr=subprocess.STDOUT, env=env,
                                 timeout=600)
    assert resumed.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert len(json.loads((run_dir / "report.json").read_text())["records"]) >= 3


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
