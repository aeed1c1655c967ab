"""`devft conformance -- CMD ...`: drive an outside device through the device contract, part by part.

A scripted coordinator on a real, secured Mosquitto (its own fleet directory, a free port on
127.0.0.1) runs the device command, with `{credentials}`, `{data}`, `{cache}`, `{run}` and `{device}`
in it replaced by a credentials file, a JSONL shard, a cache directory, the run id and the device
name, e.g.

    devft conformance -- devft-edge run --credentials {credentials} --data {data} --cache {cache} --run {run}

and checks, printing one PASS/FAIL line per part with the first differing value:

  hello      a retained `hello` status declaring `onnx` (and its onnxruntime)
  ready      on an `idle` control: chunk requests, then `hello` with `ready` = the artifact id
  train      a round: `busy`, an update whose header, tensor names, shapes and delta (bit for bit,
             or within --tolerance, against devft-edge's own code on the same inputs) are right,
             then `hello`
  tampered   a stage whose manifest.json disagrees with a file: no update before the deadline
  stage      a stage change: only the files that changed are fetched, then `ready`
  ffa-sgd    a round with SGD and only lora_B trainable, a batch without targets among the draws
  will       SIGKILL: the broker publishes the device's `offline` will
  done       restarted, the device says hello again and exits 0 on `done`
  schema     every JSON message and frame header the device sent validates against the schema

The model is the tiny artifact of docs/test-vectors (a word-level tokenizer is added), so the kit
needs no torch: what the device must compute is recomputed with edge_runtime's code.
"""

from __future__ import annotations

import argparse
import json
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime import protocol as P
from edge_runtime.fetch import describe_files
from edge_runtime.manifest import MANIFEST_NAME, Manifest, write_manifest
from edge_runtime.mqtt import MqttClient, MqttSettings

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "docs" / "test-vectors" / "tiny"
SCHEMA = REPO / "docs" / "protocol.schema.json"
RUN, DEVICE = "conformance", "dev-000"
VOCAB = 64


# --------------------------------------------------------------------------- the model and data


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _stage(out: Path, stage: int, lora_scale: float, tamper: bool = False) -> Path:
    """The tiny artifact as stage `stage` with a tokenizer; its initial LoRA scaled (a new lora file), or
    with a manifest that lists a wrong hash for train.onnx (`tamper`)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(TINY, out)
    _tokenizer(out / "tokenizer.json")
    lora = load_file(str(TINY / "lora.safetensors"))
    save_file({k: (v * np.float32(lora_scale)).astype(np.float32) for k, v in lora.items()}, str(out / "lora.safetensors"))
    manifest = Manifest.from_dict(json.loads((TINY / MANIFEST_NAME).read_text()))
    manifest.stage, manifest.run_id, manifest.tokenizer_file = stage, RUN, "tokenizer.json"
    write_manifest(out, manifest)
    if tamper:
        raw = json.loads((out / MANIFEST_NAME).read_text())
        raw["files"]["train.onnx"]["sha256"] = "0" * 64
        (out / MANIFEST_NAME).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return out


def _shard(path: Path) -> list[dict]:
    rows = []
    for i in range(7):
        prompt = " ".join(f"w{(5 * i + 3 * t) % VOCAB}" for t in range(3 + i % 3))
        completion = " " + " ".join(f"w{(11 * i + 2 * t + 1) % VOCAB}" for t in range(2 + i % 2))
        rows.append({"prompt": prompt, "completion": completion})
    rows.append({"prompt": " ".join(["w9"] * 20), "completion": " w10"})  # no target within seq_len 16
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def reference_delta(art: Path, tensors: dict[str, np.ndarray], hp: P.TrainSettings, shard: Path,
                    device: str = DEVICE) -> tuple[dict[str, np.ndarray], float]:
    """What a device must send for this round, computed with devft-edge's own code."""
    from tokenizers import Tokenizer

    from edge_runtime.backends import open_trainer
    from edge_runtime.batching import IGNORE_INDEX
    from edge_runtime.client import encode, pad_id, read_shard, round_batches

    trainer = open_trainer("onnx", art, lr=hp.lr, threads=1, trainable=hp.trainable, optimizer=hp.optimizer)
    trainer.set_lora(tensors)
    received = trainer.get_lora()
    encoded = encode(Tokenizer.from_file(str(art / "tokenizer.json")), read_shard(shard), trainer.manifest.seq_len)
    losses = [trainer.train_step(ids, labels) for ids, labels, _ in
              round_batches(encoded, hp, device, pad_id(trainer.manifest.model_config))
              if (labels[:, 1:] != IGNORE_INDEX).any()]
    trained = trainer.get_lora()
    return {k: trained[k] - received[k] for k in hp.trainable}, float(np.mean(losses)) if losses else float("nan")


def first_tensor_difference(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> tuple[str | None, float]:
    """(a description of the first differing element, the largest absolute difference)."""
    if sorted(got) != sorted(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        return f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}", float("inf")
    first, worst = None, 0.0
    for name in sorted(want):
        a, b = np.asarray(got[name]), want[name]
        if a.shape != b.shape or a.dtype != np.float32:
            return f"{name}: {a.dtype}{list(a.shape)}, expected float32{list(b.shape)}", float("inf")
        bad = np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))
        if bad.size and first is None:
            i = np.unravel_index(bad[0], a.shape)
            first = (f"{name}[{', '.join(map(str, i))}]: {float(a[i]):.9g}, expected {float(b[i]):.9g} "
                     f"({bad.size} elements differ)")
        worst = max(worst, float(np.abs(a - b).max()) if a.size else 0.0)
    return first, worst


# --------------------------------------------------------------------------- the scripted coordinator


@dataclass
class Result:
    part: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.part}" + (f": {self.detail}" if self.detail else "")


@dataclass
class Kit:
    command: list[str]
    work: Path
    timeout_s: float = 60.0
    tolerance: float = 0.0  # largest |difference| of a delta element that passes; 0: bit for bit
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        from server_sdk.fleet.broker import BrokerProcess, add_device, add_operator, fleet_init, free_port, register_run

        fleet = self.work / "fleet"
        port = free_port()
        self.server = fleet_init(fleet, hostnames=["localhost", "127.0.0.1"], port=port, bind_address="127.0.0.1")
        add_device(fleet, DEVICE)
        register_run(fleet, RUN)  # devices publish only under the fleet's registered runs
        self.probe_creds = add_operator(fleet, "conformance-probe")
        self.credentials = fleet / "credentials" / f"{DEVICE}.json"
        self.broker = BrokerProcess(fleet, port).start()
        self.shard = self.work / "shard.jsonl"
        _shard(self.shard)
        self.cache = self.work / "cache"
        self.blobs: dict[str, bytes] = {}
        self.requested: list[str] = []
        self.inbox: queue.Queue = queue.Queue()
        self.sent: list[tuple[str, bytes]] = []  # everything the device published
        self.client = self._connect(self.server)
        self.client.subscribe(P.status_topic(RUN, DEVICE), self._on_device)
        self.client.subscribe(P.update_topic(RUN, DEVICE), self._on_device)
        self.client.subscribe(P.fetch_topic(RUN, DEVICE), self._on_fetch)
        self.logs: list = []
        self.proc: subprocess.Popen | None = None

    def _connect(self, creds) -> MqttClient:
        client = MqttClient(MqttSettings(host="localhost", port=creds.port, username=creds.username,
                                         password=creds.password, ca_file=creds.ca_file, client_id=creds.client_id))
        client.connect(10)
        return client

    # -- the device process -------------------------------------------------------------------

    def start_device(self) -> None:
        values = {"credentials": str(self.credentials), "data": str(self.shard), "cache": str(self.cache),
                  "run": RUN, "device": DEVICE}
        argv = []
        for arg in self.command:  # only these placeholders: other braces (inline code) stay as they are
            for key, value in values.items():
                arg = arg.replace("{" + key + "}", value)
            argv.append(arg)
        self.logs.append(open(self.work / "device.log", "ab"))  # closed in close()
        self.proc = subprocess.Popen(argv, stdout=self.logs[-1], stderr=subprocess.STDOUT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.client.close()
        self.broker.stop()
        for f in self.logs:
            f.close()

    # -- traffic --------------------------------------------------------------------------------

    def _on_device(self, msg) -> None:
        self.sent.append((msg.topic, bytes(msg.payload)))
        self.inbox.put(msg)

    def _on_fetch(self, msg) -> None:
        self.sent.append((msg.topic, bytes(msg.payload)))
        try:
            req = P.decode_chunk_request(msg.payload)
        except P.ProtocolError:
            return  # counted by the schema part
        data = self.blobs.get(req.sha256)
        if data is None:
            return
        self.requested.append(req.sha256)
        size = 512 * 1024
        for i in req.chunks:
            self.client.publish(P.chunk_topic(RUN, req.sha256, i), data[i * size:(i + 1) * size])

    def serve(self, art: Path, stage: int) -> P.ArtifactDescriptor:
        files = {f"stage{stage}/{p.relative_to(art).as_posix()}": p for p in sorted(art.rglob("*")) if p.is_file()}
        desc = describe_files(files)
        for f in desc.files:
            self.blobs[f.sha256] = files[f.path].read_bytes()
        return desc

    def control(self, ctrl: P.ControlMessage) -> None:
        """Publish the retained control message, after dropping what the device said before it (a later
        part must not be satisfied by an earlier part's status)."""
        while not self.inbox.empty():
            self.inbox.get_nowait()
        self.client.publish(P.control_topic(RUN), P.encode_control(ctrl), retain=True, wait_s=10)

    def wait_for(self, pred, timeout_s: float | None = None):
        """The first message from the device for which pred(topic, payload) holds, else None."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            try:
                msg = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if pred(msg.topic, msg.payload):
                    return msg
            except P.ProtocolError:
                continue
        return None

    def status(self, state: str, **info):
        def pred(topic, payload):
            if not topic.endswith(f"/status/{DEVICE}"):
                return False
            st = P.decode_status(payload)
            return st.state == state and all(st.info.get(k) == v for k, v in info.items())
        return pred

    def check(self, part: str, ok: bool, detail: str = "") -> bool:
        self.results.append(Result(part, ok, detail))
        print(self.results[-1].line(), flush=True)
        return ok

    # -- the parts ------------------------------------------------------------------------------

    def run(self) -> bool:
        stages = self.work / "stages"
        a0 = _stage(stages / "a0", 0, 1.0)
        tampered = _stage(stages / "t0", 0, 1.0, tamper=True)
        a1 = _stage(stages / "a1", 1, 0.5)
        self.start_device()
        try:
            self.part_hello()
            d0 = self.serve(a0, 0)
            self.part_ready(d0)
            self.part_train("train", a0, d0, 0, 0, P.TrainSettings(
                lr=1e-2, local_steps=3, batch_size=2, trainable=tuple(self.lora_names(a0)), seeds={DEVICE: 7},
                session="s1"))
            self.part_tampered(tampered)
            d1 = self.serve(a1, 1)
            self.part_stage(d0, d1)
            lora_b = tuple(n for n in self.lora_names(a1) if "lora_B" in n)
            self.part_train("ffa-sgd", a1, d1, 1, 2, P.TrainSettings(
                lr=5e-2, local_steps=6, batch_size=1, trainable=lora_b, seeds={DEVICE: 13}, session="s1",
                optimizer="sgd"), scale=1.5)
            self.last_desc = d1
            self.part_will()
            self.part_done(d1)
            self.part_schema()
        finally:
            self.close()
        return all(r.ok for r in self.results)

    @staticmethod
    def lora_names(art: Path) -> list[str]:
        return sorted(t["peft_name"] for t in json.loads((art / MANIFEST_NAME).read_text())["trainable"])

    def part_hello(self) -> None:
        msg = self.wait_for(self.status("hello"))
        if msg is None:
            self.check("hello", False, f"no hello status on {P.status_topic(RUN, DEVICE)} within {self.timeout_s:.0f} s")
            return
        info = P.decode_status(msg.payload).info
        formats = info.get("formats")
        if not (isinstance(formats, list) and "onnx" in formats):
            self.check("hello", False, f"info.formats is {formats!r}; it must list 'onnx'")
            return
        probe = self._connect(self.probe_creds)  # a late subscriber gets the retained status
        try:
            probe.subscribe(P.status_topic(RUN, DEVICE))
            retained = probe.get(P.status_topic(RUN, DEVICE), timeout_s=10)
        except queue.Empty:
            retained = None
        finally:
            probe.close()
        self.check("hello", retained is not None and retained.retain,
                   f"formats {formats}, onnxruntime {info.get('onnxruntime')!r}" if retained is not None and
                   retained.retain else "the status is not retained at the broker")

    def part_ready(self, desc: P.ArtifactDescriptor) -> None:
        self.control(P.ControlMessage(RUN, 0, 0, "idle", artifacts={"onnx": desc}))
        msg = self.wait_for(self.status("hello", ready=desc.artifact_id))
        fetched = sorted(set(self.requested))
        self.check("ready", msg is not None, f"{len(fetched)} files fetched, ready {desc.artifact_id[:12]}" if msg else
                   f"no hello with info.ready = {desc.artifact_id} within {self.timeout_s:.0f} s "
                   f"({len(fetched)} of {len(desc.files)} files were requested)")

    def part_train(self, part: str, art: Path, desc: P.ArtifactDescriptor, stage: int, wire_round: int,
                   hp: P.TrainSettings, scale: float = 1.0) -> None:
        from safetensors.numpy import load_file

        glob = {k: (v * np.float32(scale)).astype(np.float32) for k, v in load_file(str(art / "lora.safetensors")).items()}
        self.client.publish(P.global_topic(RUN, wire_round), P.encode_global(P.GlobalMessage(RUN, stage, wire_round, glob)),
                            retain=True, wait_s=10)
        self.control(P.ControlMessage(RUN, stage, wire_round, "train", (DEVICE,), time.time() + 120, hp,
                                      {"onnx": desc}))
        if self.wait_for(self.status("busy")) is None:
            self.check(part, False, "no busy status after the train control")
            return
        msg = self.wait_for(lambda t, _: t == P.update_topic(RUN, DEVICE), 120)
        if msg is None:
            self.check(part, False, "no update before the deadline")
            return
        try:
            update = P.decode_update(msg.payload)
        except P.ProtocolError as exc:
            self.check(part, False, f"the update does not decode: {exc}")
            return
        want_ids = (RUN, stage, wire_round, DEVICE, len(_shard_rows(self.shard)))
        got_ids = (update.run_id, update.stage, update.round, update.device_id, update.num_samples)
        if got_ids != want_ids:
            self.check(part, False, f"(run, stage, round, device, num_samples) = {got_ids}, expected {want_ids}")
            return
        want, loss = reference_delta(art, glob, hp, self.shard)
        first, worst = first_tensor_difference(update.tensors, want)
        got_loss = update.metrics.get("train_loss")
        after = self.wait_for(self.status("hello"))
        if first is not None and worst > self.tolerance:
            self.check(part, False, f"delta differs: {first}; max |difference| {worst:.3g}")
        elif got_loss is None or abs(float(got_loss) - loss) > max(self.tolerance, 1e-6) * max(1.0, abs(loss)):
            self.check(part, False, f"metrics.train_loss {got_loss!r}, expected {loss!r}")
        elif after is None:
            self.check(part, False, "no hello status after the update")
        else:
            exact = "bit for bit" if first is None else f"within {worst:.2g} (first difference {first})"
            self.check(part, True, f"{len(want)} tensors, delta {exact}, train_loss {got_loss:.6f}")

    def part_tampered(self, tampered: Path) -> None:
        desc = self.serve(tampered, 0)
        hp = P.TrainSettings(lr=1e-2, local_steps=1, batch_size=1, trainable=tuple(self.lora_names(tampered)),
                             seeds={DEVICE: 1}, session="s1")
        deadline = time.time() + 20
        self.control(P.ControlMessage(RUN, 0, 1, "train", (DEVICE,), deadline, hp, {"onnx": desc}))
        msg = self.wait_for(lambda t, _: t == P.update_topic(RUN, DEVICE), 22)
        alive = self.proc is not None and self.proc.poll() is None
        self.check("tampered", msg is None and alive,
                   "no update on a manifest that lists a wrong sha256 for train.onnx" if msg is None and alive else
                   ("an update was sent for artifacts whose manifest does not match their files" if msg is not None
                    else f"the device exited ({self.proc.poll()}) instead of refusing the stage and waiting"))

    def part_stage(self, d0: P.ArtifactDescriptor, d1: P.ArtifactDescriptor) -> None:
        mark = len(self.requested)
        self.control(P.ControlMessage(RUN, 1, 2, "idle", artifacts={"onnx": d1}))
        msg = self.wait_for(self.status("hello", ready=d1.artifact_id))
        had = {f.sha256 for f in d0.files}
        again = sorted({f.path for f in d1.files if f.sha256 in had and f.sha256 in set(self.requested[mark:])})
        if msg is None:
            self.check("stage", False, f"no hello with info.ready = {d1.artifact_id} after the stage change")
        else:
            new = {f.sha256 for f in d1.files} - {f.sha256 for f in d0.files}
            self.check("stage", True, f"ready; {len(new)} new files; cached files fetched again: {again or 'none'}")

    def part_will(self) -> None:
        assert self.proc is not None
        self.control(P.ControlMessage(RUN, 1, 3, "idle", artifacts={"onnx": self.last_desc}))  # nothing to redo
        time.sleep(1)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        msg = self.wait_for(self.status("offline"), 15)
        self.check("will", msg is not None, "offline status published by the broker" if msg else
                   "no retained offline status (the MQTT will) within 15 s of SIGKILL")

    def part_done(self, d1: P.ArtifactDescriptor) -> None:
        self.start_device()
        if self.wait_for(self.status("hello")) is None:
            self.check("done", False, "the restarted device said no hello")
            return
        self.control(P.ControlMessage(RUN, 1, 3, "done"))
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            rc = None
        self.check("done", rc == 0, "exit 0 on done" if rc == 0 else f"exit status {rc} (None: still running 30 s "
                   "after the done control)")

    def part_schema(self) -> None:
        import jsonschema

        schema = json.loads(SCHEMA.read_text())
        schema.pop("oneOf")

        def validator(name):
            return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{name}"})

        kinds = {"status": "StatusMessage", "fetch": "ChunkRequest", "update": "UpdateHeader"}
        counted = 0
        for topic, payload in self.sent:
            kind = topic.split("/")[2]
            try:
                if kind == "update":
                    n = int.from_bytes(payload[:4], "big")
                    obj = json.loads(payload[4:4 + n])
                else:
                    obj = json.loads(payload)
            except ValueError as exc:
                self.check("schema", False, f"{topic}: not JSON ({exc})")
                return
            err = next(validator(kinds[kind]).iter_errors(obj), None)
            if err is not None:
                self.check("schema", False, f"{topic}: {'/'.join(map(str, err.absolute_path))}: {err.message[:200]}")
                return
            counted += 1
        self.check("schema", True, f"{counted} messages")


def _shard_rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("conformance", help="check an outside device against the device contract (real Mosquitto, "
                       "scripted coordinator, tiny model)", description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each expected message")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="T",
                   help="accept delta elements within T of devft-edge's (default 0: bit for bit, as on the same CPU "
                   "architecture and onnxruntime; e.g. 1e-5 across architectures, onnxruntime-web)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (device.log, cache, fleet)")
    p.add_argument("device", nargs=argparse.REMAINDER, help="-- then the command that starts the device")
    p.set_defaults(func=cmd_conformance)


def cmd_conformance(args: argparse.Namespace) -> int:
    command = args.device[1:] if args.device[:1] == ["--"] else args.device
    if not command:
        print("devft conformance: give the device command after --, e.g. -- devft-edge run --credentials "
              "{credentials} --data {data} --cache {cache} --run {run}", file=sys.stderr)
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="devft-conformance-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"device: {shlex.join(command)}\nwork dir: {work}", flush=True)
    kit = Kit(command, work, args.timeout, args.tolerance)
    ok = kit.run()
    print(f"{'conformant' if ok else 'NOT conformant'}: {sum(r.ok for r in kit.results)} of {len(kit.results)} "
          f"parts passed (device log: {work / 'device.log'})")
    if not args.keep and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1

