"""Every message and manifest validates against docs/protocol.schema.json, in both directions.

The fleet test watches a real run (real Mosquitto, the coordinator, devft-edge processes) from an
operator login on `devft/#` and validates every control, status, chunk request, update header and
global header that crossed the broker, and the manifests the devices trained on. The run uses
`-o optimizer=sgd`, and one device's last update is recomputed offline from its cached artifact
with SGD, bit for bit, which shows the device trains with the optimiser the coordinator chose.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edge_runtime import protocol as P
from edge_runtime.mqtt import MqttClient
from tests.broker_fixtures import settings_for

pytest_plugins = ("tests.broker_fixtures",)

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "protocol.schema.json").read_text())


def validator(definition: str) -> jsonschema.Draft202012Validator:
    schema = {k: v for k, v in SCHEMA.items() if k != "oneOf"}
    return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{definition}"})


def errors(definition: str, obj) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator(definition).iter_errors(obj)]


def test_the_schema_is_valid_draft_2020_12_and_names_this_protocol_version():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$defs"]["version"]["const"] == P.PROTOCOL_VERSION


def _control() -> P.ControlMessage:
    f = P.FileEntry("stage0/train.onnx", "a" * 64, 10, 524288, ("b" * 64,))
    desc = P.ArtifactDescriptor("c" * 64, (f,))
    hp = P.TrainSettings(lr=1e-3, local_steps=2, batch_size=4, trainable=("x.lora_B",), seeds={"dev-000": 2**53 - 1},
                         session="s1", optimizer="sgd")
    return P.ControlMessage("run1", 0, 3, "train", ("dev-000",), 1.5e9, hp, {"onnx": desc}, prefetch={"onnx": desc})


def test_what_the_protocol_module_encodes_validates_and_bad_values_do_not():
    ctrl = json.loads(P.encode_control(_control()))
    assert errors("ControlMessage", ctrl) == []
    assert errors("StatusMessage", json.loads(P.encode_status(P.StatusMessage("dev-000", "hello", 1.0,
                                                                              {"formats": ["onnx"], "ready": "c"})))) == []
    assert errors("ChunkRequest", json.loads(P.encode_chunk_request(P.ChunkRequest("run1", "dev-000", "a" * 64,
                                                                                   (0, 1))))) == []
    ctrl["hyperparams"]["seeds"]["dev-000"] = 2**53  # over the bound: refused by the schema and by the decoder
    assert any(e.startswith("hyperparams") for e in errors("ControlMessage", ctrl))
    with pytest.raises(P.ProtocolError, match="seed of dev-000"):
        P.decode_control(json.dumps(ctrl).encode())
    ctrl["hyperparams"]["seeds"]["dev-000"] = 1
    ctrl["version"] = 2
    assert errors("ControlMessage", ctrl) and errors("ControlMessage", {**ctrl, "version": 3}) == []


def test_the_test_vector_manifest_and_frames_validate():
    vectors = Path(__file__).resolve().parents[1] / "docs" / "test-vectors"
    assert errors("Manifest", json.loads((vectors / "tiny" / "manifest.json").read_text())) == []
    for f in json.loads((vectors / "frames.json").read_text())["frames"]:
        assert errors("UpdateHeader" if f["kind"] == "update" else "GlobalHeader", f["header"]) == []


class Wiretap:
    """An operator connection on devft/# that keeps every message (the run's traffic in both directions)."""

    def __init__(self, creds, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = MqttClient(settings_for(creds, port=port))
        self.client.subscribe("devft/#", self._keep)
        self.client.connect(10)

    def _keep(self, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))


def _header(payload: bytes) -> dict:
    n = int.from_bytes(payload[:4], "big")
    return json.loads(payload[4:4 + n])


def test_every_message_of_a_fleet_run_and_every_manifest_validates(tmp_path):
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.settings import FleetSettings
    from tests.test_fleet import FleetRun, fleet_cfg

    base = tiny_random_model(n_layers=4, hidden=32, seed=0)
    job = FleetRun(tmp_path / "wire", fleet_cfg(optimizer="sgd", lr=5e-2), base, 3,
                   FleetSettings(round_timeout_s=120))
    tap = Wiretap(job.observer_creds, job.fleet.port)
    try:
        job.finish()
    finally:
        tap.client.close()
    seen: dict[str, int] = {}
    bad = []
    for topic, payload in tap.messages:
        kind = topic.split("/")[2]
        if kind in ("artifacts", "janitor") or not payload:  # raw chunk bytes; the coordinator's own sweep marker
            continue  # (protocol.md section 2); an empty retained payload clears a global
        definition = {"control": "ControlMessage", "status": "StatusMessage", "fetch": "ChunkRequest",
                      "update": "UpdateHeader", "global": "GlobalHeader"}[kind]
        obj = _header(payload) if kind in ("update", "global") else json.loads(payload)
        tag = f"{kind}:{obj.get('state', '')}"
        seen[tag] = seen.get(tag, 0) + 1
        bad += [f"{topic}: {e}" for e in errors(definition, obj)]
    assert bad == []
    for tag in ("control:idle", "control:train", "control:done", "status:hello", "status:busy", "fetch:", "update:",
                "global:"):
        assert seen.get(tag), (tag, seen)
    trains = [json.loads(p) for t, p in tap.messages if t.endswith("/control") and b'"train"' in p]
    assert {c["hyperparams"]["optimizer"] for c in trains} == {"sgd"}
    assert any(c.get("prefetch") for c in trains)  # the hint is in the schema too

    manifests = sorted(job.fleet.dir.glob("devices/*/cache/stages/*/stage*/manifest.json"))
    assert manifests
    for path in manifests:
        assert errors("Manifest", json.loads(path.read_text())) == [], path

    _device_trained_with_sgd(job, tap, trains[-1])


def _device_trained_with_sgd(job, tap, ctrl: dict) -> None:
    """Recompute dev-000's update of the last round from its cache: SGD gives it bit for bit, AdamW does not."""
    from tokenizers import Tokenizer

    from edge_runtime.backends import open_trainer
    from edge_runtime.client import encode, pad_id, read_shard, round_batches

    wr, device = ctrl["round"], "dev-000"
    glob = next(P.decode_global(p) for t, p in tap.messages if t == P.global_topic(job.run_dir.name, wr) and p)
    update = next(P.decode_update(p) for t, p in tap.messages if t == P.update_topic(job.run_dir.name, device)
                  and P.decode_update(p).round == wr)
    hp = P.TrainSettings.from_json(ctrl["hyperparams"])
    art = next(job.fleet.device_dir(device).glob(f"cache/stages/*/stage{ctrl['stage']}/manifest.json")).parent
    deltas = {}
    for optimizer in ("sgd", "adamw"):
        trainer = open_trainer("onnx", art, lr=hp.lr, threads=1, trainable=hp.trainable, optimizer=optimizer)
        trainer.set_lora(glob.tensors)
        received = trainer.get_lora()
        shard = encode(Tokenizer.from_file(str(art / "tokenizer.json")), read_shard(job.shards[device]),
                       trainer.manifest.seq_len)
        for ids, labels, _ in round_batches(shard, hp, device, pad_id(trainer.manifest.model_config)):
            if (labels[:, 1:] != -100).any():
                trainer.train_step(ids, labels)
        deltas[optimizer] = {k: trainer.get_lora()[k] - received[k] for k in hp.trainable}
    for name, got in update.tensors.items():
        assert np.array_equal(got, deltas["sgd"][name]), name
    assert any(not np.array_equal(update.tensors[k], deltas["adamw"][k]) for k in update.tensors)
