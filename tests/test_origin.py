"""Stage artifacts from a real nginx (server_sdk/fleet/origin.py) with real Mosquitto logins: per-device access, the
device's hash check, and a tiny fleet run that fetches its stage files over HTTPS to the same adapter as over
MQTT chunks."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime import protocol as P
from edge_runtime.fetch import ArtifactCache, FetchError, OriginLogin, describe_files
from edge_runtime.mqtt import MqttClient
from server_sdk.fleet.broker import add_device, fleet_init
from server_sdk.fleet.origin import NginxOrigin, OriginAuth, OriginPublisher, check_password, require_nginx
from server_sdk.fleet.origin import runtime_dir as origin_runtime_dir
from tests.broker_fixtures import runtime_dir_in, settings_for

pytest_plugins = ("tests.broker_fixtures",)

RUN = "run1"


@pytest.fixture(scope="module", autouse=True)
def origin_runtime() -> Iterator[Path]:
    """Where an nginx started by root keeps its config and files: a throwaway directory its workers can reach."""
    try:
        require_nginx()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    with runtime_dir_in("DEVFT_ORIGIN_RUNTIME", "devft-origin-tests-") as path:
        yield path


@pytest.fixture
def served(tmp_path, unused_port):
    """A fleet (CA, password file) with three devices, nginx serving its origin, run1 enrolling dev-000 and dev-001,
    and one 3.2-chunk file published."""
    fleet = tmp_path / "fleet"
    fleet_init(fleet, hostnames=["localhost"], port=unused_port())
    creds = {name: add_device(fleet, name) for name in ("dev-000", "dev-001", "dev-009")}
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3 * 512 * 1024 + 77))
    desc = describe_files({"stage0/w.bin": src})
    enrolled = {"dev-000", "dev-001"}
    with NginxOrigin(fleet) as origin:
        desc = OriginPublisher(origin.files, origin.url, RUN).publish(desc, {"stage0/w.bin": src})
        auth = OriginAuth(origin.files, RUN, fleet / "passwd", lambda: enrolled).start()
        try:
            yield {"fleet": fleet, "creds": creds, "desc": desc, "origin": origin, "auth": auth, "tmp": tmp_path,
                   "enrolled": enrolled, "src": src}
        finally:
            auth.stop()


def login(creds, password: str | None = None) -> OriginLogin:
    return OriginLogin(creds.username, password or creds.password, creds.ca_file)


def fetch(served, name: str, creds, password: str | None = None) -> Path:
    cache = ArtifactCache(served["tmp"] / f"cache-{name}")
    return cache.fetch_file_https(served["desc"].origin, served["desc"].files[0], login(creds, password),
                                  max_retries=1, backoff_s=0.05)


def test_descriptor_origin_is_optional_and_checked():
    desc = P.ArtifactDescriptor("a" * 64, ())
    assert "origin" not in desc.to_json()  # descriptors without an origin are what version-3 devices always read
    with_origin = P.ArtifactDescriptor("a" * 64, (), origin="https://cdn.example:8443/run1/")
    assert P.ArtifactDescriptor.from_json(with_origin.to_json()) == with_origin
    from tests.test_schema import errors

    assert errors("ArtifactDescriptor", with_origin.to_json()) == [] == errors("ArtifactDescriptor", desc.to_json())
    for good in ("https://h/", "https://h:8443/a/b/"):
        assert P.ArtifactDescriptor.from_json({**desc.to_json(), "origin": good}).origin == good
        assert errors("ArtifactDescriptor", {**desc.to_json(), "origin": good}) == []
    for bad in ("http://h/run1/", "https://h/run1", "https://u:p@h/run1/", "https://h/run1/?x=1", "ftp://h/",
                "https://h/ run/", "https://h/" + "x" * 2000 + "/"):
        with pytest.raises(P.ProtocolError, match="origin"):
            P.ArtifactDescriptor.from_json({**desc.to_json(), "origin": bad})
        assert errors("ArtifactDescriptor", {**desc.to_json(), "origin": bad}), bad  # the schema says the same


def test_enrolled_device_downloads_the_file_with_its_fleet_login(served):
    path = fetch(served, "a", served["creds"]["dev-000"])
    assert path.read_bytes() == served["src"].read_bytes()
    assert served["auth"].allowed >= 1


def test_device_fetch_follows_the_descriptors_origin_with_its_mqtt_login(served):
    """The device's fetch (what devft-edge calls) goes to the origin when the descriptor names one, logging in with
    the MQTT client's username and password; the client need not even be connected."""
    creds = served["creds"]["dev-001"]
    client = MqttClient(settings_for(creds, port=1))  # never connected: nothing travels over MQTT
    cache = ArtifactCache(served["tmp"] / "cache-dev")
    got = cache.fetch(client, RUN, "dev-001", served["desc"])
    assert got["stage0/w.bin"].read_bytes() == served["src"].read_bytes()
    assert cache.bytes_downloaded == served["src"].stat().st_size


def test_device_not_enrolled_in_the_run_is_refused(served):
    with pytest.raises(FetchError, match="refused this device: HTTP 403"):
        fetch(served, "b", served["creds"]["dev-009"])  # a valid fleet login, but not one of the run's devices
    assert any("not enrolled" in why for why in served["auth"].refused)


def test_forged_login_and_no_login_are_refused(served):
    with pytest.raises(FetchError, match="HTTP 401"):
        fetch(served, "c", served["creds"]["dev-000"], password="guessed-password")
    ctx = ssl.create_default_context(cafile=served["creds"]["dev-000"].ca_file)
    url = served["desc"].origin + served["desc"].files[0].sha256
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, context=ctx, timeout=10)  # the bare URL, as anyone who read a control message
    assert err.value.code == 401


def test_device_removed_from_the_run_or_the_fleet_is_refused_at_its_next_download(served):
    creds = served["creds"]["dev-001"]
    fetch(served, "d1", creds)
    served["enrolled"].discard("dev-001")
    with pytest.raises(FetchError, match="HTTP 403"):
        fetch(served, "d2", creds)
    served["enrolled"].add("dev-001")
    passwd = served["fleet"] / "passwd"  # removed from the fleet: its line leaves the password file
    passwd.write_text("".join(line + "\n" for line in passwd.read_text().splitlines()
                              if not line.startswith("dev-001:")))
    with pytest.raises(FetchError, match="HTTP 401"):
        fetch(served, "d3", creds)


def test_nothing_but_a_runs_files_is_served(served):
    """The auth sockets, other runs' names and path tricks get 404 or a refusal, never a file."""
    creds = served["creds"]["dev-000"]
    ctx = ssl.create_default_context(cafile=creds.ca_file)
    base = served["origin"].url
    sha = served["desc"].files[0].sha256
    # a run no coordinator serves here has no auth socket: nginx answers 500 (a device retries: its coordinator
    # may be restarting)
    for path, code in ((".auth/run1.sock", 404), ("run1/", 404), ("run1/../run1/" + sha, 403), ("nginx.conf", 404),
                       ("other/" + sha, 500), ("run1/" + sha.upper(), 404)):
        req = urllib.request.Request(base + path, headers={"Authorization": login(creds).header})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, context=ctx, timeout=10)
        assert err.value.code == code, path


def test_tampered_file_on_the_origin_is_refused_by_the_hash_check(served, caplog):
    desc = served["desc"]
    target = served["origin"].files / RUN / desc.files[0].sha256
    data = bytearray(target.read_bytes())
    data[600_000] ^= 1  # one bit, in chunk 1
    target.chmod(0o644)
    target.write_bytes(bytes(data))
    cache = ArtifactCache(served["tmp"] / "cache-t")
    with pytest.raises(FetchError, match=r"refused the file served at .*chunk 1 hashes to .* tampered with"):
        cache.fetch_file_https(desc.origin, desc.files[0], login(served["creds"]["dev-000"]), backoff_s=0.05)
    assert not cache.has(desc.files[0].sha256) and cache.chunks_rejected == 2
    assert not list(cache.blobs.iterdir())  # nothing unverified kept
    # the coordinator's next publish notices the copy no longer hashes to its name and replaces it
    OriginPublisher(served["origin"].files, served["origin"].url, RUN).publish(desc, {"stage0/w.bin": served["src"]})
    assert fetch(served, "t2", served["creds"]["dev-000"]).read_bytes() == served["src"].read_bytes()


def test_password_check_reads_mosquittos_file(served):
    creds = served["creds"]["dev-000"]
    passwd = served["fleet"] / "passwd"
    assert check_password(passwd, "dev-000", creds.password)
    assert not check_password(passwd, "dev-000", creds.password + "x")
    assert not check_password(passwd, "dev-001", creds.password)
    assert not check_password(passwd, "nobody", "")


# --------------------------------------------------------------------------- a fleet run


def _adapter_bytes(run_dir: Path) -> bytes:
    return (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_fleet_run_fetches_stage_files_from_nginx_to_the_same_adapter_as_mqtt_chunks(tmp_path):
    """Two runs of the tiny model on the same seed with real devft-edge devices: one over MQTT chunks, one with the
    stage files from nginx only (no MQTT chunks served). Every update is accepted, the devices downloaded the stage
    files from nginx (its access log), and the final adapters are the same bytes."""
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.local_fleet import run_local
    from server_sdk.fleet.settings import FleetSettings
    from tests.test_fleet import events, fleet_cfg

    tiny = tiny_random_model(n_layers=4, hidden=32, seed=0)
    cfg = fleet_cfg(num_clients=2, clients_per_round=2, rounds_per_stage=[1, 1])
    settings = FleetSettings(round_timeout_s=120, artifact_bytes_per_s=None)
    reports = {}
    for mode in ("mqtt", "nginx"):
        reports[mode] = run_local(cfg, tmp_path / mode, 2, progress=False, base=tiny, settings=settings,
                                  origin=mode == "nginx", mqtt_chunks=mode == "mqtt")  # nginx: the only way in
    for mode, report in reports.items():
        accepted = [e for e in events(tmp_path / mode) if e["event"] == "accepted"]
        assert len(accepted) == 4 and report["fleet"]["rejected"] == {}, mode
        assert report["fleet"]["exit_codes"] == {"dev-000": 0, "dev-001": 0}
    assert _adapter_bytes(tmp_path / "mqtt") == _adapter_bytes(tmp_path / "nginx")

    runtime = origin_runtime_dir(tmp_path / "nginx" / "fleet")
    log_lines = (runtime / "access.log").read_text().splitlines()
    fetched = [line for line in log_lines if '"GET /nginx/' in line and " 200 " in line]
    assert {line.split()[1] for line in fetched} == {"dev-000", "dev-001"}  # each device, with its own login
    assert not [line for line in log_lines if " 401 " in line or " 403 " in line]
    tels = {mode: [t for rec in r["records"] for t in (rec.get("telemetry") or {}).values()]
            for mode, r in reports.items()}
    assert len(tels["nginx"]) == len(tels["mqtt"]) == 4
    for tel in tels["nginx"]:  # what came over MQTT (control, globals) is less than the stage files downloaded
        assert tel["mqtt_payload_bytes_received"] < tel["cache_bytes_downloaded_total"], tel
    for tel in tels["mqtt"]:
        assert tel["mqtt_payload_bytes_received"] >= tel["cache_bytes_downloaded_total"] > 0
    settings_saved = json.loads((tmp_path / "nginx" / "fleet.json").read_text())
    assert settings_saved["artifact_origin"].startswith("https://localhost:")


def test_local_origin_dies_with_its_parent_even_by_sigkill(tmp_path, unused_port):
    """`devft run --fleet local:N --artifacts nginx` must not leave nginx behind (issue #27, hole 10 for the broker)."""
    import signal
    import subprocess
    import sys
    import time

    fleet = tmp_path / "fleet"
    fleet_init(fleet, hostnames=["localhost"], port=unused_port())
    code = ("import sys, time; from server_sdk.fleet.origin import NginxOrigin; "
            f"o = NginxOrigin({str(fleet)!r}, die_with_parent=True).start(); print(o.proc.pid, flush=True); "
            "time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        nginx_pid = int(parent.stdout.readline())
        os.kill(nginx_pid, 0)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(nginx_pid, 0)
            except ProcessLookupError:
                break
            # a zombie until someone reaps it: its parent is gone, so init does; /proc says whether it still runs
            try:
                if Path(f"/proc/{nginx_pid}/status").read_text().find("State:\tZ") >= 0:
                    break
            except OSError:
                break
            time.sleep(0.05)
        else:
            os.kill(nginx_pid, signal.SIGKILL)
            raise AssertionError("nginx outlived its parent by 10 s")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_origin_with_a_certificate_the_fleet_ca_did_not_sign_is_refused(served, unused_port):
    """A device trusts the origin's TLS certificate only if the fleet CA (or, for a public origin, a CA the system
    trusts) signed it: an origin impersonated with another fleet's certificate gets nothing, not even the login."""
    other = served["tmp"] / "other-fleet"
    fleet_init(other, hostnames=["localhost"], port=unused_port())
    creds = served["creds"]["dev-000"]
    cache = ArtifactCache(served["tmp"] / "cache-x")
    with pytest.raises(FetchError, match="signed neither by the fleet CA nor by a CA this system trusts"):
        cache.fetch_file_https(served["desc"].origin, served["desc"].files[0],
                               OriginLogin(creds.username, creds.password, str(other / "ca.pem")))
    assert served["auth"].allowed == 0 and not served["auth"].refused  # the login never reached the origin


def test_cli_origin_flags_fail_clearly(tmp_path, unused_port, capsys):
    from server_sdk.cli.main import main

    fleet = tmp_path / "fleet"
    fleet_init(fleet, hostnames=["localhost"], port=unused_port())
    base = ["serve", "--broker-url", f"mqtts://localhost:{unused_port()}", "--fleet-dir", str(fleet), "--runs-dir",
            str(tmp_path / "runs"), "--name", "r1", "-o", "model=tiny-random-L4"]
    assert main([*base, "--artifacts", "nginx"]) == 2
    assert "python -m server_sdk.fleet.origin run FLEET_DIR" in capsys.readouterr().err
    assert main([*base, "--artifacts", "https://localhost:8443/"]) == 2  # no --artifact-dir
    assert "--artifacts URL --artifact-dir DIR" in capsys.readouterr().err
    assert main([*base, "--artifacts", "http://localhost:8443/", "--artifact-dir", str(tmp_path)]) == 2
    assert "https://" in capsys.readouterr().err


NODE_FETCH = """
import {{ Fetcher }} from '{web}/src/fetch.js';
import {{ nodeRuntime }} from '{web}/src/runtime-node.js';
const cfg = JSON.parse(process.argv[2]);
const rt = await nodeRuntime({{ cacheDir: cfg.cache }});
const f = new Fetcher({{ bus: null, store: rt.store, sha256: rt.sha256, runId: 'run1', deviceId: cfg.username,
  httpGet: rt.httpGet, login: {{ username: cfg.username, password: cfg.password, ca: cfg.ca }}, maxRetries: 1,
  backoffS: 0.05 }});
try {{
  await f.fetchAll(cfg.descriptor);
  const sha = cfg.descriptor.files[0].sha256;
  console.log(JSON.stringify({{ ok: true, bytes: f.bytesDownloaded, sha: await rt.sha256(await rt.store.get(sha)) }}));
}} catch (e) {{
  console.log(JSON.stringify({{ ok: false, error: e.message }}));
}}
"""


def test_js_device_fetches_from_the_origin_with_the_same_checks(served):
    """web/src's Fetcher (the Node and browser device's) follows the descriptor's origin with the device's login:
    an enrolled device gets the verified file, a forged login and a device not in the run are refused, a tampered
    origin file is refused by the hash check."""
    import subprocess

    from server_sdk.fleet.web_gateway import WEB_DIR

    if shutil.which("node") is None or not (WEB_DIR / "node_modules" / "mqtt").is_dir():
        pytest.skip("the JS device needs node and web/node_modules (scripts/setup.sh)")
    script = served["tmp"] / "fetch.mjs"
    script.write_text(NODE_FETCH.format(web=WEB_DIR.as_uri()))
    ca = Path(served["creds"]["dev-000"].ca_file).read_text()

    def node(name: str, password: str | None = None, cache: str = "js") -> dict:
        creds = served["creds"][name]
        cfg = {"cache": str(served["tmp"] / f"{cache}-{name}"), "username": name,
               "password": password or creds.password, "ca": ca, "descriptor": served["desc"].to_json()}
        done = subprocess.run(["node", str(script), json.dumps(cfg)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    sha = served["desc"].files[0].sha256
    assert node("dev-000") == {"ok": True, "bytes": served["src"].stat().st_size, "sha": sha}
    assert "HTTP 401" in node("dev-001", password="forged")["error"]
    assert "HTTP 403" in node("dev-009")["error"]
    target = served["origin"].files / RUN / sha
    data = bytearray(target.read_bytes())
    data[10] ^= 1
    target.write_bytes(bytes(data))
    got = node("dev-001", cache="js-tampered")
    assert not got["ok"] and "refused the file served at" in got["error"] and "chunk 0" in got["error"]
    assert not (served["tmp"] / "js-tampered-dev-001" / "blobs" / sha).exists()


def test_browser_preflight_is_answered_without_a_login_and_files_only_with_one(served):
    """A browser page (another origin: the web gateway) sends a CORS preflight without credentials: nginx answers it
    itself, allowing the Authorization header; the GET still needs the device's login."""
    import http.client

    creds = served["creds"]["dev-000"]
    ctx = ssl.create_default_context(cafile=creds.ca_file)
    port = served["origin"].port
    path = f"/{RUN}/{served['desc'].files[0].sha256}"
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    conn.request("OPTIONS", path, headers={"Origin": "https://gateway.lan:8443", "Access-Control-Request-Method": "GET",
                                            "Access-Control-Request-Headers": "authorization"})
    res = conn.getresponse()
    res.read()
    assert res.status == 204 and "Authorization" in res.getheader("Access-Control-Allow-Headers", "")
    conn.request("GET", path, headers={"Origin": "https://gateway.lan:8443", "Authorization": login(creds).header})
    res = conn.getresponse()
    body = res.read()
    assert res.status == 200 and body == served["src"].read_bytes()
    assert res.getheader("Access-Control-Allow-Origin") == "*"
    assert res.getheader("Cross-Origin-Resource-Policy") == "cross-origin"  # the page is cross-origin isolated
    conn.request("GET", path, headers={"Origin": "https://gateway.lan:8443"})
    res = conn.getresponse()
    res.read()
    assert res.status == 401


def test_node_device_and_devft_edge_fetch_their_stages_from_nginx_in_a_real_fleet(tmp_path):
    """A devft-edge and a Node device (web/) in one fleet with the origin on: both download every stage file from
    nginx with their own login, and every update of both is accepted."""
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.engine.rounds import run
    from server_sdk.fleet.coordinator import fleet_executor_factory
    from server_sdk.fleet.local_fleet import LocalFleet
    from server_sdk.fleet.settings import FleetSettings
    from server_sdk.fleet.web_gateway import WEB_DIR
    from tests.test_fleet import events, fleet_cfg
    from tests.test_web_device import start_node_device

    if shutil.which("node") is None or not (WEB_DIR / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("the JS device needs node and web/node_modules (scripts/setup.sh)")
    run_dir = tmp_path / "mixed"
    cfg = fleet_cfg(num_clients=2, clients_per_round=2, rounds_per_stage=[1, 1])
    with LocalFleet(run_dir / "fleet", 2) as fleet:
        fleet.start_broker()
        fleet.start_origin()
        settings = fleet.origin_settings(FleetSettings(round_timeout_s=120, artifact_bytes_per_s=None))

        def start_devices(executor) -> None:
            fleet.start_device("dev-000", run_dir / "data" / "client_000.jsonl", executor.run_id)
            start_node_device(fleet, "dev-001", run_dir / "data" / "client_001.jsonl", executor.run_id)

        factory = fleet_executor_factory(run_dir, fleet.server, settings, host="localhost", on_ready=start_devices)
        run(cfg, run_dir, base=tiny_random_model(n_layers=4, hidden=32, seed=0), progress=False,
            executor_factory=factory)
        codes = fleet.wait_devices(60)
    assert codes == {"dev-000": 0, "dev-001": 0}, codes
    accepted = sorted(e["device"] for e in events(run_dir) if e["event"] == "accepted")
    assert accepted == ["dev-000", "dev-000", "dev-001", "dev-001"]
    log_lines = (origin_runtime_dir(run_dir / "fleet") / "access.log").read_text().splitlines()
    got = {line.split()[1] for line in log_lines if '"GET /mixed/' in line and " 200 " in line}
    assert got == {"dev-000", "dev-001"}


def test_origin_only_coordinator_answers_no_mqtt_chunk_request(fleet, clients, tmp_path):
    """`--no-mqtt-chunks`: the coordinator's control names the origin, an enrolled device downloads there, and a
    chunk request over MQTT (the way around the origin's per-device check) gets nothing."""
    from dataclasses import replace as dc_replace

    from server_sdk.config import RunConfig
    from server_sdk.fleet.broker import BrokerProcess
    from server_sdk.fleet.coordinator import FleetExecutor
    from server_sdk.fleet.settings import FleetSettings

    broker = BrokerProcess(fleet.dir, fleet.port).start()
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    (art / "w.bin").write_bytes(os.urandom(700_000))
    with NginxOrigin(fleet.dir) as origin:
        settings = FleetSettings(run_id="run1", device_names={"0": "dev1", "1": "dev2"}, artifact_bytes_per_s=None,
                                 artifact_origin=origin.url, artifact_dir=str(origin.files),
                                 artifact_passwd=str(fleet.dir / "passwd"), artifact_chunks=False)
        ex = FleetExecutor(RunConfig(num_clients=2, clients_per_round=2), tmp_path / "run", fleet.server, [1],
                           settings, host="localhost")
        try:
            ex.serve_stage(0, {"onnx": art})
            desc = ex._artifacts["onnx"]
            assert desc.origin == origin.url + "run1/"
            device = clients(fleet.devices["dev1"])
            got = ArtifactCache(tmp_path / "c1").fetch(device, "run1", "dev1", desc)
            assert got["stage0/w.bin"].read_bytes() == (art / "w.bin").read_bytes()
            entry = next(f for f in desc.files if f.path == "stage0/w.bin")
            with pytest.raises(FetchError, match="no chunk arrived"):
                ArtifactCache(tmp_path / "c2").fetch_file(device, "run1", "dev1", entry, chunk_timeout_s=1.0,
                                                          max_retries=1)
            assert ex.artifacts.chunks_sent == 0
            with pytest.raises(FetchError, match="HTTP 403"):  # dev3 is a fleet device, not one of the run's
                intruder = add_device(fleet.dir, "dev3")
                ArtifactCache(tmp_path / "c3").fetch(MqttClient(settings_for(intruder, port=fleet.port)), "run1",
                                                     "dev3", dc_replace(desc, files=(entry,)))
        finally:
            ex.close()
            broker.stop()
