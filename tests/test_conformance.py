"""`devft conformance`: devft-edge passes every part; devices with planted defects fail the right part.

Each run is a real Mosquitto, the kit's scripted coordinator and a device process (about 25 s).
"""

from __future__ import annotations

import sys

import pytest

from server_sdk.cli.main import main
from server_sdk.fleet.broker import MosquittoNotFound, require_mosquitto

ARGS = ["run", "--credentials", "{credentials}", "--data", "{data}", "--cache", "{cache}", "--run", "{run}"]
PARTS = ["hello", "ready", "train", "tampered", "stage", "ffa-sgd", "will", "done", "schema"]

WRONG_ADAMW_ORDER = """
import math, sys
import numpy as np
from edge_runtime import optim
def step(self, params, grads):  # (step_size * m) / den instead of step_size * (m / den)
    self.step_count += 1
    b1, b2 = self.betas
    size = np.float32(self.lr / (1.0 - b1 ** self.step_count))
    bc2 = np.float32(math.sqrt(1.0 - b2 ** self.step_count))
    for name, g in grads.items():
        m = self._m.setdefault(name, np.zeros_like(params[name]))
        v = self._v.setdefault(name, np.zeros_like(params[name]))
        m += np.float32(1.0 - b1) * (g - m)
        v *= np.float32(b2)
        v += np.float32(1.0 - b2) * g * g
        params[name] -= (size * m) / (np.sqrt(v) / bc2 + np.float32(self.eps))
optim.AdamW.step = step
from edge_runtime.client import main
sys.exit(main(sys.argv[1:]))
"""

NO_WILL = """
import sys
from dataclasses import replace
from edge_runtime import client
real = client.MqttClient
client.MqttClient = lambda settings: real(replace(settings, will_topic=None))
sys.exit(client.main(sys.argv[1:]))
"""

WRONG_SAMPLER = """
import sys
from edge_runtime import sampler
sampler.GOLDEN_GAMMA += 2  # a SplitMix64 with the wrong increment: other batches
from edge_runtime.client import main
sys.exit(main(sys.argv[1:]))
"""

GRAPH_NAMES_ON_THE_WIRE = """
import sys
from edge_runtime import client, protocol
real = protocol.encode_update
def encode(msg):  # the graph's input names ("model." + PEFT name) instead of the PEFT names
    return real(protocol.UpdateMessage(msg.run_id, msg.stage, msg.round, msg.device_id, msg.nonce, msg.num_samples,
                                       {"model." + k: v for k, v in msg.tensors.items()}, msg.metrics, msg.telemetry))
protocol.encode_update = encode
sys.exit(client.main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _mosquitto():
    try:
        require_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))


def verdicts(capsys) -> dict[str, str]:
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("PASS ", "FAIL "))]
    return {line.split()[1].rstrip(":"): line for line in lines}


def test_devft_edge_is_conformant(tmp_path, capsys):
    rc = main(["conformance", "--keep", str(tmp_path), "--", sys.executable, "-m", "edge_runtime.client", *ARGS])
    got = verdicts(capsys)
    assert list(got) == PARTS and all(v.startswith("PASS") for v in got.values()), got
    assert "bit for bit" in got["train"] and "bit for bit" in got["ffa-sgd"]
    assert rc == 0


def test_a_device_with_adamw_in_the_wrong_order_fails_train_and_says_where(tmp_path, capsys):
    rc = main(["conformance", "--keep", str(tmp_path), "--", sys.executable, "-c", WRONG_ADAMW_ORDER, *ARGS])
    got = verdicts(capsys)
    assert rc == 1
    assert got["train"].startswith("FAIL train: delta differs: base_model.") and "expected" in got["train"], got
    assert got["ffa-sgd"].startswith("PASS")  # SGD does not use the broken step
    assert got["hello"].startswith("PASS") and got["will"].startswith("PASS")


def test_a_device_without_a_will_fails_will(tmp_path, capsys):
    rc = main(["conformance", "--keep", str(tmp_path), "--", sys.executable, "-c", NO_WILL, *ARGS])
    got = verdicts(capsys)
    assert rc == 1
    assert got["will"].startswith("FAIL will: no retained offline status"), got
    assert [p for p, v in got.items() if v.startswith("FAIL")] == ["will"], got


@pytest.mark.parametrize("code, detail", [(WRONG_SAMPLER, "delta differs: "),
                                          (GRAPH_NAMES_ON_THE_WIRE, "delta differs: tensor names differ: missing")])
def test_a_device_with_another_sampler_or_wire_names_fails_train(tmp_path, capsys, code, detail):
    rc = main(["conformance", "--keep", str(tmp_path), "--", sys.executable, "-c", code, *ARGS])
    got = verdicts(capsys)
    assert rc == 1 and got["train"].startswith(f"FAIL train: {detail}"), got
