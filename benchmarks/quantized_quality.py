"""Quantized frozen weights (issue #24): does int8 / int4 training reach fp32's quality?

    python -m benchmarks.quantized_quality                      # 3 seeds x {devft, fedit} x {fp32, int8, int4}
    python -m benchmarks.quantized_quality --weights fp32,int8  # a part of the matrix (another process runs the rest)
    python -m benchmarks.quantized_quality --summary            # only the table, plot and RESULTS.md block

SmolLM2-135M, simulated clients in one process. DEVFT is the quickstart's run (`scripts/quickstart.sh
--simulate`: -o schedule=fixed -o eval_every=3 -o accuracy_every=end, 12 rounds over 4 -> 8 -> 16 -> 30
layers); FedIT trains the full model for the same 12 rounds, same clients, data and seeds. Each run's
compact report is kept in benchmarks/results/quantized-quality/<key>.json (committed) and its run directory
with checkpoints in benchmarks/results/cache/ (git-ignored), so an interrupted matrix resumes and a rerun
only fills the gaps. The key hashes the config and the weights scheme's name (edge_runtime/manifest.WEIGHT_FORMATS):
a changed int4 format is a new run, never a stale one.

A scheme whose dequantized base model is bit for bit the fp32 one (int4 on SmolLM2-135M: its packaged
weights are ggml Q4_1 and Q8_0, which int4-asym and int8 reproduce exactly) trains and evaluates on the
same numbers as the fp32 run of its seed, which is deterministic: its row is that run's, marked
"= fp32 (bit-identical weights)", unless --run-identical runs it anyway.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from server_sdk.config import RunConfig

from .results_md import md_table, replace_block, save_figure, write_atomic

RESULTS = Path(os.environ.get("DEVFT_BENCH_RESULTS", Path(__file__).parent / "results"))
CACHE = RESULTS / "cache"
KEPT = RESULTS / "quantized-quality"
GOAL = {"int8": 0.02, "int4": 0.05}  # issue #24: final eval loss at most this much above fp32's, every seed
METHODS = ("devft", "fedit")


PERTURBED_THREADS = 1  # --perturb: fp32 again with this many torch threads (the matrix runs with torch's default)


def config(method: str, weights: str, seed: int, threads: int = 0) -> RunConfig:
    """The quickstart's simulated run (DEVFT) or FedIT with as many rounds, with these frozen weights (and `threads`
    torch threads; 0: torch's default)."""
    cfg = RunConfig(schedule="fixed", eval_every=3, accuracy_every="end", weights=weights, seed=seed, strategy=method,
                    torch_threads=threads)
    if method != "devft":
        cfg.rounds_per_stage = 3 * 4  # DEVFT's 4 stages x 3 rounds, all on the full model
    return cfg


def scheme_name(weights: str) -> str:
    from edge_runtime.manifest import WEIGHT_FORMATS

    return WEIGHT_FORMATS.get(weights, weights)


def key(cfg: RunConfig, quantizer: int | None = None) -> str:
    """The run's name; a quantized run's hashes the quantizer's revision too (export/quant.QUANTIZER; `quantizer`:
    an older one's), from revision 2 on, so the keys of the runs before it stay theirs."""
    from export.quant import QUANTIZER

    revision = QUANTIZER if quantizer is None else quantizer
    extra = {"quantizer": revision} if cfg.weights != "fp32" and revision > 1 else {}
    blob = json.dumps({**cfg.identity(), "scheme": scheme_name(cfg.weights), **extra}, sort_keys=True).encode()
    return f"{cfg.strategy}-{cfg.weights}-s{cfg.seed}-{hashlib.sha256(blob).hexdigest()[:10]}"


def run_one(cfg: RunConfig, base) -> dict:
    """Run (or resume) one config; its compact report is kept under KEPT."""
    from server_sdk.engine.rounds import run

    kept = KEPT / f"{key(cfg)}.json"
    run_dir = CACHE / f"quant-{key(cfg)}"
    resume = (run_dir / "checkpoint").exists()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # died before its first checkpoint: start over
    t0 = time.time()
    report = run(copy.deepcopy(cfg), run_dir, resume=resume, base=base, progress=False)
    compact = {"key": key(cfg), "scheme": scheme_name(cfg.weights), "config": report["config"],
               "records": report["records"], "wall_s": round(time.time() - t0, 1),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    KEPT.mkdir(parents=True, exist_ok=True)
    write_atomic(kept, json.dumps(compact) + "\n")
    return compact


def identical_to_fp32(base, weights: str) -> bool:
    """Whether `weights`' dequantized base model equals the fp32 one in every tensor, bit for bit."""
    import torch

    from server_sdk.engine.quantized import quantized_base

    if weights == "fp32":
        return True
    quant = quantized_base(base, weights).model.state_dict()
    return all(torch.equal(quant[k], v) for k, v in base.model.state_dict().items())


def load(cfg: RunConfig, quantizer: int | None = None) -> dict | None:
    path = KEPT / f"{key(cfg, quantizer)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def final(rep: dict) -> tuple[float, float | None]:
    """(final eval loss, final accuracy) of a kept report."""
    loss = [r for r in rep["records"] if r.get("eval_loss") is not None][-1]["eval_loss"]
    acc = [r for r in rep["records"] if r.get("accuracy") is not None]
    return loss, acc[-1]["accuracy"] if acc else None


def base_loss(rep: dict) -> float | None:
    """The (quantized) base model's eval loss before training: round 0's record when the run has one."""
    first = [r for r in rep["records"] if r.get("eval_loss") is not None]
    return first[0]["eval_loss"] if first and first[0].get("round") == 0 else None


def _kept(method: str, weights: str, seed: int, identical: set[str], ref: dict | None) -> dict | None:
    """The kept report of a table row (`fp32-perturbed`: the --perturb run; `int8-255`: int8 by quantizer 1, 256
    levels on every block); a bit-identical scheme's is fp32's."""
    if weights == "fp32-perturbed":
        return load(config(method, "fp32", seed, PERTURBED_THREADS))
    if weights == "int8-255":
        return load(config(method, "int8", seed), quantizer=1)
    rep = load(config(method, weights, seed))
    if rep is None and weights in identical and ref is not None:
        rep = {**ref, "scheme": f"{scheme_name(weights)}; = fp32 run, bit-identical weights"}
    return rep


def table(seeds: list[int], identical: set[str]) -> tuple[str, dict]:
    rows, data = [], {}
    for method in METHODS:
        for seed in seeds:
            ref = load(config(method, "fp32", seed))
            for weights in ("fp32", "int8", "int4", "int8-255", "fp32-perturbed"):
                rep = _kept(method, weights, seed, identical, ref)
                if rep is None:
                    if weights in ("fp32", "int8", "int4"):  # the kept older runs' rows only where they ran
                        rows.append([method, seed, weights, "not finished", "", "", ""])
                    continue
                loss, acc = final(rep)
                delta = None if ref is None else loss - final(ref)[0]
                goal = GOAL.get(weights.partition("-")[0])  # int8-255: int8's goal too
                met = "" if goal is None or delta is None else ("yes" if delta <= goal else "**no**")
                label = {"fp32": "fp32", "fp32-perturbed": f"fp32, {PERTURBED_THREADS} torch thread (perturbed)",
                         "int8-255": f"int8 ({rep['scheme']}), 256 levels on every block (quantizer 1, lossy)"}.get(
                    weights, f"{weights} ({rep['scheme']})")
                rows.append([method, seed, label,
                             f"{loss:.4f}", "n/a" if acc is None else f"{100 * acc:.1f}%",
                             "" if delta is None or weights == "fp32" else f"{delta:+.4f}", met])
                if weights in ("fp32-perturbed", "int8-255"):
                    continue
                data.setdefault(method, {}).setdefault(weights, {})[seed] = {
                    "final_eval_loss": loss, "final_accuracy": acc, "delta_vs_fp32": delta,
                    "curve": [(r["round"], r["eval_loss"]) for r in rep["records"] if r.get("eval_loss") is not None]}
    head = ["method", "seed", "weights", "final eval loss", "accuracy", "loss - fp32", f"goal met (int8 +{GOAL['int8']}, "
            f"int4 +{GOAL['int4']})"]
    return "\n".join(md_table(head, rows)), data


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS), figsize=(11, 4), squeeze=False)
    colors = {"fp32": "C0", "int8": "C1", "int4": "C3"}
    for ax, method in zip(axes[0], METHODS):
        for weights, by_seed in data.get(method, {}).items():
            for i, (_, d) in enumerate(sorted(by_seed.items())):
                x, y = zip(*d["curve"])
                ax.plot(x, y, marker="o", ms=3, color=colors[weights], alpha=0.8,
                        label=weights if i == 0 else None, linestyle=("-", "--", ":")[i % 3])
        ax.set_title(f"{method} (line style = seed)")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out eval loss")
        ax.legend(fontsize=8)
    save_figure(fig, path, "SmolLM2-135M: frozen weights fp32 / int8 / int4")


def summarize(seeds: list[int], command: str, identical: set[str]) -> None:
    md, data = table(seeds, identical)
    write_atomic(RESULTS / "quantized-quality.json", json.dumps(data, indent=1) + "\n")
    if data:
        plot(data, RESULTS / "quantized-quality.png")
    body = (f"### Quantized frozen weights: quality (issue #24)\n\nCommand: `{command}`\n\n"
            "SmolLM2-135M, simulated clients; DEVFT = the quickstart's schedule (12 rounds, 4 -> 8 -> 16 -> 30 layers), "
            "FedIT = 12 full-model rounds; same clients, data and seed per row group. Loss - fp32 is paired by seed.\n\n"
            f"{md}\n\nPlot: `benchmarks/results/quantized-quality.png`; numbers: `benchmarks/results/quantized-quality.json`.")
    replace_block("quantized_quality", body)
    print(md)


def run_jobs(jobs: list[RunConfig], run_identical: bool) -> object:
    """Run each config not kept yet (a lock file per run, so processes can share the matrix); returns the base
    model if one was loaded."""
    from server_sdk.engine.model import load_base_model

    base = None
    for i, cfg in enumerate(jobs, 1):
        label = f"[{i}/{len(jobs)}] {cfg.strategy} weights={cfg.weights} seed={cfg.seed}" + (
            f" torch_threads={cfg.torch_threads}" if cfg.torch_threads else "")
        if load(cfg) is not None:
            print(f"{label}: kept, skipped", flush=True)
            continue
        lock = CACHE / f"quant-{key(cfg)}.lock"
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        except FileExistsError:
            print(f"{label}: another process holds {lock.name}, skipped", flush=True)
            continue
        try:
            print(f"{label}: running ({time.strftime('%H:%M:%S')})", flush=True)
            base = base or load_base_model(cfg.model)
            if not run_identical and cfg.weights != "fp32" and identical_to_fp32(base, cfg.weights):
                print(f"{label}: weights bit-identical to fp32's: the fp32 run's result, once it is kept", flush=True)
                continue
            rep = run_one(cfg, base)
            loss, acc = final(rep)
            print(f"{label}: final eval loss {loss:.4f}, accuracy {acc}, {rep['wall_s']:.0f} s", flush=True)
        finally:
            lock.unlink(missing_ok=True)
    return base


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--weights", default="fp32,int8,int4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--summary", action="store_true", help="only write the table from the kept runs")
    ap.add_argument("--perturb", action="store_true",
                    help=f"run fp32 again with {PERTURBED_THREADS} torch thread: how far the same run moves when only "
                         "float summation order changes (the table's perturbed rows)")
    ap.add_argument("--run-identical", action="store_true",
                    help="run a scheme even where its weights are bit-identical to fp32's (the same run again)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = None
    if not args.summary:
        jobs = [config(m, w, s) for s in seeds for m in args.methods.split(",") for w in args.weights.split(",")]
        if args.perturb:
            jobs = [config(m, "fp32", s, PERTURBED_THREADS) for s in seeds for m in args.methods.split(",")]
        base = run_jobs(jobs, args.run_identical)
    identical: set[str] = set()
    if not args.run_identical:
        from server_sdk.engine.model import load_base_model

        base = base or load_base_model(config("devft", "fp32", 0).model)
        identical = {w for w in ("int8", "int4") if identical_to_fp32(base, w)}
    summarize(seeds, "python -m benchmarks.quantized_quality " + " ".join(sys.argv[1:] if argv is None else argv),
              identical)


if __name__ == "__main__":
    main()
