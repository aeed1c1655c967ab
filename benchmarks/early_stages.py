"""Screening harness for issue #12: do DEVFT's early stages teach the full model?

    python -m benchmarks.early_stages --profile smoke                 # tiny model, the code path (tests)
    nice -n 10 python -m benchmarks.early_stages --profile screen     # SmolLM2-135M: first stage, seed 0
    nice -n 10 python -m benchmarks.early_stages --profile screen --variants paper,heal=hidden --stages 2
    nice -n 10 python -m benchmarks.early_stages --profile full --variants auto --seeds 3   # whole runs

A screen runs each variant's first stage (or first `--stages` stages), one seed, and a FedIT run
of the same profile for as many rounds, then reports per stage the full model's held-out loss
change per client CPU second (server_sdk.method.stage_gain) beside FedIT's. A variant that does not
move that number will not move time-to-target. `full` runs every stage (12 rounds) with FedIT
beside it and adds the issue's headline ratios: client CPU and LoRA bytes to FedIT's final eval
loss (FedIT / variant; null where never reached).

Evaluation is sized to resolve differences: 64 held-out examples per task (256), from generator
seeds training never sees (server_sdk.data.build_eval_data), loss only (no generation) in
screens. `--partition dirichlet` runs the Dirichlet partition beside the task partition.

Each run is cached by config hash under benchmarks/results/cache/ (git-ignored; resumable) and
kept as benchmarks/results/early-stages/<key>.json (committed, small); the summary goes to
benchmarks/results/early-stages[-<profile>][-<partition>].json and RESULTS.md's block.
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
from server_sdk.method.records import RoundRecord
from server_sdk.method.stage_gain import relative_rate, stage_gains

from .metrics import Link, client_cpu, cumulative, first_reaching, ratio
from .results_md import RESULTS_MD, replace_block, write_atomic
from .shards import shared_data

RESULTS = Path(os.environ.get("DEVFT_BENCH_RESULTS", Path(__file__).parent / "results"))
CACHE = RESULTS / "cache"
KEPT = RESULTS / "early-stages"
COMPUTE_KEY = "client_cpu_seconds"

# name -> config overrides of DEVFT; the base config is the paper's method ("paper": fixed schedule, no heal)
VARIANTS: dict[str, dict] = {
    "paper": {},
    "heal=hidden": {"heal": "hidden"},
    "heal=logits": {"heal": "logits"},
    "heal=hidden/200steps": {"heal": "hidden", "heal_steps": 200},
    "first-last": {"grouping": "first-last", "anchor": "last", "fusion": "select", "transfer": "anchor"},
    "first-last+heal=hidden": {"grouping": "first-last", "anchor": "last", "fusion": "select", "transfer": "anchor",
                               "heal": "hidden"},
    "auto": {"schedule": "auto", "eval_every": 1},
}


def base_config(profile: str, partition: str = "task") -> RunConfig:
    """The convergence benchmark's standard setup, with an evaluation that resolves differences: the named config
    server_sdk/configs/early-stages[-smoke|-full].yaml (screens evaluate at stage ends only; whole runs every round,
    for time-to-target), with the partition asked for."""
    cfg = RunConfig.load({"smoke": "early-stages-smoke", "full": "early-stages-full"}.get(profile, "early-stages"))
    cfg.data.partition = partition
    return cfg


def variant_config(base: RunConfig, name: str, seed: int, to_target: bool = False) -> RunConfig:
    """One run's config. to_target (whole runs): a DEVFT variant's final stage gets as many rounds
    as FedIT has in all, so it can reach FedIT's final loss; the run stops there (see run_one)."""
    cfg = copy.deepcopy(base)
    overrides = {"strategy": "fedit"} if name == "fedit" else VARIANTS[name]
    for k, v in {**overrides, "seed": seed}.items():
        setattr(cfg, k, v)
    n_stages = len(base.stages) if base.stages else 4
    if name == "fedit":  # the same round budget, all on the full model
        cfg.rounds_per_stage, cfg.stages = base.rounds_per_stage * n_stages, None
    elif to_target:
        cfg.rounds_per_stage = [base.rounds_per_stage] * (n_stages - 1) + [base.rounds_per_stage * n_stages]
    return cfg.validate()


def reached(target: float, cpu_budget: float):
    """stop_when for a run toward FedIT's final eval loss: stop at the first evaluated round at or
    below it, or once the run's client CPU passes cpu_budget (then it never got there in budget)."""
    def stop(records: list[RoundRecord]) -> bool:
        rounds = [r for r in records if r.stage >= 0]
        last = rounds[-1].eval_loss if rounds else None
        return (last is not None and last <= target + 1e-12) or client_cpu([r.to_dict() for r in records]) > cpu_budget
    return stop


# bumped when a rule's behaviour changes, so kept runs of the old rule are not reused:
# auto 3 = rolls back a small stage that did not pay for itself; the full-model stage draws as FedIT's
RULE_VERSIONS = {"auto": 3}


def run_key(cfg: RunConfig, stop_after: int | None, target: dict | None = None) -> str:
    ident = {"cfg": cfg.identity(), "stop_after": stop_after, **({"target": target} if target else {})}
    if cfg.strategy == "devft" and cfg.schedule in RULE_VERSIONS:
        ident["rules"] = RULE_VERSIONS[cfg.schedule]
    blob = json.dumps(ident, sort_keys=True).encode()
    return f"{cfg.strategy}-{hashlib.sha256(blob).hexdigest()[:12]}"


# whole runs stop once past this multiple of FedIT's client CPU (the goal is <= 1.0x; 1.1x is "much worse")
CPU_BUDGET_X_FEDIT = 1.5


def run_one(name: str, cfg: RunConfig, stop_after: int | None, base_model=None, fedit_ref: dict | None = None,
            kept_only: bool = False) -> dict | None:
    """Run (or resume, or load) one run; its compact record is kept under KEPT. With fedit_ref
    (whole runs of DEVFT variants) the run goes toward FedIT's final eval loss and stops there, or
    at CPU_BUDGET_X_FEDIT times FedIT's client CPU. kept_only: None instead of running it."""
    from server_sdk.engine.rounds import RunState, run

    target = stop_when = None
    if fedit_ref is not None:
        target = {"eval_loss": _final_loss(fedit_ref), "cpu_budget": CPU_BUDGET_X_FEDIT * client_cpu(fedit_ref["records"])}
        stop_when = reached(target["eval_loss"], target["cpu_budget"])
    key = run_key(cfg, stop_after, target)
    kept = KEPT / f"{key}.json"
    if kept.exists():
        return json.loads(kept.read_text())
    if kept_only:
        return None
    run_dir = CACHE / f"early-{key}"
    resume = (run_dir / "checkpoint").exists()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    if not resume and base_model is not None:  # every run of one seed shares its data: generate it once
        shared = shared_data(cfg, base_model, CACHE)
        shutil.copytree(shared / "data", run_dir / "data")
    c0, t0 = time.process_time(), time.perf_counter()
    out = run(cfg, run_dir, resume=resume, base=base_model, progress=False, stop_after_rounds=stop_after,
              stop_when=stop_when)
    state = RunState.load(run_dir)
    plans = [{k: v for k, v in p.items() if k != "similarity"} for p in (state.stage_plans if state else [])]
    compact = {"key": key, "name": name, "config": cfg.to_dict(), "stop_after_rounds": stop_after,
               "target": target, "stopped_early": out.stopped_early,
               "records": [r.to_dict() for r in out.records], "stage_plans": plans,
               "stage_transfer": stage_gains(out.records),
               "process_cpu_seconds": time.process_time() - c0, "wall_seconds": time.perf_counter() - t0,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomic(kept, json.dumps(compact) + "\n")
    return compact


def _final_loss(rep: dict) -> float:
    return [r for r in rep["records"] if r.get("eval_loss") is not None][-1]["eval_loss"]


def summarize(name: str, reps: list[dict], fedit: dict[int, dict], full: bool, link: Link) -> dict:
    """One variant's entry of early-stages.json: per stage, the mean over seeds of its transfer rate
    and that rate relative to FedIT's on the same seed (1.0 = buys as much per CPU second as FedIT)."""
    per_stage: dict[int, list[dict]] = {}
    for rep in reps:
        ref = fedit.get(rep["config"]["seed"])
        ref_rate = ref["stage_transfer"][0]["loss_change_per_client_cpu_s"] if ref else None
        for st in rep["stage_transfer"]:
            per_stage.setdefault(st["stage"], []).append(
                {**st, "seed": rep["config"]["seed"], "fedit_loss_change_per_client_cpu_s": ref_rate,
                 "relative_to_fedit": relative_rate(st["loss_change_per_client_cpu_s"], ref_rate),
                 "server_cpu_seconds": next((p.get("server_cpu_seconds") for p in rep["stage_plans"]
                                             if p["stage"] == st["stage"]), None)})
    stages = []
    for s, rows in sorted(per_stage.items()):
        def mean(key: str, rows: list[dict] = rows) -> float | None:
            vals = [r[key] for r in rows if r[key] is not None]
            return sum(vals) / len(vals) if vals else None

        stages.append({"stage": s, "layers": rows[0]["layers"], "rounds": rows[0]["rounds"],
                       **{k: mean(k) for k in ("loss_start", "loss_end", "loss_change", "client_cpu_seconds",
                                               "loss_change_per_client_cpu_s", "fedit_loss_change_per_client_cpu_s",
                                               "relative_to_fedit", "server_cpu_seconds")},
                       "per_seed": rows})
    speed, bytes_, wall = [], [], []
    if full:
        for rep in reps:
            ref = fedit.get(rep["config"]["seed"])
            if ref is None:
                continue
            target = _final_loss(ref)
            mine, theirs = cumulative(rep["records"], link, COMPUTE_KEY), cumulative(ref["records"], link, COMPUTE_KEY)
            got = {k: first_reaching(mine, target, k) for k in ("compute_seconds", "lora_bytes", "sim_seconds")}
            base = {k: first_reaching(theirs, target, k) for k in ("compute_seconds", "lora_bytes", "sim_seconds")}
            speed.append(ratio(base["compute_seconds"], got["compute_seconds"]) or None)
            bytes_.append(ratio(base["lora_bytes"], got["lora_bytes"]) or None)
            wall.append(ratio(base["sim_seconds"], got["sim_seconds"]) or None)
    return {"name": name, "seeds": sorted(r["config"]["seed"] for r in reps),
            "overrides": {} if name == "fedit" else VARIANTS.get(name, {}), "stage_transfer": stages,
            "final_eval_loss": [_final_loss(r) for r in reps] if full else None,
            # FedIT / variant to FedIT's final eval loss, per seed; None = not measured (screens) or never reached
            "client_cpu_speedup_to_fedit_final": speed or None,
            "lora_bytes_reduction_to_fedit_final": bytes_ or None,
            "simulated_wall_speedup_to_fedit_final": wall or None,
            "rounds_run": [sum(1 for x in r["records"] if x["stage"] >= 0) for r in reps] if full else None}


def markdown(summary: dict, command: str) -> str:
    lines = [f"Command: `{command}` (profile `{summary['profile']}`, partition `{summary['partition']}`, "
             f"{summary['eval_examples']} held-out examples, loss only)", "",
             *(["In whole runs \"x FedIT's rate\" divides by FedIT's average rate over its whole run, which "
                "its diminishing later rounds lower; screens divide by its first stage's rounds.", ""]
               if summary["stages_screened"] is None else []),
             "| variant | seeds | stage | layers | rounds | full-model eval loss start -> end | client CPU s | "
             "loss change per client CPU s | x FedIT's rate | server CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for v in summary["variants"]:
        for st in v["stage_transfer"]:
            lines.append(f"| {v['name']} | {len(v['seeds'])} | {st['stage'] + 1} | {st['layers']} | {st['rounds']} | "
                         f"{f(st['loss_start'], '.3f')} -> {f(st['loss_end'], '.3f')} | "
                         f"{f(st['client_cpu_seconds'], '.1f')} | {f(st['loss_change_per_client_cpu_s'], '.2e')} | "
                         f"{f(st['relative_to_fedit'], '.3f')} | {f(st['server_cpu_seconds'], '.0f')} |")
    whole = [v for v in summary["variants"] if v.get("rounds_run")]
    if whole:
        per_seed = lambda vals, fmt: ", ".join("never" if x is None else format(x, fmt) for x in vals)  # noqa: E731
        lines += ["", "Whole runs to FedIT's final eval loss (FedIT / variant per seed: above 1 is better; `never`: "
                  f"not within {CPU_BUDGET_X_FEDIT}x FedIT's client CPU):", "",
                  "| variant | seeds | final eval loss | rounds run | client CPU speedup | LoRA bytes reduction | "
                  "simulated wall speedup |", "|---|---|---|---|---|---|---|"]
        for v in whole:
            lines.append(f"| {v['name']} | {', '.join(map(str, v['seeds']))} | {per_seed(v['final_eval_loss'], '.3f')} | "
                         f"{', '.join(map(str, v['rounds_run']))} | "
                         f"{per_seed(v['client_cpu_speedup_to_fedit_final'] or [], '.2f')} | "
                         f"{per_seed(v['lora_bytes_reduction_to_fedit_final'] or [], '.2f')} | "
                         f"{per_seed(v['simulated_wall_speedup_to_fedit_final'] or [], '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["smoke", "screen", "full"], default="smoke")
    p.add_argument("--variants", default="paper", help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--stages", type=int, default=1, help="screen: how many stages to run (default 1)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed-list", default=None,
                   help="comma-separated seeds to run instead of 0..--seeds-1 (parallel workers take disjoint seeds)")
    p.add_argument("--partition", choices=["task", "dirichlet", "iid"], default="task")
    p.add_argument("--no-fedit", action="store_true", help="skip the FedIT reference run")
    p.add_argument("--kept-only", action="store_true",
                   help="summarise the runs already kept under results/early-stages/; run nothing")
    p.add_argument("--whole", action="store_true",
                   help="whole runs toward FedIT's final loss with the headline ratios (always on in `full`)")
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    from server_sdk.engine.model import load_base_model

    base = base_config(args.profile, args.partition)
    full = args.profile == "full" or args.whole
    if full:  # time-to-target needs the loss after every round
        base.eval_every = 1
    per = base.rounds_per_stage
    stop = None if full else per * args.stages
    model = load_base_model(base.model)
    link = Link()
    fedit: dict[int, dict] = {}
    reps: dict[str, list[dict]] = {name: [] for name in names}
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    for seed in seeds:  # seed-major: an interrupted matrix has every variant at the first seeds
        if not args.no_fedit:
            ref = run_one("fedit", variant_config(base, "fedit", seed), stop, model, kept_only=args.kept_only)
            if ref is not None:
                fedit[seed] = ref
        for name in names:
            ref = fedit.get(seed) if full else None
            if full and ref is None and not args.no_fedit:
                continue  # a whole run needs its seed's FedIT target
            rep = run_one(name, variant_config(base, name, seed, to_target=ref is not None), stop, model,
                          fedit_ref=ref, kept_only=args.kept_only)
            if rep is not None:
                reps[name].append(rep)
    summaries = [summarize("fedit", list(fedit.values()), fedit, full, link)] if fedit else []
    summaries += [summarize(name, reps[name], fedit, full, link) for name in names if reps[name]]
    tag = "" if args.profile == "screen" else f"-{args.profile}"
    tag += "-whole" if args.whole and args.profile != "full" else ""
    tag += "" if args.partition == "task" else f"-{args.partition}"
    out_path = RESULTS / f"early-stages{tag}.json"
    old = json.loads(out_path.read_text()) if out_path.exists() else {"variants": []}
    merged = {v["name"]: v for v in old.get("variants", []) if v["name"] in VARIANTS or v["name"] == "fedit"}
    merged.update({v["name"]: v for v in summaries})  # later screens add variants, keep the earlier ones
    summary = {"profile": args.profile, "partition": args.partition, "stages_screened": None if full else args.stages,
               "eval_examples": base.data.eval_examples_per_task * len(base.data.tasks),
               "variants": list(merged.values())}
    out_path.write_text(json.dumps(summary, indent=1) + "\n")
    command = "python -m benchmarks.early_stages " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(summary, command)
    if args.profile != "smoke" and "DEVFT_BENCH_RESULTS" not in os.environ:
        replace_block(f"early-stages{tag}", f"#### Early-stage screens ({args.profile}, {args.partition})\n\n{md}\n"
                      f"JSON: `benchmarks/results/early-stages{tag}.json`; per-run records in "
                      f"`benchmarks/results/early-stages/`. Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
                      RESULTS_MD)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
