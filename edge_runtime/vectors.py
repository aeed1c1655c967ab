"""Test vectors of the device contract (docs/test-vectors/), computed by devft-edge's own code.

`python -m edge_runtime.vectors write DIR` writes the JSON vectors next to the tiny artifact in
DIR/tiny (scripts/make_test_vectors.py exports that artifact, with torch, and then calls this);
`python -m edge_runtime.vectors check DIR` recomputes every vector and prints the first value
that differs. tests/test_vectors.py runs the check. A device author reads the JSON and the
pseudo-code in docs/device-client.md; nothing here is needed to use the vectors.

Encodings: float32 tensors are {"shape", "f32le_base64"} (little-endian bytes, base64); a float32
scalar is {"f32": "0x3f800000", "value": 1.0} (its bit pattern, and the number for reading);
uint64 values are 16-digit hex strings. Torch-free.
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import protocol as P
from edge_runtime.batching import IGNORE_INDEX, collate, join
from edge_runtime.optim import make_optimizer
from edge_runtime.sampler import SplitMix64, round_draws

ARTIFACT = "tiny"  # the artifact directory under the vectors directory
FILES = ("sampler.json", "optim.json", "frames.json", "artifact_id.json", "train_step.json", "round.json")


# --------------------------------------------------------------------------- encodings


def f32(x: float | np.floating) -> dict[str, Any]:
    bits = struct.unpack("<I", struct.pack("<f", float(np.float32(x))))[0]
    return {"f32": f"0x{bits:08x}", "value": float(np.float32(x))}


def from_f32(d: Mapping[str, Any]) -> np.float32:
    return np.frombuffer(struct.pack("<I", int(d["f32"], 16)), dtype="<f4")[0]


def tensor(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "f32le_base64": base64.b64encode(a.tobytes()).decode()}


def from_tensor(d: Mapping[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["f32le_base64"]), dtype="<f4").reshape(d["shape"]).astype(np.float32)


def tensors(m: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {k: tensor(v) for k, v in sorted(m.items())}


def from_tensors(d: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: from_tensor(v) for k, v in d.items()}


# --------------------------------------------------------------------------- the vectors


def sampler_vectors() -> dict[str, Any]:
    streams = []
    for seed in (0, 1, 42, 2**32 - 1, 2**53 - 1):
        rng = SplitMix64(seed)
        streams.append({"seed": seed, "next": [f"{rng.next():016x}" for _ in range(6)]})
    rounds = []
    for seed, n, batch_size, steps in ((0, 10, 4, 3), (7, 5, 8, 2), (2718281828, 64, 4, 5), (2**53 - 1, 3, 1, 4),
                                       (123, 1, 4, 2), (99, 1000, 16, 2)):
        rounds.append({"seed": seed, "n": n, "batch_size": batch_size, "local_steps": steps,
                       "batches": list(round_draws(seed, n, batch_size, steps))})
    return {"description": "SplitMix64 outputs (hex) per seed, and a round's batch draws (example indices, in the "
                           "order drawn) per (seed, n, batch_size, local_steps): docs/device-client.md section 4.",
            "streams": streams, "rounds": rounds}


def _optim_case(name: str, lr: float, p0: np.ndarray, grads: list[np.ndarray]) -> dict[str, Any]:
    opt = make_optimizer(name, lr)
    p = {"p": p0.copy()}
    after = []
    for g in grads:
        opt.step(p, {"p": g})
        after.append(tensor(p["p"]))
    return {"optimizer": name, "lr": lr, "p0": tensor(p0), "grads": [tensor(g) for g in grads], "p_after_step": after}


def optim_vectors() -> dict[str, Any]:
    rng = np.random.default_rng(3)  # only makes the inputs; the inputs are in the file
    p0 = rng.normal(0, 0.1, size=(8, 32)).astype(np.float32)
    grads = [rng.normal(0, s, size=(8, 32)).astype(np.float32) for s in (1.0, 1e-3, 10.0, 1e-6, 0.5)]
    grads[3][0, 0] = 0.0  # a zero gradient
    grads[1][1, 1] = -grads[1][1, 1] * 1e-30  # denormal-adjacent
    return {"description": "Optimiser steps from p0 with the given gradients; p after each step, float32. AdamW: "
                           "betas (0.9, 0.999), eps 1e-8, no weight decay, the operation order of "
                           "docs/device-client.md section 4. SGD: p - f32(lr) * g.",
            "cases": [_optim_case("adamw", 1e-3, p0, grads), _optim_case("adamw", 0.05, p0, grads[:3]),
                      _optim_case("sgd", 1e-2, p0, grads[:3])]}


def frame_vectors() -> dict[str, Any]:
    rng = np.random.default_rng(4)
    delta = {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight":
             rng.normal(0, 1e-3, size=(4, 2)).astype(np.float32),
             "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight":
             rng.normal(0, 1e-3, size=(2, 2)).astype(np.float32)}
    update = P.UpdateMessage("run1", 1, 4, "dev-007", "5be0c1a9d2f04e7b8a1c3d5e7f901234", 128, delta,
                             {"train_loss": 1.92}, {"steps": 5, "train_s": 41.2})
    glob = P.GlobalMessage("run1", 1, 4, {**delta, "base_model.model.model.layers.0.self_attn.q_proj.lora_A."
                                          "default.weight": np.arange(6, dtype=np.float32).reshape(2, 3)})
    out = []
    for kind, msg, data in (("update", update, P.encode_update(update)), ("global", glob, P.encode_global(glob))):
        n = struct.unpack(">I", data[:4])[0]
        out.append({"kind": kind, "frame_base64": base64.b64encode(data).decode(),
                    "header": json.loads(data[4:4 + n]), "tensors": tensors(msg.tensors)})
    return {"description": "Framed messages (protocol.md section 4): 4-byte big-endian header length, JSON header, "
                           "safetensors body. Decoding frame_base64 must give header and tensors. Your encoder need "
                           "not reproduce the bytes (JSON key order and safetensors layout are free), only what "
                           "decodes from them.",
            "frames": out}


def artifact_id_vectors() -> dict[str, Any]:
    cases = []
    for files in ({"stage0/train.onnx": b"graph", "stage0/manifest.json": b"{}", "stage0/weights/a.bin": b"\0" * 8},
                  {"stage1/lora.safetensors": b""}):
        listing = sorted([path, hashlib.sha256(data).hexdigest(), len(data)] for path, data in files.items())
        text = json.dumps(listing, separators=(",", ":"))
        cases.append({"files": {p: base64.b64encode(d).decode() for p, d in files.items()}, "listing": text,
                      "artifact_id": hashlib.sha256(text.encode()).hexdigest()})
    return {"description": "artifact_id = sha256 of the compact JSON [[path, sha256, size], ...] sorted by path "
                           "(separators ',' and ':', non-ASCII escaped as \\uXXXX); files are base64 here.",
            "cases": cases}


def _trainer(art: Path, lr: float = 1e-3, optimizer: str = "adamw", trainable=None, micro_batch=None):
    from edge_runtime.backends import open_trainer

    return open_trainer("onnx", art, lr=lr, threads=1, trainable=trainable, optimizer=optimizer,
                        micro_batch=micro_batch)


def _runtime() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "machine": platform.machine()}


def _tiny_batch() -> tuple[np.ndarray, np.ndarray]:
    ids = (np.arange(24, dtype=np.int64).reshape(2, 12) * 7 + 3) % 64
    labels = ids.copy()
    labels[0, :5] = IGNORE_INDEX  # prompt
    labels[1, :3] = IGNORE_INDEX
    labels[1, 10:] = IGNORE_INDEX  # padding
    return ids, labels


def train_step_vectors(art: Path) -> dict[str, Any]:
    trainer = _trainer(art)
    ids, labels = _tiny_batch()
    lora = trainer.get_lora()
    loss, grads = trainer.loss_and_grads(ids, labels)
    return {"description": f"One run of {ARTIFACT}/train.onnx: inputs input_ids, labels (int64), the LoRA tensors "
                           f"of {ARTIFACT}/lora.safetensors (by peft_name; graph input name = 'model.' + peft_name); "
                           "outputs loss and grad.<name>. Bit for bit on the recorded runtime and machine, else "
                           "within 1e-5.",
            "runtime": _runtime(), "input_ids": ids.tolist(), "labels": labels.tolist(), "lora": tensors(lora),
            "loss": f32(loss), "grads": tensors(grads)}


def _encoded_shard(seq_len: int = 16) -> list[tuple[list[int], list[int]]]:
    """Tokenised examples, truncated to the artifact's seq_len as a device truncates them (section 5)."""
    shard = []
    for i in range(6):
        prompt = [(5 * i + 3 * t) % 64 for t in range(3 + i % 3)]
        completion = [(11 * i + 2 * t + 1) % 64 for t in range(2 + i % 2)]
        shard.append(join(prompt, completion, seq_len))
    shard.append(join([9] * 20, [10, 2], seq_len))  # the prompt fills seq_len: no target, a batch of it is skipped
    return shard


def run_round(art: Path, case: Mapping[str, Any], shard) -> tuple[list[list[int]], list[float], dict, float]:
    """What a device does in a round (docs/device-client.md section 4), on pre-tokenised examples."""
    trainable = case.get("trainable")
    micro = case.get("micro_batch")
    trainer = _trainer(art, case["lr"], case["optimizer"], trainable, micro if micro and micro < case["batch_size"] else None)
    received = trainer.get_lora()
    pad = 2  # the tiny model's eos_token_id (it has no pad_token_id)
    draws, losses = [], []
    for idx in round_draws(case["seed"], len(shard), case["batch_size"], case["local_steps"]):
        draws.append(idx)
        ids, labels = collate([shard[i] for i in idx], pad)
        if not (labels[:, 1:] != IGNORE_INDEX).any():
            continue
        losses.append(trainer.train_step(ids, labels))
    trained = trainer.get_lora()
    names = sorted(trainable or received)
    delta = {k: (trained[k] - received[k]).astype(np.float32) for k in names}
    return draws, losses, delta, float(np.mean(losses)) if losses else float("nan")


ROUND_CASES = ({"seed": 11, "batch_size": 2, "local_steps": 4, "lr": 1e-2, "optimizer": "adamw"},
               {"seed": 13, "batch_size": 1, "local_steps": 6, "lr": 1e-2, "optimizer": "adamw"},
               {"seed": 11, "batch_size": 2, "local_steps": 3, "lr": 5e-2, "optimizer": "sgd"},
               # micro-batches (device-client.md section 4): 1 row at a time, some rows without a target, and
               # 2 + 1 rows (a shorter last micro-batch)
               {"seed": 11, "batch_size": 4, "micro_batch": 1, "local_steps": 4, "lr": 1e-2, "optimizer": "adamw"},
               {"seed": 5, "batch_size": 3, "micro_batch": 2, "local_steps": 4, "lr": 1e-2, "optimizer": "adamw"})


def round_vectors(art: Path) -> dict[str, Any]:
    shard = _encoded_shard()
    cases = []
    for case in ROUND_CASES:
        draws, losses, delta, loss = run_round(art, case, shard)
        cases.append({**case, "draws": draws, "step_losses": [f32(x) for x in losses], "train_loss": loss,
                      "delta": tensors(delta)})
    return {"description": f"Whole rounds on {ARTIFACT}/ from its lora.safetensors: the shard is given tokenised and "
                           "truncated to seq_len 16 (ids, labels per example, file order); pad id 2; batches "
                           "drawn by the sampler; a batch without targets skipped; delta = trained - received, "
                           "float32. Bit for bit on the recorded runtime and machine, else within 1e-5.",
            "runtime": _runtime(), "pad_id": 2,
            "shard": [{"ids": ids, "labels": labels} for ids, labels in shard], "cases": cases}


def compute(directory: Path) -> dict[str, dict[str, Any]]:
    art = directory / ARTIFACT
    return {"sampler.json": sampler_vectors(), "optim.json": optim_vectors(), "frames.json": frame_vectors(),
            "artifact_id.json": artifact_id_vectors(), "train_step.json": train_step_vectors(art),
            "round.json": round_vectors(art)}


def write(directory: Path) -> None:
    for name, data in compute(directory).items():
        (directory / name).write_text(json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------- checking


def _is_tensor(value: Any) -> bool:
    return isinstance(value, dict) and "f32le_base64" in value


def first_difference(want: Any, got: Any, where: str = "") -> str | None:
    """The path and both values of the first place where two JSON values differ, else None. Tensors are
    compared element by element, so the message names the first differing element."""
    if _is_tensor(want) and _is_tensor(got):
        return _tensor_difference(want, got, where)
    if isinstance(want, dict) and isinstance(got, dict):
        return _dict_difference(want, got, where)
    if isinstance(want, list) and isinstance(got, list):
        return _list_difference(want, got, where)
    same = want == got or (isinstance(want, float) and isinstance(got, float) and want != want and got != got)
    return None if same else f"{where}: {got!r}, expected {want!r}"


def _tensor_difference(want: dict, got: dict, where: str) -> str | None:
    a, b = from_tensor(want), from_tensor(got)
    if a.shape != b.shape:
        return f"{where}: shape {list(b.shape)}, expected {list(a.shape)}"
    bad = np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))
    if bad.size:
        i = np.unravel_index(bad[0], a.shape)
        return (f"{where}[{', '.join(map(str, i))}]: {float(b[i]):.9g}, expected {float(a[i]):.9g} "
                f"({bad.size} elements differ)")
    return None


def _dict_difference(want: dict, got: dict, where: str) -> str | None:
    for k in want:
        if k not in got:
            return f"{where}.{k}: missing"
        if (d := first_difference(want[k], got[k], f"{where}.{k}")) is not None:
            return d
    extra = sorted(set(got) - set(want))
    return f"{where}: unexpected keys {extra}" if extra else None


def _list_difference(want: list, got: list, where: str) -> str | None:
    if len(want) != len(got):
        return f"{where}: {len(got)} items, expected {len(want)}"
    for i, (w, g) in enumerate(zip(want, got)):
        if (d := first_difference(w, g, f"{where}[{i}]")) is not None:
            return d
    return None


def check(directory: Path) -> list[str]:
    """One line per vector file: 'ok NAME' or 'FAIL NAME: first difference'. Runtime-dependent files
    recorded on another onnxruntime or machine are compared within 1e-5 instead of bit for bit."""
    got = compute(directory)
    lines = []
    for name in FILES:
        want = json.loads((directory / name).read_text())
        fresh = json.loads(json.dumps(got[name]))
        if "runtime" in want and want["runtime"] != fresh["runtime"]:
            diff = _close(want, fresh)
            lines.append(f"{'ok' if diff is None else 'FAIL'} {name} (within 1e-5: recorded on {want['runtime']})"
                         + (f": {diff}" if diff else ""))
            continue
        fresh.pop("runtime", None)
        want.pop("runtime", None)
        diff = first_difference(want, fresh)
        lines.append(f"ok {name}" if diff is None else f"FAIL {name}: {diff}")
    return lines


def _close(want: Mapping[str, Any], got: Mapping[str, Any]) -> str | None:
    """Like first_difference, but float32 tensors and scalars within 1e-5 absolute."""
    def walk(w: Any, g: Any, where: str) -> str | None:
        if isinstance(w, dict) and "f32le_base64" in w:
            a, b = from_tensor(w), from_tensor(g)
            err = float(np.abs(a - b).max()) if a.size else 0.0
            return None if a.shape == b.shape and err <= 1e-5 else f"{where}: max difference {err:.3g}"
        if isinstance(w, dict) and "f32" in w:
            return None if abs(w["value"] - g["value"]) <= 1e-5 else f"{where}: {g['value']}, expected {w['value']}"
        if isinstance(w, dict):
            return next((d for k in w if k != "runtime" and (d := walk(w[k], g.get(k), f"{where}.{k}"))), None)
        if isinstance(w, list):
            return next((d for i, (x, y) in enumerate(zip(w, g)) if (d := walk(x, y, f"{where}[{i}]"))), None)
        if isinstance(w, float):
            return None if abs(w - g) <= 1e-5 or (w != w and g != g) else f"{where}: {g}, expected {w}"
        return None if w == g else f"{where}: {g!r}, expected {w!r}"

    return walk(want, got, "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("write", "check"):
        print("usage: python -m edge_runtime.vectors write|check DIR", file=sys.stderr)
        return 2
    directory = Path(argv[1])
    if argv[0] == "write":
        write(directory)
        return 0
    lines = check(directory)
    print("\n".join(lines))
    return 0 if all(line.startswith("ok") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
