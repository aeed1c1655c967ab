import math

import numpy as np
import pytest

from benchmarks.metrics import Link, cumulative, first_reaching, mean_std, ratio, simulated_round_seconds


def _rec(rnd, loss, secs, down=1_000_000, up=500_000, stage_bytes=0, new=0, clients=(0, 1)):
    return {"stage": 0, "round": rnd, "clients": list(clients), "client_seconds": list(secs), "bytes_down": down,
            "bytes_up": up, "stage_download_bytes": stage_bytes, "stage_new_devices": new, "eval_loss": loss}


def test_round_time_is_slowest_client_plus_transfer():
    link = Link(up_mbit_s=8.0, down_mbit_s=16.0)  # 1 MB/s up, 2 MB/s down
    rec = _rec(1, 1.0, [3.0, 5.0], down=2_000_000, up=2_000_000)  # per client: 1 MB down, 1 MB up
    assert simulated_round_seconds(rec, link) == pytest.approx(5.0 + 0.5 + 1.0)
    staged = _rec(1, 1.0, [3.0, 5.0], down=2_000_000, up=2_000_000, stage_bytes=8_000_000, new=2)
    assert simulated_round_seconds(staged, link) == pytest.approx(5.0 + 0.5 + 1.0 + 4_000_000 / 2e6)
    assert simulated_round_seconds(staged, link, include_stage_download=False) == pytest.approx(6.5)


def test_time_and_bytes_to_target_and_never_reached():
    recs = [{"stage": -1, "round": 0, "eval_loss": 3.0}] + [
        _rec(1, 2.5, [1.0, 2.0]), _rec(2, None, [1.0, 1.0]), _rec(3, 1.9, [4.0, 1.0]), _rec(4, 1.5, [1.0, 1.0])]
    link = Link()
    curve = cumulative(recs, link)
    assert np.isnan(curve["eval_loss"][1])
    per_round = [simulated_round_seconds(r, link) for r in recs[1:]]
    assert first_reaching(curve, 2.0, "sim_seconds") == pytest.approx(sum(per_round[:3]))
    assert first_reaching(curve, 2.0, "compute_seconds") == pytest.approx(3 + 2 + 5)
    assert first_reaching(curve, 2.0, "lora_bytes") == 3 * 1_500_000
    assert first_reaching(curve, 1.0, "sim_seconds") == math.inf  # never reached
    assert ratio(10.0, 2.5) == 4.0
    assert ratio(10.0, math.inf) == 0.0


def test_mean_std_handles_never_reached():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    m, s = mean_std([1.0, math.inf])
    assert math.isinf(m) and math.isnan(s)


def test_smoke_profile_runs_end_to_end(tmp_path, monkeypatch):
    """The smoke profile keeps the benchmark code alive: 3 methods on a tiny model, cached by config hash."""
    import importlib
    import json

    monkeypatch.setenv("DEVFT_BENCH_RESULTS", str(tmp_path))
    import benchmarks.convergence as conv

    conv = importlib.reload(conv)
    assert conv.main(["--profile", "smoke"]) == 0
    summary = json.loads((tmp_path / "convergence-smoke.json").read_text())["summary"]
    assert set(summary["methods"]) == {"devft", "fedit", "ffa-lora"}
    assert summary["methods"]["fedit"]["speedup_time"] == [1.0]  # FedIT reaches its own final loss exactly
    assert (tmp_path / "convergence-smoke.png").exists() and (tmp_path / "convergence-smoke.md").exists()
    kept = sorted((tmp_path / "convergence").glob("*.json"))
    assert len(kept) == 3
    mtimes = [p.stat().st_mtime for p in kept]
    assert conv.main(["--profile", "smoke"]) == 0  # second call: everything from the cache
    assert [p.stat().st_mtime for p in kept] == mtimes
    monkeypatch.delenv("DEVFT_BENCH_RESULTS")
    importlib.reload(conv)


def test_ratio_formatting_separates_never_reached_seeds():
    from benchmarks.convergence import fmt_ratio

    assert fmt_ratio([2.0, 4.0]) == "3x ± 1.4"
    assert fmt_ratio([2.0, 0.0, 4.0]) == "3x ± 1.4 (never reached in 1/3 seeds)"  # 0 = never reached, not averaged
    assert fmt_ratio([0.0, 0.0]) == "never reached (2/2 seeds)"


def test_headline_targets_on_synthetic_runs():
    """FedIT reaches 1.5 at round 3; the method never does, but reaches the common target (its own
    final loss 1.8) at round 2 where FedIT needs round 3: a ratio exists for the common target only."""
    from benchmarks.convergence import headline

    def run(losses, secs):
        recs = [{"stage": -1, "round": 0, "eval_loss": 3.0}] + [
            _rec(i + 1, loss, [s, s], down=1_000_000, up=1_000_000) for i, (loss, s) in enumerate(zip(losses, secs))]
        return {"config": {"seed": 0}, "records": recs}

    fedit = run([2.0, 1.9, 1.5], [4.0, 4.0, 4.0])
    method = run([2.1, 1.8, 1.8], [1.0, 1.0, 1.0])
    out = headline({"fedit": [fedit], "devft": [method]}, Link(up_mbit_s=8.0, down_mbit_s=8.0))["methods"]
    assert out["devft"]["speedup_time"] == [0.0] and out["devft"]["time_to_target_s"] == [math.inf]
    assert out["devft"]["common_target"] == [1.8]
    # per round: slowest client's compute + 0.5 MB down + 0.5 MB up per client at 1 MB/s each way
    fedit_time = 3 * (4.0 + 1.0)
    method_time = 2 * (1.0 + 1.0)
    assert out["devft"]["common"]["sim_seconds"][0] == pytest.approx(fedit_time / method_time)
    assert out["devft"]["common"]["compute_seconds"][0] == pytest.approx((3 * 8.0) / (2 * 2.0))
    assert out["devft"]["common"]["lora_bytes"][0] == pytest.approx(3 / 2)
    assert out["fedit"]["speedup_time"] == [1.0]


def test_ablation_deltas_are_paired_by_seed():
    from benchmarks.convergence import paired_delta, verdict

    assert paired_delta({0: 2.0, 1: 3.0, 2: 2.5}, {0: 1.0, 1: 2.9}) == pytest.approx([1.0, 0.1])
    assert verdict([0.5, 0.6, 0.55]) == "worse"
    assert verdict([0.5, 0.6, 0.55], lower_is_better=False) == "better"
    assert verdict([0.5, -0.6, 0.1]) == "within noise"
    assert verdict([]) == "n/a"
    assert verdict([0.5]) == "one seed, no verdict"
    assert verdict([-1.5625, -1.5625], lower_is_better=False, resolution=1.5625) == "within noise"  # one example
    assert verdict([-3.125, -3.125], lower_is_better=False, resolution=1.5625) == "worse"


def test_ablations_smoke_profile_writes_paired_table(tmp_path, monkeypatch):
    """The ablation code path end to end on the tiny model: every variant runs, the default row is
    shared with the standard matrix's DEVFT run (same config hash), deltas are paired by seed."""
    import importlib
    import json

    monkeypatch.setenv("DEVFT_BENCH_RESULTS", str(tmp_path))
    import benchmarks.convergence as conv

    conv = importlib.reload(conv)
    assert conv.main(["--profile", "ablations-smoke"]) == 0
    summary = json.loads((tmp_path / "convergence-ablations-smoke.json").read_text())["ablations"]
    expected = {"default", "grouping=random", "grouping=sequential", "fusion=mean", "fusion=select", "beta=0.15",
                "beta=0.5", "beta=1.0", "growth=4x", "capacity=1", "stages=2"}
    assert set(summary) == expected
    assert summary["default"]["delta_loss"] == [0.0]
    for name in expected - {"default"}:
        assert summary[name]["delta_loss"] == [summary[name]["eval_loss"][0] - summary["default"]["eval_loss"][0]]
    # growth=4x and stages=2 are the same schedule on the 6-layer model: one cached run, equal results
    assert summary["growth=4x"]["eval_loss"] == summary["stages=2"]["eval_loss"]
    md = (tmp_path / "convergence-ablations-smoke.md").read_text()
    assert "| default | 1 |" in md and "paper's direction" in md
    assert (tmp_path / "convergence-ablations-smoke.png").exists()
    assert not (tmp_path / "RESULTS.md").exists()  # smoke profiles never touch RESULTS.md
    monkeypatch.delenv("DEVFT_BENCH_RESULTS")
    importlib.reload(conv)


def test_loss_before_last_stage():
    from benchmarks.convergence import loss_before_last_stage

    recs = [{"stage": -1, "eval_loss": 5.0}, {"stage": 0, "eval_loss": 4.8}, {"stage": 1, "eval_loss": 4.5},
            {"stage": 1, "eval_loss": None}, {"stage": 2, "eval_loss": 2.0}]
    assert loss_before_last_stage({"records": recs}) == 4.5
    assert loss_before_last_stage({"records": [{"stage": -1, "eval_loss": 5.0}, {"stage": 0, "eval_loss": 3.0}]}) == 5.0
