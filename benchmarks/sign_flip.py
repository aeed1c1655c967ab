"""A device that sends its update sign-flipped (issue #27, hole 13): what the coordinator's bounds and the robust
rules keep of the fleet's gain.

    python -m benchmarks.sign_flip --profile smoke          # tiny model, the code path (tests)
    nice -n 15 python -m benchmarks.sign_flip               # SmolLM2-135M, seed 0, FedAvg / median / trimmed mean

The FedIT setup of benchmarks/robust_aggregation.py (SmolLM2-135M in process, 8 clients, 5 sampled per
round, 6 rounds of 5 local steps). In every round the first sampled client is the attacker (one of five
updates, 20%): it trains honestly, then sends

- `flip-4x`: -4 x its own delta, what the attacker of issue 27 sent over a real fleet;
- `flip-max`: its delta negated and scaled to 0.99 x the round's AdamW bound, the longest delta the
  coordinator accepts (the strongest sign flip inside every bound).

Every update then passes the coordinator's norm checks as in a fleet (server_sdk/fleet/coordinator.py): refused over
the hard bound (`max_update_norm`) or over `aggregation.adamw_norm_bound`, then `aggregation.norm_outliers`
(k = 5, floored at that bound), and the rule aggregates what is left. The honest runs to compare with are
robust_aggregation's runs of the same config and seed (the same cache and kept records).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

from server_sdk.engine.executor import InProcessExecutor
from server_sdk.fleet.settings import FleetSettings
from server_sdk.method.aggregation import AGGREGATIONS, adamw_norm_bound, norm_outliers, update_norm

from .results_md import RESULTS_MD, md_table, replace_block, write_atomic
from .robust_aggregation import RESULTS, base_config, eval_curve, run_config, run_one

ATTACKS = ("flip-4x", "flip-max")


class SignFlipExecutor(InProcessExecutor):
    """Simulated clients, the first sampled one an attacker; the fleet coordinator's norm checks on every update."""

    def __init__(self, cfg, tokenizer, clients, attack: str, log: list[dict]):
        super().__init__(cfg, tokenizer, clients)
        self.attack, self.log, self.settings = attack, log, FleetSettings()

    def train_round(self, stage, rnd, sampled, global_lora, is_trainable, seeds):
        results = super().train_round(stage, rnd, sampled, global_lora, is_trainable, seeds)
        bound = adamw_norm_bound(self.cfg.lr, self.cfg.local_steps, sum(v.numel() for v in results[0].delta.values()))
        attacker = sampled[0]
        honest_norm = update_norm(next(r.delta for r in results if r.client == attacker))
        scale = -4.0 if self.attack == "flip-4x" else -0.99 * bound / honest_norm
        sent = [replace(r, delta={k: v * scale for k, v in r.delta.items()}) if r.client == attacker else r
                for r in results]
        norms = {r.client: update_norm(r.delta) for r in sent}
        hard = min(self.settings.max_update_norm or float("inf"), bound)
        over = {c for c, n in norms.items() if n > hard}
        outliers, _ = norm_outliers({c: n for c, n in norms.items() if c not in over}, self.settings.norm_bound_k,
                                    bound)
        refused = over | set(outliers)
        self.log.append({"stage": stage, "round": rnd, "attacker": attacker, "attacker_norm": norms[attacker],
                         "honest_norms": sorted(n for c, n in norms.items() if c != attacker),
                         "adamw_bound": bound, "refused": sorted(refused)})
        return [r for r in sent if r.client not in refused]


def attacked_run(cfg, model, attack: str) -> dict:
    log: list[dict] = []

    def factory(cfg, base, clients):
        return SignFlipExecutor(cfg, base.tokenizer, clients, attack, log)

    return run_one(cfg, model, executor_factory=factory, attack=attack, extra=lambda: {"attack_log": log})


def summarize(clean: dict[str, dict], attacked: dict[tuple[str, str], dict], base_loss: float) -> list[dict]:
    rows = []
    for (rule, attack), rep in sorted(attacked.items()):
        final = eval_curve(rep)[-1]["eval_loss"]
        honest = eval_curve(clean[rule])[-1]["eval_loss"]
        log = rep.get("attack_log") or []
        rows.append({"rule": rule, "attack": attack, "final_eval_loss": final, "honest_final_eval_loss": honest,
                     "base_eval_loss": base_loss,
                     # 1 = the honest run's whole gain kept, 0 = none, < 0 = worse than the base model
                     "gain_kept": (base_loss - final) / (base_loss - honest),
                     "attacker_refused_rounds": sum(r["attacker"] in r["refused"] for r in log),
                     "honest_refused": sum(len(set(r["refused"]) - {r["attacker"]}) for r in log),
                     "rounds_logged": len(log),
                     "attacker_norm_over_median_honest": [r["attacker_norm"] / sorted(r["honest_norms"])[
                         len(r["honest_norms"]) // 2] for r in log]})
    return rows


def markdown(rows: list[dict], command: str, cfg) -> str:
    lines = [f"Command: `{command}`", "",
             f"FedIT, `{cfg.model}`, {cfg.num_clients} clients, {cfg.clients_per_round} per round, the first sampled "
             f"one the attacker (20% of each round's updates), {cfg.rounds_per_stage} rounds of {cfg.local_steps} "
             f"local steps, lr {cfg.lr}, seed {cfg.seed}. Honest runs: benchmarks/robust_aggregation.py's, same "
             f"config and seed. Base model eval loss {rows[0]['base_eval_loss']:.4f}.", ""]
    lines += md_table(["rule", "attack", "final eval loss", "honest run", "gain kept", "attacker refused (rounds)",
                       "honest refused", "attacker norm / honest median"],
                      [[r["rule"], r["attack"], f"{r['final_eval_loss']:.4f}", f"{r['honest_final_eval_loss']:.4f}",
                        f"{r['gain_kept']:.0%}", f"{r['attacker_refused_rounds']}/{r['rounds_logged']}",
                        r["honest_refused"],
                        f"{min(r['attacker_norm_over_median_honest']):.2f}-"
                        f"{max(r['attacker_norm_over_median_honest']):.2f}"] for r in rows])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["smoke", "standard"], default="standard")
    p.add_argument("--rules", default=",".join(AGGREGATIONS), help=f"comma-separated, from {list(AGGREGATIONS)}")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, from {list(ATTACKS)}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rules, attacks = args.rules.split(","), args.attacks.split(",")
    bad = [r for r in rules if r not in AGGREGATIONS] + [a for a in attacks if a not in ATTACKS]
    if bad:
        p.error(f"unknown rule(s) or attack(s) {bad}; rules: {list(AGGREGATIONS)}, attacks: {list(ATTACKS)}")
    from server_sdk.engine.model import load_base_model

    base = base_config(args.profile)
    model = load_base_model(base.model)
    clean, attacked = {}, {}
    for rule in rules:
        cfg = run_config(base, rule, args.seed)
        clean[rule] = run_one(cfg, model)
        print(f"[sign-flip] {rule} honest: final eval loss {eval_curve(clean[rule])[-1]['eval_loss']:.4f}", flush=True)
        for attack in attacks:
            t0 = time.perf_counter()
            attacked[(rule, attack)] = attacked_run(run_config(base, rule, args.seed), model, attack)
            print(f"[sign-flip] {rule} {attack}: final eval loss "
                  f"{eval_curve(attacked[(rule, attack)])[-1]['eval_loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    base_loss = eval_curve(clean[rules[0]])[0]["eval_loss"]
    rows = summarize(clean, attacked, base_loss)
    tag = "" if args.profile == "standard" else f"-{args.profile}"
    command = ("python -m benchmarks.sign_flip " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    write_atomic(RESULTS / f"sign-flip{tag}.json", json.dumps(
        {"profile": args.profile, "command": command, "config": run_config(base, rules[0], args.seed).to_dict(),
         "rows": rows, "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1) + "\n")
    md = markdown(rows, command, run_config(base, rules[0], args.seed))
    if args.profile == "standard" and "DEVFT_BENCH_RESULTS" not in os.environ:
        replace_block("sign-flip", "### A sign-flipping device inside the bounds (issue #27, benchmarks/sign_flip.py)"
                      f"\n\n{md}\nJSON: `benchmarks/results/sign-flip.json`.", RESULTS_MD)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
