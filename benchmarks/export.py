"""Export cost and on-device training cost of SmolLM2-135M stage submodels, per backend.

For each stage depth (default 4, 8, 16, 30 layers) of a fresh first-stage submodel:
- export (ORT; ExecuTorch for the depths in --executorch-layers): wall time, peak RSS of the
  exporting process, and artifact bytes per file and per kind (frozen weights, graph, trainable);
- training: one subprocess per backend (eager torch, ORT, ExecuTorch) that loads only what a
  device would load (the pickled submodel for torch, the artifact dir otherwise) and runs
  warm-up + measured steps at batch x seq; median step time and peak RSS (ru_maxrss).

Every measurement runs in its own child process, so peak RSS is that process's alone, and the
backends of one depth run back to back, so their ratio is taken under the same machine load.

    python -m benchmarks.export                       # full run, ~15 min on 2 cores
    python -m benchmarks.export --layers 4 --steps 3  # quick look
Writes benchmarks/results/export.json and export.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODEL = "smollm2-135m"
BACKENDS = ("torch", "ort", "executorch")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# --- children -------------------------------------------------------------------------------------


def child_export(backend: str, layers: int, out: Path, seq: int, batch: int, threads: int) -> dict[str, Any]:
    """Build the submodel, export it with `backend`; also pickle it for the eager-torch child."""
    import torch

    torch.set_num_threads(threads)
    from export.stage import export_submodel
    from server_sdk.export_cli import fresh_stage_source

    t0 = time.perf_counter()
    source = fresh_stage_source(MODEL, layers)
    build_s = time.perf_counter() - t0
    if backend == "ort" and not (out.parent / "submodel.pt").exists():
        torch.save(source.peft_model, out.parent / "submodel.pt")
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    export_submodel(source, backend, out, max_seq_len=seq, max_batch=batch, optimizer="adamw")
    export_s = time.perf_counter() - t0
    model = source.peft_model
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() * p.element_size() for p in unique if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in unique if not p.requires_grad)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    # what the weight files hold beyond the raw tensors: graphs, metadata, padding. ExecuTorch dedups equal
    # constant buffers, which can make this slightly negative; it is then reported as 0.
    graph = max(0, sum(v for k, v in files.items() if k not in ("tokenizer.json", "manifest.json")) - frozen - trainable)
    return {"backend": backend, "layers": layers, "build_s": build_s, "export_s": export_s,
            "rss_before_export_mb": rss_before, "peak_rss_mb": _peak_rss_mb(), "files": files,
            "bytes": {"frozen_weights": frozen, "trainable": trainable, "graph_and_overhead": graph,
                      "tokenizer": files.get("tokenizer.json", 0)}}


def _batch(vocab: int, batch: int, seq: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    labels = ids.copy()
    labels[:, : seq // 8] = -100  # a prompt: assistant-only loss
    return ids, labels


def child_train(backend: str, stage_dir: Path, batch: int, seq: int, warmup: int, steps: int,
                threads: int) -> dict[str, Any]:
    """Load what a device would load, run warm-up + measured steps; report median step time and peak RSS."""
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        model = torch.load(stage_dir / "submodel.pt", weights_only=False)
        vocab = model.get_base_model().config.vocab_size
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()

        def step(ids, labels):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
            loss.backward()
            opt.step()
            return loss.item()
    else:
        from edge_runtime.manifest import load_manifest

        art = stage_dir / backend
        vocab = load_manifest(art, verify_hashes=False).model_config["vocab_size"]
        if backend == "ort":
            from edge_runtime.backends.ort_backend import OrtTrainer

            trainer = OrtTrainer(art, lr=1e-4, threads=threads)
        else:
            from edge_runtime.backends.executorch_backend import ExecuTorchTrainer

            trainer = ExecuTorchTrainer(art, lr=1e-4, threads=threads)
        step = trainer.train_step
    rss_loaded = _rss_mb()
    ids, labels = _batch(vocab, batch, seq)
    losses, times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(step(ids, labels))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"backend": backend, "step_s": statistics.median(times), "step_times": times, "losses": losses,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": _peak_rss_mb()}


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.export", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else f"exit {proc.returncode}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


# --- parent --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "onnxruntime-training", "executorch", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run(layers: list[int], et_layers: list[int], batch: int, seq: int, warmup: int, steps: int, threads: int,
        work: Path) -> dict[str, Any]:
    rows = []
    for n in layers:
        stage_dir = work / f"L{n}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        row: dict[str, Any] = {"layers": n, "export": {}, "train": {}}
        backends = ["ort"] + (["executorch"] if n in et_layers else [])
        for b in backends:
            print(f"[L{n}] export {b} ...", flush=True)
            row["export"][b] = _child(["export", b, str(n), str(stage_dir / b), str(seq), str(batch), str(threads)],
                                      timeout=900)
        for b in ["torch"] + backends:
            if b != "torch" and "error" in row["export"][b]:
                row["train"][b] = {"error": "export failed"}
                continue
            print(f"[L{n}] train {b} ...", flush=True)
            row["train"][b] = _child(["train", b, str(stage_dir), str(batch), str(seq), str(warmup), str(steps),
                                      str(threads)], timeout=600)
        t, o = row["train"].get("torch", {}), row["train"].get("ort", {})
        if "step_s" in t and "step_s" in o:
            row["ort_speedup"] = t["step_s"] / o["step_s"]
            row["ort_rss_ratio"] = o["peak_rss_mb"] / t["peak_rss_mb"]
        rows.append(row)
        print(table([row]), flush=True)
    return {"model": MODEL, "batch": batch, "seq": seq, "warmup": warmup, "steps": steps, "threads": threads,
            "machine": machine(), "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rows": rows}


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'layers':>6} {'backend':>10} {'export s':>8} {'exp RSS MB':>10} {'frozen MB':>9} {'graph MB':>8} "
            f"{'train MB':>8} {'step s':>7} {'train RSS MB':>12}")
    lines = [head]
    for r in rows:
        for b in BACKENDS:
            e, t = r["export"].get(b), r["train"].get(b)
            if e is None and t is None:
                continue
            e = e or {}
            t = t or {}
            by = e.get("bytes", {})
            err = e.get("error") or t.get("error")
            lines.append(
                f"{r['layers']:>6} {b:>10} {e.get('export_s', float('nan')):>8.1f} {e.get('peak_rss_mb', float('nan')):>10.0f} "
                f"{_mb(by.get('frozen_weights')):>9} {_mb(by.get('graph_and_overhead')):>8} {_mb(by.get('trainable')):>8} "
                f"{t.get('step_s', float('nan')):>7.3f} {t.get('peak_rss_mb', float('nan')):>12.0f}"
                + (f"  ({err})" if err else "")
            )
        if "ort_speedup" in r:
            lines.append(f"{'':>6} ORT vs eager torch: {r['ort_speedup']:.2f}x faster, {r['ort_rss_ratio']:.2f}x peak RSS")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for b, marker in zip(BACKENDS, "osd"):
        pts = [(r["layers"], r["train"][b]) for r in rows if "step_s" in r["train"].get(b, {})]
        if pts:
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1]["step_s"] for p in pts], marker=marker, label=b)
            axes[1].plot(xs, [p[1]["peak_rss_mb"] for p in pts], marker=marker, label=b)
    axes[0].set(title=f"step time, batch {result['batch']} x {result['seq']}", xlabel="submodel layers", ylabel="s")
    axes[1].set(title="peak RSS of the training process", xlabel="submodel layers", ylabel="MB")
    labels, kinds = [], ("frozen_weights", "graph_and_overhead", "trainable")
    stacks = {k: [] for k in kinds}
    for r in rows:
        for b in ("ort", "executorch"):
            by = r["export"].get(b, {}).get("bytes")
            if by:
                labels.append(f"{r['layers']}\n{b[:4]}")
                for k in kinds:
                    stacks[k].append(by[k] / 1e6)
    bottom = [0.0] * len(labels)
    for k in kinds:
        axes[2].bar(labels, stacks[k], bottom=bottom, label=k)
        bottom = [a + b for a, b in zip(bottom, stacks[k])]
    axes[2].set(title="artifact bytes by kind", ylabel="MB")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['model']} stage submodels on {result['machine']['cpu']} ({result['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        backend, layers, out, seq, batch, threads = argv[1:7]
        print(json.dumps(child_export(backend, int(layers), Path(out), int(seq), int(batch), int(threads))))
        return 0
    if argv and argv[0] == "train":
        backend, stage_dir, batch, seq, warmup, steps, threads = argv[1:8]
        print(json.dumps(child_train(backend, Path(stage_dir), int(batch), int(seq), int(warmup), int(steps),
                                     int(threads))))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 30])
    p.add_argument("--executorch-layers", type=int, nargs="*", default=[4],
                   help="depths also exported and trained with ExecuTorch (its export is slow: ~minutes per 4 layers)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, help="keep artifacts here (default: a temporary dir)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="devft-export-bench-") as tmp:
        result = run(args.layers, args.executorch_layers, args.batch, args.seq, args.warmup, args.steps, args.threads,
                     args.work or Path(tmp))
    (args.out / "export.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "export.png")
    print(f"\n{result['machine']['cpu']}, {result['machine']['cores']} cores, {result['date']}")
    print(table(result["rows"]))
    print(f"wrote {args.out / 'export.json'} and {args.out / 'export.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
