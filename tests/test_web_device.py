"""The JavaScript device (web/) against the contract's test vectors and in a real fleet.

The vectors run through the JS sampler, optimisers, frames, artifact ids and the tiny graph on
onnxruntime-node (bit for bit: same x86_64 numerics as devft-edge) and on onnxruntime-web's WASM
build (within 1e-5). Needs `scripts/setup.sh` (Node.js and `npm ci` in web/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import protocol as P

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"

needs_web = pytest.mark.skipif(shutil.which("node") is None or not (WEB / "node_modules").is_dir(),
                               reason="the web device needs Node.js and web/node_modules: run scripts/setup.sh")


@needs_web
@pytest.mark.parametrize("engine", ["node", "web"])
def test_js_device_reproduces_the_test_vectors(engine):
    out = subprocess.run(["node", "test/vectors.mjs", "--engine", engine], cwd=WEB, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"all checks passed ({engine})" in out.stdout
    if engine == "node":  # bit for bit where the vectors' runtime numerics are ours
        assert "train_step gradients bit for bit" in out.stdout and "delta bit for bit" in out.stdout


@needs_web
def test_js_device_refuses_a_bad_micro_batch_like_devft_edge():
    """web/src/protocol.js reads hyperparams.micro_batch by the rule edge_runtime.protocol applies: a whole number
    in [1, batch_size], absent meaning whole batches."""
    sha = "0" * 64
    files = (P.FileEntry(path="s/train.onnx", sha256=sha, size=1, chunk_size=4, chunks=(sha,)),)
    hp = P.TrainSettings(lr=1e-3, local_steps=1, batch_size=4, trainable=("a",), seeds={"dev-000": 1}, session="s")
    ctrl = json.loads(P.encode_control(P.ControlMessage("run1", 0, 0, "train", ("dev-000",), None, hp,
                                                        {"onnx": P.ArtifactDescriptor("a1", files)})))
    cases = {"absent": None, "one": 1, "four": 4, "zero": 0, "five": 5, "half": 1.5, "text": "2"}
    script = ("import { decodeControl } from './src/protocol.js';\n"
              "const base = JSON.parse(process.argv[1]), cases = JSON.parse(process.argv[2]), out = {};\n"
              "for (const [name, mb] of Object.entries(cases)) {\n"
              "  const msg = structuredClone(base); if (mb !== null) msg.hyperparams.micro_batch = mb;\n"
              "  try { decodeControl(new TextEncoder().encode(JSON.stringify(msg))); out[name] = 'ok'; }\n"
              "  catch (e) { out[name] = e.message; } }\n"
              "console.log(JSON.stringify(out));\n")
    run = subprocess.run(["node", "--input-type=module", "-e", script, json.dumps(ctrl), json.dumps(cases)], cwd=WEB,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    for name, mb in cases.items():
        msg = {**ctrl, "hyperparams": {**ctrl["hyperparams"], **({} if mb is None else {"micro_batch": mb})}}
        try:
            P.decode_control(json.dumps(msg).encode())
            python = "ok"
        except P.ProtocolError:
            python = "refused"
        assert (got[name] == "ok") == (python == "ok"), (name, got[name])
        if python != "ok":
            assert "micro_batch must be a whole number in [1, batch_size=4]" in got[name], got[name]


# --------------------------------------------------------------------------- a real fleet with Node devices


def node_device_cmd(fleet, name: str, shard: Path, run_id: str, engine: str = "node", *options: str) -> list[str]:
    ddir = fleet.device_dir(name)
    return ["node", str(WEB / "node-device.mjs"), "--credentials", str(fleet.device_credentials(name)),
            "--data", str(shard.resolve()), "--cache", str(ddir / "cache"), "--run", run_id, "--host", "localhost",
            "--engine", engine, "--record", str(ddir / "record"), *options]


def start_node_device(fleet, name: str, shard: Path, run_id: str, engine: str = "node", *options: str) -> subprocess.Popen:
    """A Node device in a LocalFleet's place for `name` (its login, its shard; `options`: more node-device.mjs
    flags), stopped with the fleet."""
    ddir = fleet.device_dir(name)
    ddir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DEVFT_EXIT_WITH_PARENT": str(os.getpid())}
    with open(ddir / "device.log", "ab") as logf:
        proc = subprocess.Popen(node_device_cmd(fleet, name, shard, run_id, engine, *options), stdout=logf,
                                stderr=subprocess.STDOUT, env=env, cwd=str(ddir))
    fleet.devices[name] = proc
    return proc


def replay_round(record: Path, art_dir: Path, shard: Path, device: str) -> tuple[dict, list[float], P.UpdateMessage]:
    """Recompute a recorded round with devft-edge's own code: its delta and step losses, and the update sent."""
    from tokenizers import Tokenizer

    from edge_runtime.backends import open_trainer
    from edge_runtime.batching import IGNORE_INDEX
    from edge_runtime.client import encode, pad_id, read_shard, round_batches

    rec = json.loads(record.with_suffix(".json").read_text())
    ctrl = P.decode_control(json.dumps(rec["control"]).encode())
    glob = P.decode_global(record.with_suffix(".global").read_bytes())
    update = P.decode_update(record.with_suffix(".update").read_bytes())
    hp = ctrl.hyperparams
    trainer = open_trainer("onnx", art_dir, lr=hp.lr, threads=1, trainable=hp.trainable, optimizer=hp.optimizer,
                           micro_batch=hp.rows_per_run)
    trainer.set_lora({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in glob.tensors.items()})
    received = trainer.get_lora()
    man = trainer.manifest
    encoded = encode(Tokenizer.from_file(str(art_dir / man.tokenizer_file)), read_shard(shard), man.seq_len)
    losses = [trainer.train_step(ids, labels) for ids, labels, _ in
              round_batches(encoded, hp, device, pad_id(man.model_config)) if (labels[:, 1:] != IGNORE_INDEX).any()]
    trained = trainer.get_lora()
    return {k: (trained[k] - received[k]).astype(np.float32) for k in hp.trainable}, losses, update


@needs_web
@pytest.mark.parametrize("micro_batch", [None, 1])
def test_node_devices_train_in_a_real_fleet_bit_identical_to_devft_edge(tmp_path, micro_batch):
    """2 devft-edge and 2 Node devices, real Mosquitto (TLS, passwords, ACL), tiny model, two stages: every
    Node update is accepted, and each equals, bit for bit, what devft-edge's code computes from the same
    global adapter, seed and shard (and the Node tokeniser gives Python's ids on every shard line); also with
    the run's batches of 2 trained in micro-batches of 1 row (hyperparams.micro_batch)."""
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.settings import FleetSettings
    from tests.test_fleet import FleetRun, accepted_by_round, events, fleet_cfg

    node_names = ("dev-002", "dev-003")

    class MixedRun(FleetRun):
        def start_device(self, name: str, code: str | None = None):
            if name in node_names:
                return start_node_device(self.fleet, name, self.shards[name], self.run_dir.name)
            return super().start_device(name, code)

    cfg = fleet_cfg(num_clients=4, clients_per_round=4, micro_batch=micro_batch)
    job = MixedRun(tmp_path / "mixed", cfg, tiny_random_model(n_layers=4, hidden=32, seed=0), 4,
                   FleetSettings(round_timeout_s=120))
    report = job.finish()
    evs = events(job.run_dir)
    rounds = accepted_by_round(job.run_dir)
    assert len(rounds) == 3 and all(sorted(v) == ["dev-000", "dev-001", "dev-002", "dev-003"] for v in rounds.values())
    assert not [e for e in evs if e["event"] == "rejected"]
    assert job.codes == {name: 0 for name in ("dev-000", "dev-001", "dev-002", "dev-003")}, job.codes
    recs = [r for r in report["records"] if r["stage"] >= 0]
    for rec in recs:  # the Node devices' telemetry under the keys the coordinator and reports read
        for name in node_names:
            tel = rec["telemetry"][name]
            assert tel["steps"] == cfg.local_steps and tel["peak_rss_bytes"] > 0 and tel["train_s"] > 0
            assert tel["step_latency_s"]["p50"] > 0 and tel["backend"] == "onnx" and tel["stage_download_bytes"] >= 0

    replayed = 0
    for name in node_names:
        ddir = job.fleet.device_dir(name)
        shard = job.shards[name]
        for record in sorted((ddir / "record").glob("round-*.json")):
            ctrl = json.loads(record.read_text())["control"]
            assert ctrl["hyperparams"].get("micro_batch") == micro_batch and cfg.batch_size == 2
            art_dir = ddir / "cache" / "stages" / ctrl["artifacts"]["onnx"]["artifact_id"]
            delta, losses, update = replay_round(record.with_suffix(""), art_dir, shard, name)
            assert sorted(update.tensors) == sorted(delta)
            for k, want in delta.items():
                assert update.tensors[k].dtype == np.float32 and update.tensors[k].tobytes() == want.tobytes(), (name, k)
            assert update.metrics["train_loss"] == float(np.mean(losses))
            replayed += 1
        # the same token ids as Python on every line of the shard
        art_dir = next((ddir / "cache" / "stages").iterdir())
        man = json.loads((art_dir / "manifest.json").read_text())
        out = subprocess.run(["node", "test/tokenize.mjs", str(art_dir / man["tokenizer_file"]), str(shard),
                              str(man["seq_len"])], cwd=WEB, capture_output=True, text=True, timeout=120, check=True)
        from tokenizers import Tokenizer

        from edge_runtime.client import encode, read_shard

        want = encode(Tokenizer.from_file(str(art_dir / man["tokenizer_file"])), read_shard(shard), man["seq_len"])
        assert json.loads(out.stdout) == [[list(i), list(lab)] for i, lab in want]
    assert replayed == 6


# --------------------------------------------------------------------------- browsers (headless Chromium)

needs_browser = pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("websockify") is None,
                                   reason="browser devices need Debian's chromium and websockify: run scripts/setup.sh")


def layout(descriptor: dict, blobs: Path, dest: Path) -> Path:
    """The artifact directory of a descriptor, from blobs named by sha256 (each checked): the manifest's dir."""
    import hashlib

    for f in descriptor["files"]:
        data = (blobs / f["sha256"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        (dest / f["path"]).parent.mkdir(parents=True, exist_ok=True)
        (dest / f["path"]).write_bytes(data)
    return next(dest.glob("**/manifest.json")).parent


@needs_web
@needs_browser
def test_browser_devices_train_in_a_real_fleet_within_1e5_of_native(tmp_path):
    """2 devft-edge devices and 2 pages in headless Chromium (onnxruntime-web, mqtt.js over WSS through
    websockify to Mosquitto's TLS listener, the page over HTTPS with COOP/COEP): every browser update is
    accepted, and each browser round's losses are within 1e-5 of devft-edge's code replaying its inputs."""
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.settings import FleetSettings
    from tests.test_fleet import accepted_by_round, events, fleet_cfg
    from tests.web_helpers import DriverRun, browser_devices

    browser_names = ("dev-002", "dev-003")
    out = tmp_path / "browsers"
    cfg = fleet_cfg(num_clients=4, clients_per_round=4)
    # after `done` the driver copies each round's files out of the pages for the replay
    job = DriverRun(tmp_path / "web", cfg, tiny_random_model(n_layers=4, hidden=32, seed=0), 4,
                    FleetSettings(round_timeout_s=180), driven=browser_names,
                    command=browser_devices(out, 500, "--keep-blobs"), cwd=WEB, log=tmp_path / "browsers.log",
                    wait_s=300, gateway=True)
    report = job.finish(900)
    logs = "".join((out / b / "log.txt").read_text() for b in browser_names if (out / b / "log.txt").exists())
    rounds = accepted_by_round(job.run_dir)
    assert len(rounds) == 3 and all(sorted(v) == ["dev-000", "dev-001", "dev-002", "dev-003"] for v in rounds.values()), \
        (rounds, logs)
    assert not [e for e in events(job.run_dir) if e["event"] == "rejected"]
    assert job.codes["browsers"] == 0, logs
    assert "crossOriginIsolated: true" in logs
    for rec in (r for r in report["records"] if r["stage"] >= 0):
        for name in browser_names:
            tel = rec["telemetry"][name]
            assert tel["steps"] == cfg.local_steps and tel["backend"] == "onnx" and tel["train_s"] > 0
            assert tel["runtime"].startswith("onnxruntime-web")

    replayed = 0
    for name in browser_names:
        for record in sorted((out / name).glob("round-*.json")):
            ctrl = json.loads(record.read_text())["control"]
            art_dir = layout(ctrl["artifacts"]["onnx"], out / name / "blobs", tmp_path / "replay" / record.stem / name)
            delta, losses, update = replay_round(record.with_suffix(""), art_dir, job.shards[name], name)
            browser_losses = json.loads(record.read_text())["losses"]
            assert len(browser_losses) == len(losses) and np.allclose(browser_losses, losses, rtol=0, atol=1e-5)
            assert abs(update.metrics["train_loss"] - float(np.mean(losses))) < 1e-5
            # AdamW divides by sqrt(v) + eps: at a coordinate whose gradient is near eps, WASM's last-bit gradient
            # differences (within 1e-7, test_js_device_reproduces_the_test_vectors) become step differences of up
            # to lr. So each delta is compared as a whole (relative L2 within 1e-3), and element-wise within 1e-5
            # everywhere but at one coordinate or 0.5% of them, whichever is more.
            for k, want in delta.items():
                diff = np.abs(update.tensors[k] - want)
                assert np.linalg.norm(diff) <= 1e-3 * np.linalg.norm(want), (name, k, float(diff.max()))
                assert (diff >= 1e-5).sum() <= max(1, 0.005 * diff.size), (name, k, int((diff >= 1e-5).sum()), diff.size)
            replayed += 1
    assert replayed == 6


@needs_web
@needs_browser
def test_gateway_keeps_logins_and_the_acl_and_serves_only_the_page(tmp_path):
    """MQTT over WSS reaches Mosquitto's own login and ACL (a wrong password is refused, another device's
    update topic gets PUBACK 0x87), and the HTTPS server sends the cross-origin isolation headers and
    nothing outside its allowlist (no fleet keys, no path escapes, no other packages)."""
    import http.client
    import ssl

    from server_sdk.fleet.local_fleet import LocalFleet
    from server_sdk.fleet.web_gateway import WebGateway

    with LocalFleet(tmp_path / "fleet", 2, run_id="r") as fleet:  # devices publish only under registered runs
        fleet.start_broker()
        with WebGateway(fleet.dir, fleet.port) as gw:
            out = subprocess.run(["node", "test/gateway-checks.mjs", "--wss", gw.ws_url, "--credentials",
                                  str(fleet.device_credentials("dev-000")), "--other", "dev-001", "--run", "r"],
                                 cwd=WEB, capture_output=True, text=True, timeout=120)
            checks = json.loads(out.stdout)
            assert checks["wrong_password"] == {"connected": False, "error": "Connection refused: Not authorized",
                                                "code": 135}
            assert checks["right_password"]["connected"] is True
            assert checks["other_update"]["code"] == 0x87  # Not authorized: the broker's ACL, through the gateway
            assert checks["own_fetch"] == {"ok": True, "reasonCode": 0}

            ctx = ssl.create_default_context(cafile=str(fleet.dir / "ca.pem"))

            def get(path: str) -> tuple[int, dict, bytes]:
                conn = http.client.HTTPSConnection("localhost", gw.https_port, context=ctx, timeout=10)
                conn.request("GET", path)
                resp = conn.getresponse()
                return resp.status, dict(resp.getheaders()), resp.read()

            status, headers, body = get("/app/")
            assert status == 200 and b"devft device" in body
            assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            status, headers, _ = get("/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm")
            assert status == 200 and headers["Content-Type"] == "application/wasm"
            assert json.loads(get("/app/config.json")[2]) == {"mqtt_ws_url": f"wss://localhost:{gw.ws_port}/"}
            for path in ("/app/../../server.key", "/src/../../fleet/server.key", "/app/%2e%2e/package.json",
                         "/node_modules/onnxruntime-node/package.json", "/server.key", "/credentials/dev-000.json"):
                assert get(path)[0] == 404, path


@needs_web
@needs_browser
def test_a_tab_closed_mid_round_is_offline_through_its_will_and_the_run_goes_on(tmp_path):
    """A browser device whose tab closes while it trains: the WebSocket closes, the gateway drops its broker
    connection, Mosquitto publishes the page's will (`offline`), and the round closes on the quorum of the
    three devft-edge devices instead of waiting for the dead tab; the run finishes."""
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.settings import FleetSettings
    from tests.test_fleet import events, fleet_cfg
    from tests.web_helpers import DriverRun, browser_devices

    out = tmp_path / "browsers"
    cfg = fleet_cfg(num_clients=4, clients_per_round=4, stages=[4], rounds_per_stage=[2])
    job = DriverRun(tmp_path / "tab", cfg, tiny_random_model(n_layers=4, hidden=32, seed=0), 4,
                    FleetSettings(round_timeout_s=300), driven=("dev-003",),
                    command=browser_devices(out, 300, "--close", "dev-003"), cwd=WEB, log=tmp_path / "browsers.log",
                    gateway=True)
    job.finish(900)
    evs = events(job.run_dir)
    ends = [e for e in evs if e["event"] == "round_end"]
    assert (out / "dev-003" / "closed.json").exists(), (tmp_path / "browsers.log").read_text()
    assert len(ends) == 2 and all(e["accepted"] == ["dev-000", "dev-001", "dev-002"] for e in ends)
    assert ends[0]["offline"] == ["dev-003"] and ends[0]["missing"] == ["dev-003"]
    went_offline = [e for e in evs if e["event"] == "status" and e["device"] == "dev-003" and e["state"] == "offline"]
    assert went_offline, [e for e in evs if e["event"] == "status"]
    closed = json.loads((out / "dev-003" / "closed.json").read_text())["closed_unix"]
    print(f"the will arrived {went_offline[0]['t'] - closed:.2f} s and round 0 closed {ends[0]['t'] - closed:.2f} s "
          "after the tab closed")


@needs_web
@needs_browser
def test_a_join_link_enrols_a_browser_once_and_never_shows_up_in_a_log(tmp_path, caplog):
    """`web_gateway join` prints a link whose token (in the fragment) a page redeems once for its device's
    credentials, run and shard, then connects as that device; the same link again, a forged, a revoked and
    an expired one are refused with a clear message in the page (and to a plain POST); the token is in no
    log and not in the fleet's files, even when a hand-made request carries it in its request line."""
    import http.client
    import logging
    import ssl

    from server_sdk.fleet.local_fleet import LocalFleet
    from server_sdk.fleet.web_gateway import WebGateway, spki_sha256
    from server_sdk.fleet.web_join import issue, revoke

    caplog.set_level(logging.DEBUG)
    shard = tmp_path / "client_001.jsonl"
    shard.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    with LocalFleet(tmp_path / "fleet", 2, run_id="r") as fleet:  # devices publish only under registered runs
        fleet.start_broker()
        with WebGateway(fleet.dir, fleet.port) as gw:
            token = issue(fleet.dir, "dev-001", "joinrun", shard)
            revoked = issue(fleet.dir, "dev-000", "joinrun", shard)
            assert revoke(fleet.dir, "dev-000") == 1
            expired = issue(fleet.dir, "dev-000", "joinrun", shard, ttl_s=-1)
            links = [token, token, "x" * 43, revoked, expired]
            cmd = ["node", "test/join.mjs", "--spki", spki_sha256(fleet.dir / "server.pem")]
            for t in links:
                cmd += ["--url", f"{gw.page_url}#join={t}"]
            out = subprocess.run(cmd, cwd=WEB, capture_output=True, text=True, timeout=240)
            page, *refused = json.loads(out.stdout)
            assert page["error"] is None and page["enrolled"] == "dev-001" and page["stored_user"] == "dev-001", page
            assert page["status"] == "hello"  # connected through the gateway with the redeemed password
            assert token not in page["address"]  # the page dropped the token from its address and history
            for got, why in zip(refused, ["already used", "not valid", "revoked", "expired"], strict=True):
                assert got["status"] is None and got["stored_user"] is None, got  # no device, nothing kept
                assert got["page_text"].startswith("cannot join: this join link") and why in got["page_text"], got
                assert "ask the fleet's operator for" in got["page_text"], got

            ctx = ssl.create_default_context(cafile=str(fleet.dir / "ca.pem"))

            def request(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
                conn = http.client.HTTPSConnection("localhost", gw.https_port, context=ctx, timeout=10)
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                return resp.status, resp.read()

            def post(body: bytes) -> tuple[int, dict]:
                status, answer = request("POST", "/api/join", body)
                return status, json.loads(answer)

            status, answer = post(json.dumps({"token": token}).encode())
            assert status == 410 and "already used" in answer["error"]
            status, answer = post(json.dumps({"token": "x" * 43}).encode())
            assert status == 403 and "not valid" in answer["error"]
            assert post(b"not json")[0] == 400
            second = issue(fleet.dir, "dev-001", "joinrun", shard)
            assert revoke(fleet.dir, "dev-001") == 1
            status, answer = post(json.dumps({"token": second}).encode())
            assert status == 410 and "revoked" in answer["error"]
            # a token pasted into a request line (not how the page sends it) is cut out of the access line
            assert request("GET", f"/app/?join={token}")[0] == 200
            assert request("GET", f"/app/index.html#join={token}")[0] == 200
            assert "GET /app/?..." in caplog.text
        for path in [*fleet.dir.rglob("*"), *tmp_path.rglob("*.log")]:
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path
        assert token not in caplog.text


@needs_web
@needs_browser
def test_a_page_opened_over_plain_http_says_it_needs_https(tmp_path):
    """Opened over plain HTTP from a host that is not localhost, the page is no secure context (no
    crypto.subtle, Cache API or WASM threads): it says so and what to do instead of failing later."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(WEB))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        out = subprocess.run(["node", "test/join.mjs", "--url", f"http://phone.devft.test:{port}/app/index.html",
                              "--wait-s", "20", "--chromium-arg=--host-resolver-rules=MAP phone.devft.test 127.0.0.1"],
                             cwd=WEB, capture_output=True, text=True, timeout=120)
    finally:
        httpd.shutdown()
        httpd.server_close()
    page = json.loads(out.stdout)[0]
    assert page["status"] is None and "must be opened over HTTPS" in page["error"], page
    assert page["page_text"].startswith("cannot train here: this page must be opened over HTTPS"), page


@needs_web
@needs_browser
def test_a_browser_without_webassembly_says_so_and_does_not_join(tmp_path):
    """A browser with WebAssembly turned off (V8 without its JIT, as in Lockdown Mode or a JIT-less security
    setting: `--js-flags=--jitless`) opening a join link: the page says it needs WebAssembly and what to do,
    and does not redeem the link (it still enrols a capable browser afterwards)."""
    import http.client
    import ssl

    from server_sdk.fleet.local_fleet import LocalFleet
    from server_sdk.fleet.web_gateway import WebGateway, spki_sha256
    from server_sdk.fleet.web_join import issue

    shard = tmp_path / "client_000.jsonl"
    shard.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    with LocalFleet(tmp_path / "fleet", 1, run_id="r") as fleet:
        with WebGateway(fleet.dir, fleet.port) as gw:
            token = issue(fleet.dir, "dev-000", "r", shard)
            out = subprocess.run(["node", "test/join.mjs", "--url", f"{gw.page_url}#join={token}", "--spki",
                                  spki_sha256(fleet.dir / "server.pem"), "--wait-s", "20",
                                  "--chromium-arg=--js-flags=--jitless"], cwd=WEB, capture_output=True, text=True,
                                 timeout=120)
            page = json.loads(out.stdout)[0]
            assert page["wasm"] == "undefined", page  # the browser really has none
            assert page["page_text"].startswith("cannot train here: this browser has no WebAssembly"), page
            assert "use another browser" in page["page_text"] and page["enrolled"] is None, page
            assert page["status"] is None and page["stored_user"] is None, page
            ctx = ssl.create_default_context(cafile=str(fleet.dir / "ca.pem"))
            conn = http.client.HTTPSConnection("localhost", gw.https_port, context=ctx, timeout=10)
            conn.request("POST", "/api/join", body=json.dumps({"token": token}), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["credentials"]["username"] == "dev-000"


@needs_web
@needs_browser
def test_an_artifact_origin_that_stops_answering_is_abandoned_not_waited_for(tmp_path):
    """fetch() in a browser never gives up: an origin that accepts a GET and then says nothing (before its headers,
    or halfway through its body) froze the page's device loop for good. The browser runtime's GET (real Chromium,
    the gateway's page and code) abandons it after its stall limit (2 s here) with an error naming the URL, which
    fetch.js retries; a GET that answers is unaffected."""
    import http.server
    import ssl
    import threading

    from server_sdk.fleet.local_fleet import LocalFleet
    from server_sdk.fleet.web_gateway import WebGateway, spki_sha256

    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _cors(self):
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", "Authorization")

        def do_OPTIONS(self):  # the CORS preflight of a GET with an Authorization header
            self.send_response(204)
            self._cors()
            self.end_headers()

        def do_GET(self):
            if self.path == "/silent":  # never answers
                release.wait(60)
                return
            self.send_response(200)
            self._cors()
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * (1000 if self.path == "/ok" else 10))
            self.wfile.flush()
            release.wait(60)  # /half: ten bytes, then nothing

    with LocalFleet(tmp_path / "fleet", 1, run_id="r") as fleet:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(fleet.dir / "server.pem", fleet.dir / "server.key")
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"https://localhost:{httpd.server_address[1]}"
        try:
            with WebGateway(fleet.dir, fleet.port) as gw:
                out = subprocess.run(["node", "test/http-stall.mjs", "--page", gw.page_url, "--spki",
                                      spki_sha256(fleet.dir / "server.pem"), "--stall-s", "2",
                                      "--get", f"ok={base}/ok", "--get", f"silent={base}/silent",
                                      "--get", f"half={base}/half"], cwd=WEB, capture_output=True, text=True, timeout=120)
        finally:
            release.set()
            httpd.shutdown()
            httpd.server_close()
    got = json.loads(out.stdout)
    assert got["ok"]["ok"] and got["ok"]["status"] == 200 and got["ok"]["bytes"] == 1000, got
    for name in ("silent", "half"):
        assert not got[name]["ok"] and f"no bytes from {base}/{name} for 2 s" in got[name]["error"], got
        assert 2 <= got[name]["seconds"] < 10, got  # abandoned at the limit, not at the server's 60 s


@needs_web
@needs_browser
def test_a_full_storage_quota_is_shown_and_loses_nothing(tmp_path):
    """A browser device whose site storage is capped below the stage's files (DevTools
    Storage.overrideQuotaForOrigin, 4 kB): fetching the stage fails to store, the page shows the quota error
    and what to do, the device gives the round up but stays in the fleet, the round closes on the two
    devft-edge devices at its deadline, the run finishes, and the page ends cleanly with the run."""
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.settings import FleetSettings
    from tests.test_fleet import accepted_by_round, events, fleet_cfg
    from tests.web_helpers import DriverRun, browser_devices

    out = tmp_path / "browsers"
    cfg = fleet_cfg(num_clients=3, clients_per_round=3, stages=[4], rounds_per_stage=[1])
    job = DriverRun(tmp_path / "quota", cfg, tiny_random_model(n_layers=4, hidden=32, seed=0), 3,
                    FleetSettings(round_timeout_s=40), driven=("dev-002",),
                    command=browser_devices(out, 300, "--quota", "4096"), cwd=WEB, log=tmp_path / "browsers.log",
                    wait_s=120, gateway=True)
    report = job.finish(600)
    log = (out / "dev-002" / "log.txt").read_text() if (out / "dev-002" / "log.txt").exists() else \
        (tmp_path / "browsers.log").read_text()
    page = json.loads((out / "dev-002" / "abandoned.json").read_text())
    assert page["abandoned"] and all("storage quota is exhausted" in a["error"] for a in page["abandoned"]), page
    assert "free space for this site or use a smaller stage" in page["abandoned"][0]["error"]
    assert job.codes["browsers"] == 0 and "done: true error: null" in log, log  # it stayed and ended with the run
    ends = [e for e in events(job.run_dir) if e["event"] == "round_end"]
    assert len(ends) == 1 and ends[0]["accepted"] == ["dev-000", "dev-001"] and ends[0]["missing"] == ["dev-002"], ends
    assert {k: sorted(v) for k, v in accepted_by_round(job.run_dir).items()} == {0: ["dev-000", "dev-001"]}
    assert [r for r in report["records"] if r["stage"] >= 0][0]["telemetry"].keys() == {"dev-000", "dev-001"}
    assert (job.run_dir / "adapter").is_dir()  # the run's result is written: nothing aggregated was lost


# --------------------------------------------------------------------------- the contract's conformance kit

NODE_ARGS = ["--credentials", "{credentials}", "--data", "{data}", "--cache", "{cache}", "--run", "{run}"]
PARTS = ["hello", "ready", "train", "tampered", "stage", "ffa-sgd", "will", "done", "schema"]


@needs_web
@pytest.mark.parametrize("engine, tolerance", [("node", None), ("web", "1e-5")])
def test_the_js_device_passes_devft_conformance(tmp_path, capsys, engine, tolerance):
    """`devft conformance` (the contract's scripted coordinator; server_sdk/fleet/conformance.py, from the contract
    branch) passes the Node device on every part: bit for bit on onnxruntime-node, within 1e-5 on
    onnxruntime-web's WASM."""
    if not (REPO / "server_sdk" / "conformance.py").is_file():
        pytest.skip("the conformance kit (server_sdk/fleet/conformance.py) comes with the contract branch")
    from server_sdk.cli.main import main

    extra = ["--tolerance", tolerance] if tolerance else []
    rc = main(["conformance", *extra, "--keep", str(tmp_path), "--", "node", str(WEB / "node-device.mjs"),
               "--engine", engine, *NODE_ARGS])
    out = capsys.readouterr().out
    got = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith(("PASS ", "FAIL "))}
    assert list(got) == PARTS and all(v.startswith("PASS") for v in got.values()), got
    if tolerance is None:
        assert "bit for bit" in got["train"] and "bit for bit" in got["ffa-sgd"]
    assert rc == 0
