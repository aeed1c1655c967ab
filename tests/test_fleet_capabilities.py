"""Capability-aware serving (issue 22, item 4): what a device declares in its hello, checked; sampled by memory.

A device declares `platform`, `runtime`, `ram_mb` (the memory it offers training) and `cores` in every status's
`info`. The coordinator refuses a bad declaration and a budget that fits no stage of the run (the device is
named in the control message's `refused` and stops), samples a device only for stages whose memory need
(export/memory.py: the peak predicted from shapes, or a measured one) fits, fails a stage no connected device fits
with an error naming the stage, its need and the largest budget seen, and the report shows what each device
declared and which stages it trained. Real Mosquitto (TLS, passwords, ACL) throughout; the last test is a
whole local fleet run of devft-edge processes on the tiny model.
"""

from __future__ import annotations

import json
import queue
import shutil
import time
from pathlib import Path

import pytest

from benchmarks.device import VARIANTS
from edge_runtime import protocol as P
from export.memory import MIB, predicted_peak_mb
from server_sdk.config import LoraSettings, RunConfig
from server_sdk.fleet.broker import BrokerProcess, Credentials, add_device
from server_sdk.fleet.coordinator import FleetExecutor
from server_sdk.fleet.registry import StageDoesNotFit
from server_sdk.fleet.settings import FleetSettings
from tests.test_fleet import RUN, FleetRun, events, fleet_cfg, wait_for

pytest_plugins = ("tests.broker_fixtures",)

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, vocab_size=49152, num_attention_heads=9,
                    num_key_value_heads=3)
TINY = dict(hidden_size=32, intermediate_size=64, vocab_size=49152, num_attention_heads=4, num_key_value_heads=2)
GOOD = {"platform": "linux-aarch64", "runtime": "devft-edge (python 3.11.2)", "ram_mb": 3800, "cores": 4}


# --------------------------------------------------------------------------- the need and the declaration


def test_predicted_peak_lies_above_every_measured_peak_of_the_portable_format():
    """The margin (1.25 x floor + 192 MiB) is set from benchmarks/results/device.json: it must cover each measured
    portable-format peak there (4, 8 and 30 layers, fp32/int8/int4, activations kept or recomputed), and not by
    more than 2x."""
    rows = [r for r in json.loads((ROOT / "benchmarks" / "results" / "device.json").read_text())["rows"]
            if r["backend"].startswith("onnx") and r.get("peak_rss_bytes")]
    assert {r["stage_layers"] for r in rows} >= {4, 30} and len(rows) >= 6
    for r in rows:
        need = predicted_peak_mb(SMOLLM2_135M, r["stage_layers"], batch=r["batch"], seq=r["seq"],
                                 graph=VARIANTS[r["backend"]],  # the weights' scheme, activations kept or recomputed
                                 micro_batch=r.get("micro_batch"))  # micro-batched rows: activations of that many rows
        peak_mb = r["peak_rss_bytes"] / MIB
        assert peak_mb <= need["need_mb"] <= 2 * peak_mb, (r["backend"], r["stage_layers"], peak_mb, need)
    deeper = [predicted_peak_mb(TINY, n, batch=4, seq=128, rank=2)["need_mb"] for n in (2, 4)]
    assert deeper[1] - deeper[0] >= 4  # the tiny model's stages below differ in need by whole MiB


def test_micro_batches_lower_the_predicted_need_by_the_activations_of_the_rows_left_out():
    whole = predicted_peak_mb(SMOLLM2_135M, 30, batch=4, seq=128)
    assert predicted_peak_mb(SMOLLM2_135M, 30, batch=4, seq=128, micro_batch=4) == whole
    one = predicted_peak_mb(SMOLLM2_135M, 30, batch=4, seq=128, micro_batch=1)
    assert one["parts_mb"]["activations"] == pytest.approx(whole["parts_mb"]["activations"] / 4, rel=0.01)
    assert one["parts_mb"]["lora_state"] == pytest.approx(whole["parts_mb"]["lora_state"] * 5 / 4, rel=0.01)  # + sum
    assert one["need_mb"] < whole["need_mb"] - 500


@pytest.mark.parametrize("info, field", [
    ({"ram_mb": "4096"}, "ram_mb"), ({"ram_mb": -1}, "ram_mb"), ({"ram_mb": 0}, "ram_mb"), ({"ram_mb": True}, "ram_mb"),
    ({"ram_mb": 1.5}, "ram_mb"), ({"ram_mb": 2**40}, "ram_mb"), ({"cores": 0}, "cores"), ({"cores": [4]}, "cores"),
    ({"platform": "linux\x00; rm -rf /"}, "platform"), ({"platform": ""}, "platform"), ({"platform": 7}, "platform"),
    ({"runtime": "x" * 65}, "runtime"), ({"runtime": "onnxruntime\n[fake log line]"}, "runtime"),
    ({"platform": "Andr\u00f6id"}, "platform"), ({"platform": "linux\n"}, "platform"),
])
def test_bad_capabilities_are_refused_naming_the_field(info, field):
    with pytest.raises(P.StatusRejected, match=f"info.{field}") as exc:
        P.check_capabilities({**GOOD, **info})
    assert exc.value.reason == "bad_capabilities"


def test_good_capabilities_pass_and_each_is_optional():
    assert P.check_capabilities({**GOOD, "formats": ["onnx"], "other": {"x": 1}}) == GOOD
    assert P.check_capabilities({}) == {}
    assert P.check_capabilities({"ram_mb": 1, "cores": 4096, "platform": "Chrome OS", "runtime": "a"}) == {
        "ram_mb": 1, "cores": 4096, "platform": "Chrome OS", "runtime": "a"}


def test_refused_travels_in_the_control_message_and_is_checked():
    ctrl = P.ControlMessage("run1", 0, 0, "idle", refused={"dev-003": "memory: too little"})
    assert P.decode_control(P.encode_control(ctrl)).refused == {"dev-003": "memory: too little"}
    assert P.decode_control(P.encode_control(P.ControlMessage("run1", 0, 0, "idle"))).refused == {}
    raw = json.loads(P.encode_control(ctrl))
    for bad in ({"../x": "y"}, {"dev-003": 5}, {"dev-003": "x" * 401}, ["dev-003"]):
        with pytest.raises(P.ProtocolError, match="refused"):
            P.decode_control(json.dumps({**raw, "refused": bad}).encode())


def test_cli_takes_measured_stage_peaks_and_the_need_uses_them(tmp_path):
    from server_sdk.cli.fleet import _fleet_settings
    from server_sdk.cli.main import build_parser
    from server_sdk.config import ConfigError

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    args = sub.choices["run"].parse_args(["--fleet", "local:3", "--stage-peak-mb", "4=524, 8=850"])
    assert _fleet_settings(args, tmp_path).stage_peak_mb == {"4": 524, "8": 850}
    for bad in ("4:524", "4=lots", "four=5", "4=0"):
        with pytest.raises(ConfigError, match="stage-peak-mb|stage_peak_mb"):
            _fleet_settings(sub.choices["run"].parse_args(["--fleet", "local:3", "--stage-peak-mb", bad]), tmp_path)


# --------------------------------------------------------------------------- the coordinator, hand-made hellos


@pytest.fixture
def coordinator(fleet, tmp_path):
    """A FleetExecutor whose run has a 2-layer and a 4-layer stage of the tiny model (batch 4 x 128), serving the
    4-layer one; devices dev1..dev3 are clients 1..3, observed from an operator login."""
    from server_sdk.fleet.broker import add_operator

    add_device(fleet.dir, "dev3")
    fleet.devices["dev3"] = Credentials.load(fleet.dir / "credentials" / "dev3.json")
    observer = add_operator(fleet.dir, "observer")
    broker = BrokerProcess(fleet.dir, fleet.port).start()
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    settings = FleetSettings(run_id=RUN, round_timeout_s=20, artifact_bytes_per_s=None, stage_ready_timeout_s=0,
                             device_names={"1": "dev1", "2": "dev2", "3": "dev3"})
    cfg = RunConfig(num_clients=4, clients_per_round=3, batch_size=4, seq_len=128, lora=LoraSettings(r=2, alpha=4))
    ex = FleetExecutor(cfg, tmp_path / "run", fleet.server, [1, 1], settings, host="localhost")
    ex.expect_stages({**TINY, "num_hidden_layers": 4}, [2, 4])
    ex.serve_stage(1, {"onnx": tmp_path / "art"}, ex.stage_need(TINY, 4))
    ex.observer_creds = observer
    yield ex
    ex.close()
    broker.stop()


def _hello(clients, creds, **info):
    device = clients(creds)
    status = P.StatusMessage(creds.username, "hello", time.time(), {"formats": ["onnx"], **info})
    device.publish(P.status_topic(RUN, creds.username), P.encode_status(status), retain=True, wait_s=10)
    return device


def _controls(clients, ex) -> queue.Queue:
    """Control messages published after this call (not the retained one): (retained flag, message)."""
    got: queue.Queue = queue.Queue()
    client = clients(ex.observer_creds, connect=False)
    client.subscribe(P.control_topic(RUN), lambda m: got.put((m.retain, P.decode_control(m.payload))))
    client.connect(10)
    return got


def _live_control(got: queue.Queue, pred, timeout_s: float = 15) -> P.ControlMessage:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            retained, ctrl = got.get(timeout=0.2)
        except queue.Empty:
            continue
        if not retained and pred(ctrl):
            return ctrl
    raise AssertionError("no live control message as expected")


def test_a_bad_hello_is_refused_and_the_device_is_told_why(coordinator, fleet, clients):
    ex = coordinator
    got = _controls(clients, ex)
    first = _hello(clients, fleet.devices["dev1"], ram_mb="lots", platform="linux")
    ctrl = _live_control(got, lambda c: "dev1" in c.refused)
    assert ctrl.refused["dev1"].startswith("bad_capabilities: info.ram_mb 'lots' must be a whole number")
    assert ctrl.state == "idle" and ctrl.stage == 1  # the control it was: only `refused` changed
    rej = [e for e in events(ex.run_dir) if e["event"] == "rejected"]
    assert [(e["device"], e["reason"], e["message"]) for e in rej] == [("dev1", "bad_capabilities", "hello")]
    assert ex._pool() == [0, 2, 3]  # dev1 is client 1
    with pytest.raises(StageDoesNotFit, match=r"none declared; refused: \['dev1'\]"):
        ex.eligible_clients(1)  # the only connected device is refused: the stage cannot run
    # the device fixes its declaration and restarts (one connection per client id: two would take the session
    # from each other): it is told it is no longer refused, and may be sampled again
    first.close()
    _hello(clients, fleet.devices["dev1"], **{**GOOD, "ram_mb": 100_000})
    _live_control(got, lambda c: "dev1" not in c.refused)
    assert ex._fits("dev1") and any(e["event"] == "refusal_cleared" for e in events(ex.run_dir))


def test_a_device_that_fits_no_stage_is_refused_at_hello_and_one_that_fits_the_small_stage_is_not_sampled_for_the_large(
        coordinator, fleet, clients):
    ex = coordinator
    small, large = (ex.stage_need(TINY, n)["need_mb"] for n in (2, 4))
    ex.settings.stage_peak_mb = {"4": 123}  # a measured peak, where the operator gives one, is the need
    assert ex.stage_need(TINY, 4) == {"layers": 4, "need_mb": 123, "source": "measured: --stage-peak-mb"}
    ex.settings.stage_peak_mb = {}
    got = _controls(clients, ex)
    _hello(clients, fleet.devices["dev1"], **{**GOOD, "ram_mb": small - 1})  # fits no stage
    _hello(clients, fleet.devices["dev2"], **{**GOOD, "ram_mb": small})  # the 2-layer stage only
    dev3 = _hello(clients, fleet.devices["dev3"], **{**GOOD, "ram_mb": large})
    ctrl = _live_control(got, lambda c: "dev1" in c.refused)
    assert f"declares ram_mb {small - 1} MiB; the smallest stage of this run (2 layers) needs {small} MiB" \
        in ctrl.refused["dev1"] and "dev2" not in ctrl.refused
    wait_for(lambda: "ram_mb" in ex._caps.get("dev3", {}), 10, "dev3's hello")
    assert ex.eligible_clients(1) == [0, 3]  # the served 4-layer stage: dev2 (client 2) and dev1 are left out
    # no connected device fits: the stage fails at once, naming it, its need and the largest budget declared
    dev3.close()  # restarts with a smaller budget
    _hello(clients, fleet.devices["dev3"], **{**GOOD, "ram_mb": small})
    wait_for(lambda: ex._caps.get("dev3", {}).get("ram_mb") == small, 10, "dev3's new hello")
    with pytest.raises(StageDoesNotFit, match=rf"stage 2 \(4 layers\) needs {large} MiB per device \(predicted, "
                       rf"1.25 x floor \+ 192 MiB\).*largest budget a device declared is {small} MiB \(dev[23]\)"):
        ex.eligible_clients(1)


def test_a_refused_devft_edge_device_stops_with_its_reason(coordinator, fleet, tmp_path):
    """devft-edge with --ram-mb below every stage's need: refused at hello, it logs why and exits with code 4."""
    import subprocess
    import sys

    ex = coordinator
    creds = fleet.devices["dev2"]
    shard = tmp_path / "shard.jsonl"
    shard.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.client", "run", "--credentials",
                           str(fleet.dir / "credentials" / "dev2.json"), "--data", str(shard), "--cache",
                           str(tmp_path / "cache"), "--run", RUN, "--host", "localhost", "--port", str(creds.port),
                           "--ram-mb", "64"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "the coordinator refuses this device: memory: dev2 declares ram_mb 64 MiB" in proc.stderr
    caps = next(e for e in events(ex.run_dir) if e["event"] == "capabilities" and e["device"] == "dev2")
    assert caps["ram_mb"] == 64 and caps["platform"].startswith("linux-") and caps["runtime"].startswith("devft-edge")


@pytest.mark.skipif(shutil.which("node") is None or not (ROOT / "web" / "node_modules").is_dir(),
                    reason="the web device needs Node.js and web/node_modules: run scripts/setup.sh")
def test_a_refused_node_device_stops_with_its_reason(coordinator, fleet, tmp_path):
    """The JS device (Node) declares its capabilities, and --ram-mb below every stage's need gets it refused: it
    says why and exits with code 4, as devft-edge does."""
    import subprocess

    ex = coordinator
    shard = tmp_path / "shard.jsonl"
    shard.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    proc = subprocess.run(["node", str(ROOT / "web" / "node-device.mjs"), "--credentials",
                           str(fleet.dir / "credentials" / "dev3.json"), "--data", str(shard), "--cache",
                           str(tmp_path / "cache"), "--run", RUN, "--host", "localhost", "--port",
                           str(fleet.devices["dev3"].port), "--ram-mb", "64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "the coordinator refuses this device: memory: dev3 declares ram_mb 64 MiB" in proc.stderr
    caps = next(e for e in events(ex.run_dir) if e["event"] == "capabilities" and e["device"] == "dev3")
    assert caps["ram_mb"] == 64 and caps["platform"].startswith("node-linux-") and caps["runtime"] == "onnxruntime-node"
    assert caps["cores"] >= 1


# --------------------------------------------------------------------------- a whole run


def test_local_fleet_samples_each_device_only_for_the_stages_its_memory_fits(tmp_path):
    """tiny model, stages of 2 and 4 layers (batch 4 x 128, so they differ in need): dev-000 declares exactly the
    2-layer stage's need, dev-003 less than any stage's, dev-001 and dev-002 their MemAvailable. dev-000 trains
    stage 1 only, dev-003 nothing (refused at hello, exit code 4), and the report says so."""
    from server_sdk.cli.report import fleet_table
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.local_fleet import add_fleet_summary

    base = tiny_random_model(n_layers=4, hidden=32, seed=0)
    cfg = fleet_cfg(rounds_per_stage=[1, 1], num_clients=4, clients_per_round=3, batch_size=4, seq_len=128)
    small = predicted_peak_mb(TINY, 2, batch=4, seq=128, rank=cfg.lora.r)["need_mb"]
    wrapper = "import sys\nsys.argv += ['--ram-mb', '{}']\nfrom edge_runtime.client import main\nsys.exit(main(sys.argv[1:]))"
    job = FleetRun(tmp_path / "mem", cfg, base, 4, FleetSettings(round_timeout_s=120, artifact_bytes_per_s=None),
                   device_code={"dev-000": wrapper.format(small), "dev-003": wrapper.format(64)})
    report = add_fleet_summary(job.run_dir, job.finish(), job.codes)
    log = events(job.run_dir)
    stages = [e for e in log if e["event"] == "stage"]
    assert [s["memory"]["layers"] for s in stages] == [2, 4] and stages[0]["memory"]["need_mb"] == small
    assert stages[1]["memory"]["need_mb"] > small
    sampled = [e["sampled"] for e in log if e["event"] == "round_start"]
    assert sampled == [["dev-000", "dev-001", "dev-002"], ["dev-001", "dev-002"]]
    devices = report["fleet"]["devices"]
    assert devices["dev-000"]["stages"] == [0] and devices["dev-000"]["ram_mb"] == small
    assert devices["dev-001"]["stages"] == devices["dev-002"]["stages"] == [0, 1]
    assert devices["dev-003"]["stages"] == [] and devices["dev-003"]["refused"].startswith("memory: dev-003 declares")
    assert all(d["platform"].startswith("linux-") and d["runtime"].startswith("devft-edge") for d in devices.values())
    assert job.codes == {"dev-000": 0, "dev-001": 0, "dev-002": 0, "dev-003": 4}
    assert report["fleet"]["rejected"] == {"memory": 1}
    text = fleet_table(report["fleet"])
    line = {ln.split()[0]: ln for ln in text.splitlines()[2:] if ln.startswith("dev-")}
    assert line["dev-000"].rstrip().endswith(f"{small}  1") and "refused: memory" in line["dev-003"]
    assert line["dev-001"].rstrip().endswith("1, 2") and "stage 2 (4 layers)" in text


def test_the_schema_says_what_the_checks_say():
    from tests.test_schema import errors

    status = {"version": P.PROTOCOL_VERSION, "device_id": "dev-000", "state": "hello", "timestamp": 1.0}
    assert errors("StatusMessage", {**status, "info": {**GOOD, "formats": ["onnx"], "battery": 0.8}}) == []
    for bad in ({"ram_mb": "4096"}, {"ram_mb": 0}, {"ram_mb": True}, {"cores": 5000}, {"platform": "a\nb"},
                {"runtime": "x" * 65}):
        assert errors("StatusMessage", {**status, "info": {**GOOD, **bad}}), bad
        with pytest.raises(P.StatusRejected):
            P.check_capabilities({**GOOD, **bad})
    ctrl = json.loads(P.encode_control(P.ControlMessage("run1", 0, 0, "idle", refused={"dev-003": "memory: x"})))
    assert errors("ControlMessage", ctrl) == []
    assert errors("ControlMessage", {**ctrl, "refused": {"dev-003": "x" * 401}})
