"""Simulation engines side by side: devft in-process, devft on Ray (2 workers), Flower on Ray,
each in fp32 and in bf16 mixed precision.

    python -m benchmarks.simulation --profile smoke      # tiny model, 2 rounds (tests the code path)
    python -m benchmarks.simulation --profile standard   # SmolLM2-135M FedIT, 6 rounds, 2 of 8 clients
    python -m benchmarks.simulation --configs devft-ray-2 flower-ray-2   # a subset

The Flower configurations need the `bench-flower` extra (`pip install -e ".[bench-flower]"`).

All three engines train FedIT on the same shards (the in-process run of a precision writes them;
the others read them), the same client schedule, seeds, LoRA settings and devft's `local_train`
and `evaluate` in the configuration's precision (`-bf16`: RunConfig.precision="bf16", see
server_sdk/engine/precision.py), with one torch thread per training process. Flower's central
evaluation runs in its server process, devft's is split across the Ray workers. Each
configuration runs in its own process while this one samples the memory of that process and
every descendant (Ray's raylet, GCS and workers) every half second. Each configuration's result is cached as
benchmarks/results/simulation/<profile>-<config>.json (a rerun only fills the gaps; delete a
file to measure it again); the summary goes to results/simulation[-smoke].json, a plot and,
for the standard profile, RESULTS.md.

Seconds per round are the mean over rounds 2.. (round 1 includes Flower's model loading in
its client processes; devft's Ray workers load theirs before round 1); the total wall time,
start-up included, is reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from server_sdk.config import RunConfig

from .results_md import md_table, replace_block

RESULTS = Path(os.environ.get("DEVFT_BENCH_RESULTS", Path(__file__).parent / "results"))
KEPT = RESULTS / "simulation"
CACHE = RESULTS / "cache" / "simulation"
# the fp32 trio, then the same three with bf16 mixed precision (server_sdk/engine/precision.py): Flower's app
# trains and evaluates with devft's local_train/evaluate, so it gets the same precision
ENGINES = ("devft-in-process", "devft-ray-2", "flower-ray-2")
CONFIGS = (*ENGINES, *(f"{e}-bf16" for e in ENGINES))
MiB = 2**20


def split(config: str) -> tuple[str, str]:
    """"devft-ray-2-bf16" -> ("devft-ray-2", "bf16"); no suffix is fp32."""
    return (config[:-5], "bf16") if config.endswith("-bf16") else (config, "fp32")


def profile_config(profile: str, precision: str = "fp32") -> RunConfig:
    return dataclasses.replace(_profile_config(profile), precision=precision)


def _profile_config(profile: str) -> RunConfig:
    """The named config server_sdk/configs/simulation[-smoke].yaml."""
    return RunConfig.load("simulation-smoke" if profile == "smoke" else "simulation")


# ---- one configuration, in its own process ------------------------------------------------
def run_child(config: str, profile: str, out: Path) -> None:
    """Run one configuration; write its rounds (eval loss, seconds) and this process's peak RSS."""
    engine, precision = split(config)
    cfg = profile_config(profile, precision)
    # the in-process run of the same precision writes the shards (and the config.json Flower reads)
    data_dir = CACHE / profile / ("devft-in-process" if precision == "fp32" else f"devft-in-process-{precision}")
    t0 = time.perf_counter()
    if engine.startswith("devft"):
        from server_sdk.engine.rounds import run

        run_dir = CACHE / profile / config
        shutil.rmtree(run_dir, ignore_errors=True)
        factory = None
        if engine == "devft-ray-2":
            from server_sdk.engine.ray_executor import RaySettings, ray_executor_factory

            factory = ray_executor_factory(RaySettings(workers=2, quorum=1.0))
        report = run(cfg, run_dir, progress=False, executor_factory=factory)
        rounds = [{"round": r["round"], "eval_loss": r["eval_loss"], "seconds": r["wall_seconds"],
                   "train_loss": r["train_loss"]} for r in report["records"] if r["stage"] >= 0]
        base_eval = report["records"][0]["eval_loss"]
    else:
        try:
            from flwr.simulation import run_simulation
        except ImportError:
            raise SystemExit(f"{config} needs Flower: pip install -e '.[bench-flower]' (flwr 1.42.0) into this "
                             "environment, or leave the Flower configurations out with --configs") from None

        from .flower_app import client_app, server_app, task

        log = CACHE / profile / f"{config}-rounds.json"
        settings = CACHE / profile / f"{config}-settings.json"
        settings.write_text(json.dumps({"run_dir": str(data_dir), "log": str(log)}))
        os.environ[task.SETTINGS_ENV] = str(settings)  # Ray workers inherit it
        run_simulation(server_app=server_app.app, client_app=client_app.app, num_supernodes=cfg.num_clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2, "include_dashboard": False}})
        rows = json.loads(log.read_text())
        base_eval = rows[0]["eval_loss"]
        rounds = [r for r in rows if r["round"] > 0]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.write_text(json.dumps({"config": config, "rounds": rounds, "base_eval_loss": base_eval,
                               "total_seconds": time.perf_counter() - t0,
                               "coordinator_peak_rss_mib": peak_kib / 1024}, indent=1))


# ---- the parent: runs a child and samples its process tree -------------------------------
def _label(proc: psutil.Process, root: int) -> str:
    if proc.pid == root:
        return "coordinator"
    try:
        name = " ".join(proc.cmdline())[:120] or proc.name()
    except psutil.Error:
        return "?"
    for key, label in (("ClientWorker", "devft Ray worker"), ("ClientAppActor", "Flower client actor"),
                       ("raylet", "ray: raylet"), ("gcs_server", "ray: gcs"), ("IDLE", "ray: idle worker")):
        if key in name:
            return label
    return "other: " + proc.name()


def measure(config: str, profile: str) -> dict:
    """Run one configuration in a child process, sampling the RSS of it and all its descendants."""
    out = CACHE / profile / f"{config}.child.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.simulation", "--profile", profile, "--child", config, "--out", str(out)]
    child = subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"})
    root = psutil.Process(child.pid)
    peaks: dict[int, dict] = {}
    peak_sum = peak_pss = 0
    tick = 0
    while child.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        total = pss = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                if tick % 6 == 0:
                    pss += p.memory_full_info().pss
            except psutil.Error:
                continue
            total += rss
            entry = peaks.setdefault(p.pid, {"label": _label(p, child.pid), "peak_rss_mib": 0.0})
            if entry["label"] in ("ray: idle worker", "?") or entry["label"].startswith("other"):
                entry["label"] = _label(p, child.pid)  # Ray names a worker once it takes an actor
            entry["peak_rss_mib"] = max(entry["peak_rss_mib"], rss / MiB)
        peak_sum = max(peak_sum, total)
        peak_pss = max(peak_pss, pss)
        tick += 1
        time.sleep(0.5)
    if child.wait() != 0:
        raise RuntimeError(f"{config} failed (exit {child.returncode}); see its output above")
    result = json.loads(out.read_text())
    procs = sorted(peaks.values(), key=lambda e: -e["peak_rss_mib"])
    result.update(processes=[e for e in procs if e["peak_rss_mib"] >= 20], summed_peak_rss_mib=peak_sum / MiB,
                  summed_peak_pss_mib=peak_pss / MiB)
    return result


def run_profile(profile: str, configs: tuple[str, ...] = CONFIGS) -> dict:
    KEPT.mkdir(parents=True, exist_ok=True)
    for config in configs:  # the in-process run goes first: it writes the shards the others read
        kept = KEPT / f"{profile}-{config}.json"
        if not kept.exists():
            print(f"simulation benchmark: running {config} ({profile})", flush=True)
            kept.write_text(json.dumps(measure(config, profile), indent=1))
    results = {c: json.loads((KEPT / f"{profile}-{c}.json").read_text()) for c in CONFIGS
               if (KEPT / f"{profile}-{c}.json").exists()}
    summary = summarize(results)
    name = "simulation" if profile == "standard" else f"simulation-{profile}"
    (RESULTS / f"{name}.json").write_text(json.dumps({"profile": profile, "summary": summary, "runs": results},
                                                     indent=1))
    plot(results, RESULTS / f"{name}.png")
    table = markdown(profile, summary, results)
    print(table)
    if profile == "standard":
        replace_block("simulation", table)
    return summary


def summarize(results: dict) -> dict:
    """Per configuration: s/round (rounds 2..), memory, and the largest eval-loss difference from the in-process
    run of the same precision (bf16 runs also from the fp32 one); s/round against Flower of the same precision
    and against Flower's fastest configuration."""
    out = {}
    for config, r in results.items():
        engine, precision = split(config)
        same = "devft-in-process" if precision == "fp32" else f"devft-in-process-{precision}"
        ref = [x["eval_loss"] for x in results.get(same, results["devft-in-process"])["rounds"]]
        fp32 = [x["eval_loss"] for x in results["devft-in-process"]["rounds"]]
        secs = [x["seconds"] for x in r["rounds"]]
        warm = secs[1:] or secs
        workers = [p["peak_rss_mib"] for p in r["processes"] if "worker" in p["label"] or "actor" in p["label"]]
        out[config] = {
            "seconds_per_round": sum(warm) / len(warm), "total_seconds": r["total_seconds"],
            "coordinator_peak_rss_mib": r["coordinator_peak_rss_mib"],
            "max_worker_peak_rss_mib": max(workers) if workers else None,
            "summed_peak_rss_mib": r["summed_peak_rss_mib"], "summed_peak_pss_mib": r["summed_peak_pss_mib"],
            "precision": precision,
            "max_eval_loss_diff_vs_in_process": max(abs(a["eval_loss"] - b) for a, b in zip(r["rounds"], ref)),
            "max_eval_loss_diff_vs_fp32_in_process": max(abs(a["eval_loss"] - b) for a, b in zip(r["rounds"], fp32)),
        }
    flowers = {c: s["seconds_per_round"] for c, s in out.items() if c.startswith("flower")}
    best = min(flowers.values(), default=None)
    for config, s in out.items():
        if config.startswith("flower"):
            continue
        flower = flowers.get("flower-ray-2" + ("" if s["precision"] == "fp32" else f"-{s['precision']}"))
        if flower:
            s["seconds_per_round_vs_flower"] = s["seconds_per_round"] / flower
        if best:
            s["seconds_per_round_vs_flower_best"] = s["seconds_per_round"] / best
        if split(config)[0] == "devft-in-process":  # every client and the evaluation, one after another on one core
            s["two_core_bound_seconds"] = s["seconds_per_round"] / 2
            if flower:
                s["two_core_bound_vs_flower"] = s["two_core_bound_seconds"] / flower
    return out


def markdown(profile: str, summary: dict, results: dict) -> str:
    rows = []
    for config, s in summary.items():
        worker = "-" if s["max_worker_peak_rss_mib"] is None else f"{s['max_worker_peak_rss_mib']:.0f}"
        ratio, best = s.get("seconds_per_round_vs_flower"), s.get("seconds_per_round_vs_flower_best")
        rows.append([config, f"{s['seconds_per_round']:.1f}", "-" if ratio is None else f"{ratio:.2f}x",
                     "-" if best is None else f"{best:.2f}x",
                     f"{s['total_seconds']:.0f}", f"{s['coordinator_peak_rss_mib']:.0f}", worker,
                     f"{s['summed_peak_rss_mib']:.0f}", f"{s['summed_peak_pss_mib']:.0f}",
                     f"{s['max_eval_loss_diff_vs_in_process']:.1e}", f"{s['max_eval_loss_diff_vs_fp32_in_process']:.1e}"])
    header = ["configuration", "s/round", "vs Flower (same precision)", "vs Flower's fastest", "total s",
              "coordinator peak RSS MiB", "largest worker peak RSS MiB", "summed peak RSS MiB", "summed peak PSS MiB",
              "max Δ eval loss vs in-process (same precision)", "max Δ eval loss vs fp32 in-process"]
    loss_rows = [[r["round"], *(f"{results[c]['rounds'][i]['eval_loss']:.6f}" for c in results)]
                 for i, r in enumerate(results["devft-in-process"]["rounds"])]
    bounds = [f"- {c}: {s['seconds_per_round']:.1f} s of one-core work per round; split perfectly over 2 cores "
              f"{s['two_core_bound_seconds']:.1f} s" + (f", {s['two_core_bound_vs_flower']:.2f}x Flower's round of the same "
                                                       "precision" if "two_core_bound_vs_flower" in s else "")
              for c, s in summary.items() if "two_core_bound_seconds" in s]
    lines = [f"### Simulation engines ({profile} profile: `python -m benchmarks.simulation --profile {profile}`)", "",
             *md_table(header, rows), "",
             "The fastest any engine can be on these 2 cores, at the same per-client work: the in-process round "
             "(clients and evaluation one after another, one thread) divided by 2:", "", *bounds, "",
             "Held-out eval loss per round:", "",
             *md_table(["round", *results], loss_rows)]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for config, r in results.items():
        rounds = [x["round"] for x in r["rounds"]]
        axes[0].plot(rounds, [x["seconds"] for x in r["rounds"]], marker="o", label=config)
        axes[1].plot(rounds, [x["eval_loss"] for x in r["rounds"]], marker="o", label=config)
    axes[0].set(xlabel="round", ylabel="seconds", title="seconds per round")
    axes[1].set(xlabel="round", ylabel="held-out eval loss", title="eval loss")
    names = list(results)
    coord = [results[c]["coordinator_peak_rss_mib"] for c in names]
    summed = [results[c]["summed_peak_rss_mib"] for c in names]
    xs = range(len(names))
    axes[2].bar([x - 0.2 for x in xs], coord, width=0.4, label="coordinator")
    axes[2].bar([x + 0.2 for x in xs], summed, width=0.4, label="all processes (RSS sum)")
    axes[2].set_xticks(list(xs), names, rotation=15)
    axes[2].set(ylabel="peak RSS MiB", title="memory")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=("smoke", "standard"), default="standard")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child, args.profile, args.out)
        return 0
    configs = [c for c in CONFIGS if c in args.configs]
    for c in list(configs):  # the in-process run of a precision writes its shards and is its reference
        ref = "devft-in-process" + ("" if split(c)[1] == "fp32" else f"-{split(c)[1]}")
        if ref not in configs and not (KEPT / f"{args.profile}-{ref}.json").exists():
            configs.insert(0, ref)
    if "devft-in-process" not in configs and not (KEPT / f"{args.profile}-devft-in-process.json").exists():
        configs.insert(0, "devft-in-process")
    run_profile(args.profile, tuple(c for c in CONFIGS if c in configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
