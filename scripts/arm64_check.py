"""Helper of scripts/arm64_check.sh: a real fleet round with an emulated arm64 device, compared with x86_64.

    python scripts/arm64_check.py fleet --model tiny --arch arm64 --work DIR --rootfs ROOT
    python scripts/arm64_check.py compare --work DIR --out benchmarks/results/arm64.json --markdown

`fleet` runs, on this machine, a secured Mosquitto (TLS on loopback) and the devft coordinator
(`server_sdk.engine.rounds.run` with the fleet executor, what `devft serve` runs) for a one-device
fleet, and starts that device: for `--arch x86_64` a `python -m edge_runtime.client run` process
here, for `--arch arm64` `devft-edge run` inside the arm64 Debian root (chroot; qemu-user runs its
aarch64 binaries and shares the host network, so the device reaches the broker on 127.0.0.1).
The root holds only the `edge` install (onnxruntime, numpy, tokenizers, safetensors, paho-mqtt,
psutil): no torch. The work directory is bind-mounted at the same path inside the root, so the
credentials, data shard and cache paths are the same on both sides. Both architectures run the
same config and seed, so the device gets the same batches and starting LoRA and should report the
same per-round loss and send the same delta.

`compare` reads the two runs of each model and writes the verdict (PASS iff every round's train
loss agrees within TOLERANCE and the coordinator accepted every update of both devices), as JSON
and as the arm64 block of benchmarks/RESULTS.md.

The old ExecuTorch check (ExecuTorch SGD steps + ORT evaluation of a tiny stage, `scripts/arm64_check.sh
--executorch`) keeps its subcommands: `et-export DIR`, `et-train DIR OUT`, `et-compare X86 ARM`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo (host) or /opt/devft/src (arm64 root)

TOLERANCE = 1e-5  # max |train loss difference| per round between the x86_64 and the arm64 device
DEVICE = "dev-000"  # one-device fleet; dev-000 trains data shard 0
ROOT_PATH = "/opt/devft/venv/bin:/usr/bin:/bin"  # PATH inside the arm64 root (its venv holds devft-edge)
ARCHES = ("x86_64", "arm64")

# the ExecuTorch check (--executorch): tiny random LLaMA, ExecuTorch SGD steps + ONNX Runtime evaluation
STEPS, LR, SEED = 8, 0.2, 0
BATCH, SEQ, VOCAB = 2, 16, 256
ET_TOLERANCE = 1e-4  # max |loss difference| between x86_64 and arm64; float32 kernels differ in summation order
BEGIN, END = "<!-- arm64_check: begin (generated) -->", "<!-- arm64_check: end -->"



@dataclass(frozen=True)
class FleetCase:
    """One model's run: the config both architectures share, and where the coordinator stops."""

    name: str
    label: str
    overrides: dict[str, Any]
    stop_after_rounds: int | None  # None = the whole run (every stage); else stop after this many rounds
    round_timeout_s: float
    tiny_hidden: int | None = None  # tiny random base built here (hidden size), else loaded from cfg.model

    def base(self):
        """The base model; None lets the coordinator load cfg.model itself."""
        if self.tiny_hidden is None:
            return None
        from server_sdk.engine.model import tiny_random_model

        n_layers = int(self.overrides["model"].split("-L")[-1])
        return tiny_random_model(n_layers=n_layers, hidden=self.tiny_hidden, seed=0)

    def config(self):
        from server_sdk.config import DataSettings, LoraSettings, RunConfig

        kw = dict(self.overrides)
        kw["lora"] = LoraSettings(**kw.pop("lora", {}))
        kw["data"] = DataSettings(**kw.pop("data", {}))
        return RunConfig(**kw).validate()


_DATA = {"tasks": ["chain_sum", "basic_arithmetic"], "tasks_per_client": 1, "examples_per_client": 8,
         "eval_examples_per_task": 2}
CASES = {
    # tiny random LLaMA (the shape tests/test_fleet.py runs, so its export templates are usually cached): both
    # stages, so the device also fetches a second stage's artifacts (cross-stage dedupe)
    "tiny": FleetCase("tiny", "tiny random LLaMA (hidden 32, 4 layers), stages 2 -> 4 layers, 2 + 1 rounds",
                      dict(model="tiny-random-L4", stages=[2, 4], rounds_per_stage=[2, 1], num_clients=1,
                           clients_per_round=1, local_steps=2, batch_size=2, seq_len=64, lr=5e-3, seed=0,
                           accuracy_every="never", lora={"r": 2, "alpha": 4}, data=_DATA),
                      stop_after_rounds=None, round_timeout_s=900.0, tiny_hidden=32),
    # SmolLM2-135M's stage-1 submodel (4 layers; LoRA r=8 on all 7 projections; max_seq_len 128, the shape whose
    # export template is usually cached): the 2 rounds of stage 1, then the coordinator stops (interrupted run).
    # One local step per round: a round's loss is then the forward pass at the received adapter, which both
    # machines compute from identical inputs. With 2 steps the second step's loss differed by 3.5e-5 (> 1e-5):
    # AdamW's first step moves every entry by about lr*sign(grad), so entries whose gradient is ~0 go either way
    # depending on float summation order (benchmarks/results/arm64-smollm2-local-steps-2.json).
    "smollm2": FleetCase("smollm2", "SmolLM2-135M stage-1 submodel (4 of 30 layers, LoRA r=8 on all 7 "
                         "projections), 2 rounds of stage 1, 1 local step each", dict(model="smollm2-135m", stages=[4, 30],
                         rounds_per_stage=[2, 1], num_clients=1, clients_per_round=1, local_steps=1,
                         batch_size=1, seq_len=128, lr=1e-3, seed=0, accuracy_every="never", data=_DATA),
                         stop_after_rounds=2, round_timeout_s=1800.0),
}


# --------------------------------------------------------------------------- fleet run


def device_command(arch: str, rootfs: Path | None, args: list[str], cwd: Path) -> tuple[list[str], dict[str, str]]:
    """The command line (and environment) that runs `devft-edge ARGS` as an x86_64 or emulated arm64 device."""
    if arch == "x86_64":
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        return [sys.executable, "-m", "edge_runtime.client", *args], env
    if rootfs is None or not (rootfs / "opt/devft/venv/bin/devft-edge").exists():
        raise SystemExit(f"no devft-edge in the arm64 root {rootfs}; scripts/arm64_check.sh installs it")
    # env -i: the host's variables (PYTHONPATH, CA bundle paths) mean nothing inside the root
    inner = " ".join(["cd", _q(cwd), "&&", "exec", "devft-edge", *map(_q, args)])
    return ["nice", "-n", "10", "chroot", str(rootfs), "/usr/bin/env", "-i", f"PATH={ROOT_PATH}", "HOME=/root",
            "LC_ALL=C.UTF-8", "OMP_NUM_THREADS=1", "TOKENIZERS_PARALLELISM=false", "sh", "-c", inner], {}


def _q(s: str | Path) -> str:
    import shlex

    return shlex.quote(str(s))


def device_environment(arch: str, rootfs: Path | None) -> dict[str, Any]:
    """What the device side runs on: machine, Python, package versions, and whether torch is importable."""
    code = ("import json, platform, importlib.util as u\n"
            "from importlib.metadata import version, PackageNotFoundError\n"
            "def v(d):\n try: return version(d)\n except PackageNotFoundError: return None\n"
            "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),"
            " 'torch_importable': u.find_spec('torch') is not None,"
            " 'versions': {d: v(d) for d in ('onnxruntime', 'onnxruntime-training', 'numpy', 'tokenizers',"
            " 'safetensors', 'paho-mqtt', 'psutil', 'devft') if v(d)}}))")
    if arch == "x86_64":
        cmd = [sys.executable, "-c", code]
    else:
        cmd = ["chroot", str(rootfs), "/usr/bin/env", "-i", f"PATH={ROOT_PATH}", "HOME=/root", "LC_ALL=C.UTF-8",
               "python", "-c", code]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_fleet(case: FleetCase, arch: str, work: Path, rootfs: Path | None) -> dict[str, Any]:
    """One fleet run (broker, coordinator, one device of `arch`); returns and writes its summary."""
    from server_sdk.engine import checkpoint
    from server_sdk.engine.rounds import run
    from server_sdk.fleet.coordinator import fleet_executor_factory
    from server_sdk.fleet.local_fleet import LocalFleet, add_fleet_summary
    from server_sdk.fleet.settings import FleetSettings

    run_dir = work / "fleet" / f"{case.name}-{arch}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = case.config()
    settings = FleetSettings(round_timeout_s=case.round_timeout_s, quorum=1.0, formats=["onnx"])
    env_info = device_environment(arch, rootfs)
    t0 = time.perf_counter()
    observers: list[RoundRecorder] = []
    with LocalFleet(run_dir / "fleet", 1) as fleet:
        fleet.start_broker()
        name = fleet.names[0]
        ddir = fleet.device_dir(name)

        def start_device(executor) -> None:
            observers.append(RoundRecorder(fleet.server, fleet.port, executor.run_id, run_dir / "rounds"))
            ddir.mkdir(parents=True, exist_ok=True)
            args = ["run", "--credentials", str(fleet.device_credentials(name)),
                    "--data", str((run_dir / "data" / "client_000.jsonl").resolve()),
                    "--cache", str(ddir / "cache"), "--run", executor.run_id, "--host", "127.0.0.1",
                    "--backend", "onnx"]
            cmd, env = device_command(arch, rootfs, args, ddir)
            with open(ddir / "device.log", "ab") as logf:
                fleet.devices[name] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(ddir),
                                                       env=env or None)

        factory = fleet_executor_factory(run_dir, fleet.server, settings, host="localhost", on_ready=start_device)
        result = run(cfg, run_dir, base=case.base(), progress=False, stop_after_rounds=case.stop_after_rounds,
                     executor_factory=factory)
        wall_s = time.perf_counter() - t0
        # a finished run tells the device `done` (it exits 0); an interrupted one leaves it waiting: stop it
        codes = fleet.wait_devices(60 if not result.interrupted else 0)
        for obs in observers:
            obs.close()
    if not result.interrupted:
        add_fleet_summary(run_dir, result.report, codes)
    report = result.to_dict()
    events = [json.loads(line) for line in (run_dir / "fleet_events.jsonl").read_text().splitlines() if line]
    rounds = []
    for rec in report["records"]:
        if rec["stage"] < 0:
            continue
        tel = (rec.get("telemetry") or {}).get("0", {})
        rounds.append({"stage": rec["stage"], "round": rec["round"], "layers": rec["layers"],
                       "train_loss": rec["train_loss"], "eval_loss": rec.get("eval_loss"),
                       "backend": tel.get("backend"), "steps": tel.get("steps"), "train_s": tel.get("train_s"),
                       "fetch_s": tel.get("fetch_s"), "peak_rss_bytes": tel.get("peak_rss_bytes"),
                       "step_latency_p50_s": (tel.get("step_latency_s") or {}).get("p50")})
    replayed = replay_rounds(run_dir, ddir / "cache")
    for r, loss in zip(rounds, replayed):
        r["x86_64_replay_loss"] = loss
    loaded = checkpoint.load(run_dir)
    assert loaded is not None, f"{run_dir} has no checkpoint"
    summary = {
        "case": case.name, "arch": arch, "model": case.label, "config": cfg.to_dict(), "run_dir": str(run_dir),
        "device": name, "device_environment": env_info, "device_exit_code": codes.get(name),
        "interrupted": result.interrupted, "rounds": rounds,
        "accepted": [e for e in events if e["event"] == "accepted" and e.get("device") == name],
        "rejected": [e for e in events if e["event"] == "rejected"],
        "wall_s": wall_s,
        "checkpoint": str(run_dir / checkpoint.NAME),
        "device_log_tail": (ddir / "device.log").read_text(errors="replace").splitlines()[-15:],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("case", "arch", "rounds", "accepted", "rejected", "device_exit_code")},
                     indent=1))
    return summary


class RoundRecorder:
    """A server-side MQTT connection that keeps every train control message and global adapter of a run.

    What the device received each round, byte for byte: `replay_rounds` trains the same round again on
    this machine from exactly these inputs."""

    def __init__(self, creds, port: int, run_id: str, out: Path) -> None:
        import secrets

        from edge_runtime import protocol as P
        from edge_runtime.mqtt import MqttClient
        from server_sdk.fleet.settings import mqtt_settings

        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.client = MqttClient(mqtt_settings(creds, client_id=f"arm64-check-{secrets.token_hex(3)}", host="localhost",
                                               port=port))

        def on_control(msg) -> None:
            if msg.payload and P.decode_control(msg.payload).state == "train":
                ctrl = P.decode_control(msg.payload)
                (out / f"control-{ctrl.round}.bin").write_bytes(msg.payload)

        def on_global(msg) -> None:
            if msg.payload:
                glob = P.decode_global(msg.payload)
                (out / f"global-{glob.round}.bin").write_bytes(msg.payload)

        self.client.subscribe(P.control_topic(run_id), on_control)
        self.client.subscribe(P.global_topic(run_id, "+"), on_global)
        self.client.connect(30)

    def close(self) -> None:
        self.client.close()


def replay_rounds(run_dir: Path, device_cache: Path) -> list[float | None]:
    """Each round's training again, here, from the control message and global adapter the device received.

    The device's steps in edge_runtime.client (Device.train_round), on its verified artifact directory:
    the onnx trainer of the round's hyperparameters, the received LoRA, batches drawn with
    edge_runtime.sampler, mean loss. On the x86_64 run this must reproduce the device's own losses (a check
    that the replay is faithful); on the arm64 run it is the x86_64 loss from identical inputs."""
    from tokenizers import Tokenizer

    from edge_runtime import protocol as P
    from edge_runtime.backends import open_trainer
    from edge_runtime.batching import IGNORE_INDEX
    from edge_runtime.client import encode, pad_id, read_shard, round_batches

    shard = read_shard(run_dir / "data" / "client_000.jsonl")
    losses: list[float | None] = []
    rnd = 0
    while (run_dir / "rounds" / f"control-{rnd}.bin").exists():
        ctrl = P.decode_control((run_dir / "rounds" / f"control-{rnd}.bin").read_bytes())
        glob = P.decode_global((run_dir / "rounds" / f"global-{rnd}.bin").read_bytes())
        hp = ctrl.hyperparams
        chosen = ctrl.artifact_for(["onnx"])
        if hp is None or chosen is None or DEVICE not in hp.seeds:
            losses.append(None)
            rnd += 1
            continue
        manifests = [f.path for f in chosen[1].files if f.path.rsplit("/", 1)[-1] == "manifest.json"]
        art_dir = device_cache / "stages" / chosen[1].artifact_id / Path(manifests[0]).parent
        trainer = open_trainer("onnx", art_dir, lr=hp.lr, threads=1, trainable=hp.trainable, optimizer=hp.optimizer)
        trainer.set_lora({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in glob.tensors.items()})
        encoded = encode(Tokenizer.from_file(str(art_dir / trainer.manifest.tokenizer_file)), shard,
                         trainer.manifest.seq_len)
        pad = pad_id(trainer.manifest.model_config)
        step_losses = [trainer.train_step(ids, labels) for ids, labels, _ in round_batches(encoded, hp, DEVICE, pad)
                       if (labels[:, 1:] != IGNORE_INDEX).any()]
        losses.append(float(np.mean(step_losses)) if step_losses else None)
        rnd += 1
    return losses


# --------------------------------------------------------------------------- compare


def _lora_tensors(checkpoint_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(checkpoint_dir) / "state.safetensors"))


def compare_case(x86: dict[str, Any], arm: dict[str, Any]) -> dict[str, Any]:
    """Per-round loss diffs, accepted updates, and how far apart the two runs' LoRA states ended."""
    n = len(x86["rounds"])
    # the gate: each round of the arm64 device against the same round trained here from identical inputs
    diffs = [abs(b["train_loss"] - b["x86_64_replay_loss"]) if b.get("x86_64_replay_loss") is not None else float("inf")
             for b in arm["rounds"]]
    # the replay must reproduce the x86_64 device's own losses, else it is not the device's training path
    replay_fidelity = [abs(a["train_loss"] - a["x86_64_replay_loss"]) if a.get("x86_64_replay_loss") is not None
                       else float("inf") for a in x86["rounds"]]
    # two independent runs: from round 2 on their inputs differ (the aggregated LoRA carries round 1's differences)
    drift = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(x86["rounds"], arm["rounds"])]
    tx, ta = _lora_tensors(x86["checkpoint"]), _lora_tensors(arm["checkpoint"])
    # `full/...` is the LoRA of the whole model; `global/...` the stage's (absent once the last stage ended)
    keys = sorted(tx)
    gap = max(float(np.abs(tx[k] - ta[k]).max()) for k in keys)
    gap_norm = float(np.sqrt(sum(float(((tx[k] - ta[k]).astype(np.float64) ** 2).sum()) for k in keys)))
    # the accepted events carry the L2 norm of each update's delta, as the coordinator measured it
    norms = [(a["norm"], b["norm"]) for a, b in zip(x86["accepted"], arm["accepted"])]
    # one accepted update per round from each device (the fleet's round numbers count across stages)
    accepted_ok = all(len(s["accepted"]) == n and len({e["round"] for e in s["accepted"]}) == n for s in (x86, arm))
    checks = {
        "same_number_of_rounds": n == len(arm["rounds"]) and n > 0,
        "every_update_accepted": accepted_ok and not x86["rejected"] and not arm["rejected"],
        "loss_within_tolerance": bool(diffs) and max(diffs) <= TOLERANCE,
        "replay_reproduces_x86_64_device": bool(replay_fidelity) and max(replay_fidelity) <= TOLERANCE / 10,
        "first_round_of_independent_runs_within_tolerance": bool(drift) and drift[0] <= TOLERANCE,
        "device_is_aarch64": arm["device_environment"]["machine"] == "aarch64",
        "device_has_no_torch": not arm["device_environment"]["torch_importable"],
        "onnx_backend": all(r["backend"] == "onnx" for r in x86["rounds"] + arm["rounds"]),
    }
    return {"case": x86["case"], "model": x86["model"], "passed": all(checks.values()), "checks": checks,
            "rounds": [{"stage": a["stage"], "round": a["round"], "layers": a["layers"],
                        "arm64_loss": b["train_loss"], "x86_64_replay_loss": b.get("x86_64_replay_loss"), "abs_diff": d,
                        "x86_64_run_loss": a["train_loss"], "x86_64_run_replay_loss": a.get("x86_64_replay_loss"),
                        "independent_runs_abs_diff": dr, "x86_64_delta_norm": nx, "arm64_delta_norm": na}
                       for a, b, d, dr, (nx, na) in zip(x86["rounds"], arm["rounds"], diffs, drift, norms)],
            "max_loss_diff": max(diffs) if diffs else None,
            "max_replay_fidelity_diff": max(replay_fidelity) if replay_fidelity else None,
            "max_independent_runs_loss_diff": max(drift) if drift else None,
            # AdamW divides by the root of the second moment, so deltas agree less tightly than losses: reported
            "max_delta_norm_rel_diff": max((abs(nx - na) / nx for nx, na in norms if nx), default=None),
            "lora_state_max_abs_diff": gap, "lora_state_diff_l2": gap_norm,
            "accepted_events": {"x86_64": len(x86["accepted"]), "arm64": len(arm["accepted"])},
            "rejected_events": {"x86_64": len(x86["rejected"]), "arm64": len(arm["rejected"])},
            "device_exit_code": {"x86_64": x86["device_exit_code"], "arm64": arm["device_exit_code"]},
            "interrupted_after_rounds": x86["interrupted"],
            "wall_s": {"x86_64": x86["wall_s"], "arm64_emulated": arm["wall_s"]},
            "device_train_s": {"x86_64": sum(r["train_s"] or 0 for r in x86["rounds"]),
                               "arm64_emulated": sum(r["train_s"] or 0 for r in arm["rounds"])},
            "device_environment": {"x86_64": x86["device_environment"], "arm64": arm["device_environment"]}}


def compare(work: Path, cases: list[str], out: Path | None, markdown: Path | None, setup_note: str) -> int:
    results = []
    for name in cases:
        x86, arm = (json.loads((work / "fleet" / f"{name}-{a}" / "summary.json").read_text()) for a in ARCHES)
        results.append(compare_case(x86, arm))
    passed = all(r["passed"] for r in results)
    doc = {"check": "scripts/arm64_check.sh: a real fleet round with an emulated arm64 device vs an x86_64 device",
           "result": "PASS" if passed else "FAIL", "tolerance": TOLERANCE,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.machine(),
           "timings": "arm64 timings are qemu-user emulation on an x86_64 host: they mean nothing for a board",
           "arm64_environment": setup_note, "cases": results}
    text = json.dumps(doc, indent=1) + "\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    if markdown is not None:
        from benchmarks.results_md import replace_block

        replace_block("arm64", _markdown(doc), markdown)
    return 0 if passed else 1


def _markdown(doc: dict[str, Any]) -> str:
    lines = ["## ARM64: a real fleet round with an emulated arm64 device (scripts/arm64_check.sh)", "",
             "Command: `sudo scripts/arm64_check.sh` (x86_64 host; a Debian bookworm arm64 root under qemu-user; "
             "correctness only: **emulated timings mean nothing**).  ",
             f"Date: {doc['date']}. Result: **{doc['result']}**. JSON: `benchmarks/results/arm64.json`.  ",
             "Each model runs twice with the same config and seed: a secured Mosquitto (TLS on 127.0.0.1) and "
             "the coordinator (`simulation.run` with the fleet executor, as `devft serve`) on the host, and one "
             f"device `{DEVICE}` on the same shard: once `devft-edge run` in the arm64 root (installed from the "
             "`edge` extra only), once an x86_64 `python -m edge_runtime.client run`. A server-side MQTT observer "
             "keeps each round's control message and global adapter, and the round is trained again on x86_64 "
             "from exactly those inputs (the device's steps: onnx trainer, received LoRA, batches from the round's "
             "seed). PASS needs, every round: arm64 device loss within "
             f"{doc['tolerance']:g} of that x86_64 replay; the replay equal to the x86_64 device's own loss "
             f"(within {doc['tolerance'] / 10:g}: it is the device's training path); every update of both devices "
             "accepted, none rejected; the device aarch64, onnx backend, no torch importable. The two independent "
             "runs are also compared round by round: their first rounds have identical inputs; later rounds start "
             "from aggregated adapters that already carry the previous rounds' float differences (AdamW's first "
             "steps move near-zero-gradient entries by about lr either way), so that drift is reported, not gated.  ",
             f"arm64 environment: {doc['arm64_environment']}", ""]
    for c in doc["cases"]:
        stopped = (f" (the coordinator stops after stage 1's {len(c['rounds'])} rounds, as configured; the device, "
                   "waiting for stage 2, is then terminated: exit code None)" if c["interrupted_after_rounds"] else "")
        lines += [f"**{c['model']}**: {'PASS' if c['passed'] else 'FAIL'}; max |arm64 - x86_64 replay| "
                  f"{c['max_loss_diff']:.1e}; replay vs x86_64 device {c['max_replay_fidelity_diff']:.1e}; "
                  f"independent runs {c['max_independent_runs_loss_diff']:.1e} (max relative difference of the "
                  f"delta norms {c['max_delta_norm_rel_diff']:.1e}; LoRA state after the runs differs by at most "
                  f"{c['lora_state_max_abs_diff']:.1e}); accepted updates x86_64 {c['accepted_events']['x86_64']}, "
                  f"arm64 {c['accepted_events']['arm64']}; rejected {c['rejected_events']['x86_64']} and "
                  f"{c['rejected_events']['arm64']}; device training time x86_64 {c['device_train_s']['x86_64']:.1f} s, "
                  f"arm64 {c['device_train_s']['arm64_emulated']:.1f} s emulated; whole run {c['wall_s']['x86_64']:.0f} s "
                  f"vs {c['wall_s']['arm64_emulated']:.0f} s with the emulated device; device exit codes x86_64 "
                  f"{c['device_exit_code']['x86_64']}, arm64 {c['device_exit_code']['arm64']}{stopped}.", "",
                  "| stage | round | layers | arm64 device loss | x86_64 replay, same inputs | abs diff | "
                  "x86_64 run loss | runs abs diff | delta L2 x86_64 run | delta L2 arm64 run |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in c["rounds"]:
            lines.append(f"| {r['stage']} | {r['round']} | {r['layers']} | {r['arm64_loss']:.7f} | "
                         f"{_f(r['x86_64_replay_loss'])} | {r['abs_diff']:.1e} | {r['x86_64_run_loss']:.7f} | "
                         f"{r['independent_runs_abs_diff']:.1e} | {r['x86_64_delta_norm']:.6g} | "
                         f"{r['arm64_delta_norm']:.6g} |")
        failed = [k for k, ok in c["checks"].items() if not ok]
        if failed:
            lines.append(f"\nFailed checks: {', '.join(failed)}.")
        lines.append("")
    envs = doc["cases"][0]["device_environment"] if doc["cases"] else {}
    for arch, env in envs.items():
        lines.append(f"Device side {arch}: {env['machine']}, Python {env['python']}, "
                     + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
                     + f"; torch importable: {env['torch_importable']}.  ")
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.7f}"


# --------------------------------------------------------------------------- ExecuTorch check (--executorch): host export


def et_export(out: Path) -> None:
    """A tiny random LLaMA (hidden 64, 2 layers, vocab 256) with LoRA: ExecuTorch artifacts + forward ONNX."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from export.executorch import export_executorch_artifacts
    from export.ort import export_onnx
    from server_sdk.config import LoraSettings
    from server_sdk.method.lora import attach_lora

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, use_cache=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8), seed=SEED)
    with torch.no_grad():  # B starts at zero; make it non-zero so step one already moves every tensor
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    out.mkdir(parents=True, exist_ok=True)
    export_executorch_artifacts(peft_model, out / "executorch", seq_len=SEQ, max_batch=BATCH)
    export_onnx(peft_model, out / "forward.onnx", seq_len=SEQ, opset=18)
    ids = np.random.default_rng(SEED).integers(0, VOCAB, size=(BATCH, SEQ), dtype=np.int64)
    np.save(out / "input_ids.npy", ids)


# --------------------------------------------------------------------------- device: train + evaluate


class MinimalExecutorchTrainer:
    """The reference recipe (executorch-training.md), used when edge_runtime has no ExecuTorch backend yet."""

    def __init__(self, artifact_dir: Path, lr: float):
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule, get_sgd_optimizer

        from edge_runtime.manifest import load_manifest

        self.manifest = load_manifest(artifact_dir)
        self.module = TrainingModule(_load_for_executorch(str(artifact_dir / "model.pte"), str(artifact_dir / "lora.ptd")))
        self.lr, self.optimizer, self._sgd = lr, None, get_sgd_optimizer

    def train_step(self, ids: np.ndarray, labels: np.ndarray) -> float:
        import torch

        (loss,) = self.module.forward_backward("forward", (torch.from_numpy(ids), torch.from_numpy(labels)))
        if self.optimizer is None:  # named_parameters() exists only after the first forward_backward
            self.optimizer = self._sgd(self.module.named_parameters(), self.lr, 0, 0, 0, False)
        self.optimizer.step(self.module.named_gradients())
        return float(loss)

    def eval_loss(self, ids: np.ndarray, labels: np.ndarray) -> float:
        """Loss at the current weights: a forward_backward whose gradients are not applied."""
        import torch

        (loss,) = self.module.forward_backward("forward", (torch.from_numpy(ids), torch.from_numpy(labels)))
        return float(loss)

    def get_lora(self) -> dict[str, np.ndarray]:
        params = self.module.named_parameters()
        return {t.peft_name: params[t.name].detach().numpy().copy() for t in self.manifest.trainable}


def _trainer(artifact_dir: Path, lr: float) -> tuple[Any, str]:
    try:
        from edge_runtime.backends.executorch_backend import ExecuTorchTrainer
    except ImportError:
        return MinimalExecutorchTrainer(artifact_dir, lr), "scripts/arm64_check.py MinimalExecutorchTrainer"
    return ExecuTorchTrainer(artifact_dir, lr=lr), "edge_runtime.backends.executorch_backend.ExecuTorchTrainer"


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    keep = labels != -100
    return float(-logp[keep, labels[keep]].mean())


def ort_eval_loss(onnx_path: Path, lora_by_artifact_name: dict[str, np.ndarray], ids: np.ndarray) -> float:
    """Loss of the forward graph with its LoRA initializers replaced, on plain ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The replacement values are bound when the session state is built, after graph optimisation:
    # constant folding would already have baked the exported LoRA values into the graph.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    keep = []  # add_initializer does not copy: the OrtValues must outlive session creation
    for name, value in lora_by_artifact_name.items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
        options.add_initializer(name, keep[-1])
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    logits, shifted = session.run(None, {"input_ids": ids, "labels": ids.copy()})
    return _cross_entropy(logits, shifted)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("executorch", "torch", "onnxruntime", "onnxruntime-training", "numpy"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def et_train(artifacts: Path, out: Path) -> None:
    t0 = time.perf_counter()
    ids = np.load(artifacts / "input_ids.npy")
    trainer, trainer_name = _trainer(artifacts / "executorch", LR)
    names = {t.peft_name: t.name for t in trainer.manifest.trainable}
    losses = [trainer.train_step(ids, ids.copy()) for _ in range(STEPS)]
    trained = trainer.get_lora()
    et_after = trainer.eval_loss(ids, ids.copy())
    ort_after = ort_eval_loss(artifacts / "forward.onnx", {names[k]: v for k, v in trained.items()}, ids)
    result = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": _versions(),
        "trainer": trainer_name,
        "steps": STEPS,
        "lr": LR,
        "executorch_train_losses": losses,
        "executorch_eval_loss_after": et_after,
        "ort_eval_loss_after": ort_after,
        "lora_checksum": float(sum(np.abs(v).sum() for v in trained.values())),
        "torch_imported": "torch" in sys.modules,
        "seconds": time.perf_counter() - t0,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


# --------------------------------------------------------------------------- compare


def et_compare(x86_path: Path, arm_path: Path, markdown: Path | None, setup_note: str) -> int:
    x86, arm = json.loads(x86_path.read_text()), json.loads(arm_path.read_text())
    diffs = [abs(a - b) for a, b in zip(x86["executorch_train_losses"], arm["executorch_train_losses"])]
    diffs += [abs(x86[k] - arm[k]) for k in ("executorch_eval_loss_after", "ort_eval_loss_after")]
    learned = arm["executorch_train_losses"][-1] < arm["executorch_train_losses"][0]
    # two runtimes, same trained weights: ONNX Runtime must agree with ExecuTorch on each machine
    runtimes_gap = max(abs(r["ort_eval_loss_after"] - r["executorch_eval_loss_after"]) for r in (x86, arm))
    passed = max(diffs) <= ET_TOLERANCE and learned and runtimes_gap <= ET_TOLERANCE
    lines = [BEGIN, "## ARM64, ExecuTorch path (scripts/arm64_check.sh --executorch)", "",
             "Command: `sudo scripts/arm64_check.sh --executorch` (x86_64 host, arm64 Debian bookworm root under qemu-user; "
             "correctness only, emulated timings mean nothing).  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
             f"Model: tiny random LLaMA (hidden 64, 2 layers, vocab {VOCAB}), LoRA r=4 on all projections; "
             f"{STEPS} ExecuTorch SGD steps (lr {LR}) on one fixed batch {BATCH} x {SEQ}, then the trained LoRA "
             "evaluated by ONNX Runtime (InferenceSession on the forward graph, LoRA initializers replaced).  ",
             f"arm64 environment: {setup_note}", "",
             "| step | x86_64 loss | arm64 loss | abs diff |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(x86["executorch_train_losses"], arm["executorch_train_losses"])):
        lines.append(f"| ExecuTorch train {i + 1} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    for key, label in (("executorch_eval_loss_after", "ExecuTorch eval after training"),
                       ("ort_eval_loss_after", "ONNX Runtime eval after training")):
        a, b = x86[key], arm[key]
        lines.append(f"| {label} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    lines += ["", f"Trainer: {arm['trainer']}. Versions x86_64: {x86['versions']}; arm64: {arm['versions']}.  ",
              f"Result: **{'PASS' if passed else 'FAIL'}** (max |diff| {max(diffs):.1e}, tolerance {ET_TOLERANCE:g}; "
              f"loss fell on arm64: {learned}; largest ONNX Runtime vs ExecuTorch gap on one machine {runtimes_gap:.1e}). "
              f"arm64 run took {arm['seconds']:.0f} s emulated.", END]
    section = "\n".join(lines)
    print(section)
    if markdown is not None:
        old = markdown.read_text() if markdown.exists() else "# Device benchmarks\n\n"
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        new = pattern.sub(lambda _: section, old) if pattern.search(old) else old.rstrip() + "\n\n" + section + "\n"
        markdown.write_text(new)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/arm64_check.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fleet", help="one fleet run with one x86_64 or emulated arm64 device (host side)")
    f.add_argument("--model", choices=sorted(CASES), required=True)
    f.add_argument("--arch", choices=ARCHES, required=True)
    f.add_argument("--work", type=Path, required=True, help="work directory, bind-mounted at the same path in the root")
    f.add_argument("--rootfs", type=Path, help="the arm64 root (for --arch arm64)")
    c = sub.add_parser("compare", help="x86_64 vs arm64 runs of each model: PASS/FAIL, JSON and RESULTS.md")
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES))
    c.add_argument("--out", type=Path)
    c.add_argument("--markdown", type=Path, help="RESULTS.md whose arm64 block is replaced")
    c.add_argument("--setup-note", default="")
    sub.add_parser("et-export").add_argument("dir", type=Path)
    t = sub.add_parser("et-train")
    t.add_argument("dir", type=Path)
    t.add_argument("out", type=Path)
    e = sub.add_parser("et-compare")
    e.add_argument("x86", type=Path)
    e.add_argument("arm", type=Path)
    e.add_argument("--markdown", type=Path)
    e.add_argument("--setup-note", default="")
    args = p.parse_args(argv)
    if args.cmd == "fleet":
        # SIGTERM (the shell script's cleanup, a timeout) unwinds like Ctrl-C: LocalFleet stops broker and device
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        if args.arch == "arm64" and args.rootfs is None:
            p.error("--arch arm64 needs --rootfs (the arm64 root scripts/arm64_check.sh builds)")
        run_fleet(CASES[args.model], args.arch, args.work.resolve(), args.rootfs)
        return 0
    if args.cmd == "compare":
        return compare(args.work.resolve(), args.models, args.out, args.markdown, args.setup_note)
    if args.cmd == "et-export":
        et_export(args.dir)
        return 0
    if args.cmd == "et-train":
        et_train(args.dir, args.out)
        return 0
    return et_compare(args.x86, args.arm, args.markdown, args.setup_note)


if __name__ == "__main__":
    sys.exit(main())
