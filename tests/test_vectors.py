"""docs/test-vectors/ agree with devft-edge and with the pseudo-code of docs/device-client.md.

devft-edge's code recomputes every vector (edge_runtime.vectors.check); the sampler and the
optimisers are also re-implemented here from the docs' pseudo-code alone, so the docs, the vectors
and the code cannot drift apart; a planted defect (AdamW's operations in the order the old docs
suggested) is caught and named at its first differing element.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import protocol as P
from edge_runtime import vectors as V
from edge_runtime.batching import micro_batches, target_count

VECTORS = Path(__file__).resolve().parents[1] / "docs" / "test-vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def test_devft_edge_reproduces_every_vector():
    assert V.check(VECTORS) == [f"ok {name}" for name in V.FILES]


# --------------------------------------------------------------------------- from the docs alone


def docs_splitmix(seed: int):
    """device-client.md section 4, line by line, in Python integers masked to 64 bits."""
    mask = (1 << 64) - 1
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        yield z ^ (z >> 31)


def docs_round(seed: int, n: int, batch_size: int, local_steps: int) -> list[list[int]]:
    stream, k, out = docs_splitmix(seed), min(batch_size, n), []
    for _ in range(local_steps):
        a = list(range(n))
        for i in range(k):
            j = i + next(stream) % (n - i)
            a[i], a[j] = a[j], a[i]
        out.append(a[:k])
    return out


def test_the_documented_sampler_gives_the_vectors():
    vec = load("sampler.json")
    for s in vec["streams"]:
        stream = docs_splitmix(s["seed"])
        assert [f"{next(stream):016x}" for _ in s["next"]] == s["next"]
    for r in vec["rounds"]:
        assert docs_round(r["seed"], r["n"], r["batch_size"], r["local_steps"]) == r["batches"]
    assert load("sampler.json")["streams"][0]["next"][:3] == ["e220a8397b1dcdaf", "6e789e6aa1b965f4", "06c45d188009454f"]


def docs_adamw(lr: float, p: np.ndarray, grads: list[np.ndarray], wrong_order: bool = False) -> list[np.ndarray]:
    f32 = np.float32
    c1, c2, c3, eps = f32(1.0 - 0.9), f32(0.999), f32(1.0 - 0.999), f32(1e-8)
    m, v, out = np.zeros_like(p), np.zeros_like(p), []
    p = p.copy()
    for t, g in enumerate(grads, start=1):
        step_size, bc2 = f32(lr / (1.0 - 0.9**t)), f32(math.sqrt(1.0 - 0.999**t))
        m = m + c1 * (g - m)
        v = v * c2
        v = v + (c3 * g) * g
        den = np.sqrt(v) / bc2 + eps
        p = p - ((step_size * m) / den if wrong_order else step_size * (m / den))
        out.append(p.copy())
    return out


def docs_sgd(lr: float, p: np.ndarray, grads: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for g in grads:
        p = p - np.float32(lr) * g
        out.append(p.copy())
    return out


def test_the_documented_optimisers_give_the_vectors_bit_for_bit():
    for case in load("optim.json")["cases"]:
        p0, grads = V.from_tensor(case["p0"]), [V.from_tensor(g) for g in case["grads"]]
        mine = (docs_adamw if case["optimizer"] == "adamw" else docs_sgd)(case["lr"], p0, grads)
        for step, (got, want) in enumerate(zip(mine, case["p_after_step"])):
            assert V.first_difference(want, V.tensor(got), f"{case['optimizer']} step {step + 1}") is None


def test_the_order_the_old_docs_suggested_differs_from_the_vectors():
    case = load("optim.json")["cases"][0]
    wrong = docs_adamw(case["lr"], V.from_tensor(case["p0"]), [V.from_tensor(g) for g in case["grads"]], True)
    assert any(V.first_difference(w, V.tensor(g)) for g, w in zip(wrong, case["p_after_step"]))


def test_frames_decode_to_their_header_and_tensors():
    for f in load("frames.json")["frames"]:
        data = base64.b64decode(f["frame_base64"])
        msg = (P.decode_update if f["kind"] == "update" else P.decode_global)(data)
        header_len = int.from_bytes(data[:4], "big")
        assert json.loads(data[4:4 + header_len]) == f["header"]
        assert f["header"]["version"] == P.PROTOCOL_VERSION and f["header"]["body_size"] == len(data) - 4 - header_len
        assert (msg.run_id, msg.stage, msg.round) == (f["header"]["run_id"], f["header"]["stage"], f["header"]["round"])
        assert V.first_difference(f["tensors"], V.tensors(msg.tensors)) is None


def test_artifact_ids_are_what_the_chunk_server_computes(tmp_path):
    from edge_runtime.fetch import describe_files

    for case in load("artifact_id.json")["cases"]:
        local = {}
        for i, (path, data) in enumerate(case["files"].items()):
            local[path] = tmp_path / f"{len(local)}-{i}"
            local[path].write_bytes(base64.b64decode(data))
        assert describe_files(local).artifact_id == case["artifact_id"]
        tmp_path = tmp_path / "next"
        tmp_path.mkdir()


def test_a_planted_adamw_defect_is_named_at_its_first_differing_element(monkeypatch):
    from edge_runtime import optim

    def wrong_step(self, params, grads):  # (step_size * m) / den: the order the old docs suggested
        self.step_count += 1
        b1, b2 = self.betas
        step_size = np.float32(self.lr / (1.0 - b1**self.step_count))
        bc2 = np.float32(math.sqrt(1.0 - b2**self.step_count))
        for name, g in grads.items():
            m = self._m.setdefault(name, np.zeros_like(params[name]))
            v = self._v.setdefault(name, np.zeros_like(params[name]))
            m += np.float32(1.0 - b1) * (g - m)
            v *= np.float32(b2)
            v += np.float32(1.0 - b2) * g * g
            params[name] -= (step_size * m) / (np.sqrt(v) / bc2 + np.float32(self.eps))

    monkeypatch.setattr(optim.AdamW, "step", wrong_step)
    lines = V.check(VECTORS)
    assert lines[0] == "ok sampler.json"
    assert lines[1].startswith("FAIL optim.json: .cases[0].p_after_step[0][") and "expected" in lines[1], lines[1]
    assert lines[5].startswith("FAIL round.json"), lines[5]


def test_a_planted_sampler_defect_is_caught(monkeypatch):
    import edge_runtime.sampler as S

    monkeypatch.setattr(S, "GOLDEN_GAMMA", S.GOLDEN_GAMMA + 2)
    lines = V.check(VECTORS)
    assert lines[0].startswith("FAIL sampler.json: .streams[0].next[0]: "), lines[0]


@pytest.mark.parametrize("name", ["train_step.json", "round.json"])
def test_runtime_vectors_name_the_runtime_they_were_recorded_on(name):
    assert set(load(name)["runtime"]) == {"onnxruntime", "machine"}


# --------------------------------------------------------------------------- micro-batches


def _tiny_batch(rows: int):
    from edge_runtime.batching import collate

    shard = V._encoded_shard()
    return collate([shard[i % len(shard)] for i in range(rows)], 2)  # row 6 has no target


@pytest.mark.parametrize("micro", [1, 2, 3, 5])
def test_micro_batches_give_the_whole_batch_loss_and_gradients_to_float32_rounding(micro):
    """sum_i (n_i / N) g_i is the whole batch's gradient (the loss is the mean over supervised positions); a
    micro-batch without targets (row 6) is left out. Measured max |diff| ~3e-8 on gradients of size ~0.06."""
    ids, labels = _tiny_batch(8)
    whole = V._trainer(VECTORS / V.ARTIFACT)
    loss, grads = whole.loss_and_grads(ids, labels)
    split = V._trainer(VECTORS / V.ARTIFACT, micro_batch=micro)
    mloss, mgrads = split.loss_and_grads(ids, labels)
    assert abs(mloss - loss) <= 2e-6 * abs(loss)
    for k, g in grads.items():
        scale = float(np.abs(g).max())
        assert mgrads[k].dtype == np.float32 and float(np.abs(mgrads[k] - g).max()) <= 1e-5 * scale, k
    assert sum(n for _, n in micro_batches(labels, micro)) == target_count(labels)


def test_a_micro_batch_of_the_whole_batch_is_bit_identical_to_none():
    ids, labels = _tiny_batch(4)
    loss, grads = V._trainer(VECTORS / V.ARTIFACT).loss_and_grads(ids, labels)
    for micro in (4, 9):
        mloss, mgrads = V._trainer(VECTORS / V.ARTIFACT, micro_batch=micro).loss_and_grads(ids, labels)
        assert mloss == loss and all(np.array_equal(mgrads[k].view(np.uint32), g.view(np.uint32))
                                     for k, g in grads.items())


def test_a_planted_micro_batch_weighting_defect_is_caught(monkeypatch):
    """The plain mean of the micro-batches' gradients (each micro-batch weighted alike, not by its supervised
    positions) is not the batch's gradient: the micro-batch round vectors catch it; the others stay ok."""
    from edge_runtime import batching
    from edge_runtime.backends import onnx_backend

    def equal_weights(labels, micro_batch):
        parts = batching.micro_batches(labels, micro_batch)
        return [(rows, 1) for rows, _ in parts]

    monkeypatch.setattr(onnx_backend, "micro_batches", equal_weights)
    lines = V.check(VECTORS)
    assert lines[4] == "ok train_step.json"
    assert lines[5].startswith("FAIL round.json: .cases[3]"), lines[5]


@pytest.mark.parametrize("micro", [0, -2, True, 1.0])
def test_a_bad_micro_batch_is_refused_before_anything_loads(micro):
    with pytest.raises(ValueError, match="micro_batch must be a whole number >= 1"):
        V._trainer(VECTORS / V.ARTIFACT, micro_batch=micro)


def test_the_legacy_formats_refuse_micro_batches_naming_the_fix(tmp_path):
    from edge_runtime.backends import open_trainer

    for fmt in ("ort", "executorch"):
        with pytest.raises(ValueError, match="needs the portable onnx format"):
            open_trainer(fmt, tmp_path, lr=1e-3, micro_batch=1)
