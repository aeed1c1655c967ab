"""`devft-edge bench`: how much memory, time and energy one local training step costs this device.

A fleet operator runs it on a board over an artifact directory (from `devft export` or the
broker) and gets one JSON row in the format of benchmarks/results/device.json, so the row can be
appended there beside the rows measured on the development machine:

    devft-edge bench ARTIFACT_DIR --device-profile raspberry-pi-5-8gb --out device-rows.json
    python -m edge_runtime.bench ARTIFACT_DIR ...        # the same, without the entry point

The run: load the trainer (timed), train ``--warmup`` steps untimed (first-step allocations,
thread pools), then ``--steps`` steps inside a TelemetryRecorder: p50/p95 step latency,
tokens/s, energy from the best meter the device has (labelled ``measured:<src>`` or
``estimated:<model>``). Batches are random token ids; by default every position is supervised, so
the LM head runs over all positions, the worst case for a given batch x seq; ``--prompt-fraction``
masks the start of each row as a prompt (the portable graph runs its LM head on answers only).

Peak memory comes twice: ``peak_rss_bytes`` is the training loop's (TelemetryRecorder), and
``process_peak_rss_bytes`` the process's lifetime peak (getrusage), loading included; whether a
stage fits a device profile is judged on the larger of the two, because a device has to load
the artifacts too. Run one measurement per process: both figures include whatever the process
held before.

Any format edge_runtime.backends.open_trainer opens: ``onnx`` (the portable format, plain
onnxruntime), ``ort`` (legacy ONNX Runtime Training), ``executorch``. Torch-free for onnx and
ort; the ExecuTorch backend imports torch itself (its bindings link it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends import FORMATS, open_trainer
from edge_runtime.batching import DEFAULT_SEQ_LEN, IGNORE_INDEX, target_count
from edge_runtime.manifest import load_manifest
from edge_runtime.telemetry import DEVICE_PROFILES, TelemetryRecorder, fits
from edge_runtime.telemetry.memory import current_rss_bytes, ru_maxrss_bytes

ROW_FORMAT = 1  # bump when a field of a row changes meaning
DEFAULT_BATCH = 4
DEFAULT_SEQ = DEFAULT_SEQ_LEN  # the run's one sequence length (edge_runtime/batching.py)
BACKENDS = FORMATS  # every artifact format a device can train


def cpu_model() -> str:
    """What `lscpu` calls the CPU ("Model name"); /proc/cpuinfo or platform as fallbacks."""
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"})
            models = [line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.startswith("Model name")]
            if models:
                return " / ".join(dict.fromkeys(models))  # big.LITTLE boards list one per cluster
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(note: str | None = None) -> dict[str, Any]:
    """Where a row was measured; `note` is free text such as "Raspberry Pi 5, active cooler"."""
    return {
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "note": note,
    }


def process_peak_rss_bytes() -> int | None:
    """Peak RSS of this process's address space: VmHWM, which execve resets.

    Not getrusage's ru_maxrss: Linux carries that across fork and execve, so a worker started by
    a big parent (the benchmark driver that just exported a model) reports the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return ru_maxrss_bytes()


def random_batch(vocab_size: int, batch: int, seq: int, seed: int = 0,
                 prompt_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels, int64 [batch, seq]: the first `prompt_fraction` of each row is prompt (-100)."""
    if not 0.0 <= prompt_fraction < 1.0:
        raise ValueError(f"prompt_fraction must be in [0, 1), got {prompt_fraction}")
    ids = np.random.default_rng(seed).integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    labels = ids.copy()
    labels[:, : min(int(seq * prompt_fraction), seq - 1)] = IGNORE_INDEX  # keep at least one target per row
    return ids, labels


def load_trainer(backend: str, artifact_dir: Path, lr: float, threads: int | None,
                 micro_batch: int | None = None) -> Any:
    """A trainer with ``train_step(input_ids, labels) -> loss`` for ``backend`` (edge_runtime.backends)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    try:
        return open_trainer(backend, artifact_dir, lr=lr, threads=threads, micro_batch=micro_batch)
    except ImportError as err:
        extra = {"onnx": "edge", "ort": "legacy-ort-training", "executorch": "edge-executorch"}[backend]
        raise RuntimeError(f"the {backend} backend cannot be imported ({err}); pip install 'devft[{extra}]'") from err


def _checked_steps(steps: int, warmup: int, batch: int, micro_batch: int | None) -> int | None:
    """The micro-batch a measurement runs with (None: the whole batch at once, what a device does without
    micro-batching); ValueError for steps, warm-up or a micro-batch out of range."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if micro_batch is not None and not 1 <= micro_batch <= batch:
        raise ValueError(f"micro_batch must be in [1, batch={batch}], got {micro_batch}")
    return None if micro_batch == batch else micro_batch


def _from_manifest(artifact_dir: Path, backend: str | None) -> tuple[str, dict[str, Any], Any, dict[str, Any]]:
    """(backend, model config, stage, versions) as the artifacts' manifest records them."""
    manifest = load_manifest(artifact_dir)
    backend = backend or manifest.backend
    if backend != manifest.backend:
        raise ValueError(f"{artifact_dir} holds {manifest.backend!r} artifacts, not {backend!r}")
    return backend, manifest.model_config, manifest.stage, manifest.versions


def measure(
    artifact_dir: str | os.PathLike[str],
    *,
    backend: str | None = None,
    batch: int = DEFAULT_BATCH,
    seq: int = DEFAULT_SEQ,
    steps: int = 10,
    warmup: int = 3,
    lr: float = 1e-4,
    threads: int | None = None,
    device_profile: str | None = None,
    carbon_intensity: float | str | None = None,
    note: str | None = None,
    make_trainer: Callable[[], Any] | None = None,
    model_config: dict[str, Any] | None = None,
    versions: dict[str, Any] | None = None,
    prompt_fraction: float = 0.0,
    micro_batch: int | None = None,
) -> dict[str, Any]:
    """One benchmark row for the artifacts in `artifact_dir` (backend from the manifest if not given).

    `micro_batch` rows per graph run (the round's `hyperparams.micro_batch`, onnx only; None: the whole batch):
    the step's activations are those of `micro_batch` rows (docs/protocol.md, "Micro-batches").

    `make_trainer` replaces the artifact trainer and `model_config` the manifest (the eager
    torch reference in benchmarks/device.py passes both); the row format stays the same.
    """
    micro_batch = _checked_steps(steps, warmup, batch, micro_batch)
    artifact_dir = Path(artifact_dir)
    if make_trainer is None:
        backend, cfg, stage, versions = _from_manifest(artifact_dir, backend)
    elif model_config is None or backend is None:
        raise ValueError("a custom trainer needs backend= and model_config= (there is no manifest to read)")
    else:
        cfg, stage, versions = model_config, None, versions or {}
    ids, labels = random_batch(int(cfg["vocab_size"]), batch, seq, prompt_fraction=prompt_fraction)

    t0 = time.perf_counter()
    trainer = make_trainer() if make_trainer else load_trainer(backend, artifact_dir, lr, threads, micro_batch)
    load_s = time.perf_counter() - t0
    rss_after_load = current_rss_bytes()
    warm_losses = [trainer.train_step(ids, labels) for _ in range(warmup)]
    losses = []
    with TelemetryRecorder(device_profile=device_profile, carbon_intensity=carbon_intensity) as rec:
        for _ in range(steps):
            with rec.step(tokens=batch * seq):
                losses.append(trainer.train_step(ids, labels))
    tel = rec.report()
    process_peak = process_peak_rss_bytes()
    judged = max(tel["peak_rss_bytes"], process_peak or 0)
    if not np.isfinite(losses).all():
        raise FloatingPointError(f"non-finite training loss {losses}: the benchmark is not meaningful")
    return {
        "row_format": ROW_FORMAT,
        "backend": backend,
        "stage": stage,
        "stage_layers": int(cfg["num_hidden_layers"]),
        "model": {k: cfg.get(k) for k in ("hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size")},
        "batch": batch,
        "micro_batch": micro_batch or batch,
        "seq": seq,
        "warmup_steps": warmup,
        "steps": steps,
        "threads": threads,
        "load_s": load_s,
        "rss_after_load_bytes": rss_after_load,
        "supervised_positions": target_count(labels),
        "step_latency_s": tel["step_latency_s"],
        "tokens_per_s": tel["tokens_per_s"],
        # CPU seconds per step: steadier than wall time when other jobs share the CPUs
        "cpu_s_per_step": tel["cpu_time_s"] / steps,
        "peak_rss_bytes": tel["peak_rss_bytes"],
        "process_peak_rss_bytes": process_peak,
        "energy_j_per_step": tel["energy_j"] / steps,
        "energy_source": tel["energy_source"],
        "carbon_g_per_step": tel["carbon_g"] / steps,
        "fits": {name: fits(judged, profile) for name, profile in DEVICE_PROFILES.items()},
        "losses": {"first_warmup": warm_losses[0] if warm_losses else None, "first": losses[0], "last": losses[-1]},
        "measured_on": machine_info(note),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "artifact_dir": str(artifact_dir),
        "versions": versions,
        "torch_imported": "torch" in sys.modules,
        "telemetry": tel,
    }


def append_rows(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """Add rows to a results file ({"rows": [...]}, other keys kept), creating it if needed."""
    path = Path(path)
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(doc.get("rows", []), list):
        raise ValueError(f"{path} has a 'rows' entry that is not a list; not a devft benchmark results file")
    doc.setdefault("rows", []).extend(rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def summary_line(row: dict[str, Any]) -> str:
    lat = row["step_latency_s"]
    mib = max(row["peak_rss_bytes"], row["process_peak_rss_bytes"] or 0) / 2**20
    fit = ", ".join(n for n, ok in row["fits"].items() if ok) or "none"
    micro = f" micro {row['micro_batch']}" if row.get("micro_batch", row["batch"]) != row["batch"] else ""
    return (
        f"{row['backend']:>10} {row['stage_layers']:>3} layers  b{row['batch']}x{row['seq']}{micro}  "
        f"p50 {lat['p50']:.3f}s p95 {lat['p95']:.3f}s  {row['tokens_per_s']:.0f} tok/s  "
        f"peak {mib:.0f} MiB  {row['energy_j_per_step']:.2f} J/step ({row['energy_source']})  fits: {fit}"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact_dir", help="an exported artifact directory (with manifest.json)")
    p.add_argument("--backend", choices=BACKENDS, help="default: the manifest's backend")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"batch size (default {DEFAULT_BATCH})")
    p.add_argument("--seq", type=int, default=DEFAULT_SEQ, help=f"sequence length (default {DEFAULT_SEQ})")
    p.add_argument("--micro-batch", type=int, help="rows per graph run, gradients accumulated over the batch "
                   "(onnx only; default: the whole batch): peak activations of this many rows")
    p.add_argument("--prompt-fraction", type=float, default=0.0,
                   help="share of each row masked as prompt (label -100); default 0: every position supervised")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's choice)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--device-profile", choices=sorted(DEVICE_PROFILES), help="power model for an estimate")
    p.add_argument("--carbon-intensity", help="gCO2/kWh or an ISO country code such as DEU")
    p.add_argument("--note", help="free text stored with the row, e.g. 'Pi 5, active cooler'")
    p.add_argument("--out", help="append the row to this JSON file ({'rows': [...]})")


# the command line's options that measure() takes under the same name
BENCH_OPTIONS = ("backend", "batch", "seq", "micro_batch", "prompt_fraction", "steps", "warmup", "threads", "lr",
                 "device_profile", "carbon_intensity", "note")


def main_bench(args: argparse.Namespace) -> int:
    if args.device_profile is None and not platform.machine().lower().startswith(("x86", "amd64", "i686")):
        print(f"devft-edge bench: no --device-profile on {platform.machine()}: without an energy sensor, energy is "
              "estimated with the x86-laptop power model (labelled so); pass the profile of this board",
              file=sys.stderr)
    row = measure(args.artifact_dir, **{k: getattr(args, k) for k in BENCH_OPTIONS})
    print(summary_line(row), file=sys.stderr)
    if args.out:
        append_rows(args.out, [row])
        print(f"row appended to {args.out}", file=sys.stderr)
    else:
        print(json.dumps(row, indent=1))
    return 0


def register(subparsers: Any) -> None:
    """Add `bench` to the devft-edge command line (edge_runtime/client.py)."""
    p = subparsers.add_parser("bench", help="measure memory, step latency and energy of local training")
    add_arguments(p)
    p.set_defaults(func=main_bench)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_runtime.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return main_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
