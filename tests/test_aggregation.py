"""Aggregation rules and the bounds that keep one client from owning a round."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from server_sdk.method import aggregation as agg
from server_sdk.method.strategies.base import ClientResult

SHAPES = {"layers.0.self_attn.q_proj.lora_A": (2, 8), "layers.0.self_attn.q_proj.lora_B": (8, 2)}


def result(client: int, delta: dict[str, torch.Tensor], n: int = 4) -> ClientResult:
    return ClientResult(client=client, num_samples=n, delta=delta, train_loss=1.0, seconds=0.0)


def honest(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}


def zeros() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def moved(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
    return agg.update_norm({k: new[k] - old[k] for k in new})


def test_fedavg_summed_as_updates_arrive_equals_fedavg_over_the_round_in_any_order():
    results = [result(c, honest(c), n) for c, n in ((0, 3), (1, 7), (2, 5), (3, 64))]
    glob = honest(9, 1.0)
    want = agg.FedAvg().aggregate(glob, results)
    total = sum(r.num_samples for r in results)
    exact = {k: glob[k].double() + sum(r.num_samples * r.delta[k].double() for r in results) / total for k in glob}
    for k in glob:  # the float64 mean, rounded once
        assert torch.equal(want[k], glob[k] + (exact[k] - glob[k].double()).float())
    for order in ([3, 1, 0, 2], [2, 3, 1, 0]):  # a fleet sums in arrival order
        acc = agg.FedAvgSum()
        for i in order:
            acc.add(results[i].num_samples, results[i].delta)
        folded = agg.RoundResults([replace(r, delta={}) for r in results])
        folded.folded = acc
        got = agg.aggregate("fedavg", glob, folded)
        assert all(torch.equal(got[k], want[k]) for k in want)
        with pytest.raises(ValueError, match="needs every delta"):
            agg.aggregate("median", glob, folded)


def test_median_and_trimmed_mean_follow_flower():
    rng = np.random.default_rng(0)
    deltas = [{k: torch.from_numpy(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()}
              for _ in range(5)]
    results = [result(c, d) for c, d in enumerate(deltas)]
    stacked = {k: np.stack([d[k].numpy() for d in deltas]) for k in SHAPES}
    med = agg.FedMedian().aggregate(zeros(), results)
    trim = agg.FedTrimmedAvg(beta=0.2).aggregate(zeros(), results)  # cuts int(0.2 * 5) = 1 value per side
    for k, arr in stacked.items():
        np.testing.assert_allclose(med[k].numpy(), np.median(arr, axis=0), rtol=1e-6)
        np.testing.assert_allclose(trim[k].numpy(), np.sort(arr, axis=0)[1:4].mean(axis=0), rtol=1e-6)
    even = agg.FedMedian().aggregate(zeros(), results[:4])  # even n: mean of the two middle values, as np.median
    for k, arr in stacked.items():
        np.testing.assert_allclose(even[k].numpy(), np.median(arr[:4], axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        agg.FedTrimmedAvg(beta=0.5)


def test_bounds():
    assert agg.lower_median([990.0, 0.1]) == 0.1  # one outlier beside one honest value cannot lift it
    assert agg.lower_median([0.3, 0.1, 990.0]) == 0.3
    assert agg.adaptive_norm_bound([0.1, 0.2, 0.3, 990.0], k=5) == pytest.approx(1.0)
    clipped = agg.clip_delta(honest(1, 10.0), 2.0)
    assert agg.update_norm(clipped) == pytest.approx(2.0, rel=1e-5)
    small = honest(2, 1e-3)
    assert agg.clip_delta(small, 2.0) is small
    assert agg.cap_samples(10**12, 6) == 6 and agg.cap_samples(4, 6) == 4 and agg.cap_samples(7, None) == 7
    with pytest.raises(ValueError, match="positive"):
        agg.cap_samples(0, 6)
    with pytest.raises(ValueError, match="not one of"):
        agg.aggregate("krum", zeros(), [result(0, honest(0))])


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_a_stealthy_attacker_under_the_norm_bound_moves_robust_rules_less_than_one_honest_update(method):
    """An attacker that stays just under 5 x the median norm (so the fleet's bound lets it through)
    and keeps its weight: with FedAvg it moves the model more than an honest update, with the robust
    rules less."""
    honest_results = [result(c, honest(c)) for c in range(4)]
    norms = [agg.update_norm(r.delta) for r in honest_results]
    direction = honest(99)
    scale = 4.9 * agg.lower_median(norms) / agg.update_norm(direction)
    attacker = result(9, {k: v * scale for k, v in direction.items()})
    glob = zeros()
    baseline = agg.aggregate(method, glob, honest_results)
    attacked = agg.aggregate(method, glob, [*honest_results, attacker])
    assert moved(attacked, baseline) < min(norms)
    fed_moved = moved(agg.FedAvg().aggregate(glob, [*honest_results, attacker]), agg.FedAvg().aggregate(glob, honest_results))
    assert fed_moved > min(norms)  # what the robust rules buy


def test_robust_rules_on_a_tiny_run_stay_within_seed_noise(tiny_base, tiny_cfg, tmp_path):
    """Median and trimmed mean on an honest run end where FedAvg does, within the spread of seeds."""
    from server_sdk.engine.rounds import run

    def final_loss(**kw) -> float:
        cfg = tiny_cfg(stages=[6], rounds_per_stage=[4], num_clients=4, clients_per_round=4, local_steps=5,
                       lr=5e-2, **kw)
        name = "-".join(f"{k}{v}" for k, v in kw.items())
        records = run(cfg, tmp_path / name, base=tiny_base, progress=False).records
        return [r.eval_loss for r in records if r.eval_loss is not None][-1]

    fedavg = {seed: final_loss(seed=seed) for seed in (0, 1, 2)}
    noise = max(fedavg.values()) - min(fedavg.values())  # measured: 0.035 (8.051 .. 8.086)
    for method in ("median", "trimmed-mean"):
        got = final_loss(seed=0, aggregation=method)  # measured: 8.077 and 8.076 against FedAvg's 8.072
        assert abs(got - fedavg[0]) <= noise, (method, got, fedavg)


@pytest.mark.parametrize("rule", [agg.FedAvg(), agg.FedMedian(), agg.FedTrimmedAvg()], ids=lambda r: r.name)
def test_the_clipping_wrapper_composes_with_every_rule(rule):
    """Clipped(rule) is the rule over the deltas clipped to k x the round's lower median norm: an attacker 100x
    longer than the honest updates weighs no more than a clipped one, under every rule."""
    honest_results = [result(c, honest(c)) for c in range(4)]
    attacker = result(9, {k: v * 100 for k, v in honest(99).items()})
    results = [*honest_results, attacker]
    wrapped = agg.Clipped(rule, k=2.0)
    assert wrapped.name == rule.name and not wrapped.folds
    got = wrapped.aggregate(zeros(), results)
    bound = 2.0 * agg.lower_median([agg.update_norm(r.delta) for r in results])
    want = rule.aggregate(zeros(), [replace(r, delta=agg.clip_delta(r.delta, bound)) for r in results])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert moved(got, zeros()) < moved(rule.aggregate(zeros(), results), zeros())
    folded = agg.RoundResults([replace(r, delta={}) for r in results])
    folded.folded = agg.FedAvgSum()
    with pytest.raises(ValueError, match="needs every delta"):
        wrapped.aggregate(zeros(), folded)


def test_the_registry_names_each_rule_and_refuses_an_unknown_one():
    """The config's names pick the classes: FedAvg alone folds; the robust rules are wrapped in the clipping."""
    assert agg.make_aggregator("fedavg").folds and isinstance(agg.make_aggregator("fedavg"), agg.FedAvg)
    for name, rule in (("median", agg.FedMedian), ("trimmed-mean", agg.FedTrimmedAvg)):
        made = agg.make_aggregator(name)
        assert isinstance(made, agg.Clipped) and isinstance(made.rule, rule) and made.k == agg.ROBUST_CLIP_K
    with pytest.raises(ValueError, match=r"'krum' is not one of \['fedavg', 'median', 'trimmed-mean'\]"):
        agg.make_aggregator("krum")
