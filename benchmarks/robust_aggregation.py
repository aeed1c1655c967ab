"""Robust aggregation on an honest run (issue #13): does `median` or `trimmed-mean` cost accuracy?

    python -m benchmarks.robust_aggregation --profile smoke          # tiny model, the code path (tests)
    nice -n 15 python -m benchmarks.robust_aggregation               # SmolLM2-135M, 3 rules x seeds 0, 1

FedIT on SmolLM2-135M in process (server_sdk.engine.rounds.run, InProcessExecutor): 8 clients, 5 sampled
per round (so the trimmed mean, beta 0.2, drops one update at each end of every coordinate; with 2
per round the median would equal the mean), 6 rounds of 5 local steps, held-out loss after every
round. Every client is honest: the question is only what the robust rules cost. Each rule's final
eval loss is compared with FedAvg's on the same seed, beside FedAvg's own seed-to-seed spread
(the "seed noise").

Each run is cached by config hash under benchmarks/results/cache/ (git-ignored; an interrupted
run resumes from its checkpoint) and kept as benchmarks/results/robust-aggregation/<key>.json
(committed, small); the summary goes to benchmarks/results/robust-aggregation[-smoke].json, a
plot beside it and (real profile) RESULTS.md's block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from server_sdk.config import RunConfig
from server_sdk.method.aggregation import AGGREGATIONS

from .metrics import client_cpu
from .results_md import RESULTS_MD, md_table, replace_block, save_figure, write_atomic
from .shards import shared_data

RESULTS = Path(os.environ.get("DEVFT_BENCH_RESULTS", Path(__file__).parent / "results"))
CACHE = RESULTS / "cache"
KEPT = RESULTS / "robust-aggregation"
RULES = tuple(AGGREGATIONS)  # fedavg, median, trimmed-mean: the registry's names


def base_config(profile: str) -> RunConfig:
    """The named config server_sdk/configs/robust-aggregation[-smoke].yaml."""
    return RunConfig.load("robust-aggregation-smoke" if profile == "smoke" else "robust-aggregation")


def run_config(base: RunConfig, rule: str, seed: int) -> RunConfig:
    cfg = RunConfig.from_dict(base.to_dict())
    cfg.aggregation, cfg.seed = rule, seed
    return cfg.validate()


def run_key(cfg: RunConfig, attack: str | None = None) -> str:
    blob = json.dumps({"cfg": cfg.identity()}, sort_keys=True).encode()
    return f"{cfg.aggregation}{f'-{attack}' if attack else ''}-s{cfg.seed}-{hashlib.sha256(blob).hexdigest()[:12]}"


def run_one(cfg: RunConfig, base_model, executor_factory=None, attack: str | None = None,
            extra: Callable[[], dict] | None = None) -> dict:
    """Run (or resume, or load) one run; its compact record is kept under KEPT.

    `attack` names a run whose clients `executor_factory` builds (benchmarks/sign_flip.py); `extra()` adds
    fields to the kept record when the run ends."""
    from server_sdk.engine.rounds import run

    key = run_key(cfg, attack)
    kept = KEPT / f"{key}.json"
    if kept.exists():
        return json.loads(kept.read_text())
    run_dir = CACHE / f"robust-{key}"
    resume = (run_dir / "checkpoint").exists()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    if not resume:
        shutil.copytree(shared_data(cfg, base_model, CACHE) / "data", run_dir / "data")
    c0, t0 = time.process_time(), time.perf_counter()
    out = run(cfg, run_dir, resume=resume, base=base_model, progress=False, executor_factory=executor_factory)
    compact = {"key": key, "rule": cfg.aggregation, "seed": cfg.seed, "attack": attack, **(extra() if extra else {}),
               "config": cfg.to_dict(),
               "records": out["records"], "process_cpu_seconds": time.process_time() - c0,
               "wall_seconds": time.perf_counter() - t0, "resumed": resume,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_atomic(kept, json.dumps(compact) + "\n")
    return compact


def eval_curve(rep: dict) -> list[dict]:
    """(round, eval loss) of every evaluated record; round 0 is the base model before training."""
    return [{"round": r["round"], "eval_loss": r["eval_loss"]} for r in rep["records"] if r.get("eval_loss") is not None]


def summarize(reps: list[dict], rules: list[str], seeds: list[int]) -> dict:
    runs = []
    for rep in reps:
        curve = eval_curve(rep)
        runs.append({"rule": rep["rule"], "seed": rep["seed"], "key": rep["key"], "eval_loss_per_round": curve,
                     "final_eval_loss": curve[-1]["eval_loss"],
                     "client_cpu_seconds": client_cpu(rep["records"])})
    by = {(r["rule"], r["seed"]): r for r in runs}
    fedavg_final = {s: by[("fedavg", s)]["final_eval_loss"] for s in seeds if ("fedavg", s) in by}
    spread = max(fedavg_final.values()) - min(fedavg_final.values()) if len(fedavg_final) >= 2 else None
    per_rule = {}
    for rule in rules:
        diffs, per_round = {}, {}
        for s in seeds:
            mine, ref = by.get((rule, s)), by.get(("fedavg", s))
            if mine is None or ref is None:
                continue
            diffs[s] = mine["final_eval_loss"] - ref["final_eval_loss"]
            ref_at = {p["round"]: p["eval_loss"] for p in ref["eval_loss_per_round"]}
            per_round[s] = [{"round": p["round"], "diff": p["eval_loss"] - ref_at[p["round"]]}
                            for p in mine["eval_loss_per_round"] if p["round"] in ref_at]
        worst = max((abs(d) for d in diffs.values()), default=None)
        per_rule[rule] = {
            "final_eval_loss": {str(s): by[(rule, s)]["final_eval_loss"] for s in seeds if (rule, s) in by},
            "diff_from_fedavg_same_seed": {str(s): d for s, d in diffs.items()},
            "diff_from_fedavg_per_round": {str(s): v for s, v in per_round.items()},
            "max_abs_diff_from_fedavg": worst,
            # within seed noise: its largest same-seed difference is no larger than FedAvg's seed-to-seed spread
            "within_fedavg_seed_spread": None if worst is None or spread is None else worst <= spread,
        }
    return {"rules": rules, "seeds": seeds, "runs": runs,
            "fedavg_final_eval_loss": {str(s): v for s, v in fedavg_final.items()},
            "fedavg_seed_spread": spread, "per_rule": per_rule}


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {rule: f"C{i}" for i, rule in enumerate(summary["rules"])}
    styles = ["-", "--", ":", "-."]
    for run in summary["runs"]:
        xs = [p["round"] for p in run["eval_loss_per_round"]]
        ys = [p["eval_loss"] for p in run["eval_loss_per_round"]]
        ax.plot(xs, ys, styles[summary["seeds"].index(run["seed"]) % len(styles)], marker="o", markersize=3,
                color=colors[run["rule"]], label=f"{run['rule']}, seed {run['seed']}")
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out eval loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, title)


def markdown(summary: dict, command: str, cfg: RunConfig) -> str:
    f = lambda v, fmt=".4f": "-" if v is None else format(v, fmt)  # noqa: E731
    seeds = summary["seeds"]
    lines = [f"Command: `{command}`", "",
             f"FedIT, `{cfg.model}`, {cfg.num_clients} clients, {cfg.clients_per_round} per round, "
             f"{cfg.rounds_per_stage} rounds of {cfg.local_steps} local steps (batch {cfg.batch_size}, seq {cfg.seq_len}, "
             f"lr {cfg.lr}), all clients honest, held-out loss after every round "
             f"({cfg.data.eval_examples_per_task * len(cfg.data.tasks)} examples).", "",
             f"FedAvg's seed-to-seed spread of final eval loss (the seed noise): {f(summary['fedavg_seed_spread'])}.", ""]
    rows = []
    for rule in summary["rules"]:
        pr = summary["per_rule"][rule]
        finals = [f(pr["final_eval_loss"].get(str(s))) for s in seeds]
        diffs = [f(pr["diff_from_fedavg_same_seed"].get(str(s)), "+.4f") for s in seeds]
        within = {True: "yes", False: "no", None: "-"}[pr["within_fedavg_seed_spread"]]
        rows.append([rule, *finals, *diffs, within])
    lines += md_table(["rule", *(f"final loss, seed {s}" for s in seeds), *(f"minus FedAvg, seed {s}" for s in seeds),
                       "within FedAvg's seed spread"], rows)
    rounds = sorted({p["round"] for r in summary["runs"] for p in r["eval_loss_per_round"]})
    lines += ["", "Eval loss per round:", ""]
    lines += md_table(["rule", "seed", *map(str, rounds)],
                      [[r["rule"], r["seed"], *(f({p["round"]: p["eval_loss"] for p in r["eval_loss_per_round"]}.get(k), ".3f")
                                                for k in rounds)] for r in summary["runs"]])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["smoke", "standard"], default="standard")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, from {list(RULES)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    args = p.parse_args(argv)
    rules = [r for r in args.rules.split(",") if r]
    unknown = [r for r in rules if r not in AGGREGATIONS]
    if unknown:
        p.error(f"unknown rule(s) {unknown}; choose from {list(RULES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    from server_sdk.engine.model import load_base_model

    base = base_config(args.profile)
    model = load_base_model(base.model)
    # FedAvg on every seed first (the seed noise), then each robust rule seed by seed
    order = [(r, s) for r in rules if r == "fedavg" for s in seeds] + [(r, s) for s in seeds for r in rules if r != "fedavg"]
    reps = []
    for rule, seed in order:
        t0 = time.perf_counter()
        rep = run_one(run_config(base, rule, seed), model)
        reps.append(rep)
        final = eval_curve(rep)[-1]["eval_loss"]
        print(f"[robust] {rule} seed {seed}: final eval loss {final:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarize(reps, rules, seeds)
    bad = [r for r in summary["runs"] if not all(math.isfinite(p["eval_loss"]) for p in r["eval_loss_per_round"])]
    tag = "" if args.profile == "standard" else f"-{args.profile}"
    command = "python -m benchmarks.robust_aggregation " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"profile": args.profile, "command": command.strip(), "config": base.to_dict(), **summary,
               "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_atomic(RESULTS / f"robust-aggregation{tag}.json", json.dumps(summary, indent=1) + "\n")
    png = RESULTS / f"robust-aggregation{tag}.png"
    plot(summary, png, f"Robust aggregation on an honest run: FedIT, {base.model}, "
                       f"{base.clients_per_round} of {base.num_clients} clients per round")
    md = markdown(summary, command.strip(), base)
    if args.profile == "standard" and "DEVFT_BENCH_RESULTS" not in os.environ:
        replace_block("robust-aggregation",
                      f"### Robust aggregation on an honest run (issue #13, benchmarks/robust_aggregation.py)\n\n{md}\n"
                      f"![eval loss per round](results/robust-aggregation.png)\n\n"
                      f"JSON: `benchmarks/results/robust-aggregation.json`; per-run records in "
                      f"`benchmarks/results/robust-aggregation/`. Generated {summary['generated']}.", RESULTS_MD)
    print(md)
    if bad:
        print(f"non-finite eval loss in {[(r['rule'], r['seed']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
