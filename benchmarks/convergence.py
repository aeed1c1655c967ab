"""Convergence benchmark: DEVFT vs FedIT vs FFA-LoRA side by side, and DEVFT's ablations.

    python -m benchmarks.convergence --profile smoke       # tiny model, a minute or two (CI)
    python -m benchmarks.convergence --profile standard    # SmolLM2-135M, 3 methods x 3 seeds
    python -m benchmarks.convergence --profile ablations   # DEVFT ablations, 3 seeds each
    python -m benchmarks.convergence --profile ablations-smoke  # the ablation code path on the tiny model

Add --worker and start one process per core to share a matrix (runs are claimed by lock files).

Every (method, config, seed) run is cached by the hash of its config under
benchmarks/results/cache/ (git-ignored; holds checkpoints, so an interrupted run resumes)
and its report is kept as benchmarks/results/convergence/<hash>.json (committed, small).
A rerun only fills the gaps. Client compute is measured as process CPU time with one
torch thread, which a busy shared machine disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from server_sdk.config import RunConfig

from .metrics import Link, cumulative, first_reaching, mean_std, ratio
from .results_md import RESULTS_MD, replace_block, write_atomic

RESULTS = Path(os.environ.get("DEVFT_BENCH_RESULTS", Path(__file__).parent / "results"))
CACHE = RESULTS / "cache"  # git-ignored: run directories with checkpoints
KEPT = RESULTS / "convergence"  # committed: one compact report per finished run
COMPUTE_KEY = "client_cpu_seconds"


@dataclass
class Job:
    label: str  # e.g. "devft", "ablation:grouping=random"
    cfg: RunConfig
    group: str  # which table the run belongs to

    @property
    def key(self) -> str:
        blob = json.dumps(self.cfg.identity(), sort_keys=True).encode()
        return f"{self.cfg.strategy}-{hashlib.sha256(blob).hexdigest()[:12]}"


def _base(profile: str) -> RunConfig:
    """The named config server_sdk/configs/convergence[-smoke].yaml. DEVFT here is the paper's method: its fixed
    stage schedule (devft's default became `auto`)."""
    return RunConfig.load("convergence-smoke" if profile == "smoke" else "convergence")


def _method(base: RunConfig, strategy: str, **kw) -> RunConfig:
    cfg = copy.deepcopy(base)
    cfg.strategy = strategy
    if strategy != "devft":  # same total rounds as DEVFT, all on the full model
        n_stages = len(cfg.stages) if cfg.stages else 4
        per = cfg.rounds_per_stage
        cfg.rounds_per_stage = per * n_stages if isinstance(per, int) else sum(per)
        cfg.stages = None
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _split_rounds(total: int, n_stages: int) -> list[int]:
    """Spread a fixed round budget over stages (remainder to the last stages)."""
    per, rest = divmod(total, n_stages)
    return [per + (1 if i >= n_stages - rest else 0) for i in range(n_stages)]


def standard_jobs(profile: str, seeds: list[int], lrs: list[float]) -> tuple[list[Job], dict]:
    """LR search on the first seed (same grid for every method), then all seeds at each method's best LR."""
    base = _base(profile)
    search = [Job(m, _method(base, m, lr=lr, seed=seeds[0]), "lr-search") for m in ("devft", "fedit", "ffa-lora")
              for lr in lrs]
    return search, {"base": base, "seeds": seeds}


def ablation_jobs(profile: str, seeds: list[int], lr: float) -> list[Job]:
    from server_sdk.method.strategies import make_strategy

    base = _method(_base(profile), "devft", lr=lr)
    n = 6 if profile == "smoke" else 30
    total = sum(base.resolve_rounds_per_stage(len(make_strategy(base).stage_sizes(n))))
    variants: list[tuple[str, dict]] = [("default", {})]
    variants += [(f"grouping={g}", {"grouping": g}) for g in ("random", "sequential")]
    variants += [(f"fusion={f}", {"fusion": f}) for f in ("mean", "select")]
    variants += [(f"beta={b}", {"beta": b}) for b in (0.15, 0.5, 1.0)]
    schedules = {"growth=4x": [4, 16, 30], "capacity=1": [1, 2, 4, 8, 16, 30], "capacity=2": [2, 4, 8, 16, 30],
                 "capacity=8": [8, 16, 30], "stages=2": [4, 30], "stages=3": [4, 16, 30]} if n == 30 else \
        {"growth=4x": [2, 6], "capacity=1": [1, 2, 4, 6], "stages=2": [2, 6]}
    for name, stages in schedules.items():
        variants.append((name, {"stages": stages, "rounds_per_stage": _split_rounds(total, len(stages))}))
    jobs = []
    for seed in seeds:  # seed-major: an interrupted matrix still has every row at the first seeds
        for name, kw in variants:
            cfg = copy.deepcopy(base)
            for k, v in {**kw, "seed": seed}.items():
                setattr(cfg, k, v)
            jobs.append(Job(f"ablation:{name}", cfg, "ablations"))
    return jobs


def run_job(job: Job, base_model=None, progress: bool = False) -> dict:
    """Run (or resume, or load) one job; returns its compact report."""
    from server_sdk.engine.rounds import run

    kept = KEPT / f"{job.key}.json"
    if kept.exists():  # the same config may be kept under another table's label (default ablation = devft)
        return {**json.loads(kept.read_text()), "label": job.label, "group": job.group}
    run_dir = CACHE / job.key
    resume = (run_dir / "checkpoint").exists()
    if run_dir.exists() and not resume:
        import shutil

        shutil.rmtree(run_dir)  # a run that died before its first checkpoint: start over
    report = run(job.cfg, run_dir, resume=resume, base=base_model, progress=progress)
    for plan in report["stage_plans"]:
        plan.pop("similarity", None)
    compact = {"key": job.key, "label": job.label, "group": job.group, "config": report["config"],
               "stages": report["stages"], "stage_plans": report["stage_plans"], "records": report["records"],
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomic(kept, json.dumps(compact) + "\n")
    return compact


def _claim(job: Job) -> Path | None:
    """Take a job for this process (lock file holding our PID); None if a live process holds it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = CACHE / f"{job.key}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
                return None  # another worker is running it
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale lock from a stopped worker: take over (it resumes)
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def run_jobs(jobs: list[Job], desc: str, shared: bool = False) -> list[dict | None]:
    """Run jobs in order. With ``shared``, several processes may work on one matrix at once: each
    claims a job before running it and skips jobs claimed by another live process (None in the result)."""
    from server_sdk.engine.model import load_base_model

    models: dict[str, object] = {}
    out: list[dict | None] = []
    bar = tqdm(jobs, desc=desc, unit="run")
    for job in bar:
        bar.set_postfix_str(f"{job.label} seed={job.cfg.seed} lr={job.cfg.lr:g}")
        if (KEPT / f"{job.key}.json").exists():
            out.append(run_job(job))
            continue
        lock = _claim(job) if shared else None
        if shared and lock is None:
            out.append(None)
            continue
        try:
            if job.cfg.model not in models:
                models[job.cfg.model] = load_base_model(job.cfg.model)
            out.append(run_job(job, models[job.cfg.model]))
        finally:
            if lock is not None:
                lock.unlink(missing_ok=True)
    return out


def run_jobs_waiting(jobs: list[Job], desc: str, shared: bool) -> list[dict]:
    """Like run_jobs, but when other workers hold some jobs, wait for them: later phases need all results."""
    while True:
        reps = run_jobs(jobs, desc, shared)
        if all(r is not None for r in reps):
            return reps
        time.sleep(30)


def _all_done(reps: list[dict | None]) -> bool:
    missing = sum(r is None for r in reps)
    if missing:
        print(f"{missing} run(s) are held by other workers; rerun without --worker when they finish "
              "to write the summary (it only loads cached runs).")
    return not missing


# ---- analysis ----------------------------------------------------------------

def final_loss(rep: dict) -> float:
    return [r for r in rep["records"] if r.get("eval_loss") is not None][-1]["eval_loss"]


def final_accuracy(rep: dict) -> tuple[float | None, dict]:
    last = [r for r in rep["records"] if r.get("accuracy") is not None]
    if not last:
        return None, {}
    return last[-1]["accuracy"], {t: v.get("accuracy") for t, v in (last[-1]["per_task"] or {}).items()}


_KEYS = ("sim_seconds", "compute_seconds", "lora_bytes", "total_bytes")


def _to_target(curve: dict, ref_curve: dict, target: float) -> dict:
    """What a run and its FedIT reference (their `cumulative` curves) need to first reach `target`
    (inf: never), and the ratios."""
    got = {k: first_reaching(curve, target, k) for k in _KEYS}
    base = {k: first_reaching(ref_curve, target, k) for k in _KEYS}
    return {"target": target, "method": got, "fedit": base, "ratio": {k: ratio(base[k], got[k]) for k in _KEYS}}


def headline(reports: dict[str, list[dict]], link: Link) -> dict:
    """Per method, seed by seed: final loss/accuracy, and what it takes to reach (a) FedIT's final
    eval loss (the issue's target) and (b) the common target, the worst final loss of all methods
    on that seed, which every method reaches, so a ratio exists even where (a) is never reached."""
    by_seed = {m: {r["config"]["seed"]: r for r in reps} for m, reps in reports.items()}
    out: dict = {"link": link.__dict__, "methods": {}}
    for m, reps in by_seed.items():
        rows: dict = {"final_eval_loss": [], "final_accuracy": [], "client_compute_s": [], "lora_bytes": [],
                      "total_bytes": [], "sim_seconds": [], "time_to_target_s": [], "compute_to_target_s": [],
                      "lora_bytes_to_target": [], "total_bytes_to_target": [], "speedup_time": [],
                      "speedup_compute": [], "bytes_reduction_lora": [], "bytes_reduction_total": [],
                      "common_target": [], "common": {k: [] for k in _KEYS}, "seeds": sorted(reps)}
        for seed, rep in sorted(reps.items()):
            curve = cumulative(rep["records"], link, COMPUTE_KEY)
            rows["final_eval_loss"].append(final_loss(rep))
            rows["final_accuracy"].append(final_accuracy(rep)[0])
            rows["client_compute_s"].append(float(curve["compute_seconds"][-1]))
            rows["lora_bytes"].append(float(curve["lora_bytes"][-1]))
            rows["total_bytes"].append(float(curve["total_bytes"][-1]))
            rows["sim_seconds"].append(float(curve["sim_seconds"][-1]))
            ref = by_seed.get("fedit", {}).get(seed)
            if ref is None:
                continue
            ref_curve = cumulative(ref["records"], link, COMPUTE_KEY)
            t = _to_target(curve, ref_curve, final_loss(ref))
            rows["time_to_target_s"].append(t["method"]["sim_seconds"])
            rows["compute_to_target_s"].append(t["method"]["compute_seconds"])
            rows["lora_bytes_to_target"].append(t["method"]["lora_bytes"])
            rows["total_bytes_to_target"].append(t["method"]["total_bytes"])
            rows["speedup_time"].append(t["ratio"]["sim_seconds"])
            rows["speedup_compute"].append(t["ratio"]["compute_seconds"])
            rows["bytes_reduction_lora"].append(t["ratio"]["lora_bytes"])
            rows["bytes_reduction_total"].append(t["ratio"]["total_bytes"])
            common = max(final_loss(by_seed[k][seed]) for k in by_seed if seed in by_seed[k])
            c = _to_target(curve, ref_curve, common)
            rows["common_target"].append(common)
            for k in _KEYS:
                rows["common"][k].append(c["ratio"][k])
        out["methods"][m] = rows
    return out


def _fmt(values: list, pct: bool = False, unit: str = "") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    m, s = mean_std(vals)
    if math.isinf(m):
        return f"not reached in {sum(math.isinf(v) for v in vals)}/{len(vals)} seeds"
    k = 100 if pct else 1
    return f"{k * m:.3g}{unit} ± {k * s:.2g}" if len(vals) > 1 else f"{k * m:.3g}{unit}"


def fmt_ratio(values: list[float]) -> str:
    """Ratios over seeds, where 0 means the method never reached the target on that seed
    (see metrics.ratio): the mean over the seeds that reached it, and how many never did."""
    reached = [v for v in values if v > 0]
    never = len(values) - len(reached)
    if not values:
        return "n/a"
    if not reached:
        return f"never reached ({never}/{len(values)} seeds)"
    text = _fmt(reached, unit="x")
    return text + (f" (never reached in {never}/{len(values)} seeds)" if never else "")


def markdown(summary: dict, lr_choice: dict, profile: str, command: str) -> str:
    meths = summary["methods"]
    lines = [f"### Convergence, profile `{profile}`", "", f"Command: `{command}`", "",
             f"Link assumption: {summary['link']['up_mbit_s']} Mbit/s up, {summary['link']['down_mbit_s']} Mbit/s down. "
             "Client compute = process CPU seconds of local training (1 torch thread). Learning rate per method picked "
             f"on seed {min(next(iter(meths.values()))['seeds'])} from the same grid: "
             + ", ".join(f"{m} {lr:g}" for m, lr in lr_choice.items()) + ". Mean ± standard deviation over seeds.", "",
             "**Equal rounds** (all methods run the same number of rounds):", "",
             "| method | seeds | final eval loss | final accuracy | client CPU s | LoRA MB (up+down) | "
             "MB incl. stage downloads | simulated wall time |", "|---|---|---|---|---|---|---|---|"]
    for m, r in meths.items():
        lines.append(f"| {m} | {len(r['seeds'])} | {_fmt(r['final_eval_loss'])} | "
                     f"{_fmt(r['final_accuracy'], pct=True, unit='%')} | {_fmt(r['client_compute_s'])} | "
                     f"{_fmt([b / 1e6 for b in r['lora_bytes']])} | {_fmt([b / 1e6 for b in r['total_bytes']])} | "
                     f"{_fmt(r['sim_seconds'], unit=' s')} |")
    lines += ["", "**To FedIT's final eval loss** (the issue's target, per seed; ratios are FedIT / method, "
              "so >1 means the method needs less):", "",
              "| method | sim. time to target | speed-up (sim. time) | speed-up (client compute) | "
              "LoRA bytes reduction | bytes reduction incl. stage downloads |", "|---|---|---|---|---|---|"]
    for m, r in meths.items():
        lines.append(f"| {m} | {_fmt(r['time_to_target_s'], unit=' s')} | {fmt_ratio(r['speedup_time'])} | "
                     f"{fmt_ratio(r['speedup_compute'])} | {fmt_ratio(r['bytes_reduction_lora'])} | "
                     f"{fmt_ratio(r['bytes_reduction_total'])} |")
    common = next(iter(meths.values()))["common_target"]
    lines += ["", f"**To the common target** (per seed, the worst final eval loss of the three methods, "
              f"which all of them reach: {_fmt(common)}):", "",
              "| method | speed-up (sim. time) | speed-up (client compute) | LoRA bytes reduction | "
              "bytes reduction incl. stage downloads |", "|---|---|---|---|---|"]
    for m, r in meths.items():
        c = r["common"]
        lines.append(f"| {m} | {fmt_ratio(c['sim_seconds'])} | {fmt_ratio(c['compute_seconds'])} | "
                     f"{fmt_ratio(c['lora_bytes'])} | {fmt_ratio(c['total_bytes'])} |")
    return "\n".join(lines) + "\n"


def plot_standard(reports: dict[str, list[dict]], link: Link, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for m, reps in reports.items():
        curves = [cumulative(r["records"], link, COMPUTE_KEY) for r in reps]
        for ax, key, label in ((axes[0, 0], "round", "round"), (axes[0, 1], "sim_seconds", "simulated wall time (s)"),
                               (axes[1, 0], "lora_bytes", "LoRA traffic (MB)")):
            x = np.mean([c[key] for c in curves], axis=0) / (1e6 if "bytes" in key else 1)
            y = np.array([c["eval_loss"] for c in curves])
            ok = ~np.isnan(y).any(axis=0)
            mean, std = y[:, ok].mean(0), y[:, ok].std(0)
            ax.plot(x[ok], mean, marker="o", ms=3, label=m)
            ax.fill_between(x[ok], mean - std, mean + std, alpha=0.2)
            ax.set_xlabel(label)
            ax.set_ylabel("held-out eval loss")
    tasks = sorted({t for reps in reports.values() for r in reps for t in (final_accuracy(r)[1] or {})})
    width = 0.8 / max(len(reports), 1)
    for i, (m, reps) in enumerate(reports.items()):
        accs = [[final_accuracy(r)[1].get(t) or 0 for r in reps] for t in tasks]
        overall = [final_accuracy(r)[0] or 0 for r in reps]
        vals = [np.mean(a) * 100 for a in accs] + [np.mean(overall) * 100]
        errs = [np.std(a) * 100 for a in accs] + [np.std(overall) * 100]
        axes[1, 1].bar(np.arange(len(tasks) + 1) + i * width, vals, width, yerr=errs, label=m, capsize=2)
    axes[1, 1].set_xticks(np.arange(len(tasks) + 1) + width, [*tasks, "overall"], rotation=20, fontsize=8)
    axes[1, 1].set_ylabel("final exact-match accuracy (%)")
    for ax in axes.flat:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PAPER_DIRECTION = {
    "grouping": "deconfliction beats random/sequential by 2.4-6.1%",
    "fusion": "differential beats mean/select by 1.4-11%",
    "beta": "too high a beta hurts (0.1-0.15 best)",
    "growth": "steady (2x) growth beats aggressive (4x)",
    "capacity": "initial capacity 4 best (8B models)",
    "stages": "4 stages (steady growth) best",
}


def loss_before_last_stage(rep: dict) -> float | None:
    """Held-out loss of the full model after the early (sub-model) stages, right before the last
    stage starts: what the small stages taught the full model, before the full-model rounds."""
    recs = [r for r in rep["records"] if r.get("eval_loss") is not None]
    last = max(r["stage"] for r in recs)
    before = [r["eval_loss"] for r in recs if r["stage"] < last]
    return before[-1] if before else None


def paired_delta(variant: dict[int, float], default: dict[int, float]) -> list[float]:
    """variant - default on the seeds both have (paired by seed, which removes the data/init noise)."""
    return [variant[s] - default[s] for s in sorted(variant) if s in default and variant[s] is not None
            and default[s] is not None]


def verdict(deltas: list[float], lower_is_better: bool = True, resolution: float = 0.0) -> str:
    """Our direction for a variant vs the default: better/worse when the mean paired difference
    exceeds two standard errors and the metric's resolution (accuracy moves in steps of one eval
    example, so two seeds that both lose one example are not a finding), otherwise within noise."""
    if not deltas:
        return "n/a"
    if len(deltas) == 1:
        return "one seed, no verdict"
    m = float(np.mean(deltas))
    se = float(np.std(deltas, ddof=1) / math.sqrt(len(deltas)))
    if abs(m) <= max(2 * se, resolution):
        return "within noise"
    return "worse" if (m > 0) == lower_is_better else "better"


def ablation_table(reports: list[dict], link: Link | None = None) -> tuple[str, dict]:
    link = link or Link()
    rows: dict[str, list[dict]] = {}
    for r in reports:
        rows.setdefault(r["label"].split(":", 1)[1], []).append(r)
    loss = {n: {r["config"]["seed"]: final_loss(r) for r in reps} for n, reps in rows.items()}
    acc = {n: {r["config"]["seed"]: final_accuracy(r)[0] for r in reps} for n, reps in rows.items()}
    summary = {}
    lines = ["| ablation | seeds | eval loss before the last stage | final eval loss | final accuracy | "
             "eval loss vs default (paired) | "
             "accuracy vs default (paired, points) | ours vs default | client CPU s | LoRA MB | paper's direction |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, reps in rows.items():
        curves = [cumulative(r["records"], link, COMPUTE_KEY) for r in reps]
        dl = paired_delta(loss[name], loss.get("default", {}))
        da = [100 * d for d in paired_delta(acc[name], acc.get("default", {}))]
        summary[name] = {"seeds": sorted(loss[name]), "eval_loss": list(loss[name].values()),
                         "accuracy": list(acc[name].values()), "delta_loss": dl, "delta_accuracy_points": da,
                         "loss_before_last_stage": [loss_before_last_stage(r) for r in reps],
                         "client_compute_s": [float(c["compute_seconds"][-1]) for c in curves],
                         "lora_bytes": [float(c["lora_bytes"][-1]) for c in curves]}
        n_eval = reps[0]["config"]["data"]["eval_examples_per_task"] * max(len(final_accuracy(reps[0])[1]), 1)
        ours = "-" if name == "default" else \
            f"loss {verdict(dl)}, accuracy {verdict(da, lower_is_better=False, resolution=100 / n_eval)}"
        lines.append(
            f"| {name} | {len(reps)} | {_fmt(summary[name]['loss_before_last_stage'])} | "
            f"{_fmt(summary[name]['eval_loss'])} | "
            f"{_fmt(summary[name]['accuracy'], pct=True, unit='%')} | "
            f"{'-' if name == 'default' else _fmt(dl)} | {'-' if name == 'default' else _fmt(da)} | {ours} | "
            f"{_fmt(summary[name]['client_compute_s'])} | {_fmt([b / 1e6 for b in summary[name]['lora_bytes']])} | "
            f"{PAPER_DIRECTION.get(name.split('=')[0], '-')} |")
    d = (rows.get("default") or reports)[0]
    notes = (f"\n`default` is DEVFT as shipped: {d['config']['grouping']} grouping, {d['config']['fusion']} fusion, "
             f"beta {d['config']['beta']:g}, stages {' -> '.join(map(str, d['stages']))} layers, "
             f"{d['config']['rounds_per_stage']} rounds each. Every variant changes one thing and keeps the round budget. "
             "Differences are paired by seed (variant minus default on the same seed); 'better'/'worse' needs the "
             "mean difference to exceed two standard errors (and, for accuracy, one eval example), otherwise "
             "'within noise'.\n")
    return "\n".join(lines) + "\n" + notes, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["smoke", "standard", "ablations", "ablations-smoke"], default="smoke")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 1 smoke, 3 otherwise)")
    p.add_argument("--lrs", default=None, help="comma-separated LR grid searched on the first seed")
    p.add_argument("--up-mbit", type=float, default=10.0, help="device uplink for simulated time (Mbit/s)")
    p.add_argument("--down-mbit", type=float, default=50.0, help="device downlink (Mbit/s)")
    p.add_argument("--partition", choices=["task", "dirichlet", "iid"], default="task")
    p.add_argument("--worker", action="store_true",
                   help="share the matrix with other --worker processes (start one per core); "
                        "each claims runs through lock files in the cache")
    args = p.parse_args(argv)
    shared = args.worker
    tiny = args.profile.endswith("smoke")
    seeds = list(range(args.seeds or (1 if tiny else 3)))
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else ([5e-3] if tiny else [1e-3, 3e-3])
    link = Link(args.up_mbit, args.down_mbit)
    command = "python -m benchmarks.convergence " + " ".join(argv if argv is not None else sys.argv[1:])
    tag = args.profile if args.partition == "task" else f"{args.profile}-{args.partition}"
    profile_for_cfg = "smoke" if tiny else "standard"

    search, meta = standard_jobs(profile_for_cfg, seeds, lrs)
    for job in search:
        job.cfg.data.partition = args.partition
    if args.profile.startswith("ablations"):
        # ablations use DEVFT's LR from the standard search (run it first if missing)
        done = run_jobs_waiting([j for j in search if j.label == "devft"], "lr search (devft)", shared)
        best_lr = min(done, key=final_loss)["config"]["lr"]
        jobs = ablation_jobs(profile_for_cfg, seeds, best_lr)
        for job in jobs:
            job.cfg.data.partition = args.partition
        reps = run_jobs(jobs, "ablations", shared)
        if not _all_done(reps):
            return 0
        table, summary = ablation_table(reps, link)
        _write(tag, {"ablations": summary, "lr": best_lr},
               f"### Ablations (DEVFT, lr {best_lr:g})\n\nCommand: `{command}`\n\n" + table)
        _plot_ablations(summary, RESULTS / f"convergence-{tag}.png")
        print(table)
        return 0

    done = run_jobs_waiting(search, "lr search", shared)
    lr_choice = {}
    for m in ("devft", "fedit", "ffa-lora"):
        lr_choice[m] = min((r for r in done if r["label"] == m), key=final_loss)["config"]["lr"]
    jobs = [Job(m, _method(meta["base"], m, lr=lr_choice[m], seed=s), "standard") for m in lr_choice for s in seeds]
    for job in jobs:
        job.cfg.data.partition = args.partition
    reps = run_jobs(jobs, f"{tag}: methods x seeds", shared)
    if not _all_done(reps):
        return 0
    by_method: dict[str, list[dict]] = {}
    for r in reps:
        by_method.setdefault(r["label"], []).append(r)
    summary = headline(by_method, link)
    md = markdown(summary, lr_choice, tag, command)
    plot_standard(by_method, link, RESULTS / f"convergence-{tag}.png")
    _write(tag, {"summary": summary, "lr_choice": lr_choice, "runs": [r["key"] for r in reps]}, md)
    print(md)
    return 0


def _plot_ablations(summary: dict, path: Path) -> None:
    """Left: final eval loss per variant (mean, std over seeds). Middle/right: the paired difference
    to the default on the same seed, loss and accuracy, so seed noise shared by both cancels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.35 * len(names) + 2), sharey=True)
    panels = ((axes[0], "eval_loss", 1, "final eval loss"),
              (axes[1], "delta_loss", 1, "eval loss minus default, same seed (lower is better)"),
              (axes[2], "delta_accuracy_points", 1, "accuracy minus default, same seed (points)"))
    for ax, key, k, label in panels:
        vals = [[v for v in summary[n][key] if v is not None] for n in names]
        mean = [k * np.mean(v) if v else np.nan for v in vals]
        err = [k * np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals]
        ax.barh(y, mean, xerr=err, capsize=3, color=["grey" if n == "default" else "C0" for n in names])
        if key != "eval_loss":
            ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(label, fontsize=9)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("DEVFT ablations: mean and standard deviation over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(tag: str, data: dict, md: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"convergence-{tag}.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    (RESULTS / f"convergence-{tag}.md").write_text(md)
    if "smoke" not in tag:  # the real profiles also refresh their block of RESULTS.md (beside the results dir)
        md_path = RESULTS_MD if "DEVFT_BENCH_RESULTS" not in os.environ else RESULTS / "RESULTS.md"
        replace_block(f"convergence-{tag}", md + f"\nJSON: `benchmarks/results/convergence-{tag}.json` (per-run "
                      f"records in `benchmarks/results/convergence/`); plot: `benchmarks/results/convergence-{tag}.png`.\n"
                      f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", md_path)


if __name__ == "__main__":
    raise SystemExit(main())
