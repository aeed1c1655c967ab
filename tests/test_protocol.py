"""The wire protocol: round trips, framing, and every way a message is refused."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge_runtime import protocol as P

RUN = "run1"
SHA = "ab" * 32


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layers.0.q.lora_A": rng.standard_normal((4, 16)).astype(np.float32),
        "layers.0.q.lora_B": rng.standard_normal((16, 4)).astype(np.float16),
    }


def _spec(tensors: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in tensors.items()}


def _update(**overrides) -> P.UpdateMessage:
    fields = dict(
        run_id=RUN,
        stage=1,
        round=3,
        device_id="dev1",
        nonce="0123456789abcdef",
        num_samples=32,
        tensors=_tensors(),
        metrics={"train_loss": 1.25},
        telemetry={"wall_s": 2.5, "peak_rss_mb": 512},
    )
    fields.update(overrides)
    return P.UpdateMessage(**fields)


def _descriptor() -> P.ArtifactDescriptor:
    entry = P.FileEntry(path="stage1/model.onnx", sha256=SHA, size=10, chunk_size=4, chunks=(SHA, SHA, SHA))
    return P.ArtifactDescriptor(artifact_id="a1", files=(entry,))


# --------------------------------------------------------------------------- round trips


def test_tensors_round_trip_as_safetensors():
    tensors = _tensors()
    data = P.encode_tensors(tensors)
    (header_len,) = struct.unpack("<Q", data[:8])  # safetensors layout, readable anywhere
    assert set(json.loads(data[8 : 8 + header_len])) >= set(tensors)
    back = P.decode_tensors(data)
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype
        np.testing.assert_array_equal(back[name], arr)


def test_update_round_trip_and_framing():
    msg = _update()
    data = P.encode_update(msg)
    (n,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4 : 4 + n])
    assert header["kind"] == "update" and header["version"] == P.PROTOCOL_VERSION
    assert header["body_size"] == len(data) - 4 - n
    back = P.decode_update(data)
    assert (back.run_id, back.stage, back.round, back.device_id, back.nonce) == (RUN, 1, 3, "dev1", msg.nonce)
    assert back.num_samples == 32 and back.metrics == msg.metrics and back.telemetry == msg.telemetry
    for name in msg.tensors:
        np.testing.assert_array_equal(back.tensors[name], msg.tensors[name])


def test_global_round_trip():
    msg = P.GlobalMessage(run_id=RUN, stage=2, round=0, tensors=_tensors(), metrics={"eval_loss": 0.5})
    back = P.decode_global(P.encode_global(msg))
    assert (back.stage, back.round, back.metrics) == (2, 0, {"eval_loss": 0.5})
    assert set(back.tensors) == set(msg.tensors)


def test_control_round_trip_with_artifact():
    msg = P.ControlMessage(
        run_id=RUN,
        stage=1,
        round=4,
        state="train",
        sampled_clients=("dev1", "dev2"),
        deadline_unix=1.7e9,
        hyperparams=P.TrainSettings(lr=1e-4, local_steps=10, batch_size=4, trainable=("a", "b"),
                                    seeds={"dev1": 1, "dev2": 2}, session="s1"),
        artifacts={"onnx": _descriptor()},
    )
    assert P.decode_control(P.encode_control(msg)) == msg
    assert "prefetch" not in json.loads(P.encode_control(msg))  # omitted when there is no hint


def test_control_prefetch_hint_round_trips_and_is_validated():
    hint = _descriptor()
    msg = P.ControlMessage(RUN, 0, 1, "idle", artifacts={"onnx": _descriptor()}, prefetch={"onnx": hint})
    back = P.decode_control(P.encode_control(msg))
    assert back == msg and back.prefetch_for(["ort", "onnx"]) == ("onnx", hint) and back.prefetch_for(["ort"]) is None
    obj = json.loads(P.encode_control(msg))
    for bad, match in (({"tflite": obj["prefetch"]["onnx"]}, "prefetch offers unknown artifact formats"),
                       ({"onnx": {**obj["prefetch"]["onnx"], "files": [{"path": "../x"}]}}, "relative"),
                       ([1], "'prefetch' must be an object")):
        with pytest.raises(P.ProtocolError, match=match):
            P.decode_control(json.dumps({**obj, "prefetch": bad}).encode())


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"lr": float("inf")}, {"local_steps": 0}, {"trainable": []},
                                 {"seeds": {"dev 1": 3}}, {"seeds": {"dev1": -2}}, {"optimizer": "lion"},
                                 {"batch_size": "4"}])
def test_train_settings_refuse_bad_values(bad):
    good = {"lr": 1e-3, "local_steps": 2, "batch_size": 2, "trainable": ["a"], "seeds": {"dev1": 3}, "session": "s"}
    assert P.TrainSettings.from_json(good).seeds == {"dev1": 3}
    with pytest.raises(P.ProtocolError):
        P.TrainSettings.from_json({**good, **bad})


@pytest.mark.parametrize("micro", [0, -1, 3, True, 1.5, "1"])
def test_a_bad_micro_batch_is_refused_naming_the_range(micro):
    good = {"lr": 1e-3, "local_steps": 2, "batch_size": 2, "trainable": ["a"], "seeds": {"dev1": 3}, "session": "s"}
    with pytest.raises(P.ProtocolError, match="micro_batch"):
        P.TrainSettings.from_json({**good, "micro_batch": micro})


def test_micro_batch_is_sent_only_when_set_and_read_back():
    hp = P.TrainSettings(lr=1e-3, local_steps=2, batch_size=4, trainable=("a",), seeds={"dev1": 3}, session="s")
    assert "micro_batch" not in hp.to_json() and hp.rows_per_run is None  # control messages stay as they were
    for micro, rows in ((1, 1), (3, 3), (4, None)):
        back = P.TrainSettings.from_json(json.loads(json.dumps({**hp.to_json(), "micro_batch": micro})))
        assert back.micro_batch == micro and back.rows_per_run == rows and back.to_json()["micro_batch"] == micro


def test_train_control_without_hyperparams_is_refused():
    data = P.encode_control(P.ControlMessage(RUN, 0, 0, "idle"))
    with pytest.raises(P.ProtocolError, match="no hyperparams"):
        P.decode_control(data.replace(b'"idle"', b'"train"'))


def test_status_and_chunk_request_round_trip():
    status = P.StatusMessage(device_id="dev1", state="hello", timestamp=12.5, info={"backend": "onnx"})
    assert P.decode_status(P.encode_status(status)) == status
    req = P.ChunkRequest(run_id=RUN, device_id="dev1", sha256=SHA, chunks=(0, 5))
    assert P.decode_chunk_request(P.encode_chunk_request(req)) == req


def test_non_finite_metrics_travel_as_null():
    back = P.decode_update(P.encode_update(_update(metrics={"train_loss": float("nan")})))
    assert back.metrics == {"train_loss": None}


def test_topics():
    assert P.control_topic(RUN) == "devft/run1/control"
    assert P.global_topic(RUN, 7) == "devft/run1/global/7"
    assert P.chunk_topic(RUN, SHA, 3) == f"devft/run1/artifacts/{SHA}/3"
    assert P.fetch_topic(RUN, "dev1") == "devft/run1/fetch/dev1"
    assert P.update_topic(RUN, "+") == "devft/run1/update/+"
    assert P.status_topic(RUN, "dev1") == "devft/run1/status/dev1"
    assert P.parse_topic("devft/run1/update/dev1") == ("run1", "update", ("dev1",))
    with pytest.raises(P.ProtocolError, match="not a valid id"):
        P.update_topic(RUN, "dev/1")
    with pytest.raises(P.ProtocolError, match="not a valid id"):
        P.control_topic("run#")
    with pytest.raises(P.ProtocolError, match="sha256"):
        P.chunk_topic(RUN, "xyz", 0)


# --------------------------------------------------------------------------- decode errors


def test_malformed_json_is_refused():
    with pytest.raises(P.ProtocolError, match="not valid UTF-8 JSON"):
        P.decode_control(b"{not json")
    with pytest.raises(P.ProtocolError, match="must be a JSON object"):
        P.decode_status(b"[1, 2]")


def test_wrong_version_is_refused():
    obj = json.loads(P.encode_status(P.StatusMessage(device_id="d", state="hello", timestamp=1.0)))
    obj["version"] = 99
    with pytest.raises(P.ProtocolError, match="version 99"):
        P.decode_status(json.dumps(obj).encode())


def test_missing_field_is_refused():
    obj = json.loads(P.encode_control(P.ControlMessage(run_id=RUN, stage=0, round=0, state="idle")))
    del obj["round"]
    with pytest.raises(P.ProtocolError, match="missing required field 'round'"):
        P.decode_control(json.dumps(obj).encode())


def test_wrong_field_type_is_refused():
    obj = json.loads(P.encode_control(P.ControlMessage(run_id=RUN, stage=0, round=0, state="idle")))
    obj["round"] = "3"
    with pytest.raises(P.ProtocolError, match="'round'"):
        P.decode_control(json.dumps(obj).encode())
    obj["round"], obj["state"] = 3, "dance"
    with pytest.raises(P.ProtocolError, match="dance"):
        P.decode_control(json.dumps(obj).encode())


def test_oversized_payloads_are_refused():
    with pytest.raises(P.ProtocolError, match="over the"):
        P.decode_control(b" " * (P.MAX_CONTROL_BYTES + 1))
    with pytest.raises(P.ProtocolError, match="over the"):
        P.decode_update(b"\0" * (P.MAX_UPDATE_BYTES + 1))
    big = {"w": np.zeros(P.MAX_UPDATE_BYTES // 4 + 1, dtype=np.float32)}
    with pytest.raises(P.ProtocolError, match="smaller adapter"):
        P.encode_update(_update(tensors=big))


def test_bad_frames_are_refused():
    data = P.encode_update(_update())
    with pytest.raises(P.ProtocolError, match="truncated"):
        P.decode_update(data[:-10])
    with pytest.raises(P.ProtocolError, match="too short"):
        P.decode_update(b"\0\0")
    with pytest.raises(P.ProtocolError, match="declares a"):
        P.decode_update(struct.pack(">I", 1000) + b"{}")
    global_data = P.encode_global(P.GlobalMessage(run_id=RUN, stage=0, round=0, tensors=_tensors()))
    with pytest.raises(P.ProtocolError, match="expected 'update'"):
        P.decode_update(global_data)
    header = {"version": P.PROTOCOL_VERSION, "kind": "update"}
    with pytest.raises(P.ProtocolError, match="not valid safetensors"):
        P.decode_tensors(b"garbage!garbage!")
    with pytest.raises(P.ProtocolError, match="missing required field"):
        P.decode_update(P.frame(header, P.encode_tensors(_tensors())))


def test_bad_descriptor_is_refused():
    obj = _descriptor().to_json()
    obj["files"][0]["chunks"] = obj["files"][0]["chunks"][:2]
    with pytest.raises(P.ProtocolError, match="needs 3 chunk hashes"):
        P.ArtifactDescriptor.from_json(obj)
    obj = _descriptor().to_json()
    obj["files"][0]["path"] = "../../etc/passwd"
    with pytest.raises(P.ProtocolError, match="stay inside"):
        P.ArtifactDescriptor.from_json(obj)


def test_chunk_request_limits():
    with pytest.raises(P.ProtocolError, match="chunks"):
        P.encode_chunk_request(P.ChunkRequest(run_id=RUN, device_id="d", sha256=SHA, chunks=()))
    bad = json.dumps({"version": P.PROTOCOL_VERSION, "run_id": RUN, "device_id": "d", "sha256": SHA, "chunks": [-1]})
    with pytest.raises(P.ProtocolError, match="non-negative"):
        P.decode_chunk_request(bad.encode())


def test_object_arrays_never_travel():
    with pytest.raises(P.ProtocolError, match="only numeric"):
        P.encode_tensors({"x": np.array([object()], dtype=object)})


# --------------------------------------------------------------------------- validation


def _validate(msg: P.UpdateMessage, seen: set[str] | None = None, max_norm: float | None = 1e6) -> float:
    return P.validate_update(msg, _spec(_tensors()), RUN, 1, 3, set() if seen is None else seen, max_norm)


def test_valid_update_passes_and_records_nonce():
    seen: set[str] = set()
    norm = _validate(_update(), seen)
    expected = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in _tensors().values()))
    assert norm == pytest.approx(expected)
    assert seen == {"0123456789abcdef"}
    with pytest.raises(P.UpdateRejected) as err:
        _validate(_update(), seen)
    assert err.value.reason == "replayed_nonce"


def _bad_tensors(kind: str) -> dict[str, np.ndarray]:
    t = _tensors()
    if kind == "missing":
        t.pop("layers.0.q.lora_B")
    elif kind == "extra":
        t["layers.9.v.lora_A"] = np.zeros((4, 16), np.float32)
    elif kind == "shape":
        t["layers.0.q.lora_A"] = np.zeros((4, 8), np.float32)
    elif kind == "dtype":
        t["layers.0.q.lora_A"] = t["layers.0.q.lora_A"].astype(np.float64)
    elif kind in ("nan", "inf"):
        t["layers.0.q.lora_A"][1, 2] = np.nan if kind == "nan" else np.inf
    elif kind == "huge":
        t["layers.0.q.lora_A"] *= 1e4
    return t


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"run_id": "other"}, "wrong_run"),
        ({"stage": 2}, "wrong_stage"),
        ({"round": 2}, "stale_round"),
        ({"round": 4}, "future_round"),
        ({"num_samples": 0}, "bad_num_samples"),
        ({"tensors": _bad_tensors("missing")}, "missing_tensors"),
        ({"tensors": _bad_tensors("extra")}, "unexpected_tensors"),
        ({"tensors": _bad_tensors("shape")}, "wrong_shape"),
        ({"tensors": _bad_tensors("dtype")}, "wrong_dtype"),
        ({"tensors": _bad_tensors("nan")}, "non_finite"),
        ({"tensors": _bad_tensors("inf")}, "non_finite"),
        ({"tensors": _bad_tensors("huge")}, "norm_exceeded"),
    ],
)
def test_each_rejection_has_its_reason(overrides, reason):
    seen: set[str] = set()
    with pytest.raises(P.UpdateRejected) as err:
        _validate(_update(**overrides), seen, max_norm=1e3)
    assert err.value.reason == reason
    assert reason in P.REJECT_REASONS
    assert isinstance(err.value, ValueError)
    assert seen == set()  # a rejected update does not burn its nonce


def test_update_must_come_from_its_topic_device():
    with pytest.raises(P.UpdateRejected) as err:
        P.validate_update(_update(), _spec(_tensors()), RUN, 1, 3, set(), sender="dev2")
    assert err.value.reason == "device_mismatch"
    assert P.validate_update(_update(), _spec(_tensors()), RUN, 1, 3, set(), sender="dev1") > 0


def test_rejections_survive_the_wire():
    data = P.encode_update(_update(tensors=_bad_tensors("nan")))
    with pytest.raises(P.UpdateRejected, match="NaN"):
        _validate(P.decode_update(data))


# --------------------------------------------------------------------------- the documented schema


def _schema_defs() -> dict:
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "protocol.schema.json"
    return json.loads(path.read_text())["$defs"]


def _check_against(obj: dict, definition: dict) -> None:
    assert set(definition["required"]) <= set(obj), set(definition["required"]) - set(obj)
    assert set(obj) <= set(definition["properties"]), set(obj) - set(definition["properties"])


def test_encoders_match_the_documented_schema():
    defs = _schema_defs()
    hyper = P.TrainSettings(lr=1e-4, local_steps=1, batch_size=1, trainable=("a",), seeds={"dev1": 0}, session="s")
    control = P.ControlMessage(run_id=RUN, stage=1, round=4, state="train", hyperparams=hyper,
                               artifacts={"onnx": _descriptor()}, prefetch={"onnx": _descriptor()})
    control_obj = json.loads(P.encode_control(control))
    _check_against(control_obj, defs["ControlMessage"])
    _check_against(control_obj["hyperparams"], defs["TrainSettings"])
    _check_against(control_obj["artifacts"]["onnx"], defs["ArtifactDescriptor"])
    _check_against(control_obj["artifacts"]["onnx"]["files"][0], defs["FileEntry"])
    _check_against(control_obj["prefetch"]["onnx"], defs["ArtifactDescriptor"])
    status = P.StatusMessage(device_id="dev1", state="busy", timestamp=1.0)
    _check_against(json.loads(P.encode_status(status)), defs["StatusMessage"])
    req = P.ChunkRequest(run_id=RUN, device_id="dev1", sha256=SHA, chunks=(1,))
    _check_against(json.loads(P.encode_chunk_request(req)), defs["ChunkRequest"])
    header, _ = P.unframe(P.encode_update(_update()), "update")
    _check_against(header, defs["UpdateHeader"])
    header, _ = P.unframe(P.encode_global(P.GlobalMessage(run_id=RUN, stage=0, round=0, tensors={})), "global")
    _check_against(header, defs["GlobalHeader"])
    assert set(defs["ControlMessage"]["properties"]["state"]["enum"]) == set(P.CONTROL_STATES)
    assert set(defs["StatusMessage"]["properties"]["state"]["enum"]) == set(P.STATUS_STATES)
