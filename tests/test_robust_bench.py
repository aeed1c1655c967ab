"""Issue #13: the robust-aggregation benchmark's smoke profile (tiny model) runs every rule and seed."""

import importlib
import json
import math


def test_robust_aggregation_smoke_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVFT_BENCH_RESULTS", str(tmp_path))
    import benchmarks.robust_aggregation as bench

    bench = importlib.reload(bench)
    assert bench.main(["--profile", "smoke"]) == 0
    summary = json.loads((tmp_path / "robust-aggregation-smoke.json").read_text())
    rules = ["fedavg", "median", "trimmed-mean"]
    assert summary["rules"] == rules and summary["seeds"] == [0, 1]
    assert sorted((r["rule"], r["seed"]) for r in summary["runs"]) == sorted((r, s) for r in rules for s in (0, 1))
    for run in summary["runs"]:
        rounds = [p["round"] for p in run["eval_loss_per_round"]]
        assert rounds == [0, 1, 2]  # base model, then every round
        assert all(math.isfinite(p["eval_loss"]) for p in run["eval_loss_per_round"])
        assert math.isfinite(run["final_eval_loss"])
    assert math.isfinite(summary["fedavg_seed_spread"])
    for rule in rules:
        pr = summary["per_rule"][rule]
        assert set(pr["final_eval_loss"]) == {"0", "1"} and set(pr["diff_from_fedavg_same_seed"]) == {"0", "1"}
        assert all(math.isfinite(d) for d in pr["diff_from_fedavg_same_seed"].values())
    assert summary["per_rule"]["fedavg"]["max_abs_diff_from_fedavg"] == 0.0
    # the robust rules really aggregate differently from FedAvg (5 updates per round: one trimmed at each end)
    assert summary["per_rule"]["median"]["max_abs_diff_from_fedavg"] > 0
    assert summary["per_rule"]["trimmed-mean"]["max_abs_diff_from_fedavg"] > 0
    assert (tmp_path / "robust-aggregation-smoke.png").exists()
    kept = sorted((tmp_path / "robust-aggregation").glob("*.json"))
    assert len(kept) == 6
    mtimes = [p.stat().st_mtime for p in kept]
    assert bench.main(["--profile", "smoke"]) == 0  # second call: every run from its kept record
    assert [p.stat().st_mtime for p in kept] == mtimes
    monkeypatch.delenv("DEVFT_BENCH_RESULTS")
    importlib.reload(bench)


def test_sign_flip_smoke_profile_applies_the_coordinators_norm_checks(tmp_path, monkeypatch):
    """Issue #27 hole 13: a sign-flipped update 4x its own length is over AdamW's bound and refused in every round;
    one scaled just inside the bound is accepted, and no honest update is ever refused beside it."""
    monkeypatch.setenv("DEVFT_BENCH_RESULTS", str(tmp_path))
    import benchmarks.robust_aggregation as robust
    import benchmarks.sign_flip as bench

    importlib.reload(robust)
    bench = importlib.reload(bench)
    assert bench.main(["--profile", "smoke", "--rules", "fedavg,median"]) == 0
    rows = {(r["rule"], r["attack"]): r for r in json.loads((tmp_path / "sign-flip-smoke.json").read_text())["rows"]}
    assert set(rows) == {(rule, attack) for rule in ("fedavg", "median") for attack in ("flip-4x", "flip-max")}
    for (rule, attack), row in rows.items():
        assert row["honest_refused"] == 0 and row["rounds_logged"] == 2
        assert math.isfinite(row["final_eval_loss"]) and math.isfinite(row["gain_kept"])
        refused_every_round = row["attacker_refused_rounds"] == row["rounds_logged"]
        assert refused_every_round == (attack == "flip-4x"), (rule, attack, row)
    kept = {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in (tmp_path / "robust-aggregation").glob("*.json")}
    for rec in (r for r in kept.values() if r.get("attack")):
        for rnd in rec["attack_log"]:
            over = rnd["attacker_norm"] > rnd["adamw_bound"]
            assert (rnd["attacker"] in rnd["refused"]) == over  # the bound decides, nothing else
    monkeypatch.delenv("DEVFT_BENCH_RESULTS")
    importlib.reload(robust)
    importlib.reload(bench)
