"""Issue #12: the stage-transfer metric, the auto schedule, healed and first-last submodels, and the
screening harness (tiny models only)."""

import json

import pytest
import torch

from server_sdk.config import ConfigError
from server_sdk.method.records import RoundRecord
from server_sdk.method.schedule import auto_rounds, fixed_rounds
from server_sdk.method.stage_gain import relative_rate, stage_gains


def _rec(stage, rnd, loss, cpu, layers=4, down=100, up=50):
    return RoundRecord(stage=stage, round=rnd, stage_round=0, layers=layers, clients=[], train_loss=None,
                       bytes_down=down, bytes_up=up, stage_download_bytes=0, client_seconds=[9.0] * len(cpu),
                       wall_seconds=0.0, client_samples=[], eval_loss=loss, client_cpu_seconds=list(cpu))


BASE = RoundRecord.base_model(6, {"eval_loss": 5.0, "per_task": {}})


def test_stage_gains_measure_each_stage_from_the_previous_evaluation():
    records = [BASE, _rec(0, 1, None, [1.0, 1.0]), _rec(0, 2, 4.8, [2.0, 1.0]),  # stage 0: 5.0 -> 4.8 for 5 s
               _rec(1, 3, 4.5, [3.0, 3.0], layers=6), _rec(1, 4, None, [1.0, 1.0], layers=6)]  # last round unevaluated
    out = stage_gains(records)
    assert [e["stage"] for e in out] == [0, 1] and [e["layers"] for e in out] == [4, 6]
    s0, s1 = out
    assert s0["loss_start"] == 5.0 and s0["loss_end"] == 4.8 and s0["rounds"] == 2
    assert s0["loss_change"] == pytest.approx(-0.2) and s0["client_cpu_seconds"] == pytest.approx(5.0)
    assert s0["loss_change_per_client_cpu_s"] == pytest.approx(-0.04) and s0["lora_bytes"] == 300
    # stage 1 counts cost only up to its last evaluation (a screen stopped mid-stage)
    assert s1["loss_start"] == 4.8 and s1["loss_end"] == 4.5 and s1["client_cpu_seconds"] == pytest.approx(6.0)
    assert s1["loss_change_per_client_cpu_s"] == pytest.approx(-0.05) and s1["rounds"] == 2
    # FedIT bought -0.04/s here: stage 1 is 1.25x FedIT's rate, a stage that made things worse is negative
    assert relative_rate(s1["loss_change_per_client_cpu_s"], -0.04) == pytest.approx(1.25)
    assert relative_rate(0.01, -0.04) == pytest.approx(-0.25)
    assert relative_rate(None, -0.04) is None and relative_rate(-0.1, 0.0) is None


def test_stage_gains_without_evaluations_or_cpu_times():
    out = stage_gains([BASE, _rec(0, 1, None, [1.0])])
    assert out[0]["loss_end"] is None and out[0]["loss_change_per_client_cpu_s"] is None
    # records without CPU times (old reports) fall back to wall seconds per client
    rec = _rec(0, 1, 4.0, [1.0])
    rec.client_cpu_seconds = None
    assert stage_gains([BASE, rec])[0]["client_cpu_seconds"] == pytest.approx(9.0)


LAYERS = [4, 8, 16, 30]


def test_auto_schedule_jumps_to_the_full_model_when_the_first_round_transfers_nothing():
    records = [BASE, _rec(0, 1, 4.999, [1.0, 1.0])]  # 0.02% gain, needs 0.05 * 4/30 = 0.67%
    new = auto_rounds(0, 0, records, [3, 3, 3, 3], LAYERS, 0.05)
    assert new == [1, 0, 0, 11] and sum(new) == 12
    assert fixed_rounds(0, 0, records, [3, 3, 3, 3], LAYERS, 0.05) == [3, 3, 3, 3]


def test_auto_schedule_keeps_a_paying_stage_and_grows_when_it_stops_paying():
    paying = [BASE, _rec(0, 1, 4.9, [1.0])]  # 2% gain > 0.67%
    assert auto_rounds(0, 0, paying, [3, 3, 3, 3], LAYERS, 0.05) == [3, 3, 3, 3]
    stalled = paying + [_rec(0, 2, 4.899, [1.0])]  # second round: 0.02%
    assert auto_rounds(0, 1, stalled, [3, 3, 3, 3], LAYERS, 0.05) == [2, 4, 3, 3]
    # the stage's last round ends it anyway, and the final stage is never re-planned
    assert auto_rounds(0, 2, stalled, [3, 3, 3, 3], LAYERS, 0.05) == [3, 3, 3, 3]
    assert auto_rounds(3, 0, stalled, [3, 3, 3, 3], LAYERS, 0.05) == [3, 3, 3, 3]


def test_config_validates_the_hypotheses(tiny_cfg):
    for bad, word in (({"heal": "magic"}, "heal"), ({"schedule": "sometimes"}, "schedule"),
                      ({"schedule_expected_gain": 1.5}, "schedule_expected_gain"), ({"heal_steps": 0}, "heal_steps"),
                      ({"grouping": "last-first"}, "grouping")):
        with pytest.raises(ConfigError, match=word):
            tiny_cfg(**bad).validate()
    cfg = tiny_cfg()
    # fields added later drop out of the benchmarks' cache identity while they hold their defaults
    assert "heal" not in cfg.identity() and "heal" in tiny_cfg(heal="hidden").identity()


def test_auto_schedule_in_the_round_loop_keeps_the_budget_and_resumes(tiny_base, tiny_cfg, tmp_path):
    """With an expected full-model gain no small stage can match, stage 1 ends after one round and the
    full model gets every other round; report.json says so, and an interrupted run resumes the plan."""
    from server_sdk.engine.rounds import run

    cfg = tiny_cfg(schedule="auto", schedule_expected_gain=0.9, rounds_per_stage=2, lr=2e-2)
    report = run(cfg, tmp_path / "a", base=tiny_base, progress=False)
    assert [r.stage for r in report.records if r.stage >= 0] == [0, 2, 2, 2, 2, 2]
    assert report["rounds_per_stage"] == [1, 0, 5] and [p["stage"] for p in report["stage_plans"]] == [0, 2]
    assert [e["stage"] for e in report["stage_transfer"]] == [0, 2]
    evaluated = [r["eval_loss"] for r in report["records"]]  # eval_every=1: every round evaluated
    assert report["stage_transfer"][1]["loss_end"] == evaluated[-1]
    # the full-model stage starts from stage 1's end, or from the base model where stage 1 was rolled back
    start = evaluated[0] if report["stage_transfer"][0]["rolled_back"] else evaluated[1]
    assert report["stage_transfer"][1]["loss_change"] == pytest.approx(evaluated[-1] - start)
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert saved["stage_transfer"] == report["stage_transfer"]
    from server_sdk.engine.report import summary_text

    assert "full-model eval loss change per small stage: 2 layers" in summary_text(report.report, tmp_path / "a")
    cut = run(cfg, tmp_path / "b", base=tiny_base, progress=False, stop_after_rounds=2)
    assert cut.interrupted and cut.report is None and len(cut.records) == 3
    resumed = run(cfg, tmp_path / "b", base=tiny_base, progress=False, resume=True)
    assert [r.eval_loss for r in resumed.records] == [r.eval_loss for r in report.records]
    # the fixed schedule (the paper's) runs every stage as configured
    fixed = run(tiny_cfg(rounds_per_stage=2, lr=2e-2), tmp_path / "f", base=tiny_base, progress=False)
    assert fixed["rounds_per_stage"] == [2, 2, 2]


def test_auto_rolls_back_a_stage_that_did_not_pay_and_then_trains_fedits_rounds(tiny_base, tiny_cfg, tmp_path):
    """On this seed the first 2-layer round lowers the full model's loss, but by far less than its cost's
    share: `auto` ends the stage, rolls its transfer back, and the full-model stage (drawing clients and
    seeds as FedIT does) reproduces a FedIT run of the same seed round for round, one small round later.
    With a lower bar the same stage pays for itself and is kept."""
    from server_sdk.engine.rounds import run

    auto = run(tiny_cfg(schedule="auto", schedule_expected_gain=0.9, rounds_per_stage=2, lr=2e-2, seed=0),
               tmp_path / "auto", base=tiny_base, progress=False)
    fedit = run(tiny_cfg(strategy="fedit", stages=None, rounds_per_stage=5, lr=2e-2, seed=0),
                tmp_path / "fedit", base=tiny_base, progress=False)
    base, small, full = auto.records[0], auto.records[1], auto.records[2:]
    assert small.stage == 0 and small.rolled_back and small.eval_loss < base.eval_loss
    assert auto.report["rounds_per_stage"] == [1, 0, 5]
    assert auto.report["records"][1]["rolled_back"] and "rolled_back" not in auto.report["records"][2]
    theirs = fedit.records[1:]
    assert [r.clients for r in full] == [r.clients for r in theirs]
    assert [r.eval_loss for r in full] == [r.eval_loss for r in theirs]  # bit for bit
    first, last = auto.report["stage_transfer"]
    assert first["rolled_back"] and not last["rolled_back"]
    assert last["loss_start"] == base.eval_loss  # the rolled-back stage left no trace
    # a bar the stage clears: kept, and the full-model stage starts from its transfer
    kept = run(tiny_cfg(schedule="auto", schedule_expected_gain=1e-4, rounds_per_stage=1, lr=2e-2, seed=0),
               tmp_path / "kept", base=tiny_base, progress=False)
    assert kept.records[1].eval_loss == small.eval_loss and not kept.records[1].rolled_back
    assert kept.report["stage_transfer"][1]["loss_start"] == small.eval_loss
    # the fixed schedule never rolls back, even a stage that made the full model worse
    fixed = run(tiny_cfg(rounds_per_stage=1, lr=0.2), tmp_path / "fixed", base=tiny_base, progress=False)
    assert fixed.records[1].eval_loss > fixed.before.eval_loss
    assert not any(r.rolled_back for r in fixed.records)


def _hidden(model, ids):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        return inner.model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("rule", ["hidden", "logits"])
def test_heal_moves_the_fused_submodel_toward_the_full_model(tiny_base, tiny_cfg, rule):
    """The heal trains only the fused layers' frozen weights (LoRA untouched) and brings the submodel's
    output closer to the full model's on prompts it did not train on."""
    from server_sdk.method.heal import heal_prompts
    from server_sdk.method.lora import attach_lora, read_lora
    from server_sdk.method.strategies import make_strategy
    from server_sdk.method.submodel import share_model

    cfg = tiny_cfg(heal=rule, heal_steps=30, heal_lr=3e-3, heal_examples=16)
    strategy = make_strategy(cfg)
    strategy.stage_sizes(tiny_base.n_layers)
    full_lora = read_lora(attach_lora(share_model(tiny_base.model), cfg.lora, seed=0))
    plan, _ = strategy.configure_stage(0, tiny_base.model, full_lora, 2)
    plain, _ = make_strategy(tiny_cfg()).build_submodel(tiny_base.model, full_lora, plan)
    with pytest.raises(ValueError, match="tokenizer"):  # the round loop sets it; a bare strategy has none
        strategy.build_submodel(tiny_base.model, full_lora, plan)
    strategy.tokenizer = tiny_base.tokenizer
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    healed, lora = strategy.build_submodel(tiny_base.model, full_lora, plan)
    # submodels share the base's frozen tensors: healing must never train the base model in place
    assert all(torch.equal(v, before[k]) for k, v in tiny_base.model.state_dict().items())
    notes = strategy.stage_notes(0)
    assert notes["heal"] == rule and notes["heal_loss_last"] < notes["heal_loss_first"]
    assert notes["server_cpu_seconds"] > 0
    assert all(not p.requires_grad for p in healed.parameters())
    assert all(torch.equal(v, lora[k]) for k, v in read_lora(healed).items())  # the LoRA is the fused one
    unseen = tiny_cfg(seed=5, heal_examples=8)  # other generator seeds than the heal's
    prompts = heal_prompts(tiny_base.tokenizer, unseen)
    n = min(map(len, prompts))
    ids = torch.tensor([p[:n] for p in prompts])
    target = _hidden(tiny_base.model, ids)
    err = lambda m: float(((_hidden(m, ids) - target) ** 2).mean())  # noqa: E731
    assert err(healed) < 0.9 * err(plain)


def test_first_last_submodel_keeps_the_first_layers_and_the_last_and_transfers_to_them_only(tiny_base, tiny_cfg):
    from server_sdk.method.grouping import first_last_groups
    from server_sdk.method.lora import attach_lora, read_lora
    from server_sdk.method.strategies import make_strategy
    from server_sdk.method.submodel import share_model

    assert first_last_groups(6, 3) == [[0], [1], [2, 3, 4, 5]] and first_last_groups(6, 6)[-1] == [5]
    cfg = tiny_cfg(grouping="first-last", anchor="last", fusion="select", transfer="anchor")
    strategy = make_strategy(cfg)
    full_lora = read_lora(attach_lora(share_model(tiny_base.model), cfg.lora, seed=0))
    plan, _ = strategy.configure_stage(0, tiny_base.model, full_lora, 3)
    assert plan.groups == [[0], [1], [2, 3, 4, 5]] and plan.anchors == [0, 1, 5]
    sub, init = strategy.build_submodel(tiny_base.model, full_lora, plan)
    want = tiny_base.model.model.layers[5].state_dict()
    got = sub.get_base_model().model.layers[2].state_dict()
    assert all(torch.equal(got[k.replace(".weight", ".base_layer.weight")] if k.replace(".weight", ".base_layer.weight")
                           in got else got[k], v) for k, v in want.items())
    trained = {k: v + 1.0 for k, v in init.items()}
    after = strategy.finish_stage(full_lora, trained, init, plan)
    changed = sorted({int(k.split(".")[1]) for k in after if not torch.equal(after[k], full_lora[k])})
    assert changed == [0, 1, 5]  # layers 2-4, dropped from the submodel, keep their LoRA


def test_screening_harness_smoke(tmp_path, monkeypatch):
    """The harness end to end on the tiny model: FedIT and two variants, the issue's JSON fields."""
    import benchmarks.early_stages as es

    monkeypatch.setattr(es, "RESULTS", tmp_path)
    monkeypatch.setattr(es, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(es, "KEPT", tmp_path / "early-stages")
    assert es.main(["--profile", "smoke", "--variants", "paper,auto"]) == 0
    out = json.loads((tmp_path / "early-stages-smoke.json").read_text())
    assert out["eval_examples"] == 16 and [v["name"] for v in out["variants"]] == ["fedit", "paper", "auto"]
    for v in out["variants"]:
        assert v["seeds"] == [0] and v["client_cpu_speedup_to_fedit_final"] is None
        assert v["lora_bytes_reduction_to_fedit_final"] is None and v["stage_transfer"]
    fedit, default = out["variants"][0]["stage_transfer"][0], out["variants"][1]["stage_transfer"][0]
    assert fedit["relative_to_fedit"] == pytest.approx(1.0) and fedit["layers"] == 6
    assert default["layers"] == 2 and default["rounds"] == 2 and default["loss_change"] is not None
    assert len(list((tmp_path / "early-stages").glob("*.json"))) == 3  # one kept record per run
    assert es.main(["--profile", "smoke", "--variants", "paper"]) == 0  # cached: loads, merges the summary
    again = json.loads((tmp_path / "early-stages-smoke.json").read_text())
    assert [v["name"] for v in again["variants"]] == ["fedit", "paper", "auto"]


def test_whole_runs_go_to_fedits_final_loss_and_stop_there(tmp_path, monkeypatch):
    """Whole runs: a DEVFT variant's final stage is long enough to reach FedIT's final loss, the run
    stops at the first evaluated round that does (or past the CPU budget), and the headline ratios
    come from the records."""
    import benchmarks.early_stages as es

    monkeypatch.setattr(es, "RESULTS", tmp_path)
    monkeypatch.setattr(es, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(es, "KEPT", tmp_path / "early-stages")
    assert es.main(["--profile", "smoke", "--whole", "--variants", "paper"]) == 0
    out = json.loads((tmp_path / "early-stages-smoke-whole.json").read_text())
    fedit, default = out["variants"]
    assert fedit["rounds_run"] == [6] and fedit["client_cpu_speedup_to_fedit_final"] == [pytest.approx(1.0)]
    kept = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (tmp_path / "early-stages").glob("*")}
    run, ref = kept["paper"], kept["fedit"]
    assert run["config"]["rounds_per_stage"] == [2, 2, 6] and run["target"]["eval_loss"] == ref["records"][-1]["eval_loss"]
    losses = [r["eval_loss"] for r in run["records"] if r["stage"] >= 0]
    assert None not in losses  # evaluated every round
    cpu = sum(c for r in run["records"] if r["stage"] >= 0 for c in r["client_cpu_seconds"])
    hit = [i for i, v in enumerate(losses) if v <= run["target"]["eval_loss"]]
    if run["stopped_early"]:  # stopped at the first round at the target, or once over budget
        assert (hit and hit[0] == len(losses) - 1) or cpu > run["target"]["cpu_budget"]
    else:
        assert len(losses) == 10 and hit[:1] in ([], [9])
    speed = default["client_cpu_speedup_to_fedit_final"][0]
    assert (speed is None) == (not hit) and default["rounds_run"] == [len(losses)]


def test_auto_is_the_default_and_runs_saved_before_it_keep_the_fixed_schedule(tmp_path):
    """devft's default schedule is `auto` (issue #12's rule: the small stages do not transfer on
    SmolLM2); the paper's fixed schedule is one value away, and a run saved before the field existed
    resumes with the schedule it ran with."""
    from server_sdk.config import ConfigError, RunConfig

    assert RunConfig().schedule == "auto" and RunConfig().with_overrides({"schedule": "fixed"}).schedule == "fixed"
    old = RunConfig().to_dict()
    for field in ("schedule", "schedule_expected_gain", "heal", "heal_steps", "heal_lr", "heal_examples"):
        del old[field]  # a config.json written before issue #12
    (tmp_path / "config.json").write_text(json.dumps(old))
    resumed = RunConfig.of_run(tmp_path)
    assert resumed.schedule == "fixed" and resumed.heal == "none"
    (tmp_path / "config.json").write_text(json.dumps({**old, "schedule": "auto"}))
    assert RunConfig.of_run(tmp_path).schedule == "auto"  # a saved field always wins
    with pytest.raises(ConfigError, match="no config.json"):
        RunConfig.of_run(tmp_path / "nowhere")
