"""The secured broker: TLS with the fleet CA, passwords, the device ACL, QoS 1 sessions."""

from __future__ import annotations

import json
import os
import pwd
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import protocol as P
from edge_runtime.mqtt import MqttConnectError
from server_sdk.fleet import broker as B
from tests.broker_fixtures import DEVICES

pytest_plugins = ("tests.broker_fixtures",)  # fleet, broker, clients

RUN = "run1"


def _nothing(client, topic_filter: str, wait_s: float = 0.5) -> bool:
    try:
        msg = client.get(topic_filter, wait_s)
    except queue.Empty:
        return True
    pytest.fail(f"unexpected message on {msg.topic}: {msg.payload[:40]!r}")


def test_tls_login_with_fleet_ca_and_device_reads_control(fleet, broker, clients):
    server = clients(fleet.server)
    dev = clients(fleet.devices["dev1"], connect=False)
    dev.subscribe(P.control_topic(RUN))
    dev.connect()
    server.publish(P.control_topic(RUN), b"round 1", wait_s=5)
    assert dev.get(P.control_topic(RUN), 5).payload == b"round 1"


def test_wrong_password_is_refused(fleet, broker, clients):
    with pytest.raises(MqttConnectError, match="refused"):
        clients(fleet.devices["dev1"], password="not-the-password")


def test_anonymous_is_refused(fleet, broker, clients):
    with pytest.raises(MqttConnectError, match="refused"):
        clients(fleet.devices["dev1"], username=None, password=None, client_id="anon")


def test_certificate_from_another_ca_is_refused(fleet, broker, clients, tmp_path):
    other = B.fleet_init(tmp_path / "other", hostnames=["localhost"], port=1)
    with pytest.raises(MqttConnectError, match="TLS handshake"):
        clients(fleet.devices["dev1"], ca_file=other.ca_file, client_id="wrong-ca")


def test_connect_waits_for_a_broker_that_is_starting(fleet, broker, clients):
    broker.stop()
    threading.Timer(0.5, broker.start).start()
    dev = clients(fleet.devices["dev1"])
    assert dev.connected


def test_device_cannot_publish_as_another_device(fleet, broker, clients):
    server = clients(fleet.server)
    server.subscribe(P.update_topic(RUN, "+"))
    server.subscribe(P.control_topic(RUN))
    dev1 = clients(fleet.devices["dev1"])
    dev1.publish(P.update_topic(RUN, "dev2"), b"forged", wait_s=5)
    dev1.publish(P.control_topic(RUN), b"forged control", wait_s=5)
    dev1.publish(P.update_topic(RUN, "dev1"), b"genuine", wait_s=5)
    got = server.get(P.update_topic(RUN, "+"), 5)
    assert (got.topic, got.payload) == (P.update_topic(RUN, "dev1"), b"genuine")
    _nothing(server, P.update_topic(RUN, "+"))
    _nothing(server, P.control_topic(RUN), 0.1)


def test_overlapping_filters_each_get_a_message_once(fleet, broker, clients):
    server = clients(fleet.server)
    server.subscribe(f"devft/{RUN}/#")
    server.subscribe(P.update_topic(RUN, "+"))
    clients(fleet.devices["dev1"]).publish(P.update_topic(RUN, "dev1"), b"u", wait_s=5)
    assert server.get(P.update_topic(RUN, "+"), 5).payload == b"u"
    assert server.get(f"devft/{RUN}/#", 5).payload == b"u"
    _nothing(server, P.update_topic(RUN, "+"))
    assert server.drain(f"devft/{RUN}/#") == []


def test_device_cannot_read_other_devices_updates(fleet, broker, clients):
    server = clients(fleet.server)
    server.subscribe(P.update_topic(RUN, "+"))
    dev2 = clients(fleet.devices["dev2"])
    dev2.subscribe(P.update_topic(RUN, "+"))  # mosquitto grants it but delivers nothing
    dev1 = clients(fleet.devices["dev1"])
    dev1.publish(P.update_topic(RUN, "dev1"), b"private", wait_s=5)
    assert server.get(P.update_topic(RUN, "+"), 5).payload == b"private"
    _nothing(dev2, P.update_topic(RUN, "+"))


def test_qos1_message_reaches_persistent_session_after_reconnect(fleet, broker, clients):
    dev = clients(fleet.devices["dev1"], connect=False)
    dev.subscribe(P.control_topic(RUN))
    dev.connect()
    dev.close()
    server = clients(fleet.server)
    server.publish(P.control_topic(RUN), b"while you were away", wait_s=5)
    again = clients(fleet.devices["dev1"], connect=False)
    again.subscribe(P.control_topic(RUN))
    again.connect()
    assert again.session_present
    assert again.get(P.control_topic(RUN), 5).payload == b"while you were away"


def test_clients_reconnect_after_broker_restart_and_queued_messages_survive(fleet, broker, clients):
    server = clients(fleet.server)
    online = clients(fleet.devices["dev1"], connect=False)
    online.subscribe(P.control_topic(RUN))
    online.connect()
    offline = clients(fleet.devices["dev2"], connect=False)
    offline.subscribe(P.control_topic(RUN))
    offline.connect()
    offline.close()
    server.publish(P.control_topic(RUN), b"before restart", wait_s=5)
    assert online.get(P.control_topic(RUN), 5).payload == b"before restart"

    broker.restart()
    assert server.wait_connected(15) and online.wait_connected(15)
    server.publish(P.control_topic(RUN), b"after restart", wait_s=5)
    # QoS 1 is at least once: a PUBACK the broker had not processed when it stopped gets "before restart"
    # redelivered on the resumed session (seen once in a loaded CI run); devices take a control twice alike
    got = [online.get(P.control_topic(RUN), 5).payload]
    while got[-1] == b"before restart" and len(got) < 3:
        got.append(online.get(P.control_topic(RUN), 5).payload)
    assert got[-1] == b"after restart" and set(got[:-1]) <= {b"before restart"}, got
    assert online.reconnects >= 1

    back = clients(fleet.devices["dev2"], connect=False)
    back.subscribe(P.control_topic(RUN))
    back.connect()
    got = [back.get(P.control_topic(RUN), 5).payload for _ in range(2)]
    assert got == [b"before restart", b"after restart"]


def _no_delay(client) -> bool:
    sock = client._client.socket()  # paho's socket of the current connection (an SSLSocket)
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_client_connections_turn_nagle_off_also_after_a_reconnect(fleet, broker, clients):
    """A message's last TCP segment must not wait for the broker's delayed ACK (40 ms a message on Linux)."""
    server = clients(fleet.server)
    device = clients(fleet.devices["dev1"], connect=False)
    device.subscribe(P.control_topic(RUN))
    device.connect()
    assert _no_delay(server) and _no_delay(device)
    first = device._client.socket()
    broker.restart()
    assert server.wait_connected(15) and device.wait_connected(15)
    assert device._client.socket() is not first  # a new connection, set up the same way
    assert _no_delay(server) and _no_delay(device)
    server.publish(P.control_topic(RUN), b"after restart", wait_s=5)
    assert device.get(P.control_topic(RUN), 5).payload == b"after restart"


def test_device_added_while_running_connects_after_reload(fleet, broker, clients):
    creds = B.add_device(fleet.dir, "dev3")
    broker.reload()
    deadline = time.monotonic() + 5
    while True:
        try:
            clients(creds, client_id=f"dev3-{time.monotonic_ns()}")
            break
        except MqttConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert creds.publish_topics == ["devft/+/update/dev3", "devft/+/status/dev3", "devft/+/fetch/dev3"]
    assert "BEGIN CERTIFICATE" in creds.ca_pem


def test_fleet_files_and_config(fleet):
    conf = B.write_config(fleet.dir).read_text()
    assert "allow_anonymous false" in conf
    assert "persistence true" in conf
    assert f"listener {fleet.port}\n" in conf
    assert "127.0.0.1" not in conf  # loopback plaintext listener is off by default
    assert "use_username_as_clientid true" in conf
    if (B.mosquitto_version() or (2,)) >= (2,):  # the broker's side of every connection sends without Nagle's delay
        assert "set_tcp_nodelay true\n" in conf
    assert "user root" not in conf
    # the CA key is in its own private directory, which nothing in the broker's config points to
    assert not (fleet.dir / "ca.key").exists()
    assert (fleet.dir / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    assert (fleet.dir / "ca").stat().st_mode & 0o077 == 0
    assert "ca.key" not in conf and f"{fleet.dir / 'ca'}" not in conf
    assert (fleet.dir / "credentials" / "dev1.json").stat().st_mode & 0o077 == 0
    acl = (fleet.dir / "acl").read_text()
    assert "pattern write devft/run1/update/%u" in acl and "user server-artifacts" in acl
    assert "devft/+/update" not in acl  # devices write under registered runs only
    with pytest.raises(B.BrokerError, match="already holds a fleet"):
        B.fleet_init(fleet.dir)
    for name in ("server", "server-artifacts"):
        with pytest.raises(B.BrokerError, match="reserved"):
            B.add_device(fleet.dir, name)


def test_missing_mosquitto_names_the_install_command(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    with pytest.raises(B.MosquittoNotFound, match="apt-get install mosquitto"):
        B.require_mosquitto()


def test_will_marks_a_killed_device_offline(fleet, broker, clients):
    server = clients(fleet.server)
    server.subscribe(P.status_topic(RUN, "+"))
    creds = fleet.devices["dev1"]
    script = textwrap.dedent(
        f"""
        import time
        from edge_runtime import protocol as P
        from edge_runtime.mqtt import MqttClient, MqttSettings
        offline = P.encode_status(P.StatusMessage(device_id="dev1", state="offline", timestamp=time.time()))
        c = MqttClient(MqttSettings(host="localhost", port={creds.port}, username="dev1",
            password={creds.password!r}, ca_file={creds.ca_file!r}, client_id="dev1",
            will_topic=P.status_topic("{RUN}", "dev1"), will_payload=offline))
        c.connect()
        hello = P.StatusMessage(device_id="dev1", state="hello", timestamp=time.time())
        c.publish(P.status_topic("{RUN}", "dev1"), P.encode_status(hello), retain=True, wait_s=5)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    try:
        hello = P.decode_status(server.get(P.status_topic(RUN, "+"), 15).payload)
        assert (hello.device_id, hello.state) == ("dev1", "hello")
    finally:
        proc.kill()
        proc.wait()
    gone = P.decode_status(server.get(P.status_topic(RUN, "+"), 10).payload)
    assert (gone.device_id, gone.state) == ("dev1", "offline")


def test_one_round_over_the_wire(fleet, broker, clients):
    """Control and global go out retained; the update comes back and validates."""
    rng = np.random.default_rng(0)
    adapter = {"l0.lora_A": rng.standard_normal((2, 8)).astype(np.float32)}
    server = clients(fleet.server)
    server.subscribe(P.update_topic(RUN, "+"))
    hyper = P.TrainSettings(lr=1e-3, local_steps=1, batch_size=1, trainable=("a",), seeds={"dev1": 0}, session="s")
    control = P.ControlMessage(run_id=RUN, stage=0, round=1, state="train", sampled_clients=("dev1",),
                               hyperparams=hyper)
    server.publish(P.control_topic(RUN), P.encode_control(control), retain=True, wait_s=5)
    glob = P.GlobalMessage(run_id=RUN, stage=0, round=1, tensors=adapter)
    server.publish(P.global_topic(RUN, 1), P.encode_global(glob), retain=True, wait_s=5)

    dev = clients(fleet.devices["dev1"], connect=False)  # joins late: retained messages catch it up
    dev.subscribe(P.control_topic(RUN))
    dev.subscribe(P.global_topic(RUN, "+"))
    dev.connect()
    ctl = P.decode_control(dev.get(P.control_topic(RUN), 5).payload)
    assert ctl.state == "train" and "dev1" in ctl.sampled_clients
    got = P.decode_global(dev.get(P.global_topic(RUN, "+"), 5).payload)
    delta = {k: v * 0.01 for k, v in got.tensors.items()}
    update = P.UpdateMessage(
        run_id=RUN,
        stage=ctl.stage,
        round=ctl.round,
        device_id="dev1",
        nonce=secrets.token_hex(16),
        num_samples=8,
        tensors=delta,
        metrics={"train_loss": 0.5},
    )
    dev.publish(P.update_topic(RUN, "dev1"), P.encode_update(update), wait_s=5)

    msg = server.get(P.update_topic(RUN, "+"), 5)
    received = P.decode_update(msg.payload)
    spec = {k: (v.shape, v.dtype) for k, v in adapter.items()}
    sender = P.parse_topic(msg.topic)[2][0]
    P.validate_update(received, spec, RUN, 0, 1, set(), max_norm=10.0, sender=sender)
    np.testing.assert_array_equal(received.tensors["l0.lora_A"], delta["l0.lora_A"])


def test_cli_and_plaintext_loopback_listener(tmp_path, clients, unused_port, capsys):
    tls_port, plain_port = unused_port(), unused_port()
    fleet_dir = tmp_path / "cli-fleet"
    B.main(
        [
            "init",
            str(fleet_dir),
            "--hostname",
            "localhost",
            "--port",
            str(tls_port),
            "--plaintext-loopback-port",
            str(plain_port),
        ]
    )
    B.main(["add-device", str(fleet_dir), "phone1"])
    printed = capsys.readouterr().out.splitlines()[-1]
    creds = B.Credentials.load(printed)
    assert creds.password not in printed and Path(printed).stat().st_mode & 0o077 == 0
    assert creds.username == "phone1" and creds.port == tls_port
    proc = B.start_broker(fleet_dir)
    try:
        clients(creds, port=plain_port, ca_file=None)  # no TLS, still a password
        with pytest.raises(MqttConnectError):
            clients(creds, port=plain_port, ca_file=None, password="wrong", client_id="x")
    finally:
        proc.stop()


# --------------------------------------------------------------------------- hardening (issue 13)


def _still_connected(client, wait_s: float = 1.5) -> bool:
    time.sleep(wait_s)
    return client.connected and client.reconnects == 0


def test_a_client_id_of_another_login_disconnects_nobody(fleet, broker, clients):
    """The broker takes the client id from the username, so borrowing one takes over no session."""
    server = clients(fleet.server, client_id="server")
    artifacts = clients(B.artifact_credentials(fleet.server))  # the coordinator's second login coexists
    dev2 = clients(fleet.devices["dev2"], connect=False)
    dev2.subscribe(P.control_topic(RUN))
    dev2.connect()
    for borrowed in ("server", "server-artifacts", "dev2"):
        hijacker = clients(fleet.devices["dev1"], client_id=borrowed)
        assert hijacker.connected
        hijacker.close()  # two connections of one login would push each other out (the same client id)
    assert _still_connected(server) and _still_connected(artifacts, 0) and _still_connected(dev2, 0)
    server.publish(P.control_topic(RUN), b"still here", wait_s=5)
    assert dev2.get(P.control_topic(RUN), 5).payload == b"still here"


def _proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _gone(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return True
    return " Z " in state + " "  # a zombie has exited; only its exit status waits to be collected


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_mosquitto_never_runs_as_root(fleet, broker, clients):
    assert _proc_uid(broker.proc.pid) != 0
    if os.geteuid() == 0:
        assert _proc_uid(broker.proc.pid) == pwd.getpwnam(B.broker_user()).pw_uid
        assert broker.runtime_dir != fleet.dir  # copies of just what it reads, owned by its user
        staged = sorted(p.name for p in broker.runtime_dir.iterdir() if p.is_file())
        assert staged == sorted([*B.BROKER_FILES, "mosquitto.conf"]), staged
    clients(fleet.devices["dev1"])  # and it still reads its certificates, passwords and ACL


def _non_loopback_ipv4() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))  # no packet is sent; this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_listener_binds_to_the_configured_address(tmp_path, unused_port):
    port = unused_port()
    B.fleet_init(tmp_path / "f", hostnames=["localhost"], port=port, bind_address="127.0.0.1")
    assert f"listener {port} 127.0.0.1\n" in B.write_config(tmp_path / "f").read_text()
    with pytest.raises(B.BrokerError, match="not an IP address"):
        B.fleet_init(tmp_path / "g", hostnames=["localhost"], port=port, bind_address="everywhere")
    proc = B.start_broker(tmp_path / "f")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        other = _non_loopback_ipv4()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        proc.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_run_wrapper_leaves_no_mosquitto_behind(tmp_path, unused_port, sig):
    port = unused_port()
    B.fleet_init(tmp_path / "f", hostnames=["localhost"], port=port, bind_address="127.0.0.1")
    wrapper = subprocess.Popen([sys.executable, "-m", "server_sdk.fleet.broker", "run", str(tmp_path / "f")],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        line = wrapper.stdout.readline()
        assert "listening" in line, line
        pid = int(line.split("pid ")[1].split(")")[0])
        assert not _gone(pid)
        wrapper.send_signal(sig)
        wrapper.wait(15)
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), f"mosquitto {pid} still runs after the wrapper got signal {sig}"
        if sig != signal.SIGKILL:
            assert wrapper.returncode == 0
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        wrapper.stdout.close()


def test_forbidden_publish_gets_reason_code_0x87_over_mqtt5(fleet, broker):
    """Mosquitto drops a publish the ACL forbids and says so in the PUBACK: 0x87 Not authorized."""
    import paho.mqtt.client as paho

    creds = fleet.devices["dev1"]
    acks: queue.Queue = queue.Queue()
    client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id="dev1",
                         protocol=paho.MQTTv5)
    client.username_pw_set(creds.username, creds.password)
    client.tls_set(ca_certs=creds.ca_file)
    client.on_publish = lambda c, userdata, mid, reason, props: acks.put((mid, reason.value))
    client.connect("localhost", creds.port)
    client.loop_start()
    try:
        forbidden = client.publish(P.update_topic(RUN, "dev2"), b"forged", qos=1).mid
        allowed = client.publish(P.update_topic(RUN, "dev1"), b"mine", qos=1).mid
        got = dict(acks.get(timeout=10) for _ in range(2))
    finally:
        client.loop_stop()
        client.disconnect()
    assert got[forbidden] == 0x87  # Not authorized
    assert got[allowed] in (0x00, 0x10)  # Success / No matching subscribers


def test_a_fleet_from_before_server_users_gets_the_artifact_login_at_start(tmp_path, unused_port, clients):
    """Fleets provisioned before client ids were bound to usernames had one server login only."""
    port = unused_port()
    fleet_dir = tmp_path / "old"
    server = B.fleet_init(fleet_dir, hostnames=["localhost"], port=port)
    settings = json.loads((fleet_dir / "fleet.json").read_text())
    del settings["server_users"]
    (fleet_dir / "fleet.json").write_text(json.dumps(settings))
    passwd = fleet_dir / "passwd"
    passwd.write_text("".join(line + "\n" for line in passwd.read_text().splitlines()
                              if not line.startswith("server-artifacts:")))
    acl = fleet_dir / "acl"
    acl.write_text(acl.read_text().replace("user server-artifacts\n", "").replace(
        "topic readwrite devft/#\n\ntopic readwrite devft/#\n", "topic readwrite devft/#\n"))
    assert "server-artifacts" not in passwd.read_text() + acl.read_text()
    proc = B.start_broker(fleet_dir)
    try:
        clients(server)
        clients(B.artifact_credentials(server))
    finally:
        proc.stop()
    assert json.loads((fleet_dir / "fleet.json").read_text())["server_users"] == ["server", "server-artifacts"]


def test_clients_dropped_by_a_broker_restart_knock_again_at_jittered_times(fleet, broker, clients):
    """Issue #27: a thousand devices dropped by one broker restart must not all retry in the same instant. Each
    client's first reconnect delay is drawn from 0.5-1.5 x reconnect_min_s when its connection drops (paho's own
    backoff is the same for every client: min, 2 min, 4 min, ...)."""
    devs = [clients(fleet.devices[name], reconnect_min_s=1.0, reconnect_max_s=8.0) for name in DEVICES]
    server = clients(fleet.server, reconnect_min_s=1.0, reconnect_max_s=8.0)
    everyone = [*devs, server]
    assert {c._client._reconnect_min_delay for c in everyone} == {1.0}  # as configured, before any drop
    broker.restart()
    assert all(c.wait_connected(20) for c in everyone) and all(c.reconnects == 1 for c in everyone)
    delays = [c._client._reconnect_min_delay for c in everyone]
    assert all(0.5 <= d <= 1.5 for d in delays) and len(set(delays)) == len(delays)  # each its own
    assert {c._client._reconnect_max_delay for c in everyone} == {8.0}
