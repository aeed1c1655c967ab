import numpy as np
import pytest
import torch

from server_sdk.config import LoraSettings
from server_sdk.method.aggregation import FedAvg
from server_sdk.method.fusion import choose_anchor, fuse_group
from server_sdk.method.lora import attach_lora, layer_slice, read_lora
from server_sdk.method.strategies.base import ClientResult
from server_sdk.method.submodel import StagePlan, build_submodel, fold_back_lora, identity_plan, share_model

LORA = LoraSettings(r=2, alpha=4)


@pytest.fixture()
def full(tiny_base):
    """The tiny base model and a random (non-zero B) full-model LoRA state."""
    lora = read_lora(attach_lora(share_model(tiny_base.model), LORA, seed=1))
    g = torch.Generator().manual_seed(2)
    lora = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lora.items()}
    return tiny_base.model, lora


def _layer(model, i):
    return {k: v for k, v in model.model.layers[i].state_dict().items()}


@pytest.mark.parametrize("beta_kind", ["zero", "mean"])
def test_fusion_beta_zero_is_anchor_and_one_over_m_is_mean_on_every_tensor(full, beta_kind):
    model, lora = full
    plan = StagePlan(0, 2, [[0, 2, 3], [1, 4, 5]], [2, 4])
    beta = 0.0 if beta_kind == "zero" else 1.0 / 3
    sub, sub_lora = build_submodel(model, lora, plan, beta, "differential", LORA)
    inner = sub.get_base_model()
    for i, (group, anchor) in enumerate(zip(plan.groups, plan.anchors)):
        got = {k.replace("base_layer.", ""): v for k, v in inner.model.layers[i].state_dict().items() if "lora" not in k}
        for name, value in got.items():
            members = torch.stack([_layer(model, m)[name] for m in group])
            want = _layer(model, anchor)[name] if beta_kind == "zero" else members.mean(0)
            torch.testing.assert_close(value, want, rtol=0, atol=1e-6)
        for name, value in layer_slice(sub_lora, i).items():
            members = torch.stack([layer_slice(lora, m)[name] for m in group])
            want = layer_slice(lora, anchor)[name] if beta_kind == "zero" else members.mean(0)
            torch.testing.assert_close(value, want, rtol=0, atol=1e-6)


def test_fusion_methods_mean_and_select_match_their_definitions():
    members = [{"w": torch.full((2,), float(v))} for v in (1.0, 2.0, 6.0)]
    assert fuse_group(members, 1, 0.5, "select")["w"].tolist() == [2.0, 2.0]
    assert fuse_group(members, 1, 0.5, "mean")["w"].tolist() == [3.0, 3.0]
    # anchor 2 + 0.5 * ((1-2) + (6-2)) = 3.5
    assert fuse_group(members, 1, 0.5, "differential")["w"].tolist() == [3.5, 3.5]


def test_medoid_anchor_is_most_similar_member():
    sim = np.array([[1, .1, .2], [.1, 1, .9], [.2, .9, 1]])
    assert choose_anchor([0, 1, 2], sim, "medoid") == 2
    assert choose_anchor([0, 1, 2], sim, "first") == 0


def test_one_layer_per_group_submodel_equals_full_model(full):
    model, lora = full
    n = len(model.model.layers)
    sub, _ = build_submodel(model, lora, identity_plan(n), 0.3, "differential", LORA)
    ref = attach_lora(share_model(model), LORA)
    from server_sdk.method.lora import write_lora

    write_lora(ref, lora)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert torch.equal(sub(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_fold_back_copy_and_delta(full):
    _, lora = full
    plan = StagePlan(0, 2, [[0, 2, 3], [1, 4, 5]], [0, 1])
    initial = {k: v for k, v in lora.items() if k.startswith(("layers.0.", "layers.1."))}
    trained = {k: v + 1.0 for k, v in initial.items()}
    copied = fold_back_lora(lora, trained, initial, plan, "copy")
    delta = fold_back_lora(lora, trained, initial, plan, "delta")
    for i, group in enumerate(plan.groups):
        for m in group:
            for name, t in layer_slice(trained, i).items():
                assert torch.equal(copied[f"layers.{m}.{name}"], t)
                torch.testing.assert_close(delta[f"layers.{m}.{name}"], lora[f"layers.{m}.{name}"] + 1.0)
    assert not torch.equal(copied["layers.2.self_attn.q_proj.lora_A"], lora["layers.2.self_attn.q_proj.lora_A"])


def test_fedavg_weights_by_sample_count():
    g = {"a": torch.zeros(2)}
    results = [ClientResult(0, 1, {"a": torch.tensor([4.0, 0.0])}, 0.0, 0.0),
               ClientResult(1, 3, {"a": torch.tensor([0.0, 4.0])}, 0.0, 0.0)]
    out = FedAvg().aggregate(g, results)
    assert out["a"].tolist() == [1.0, 3.0]
    with pytest.raises(ValueError):
        FedAvg().aggregate(g, [])


def test_a_registered_fusion_rule_is_valid_config_and_the_strategy_fuses_with_it(full, monkeypatch):
    # the extension point: one function in fusion.FUSIONS, nothing else to touch
    from server_sdk.config import ConfigError, RunConfig
    from server_sdk.method import fusion
    from server_sdk.method.strategies import make_strategy

    model, lora = full
    with pytest.raises(ConfigError, match="fusion='deepest'"):
        RunConfig(fusion="deepest").validate()
    monkeypatch.setitem(fusion.FUSIONS, "deepest", lambda members, anchor_pos, beta: fusion.fuse_select(members, -1, beta))
    strategy = make_strategy(RunConfig(fusion="deepest", lora=LORA).validate())
    plan = StagePlan(0, 2, [[0, 2, 3], [1, 4, 5]], [2, 4])
    sub, sub_lora = strategy.build_submodel(model, lora, plan)
    inner = sub.get_base_model()
    for i, group in enumerate(plan.groups):
        deepest = _layer(model, group[-1])
        weights = {k.replace(".base_layer", ""): v for k, v in inner.model.layers[i].state_dict().items() if "lora_" not in k}
        assert set(weights) == set(deepest)
        assert all(torch.equal(v, deepest[k]) for k, v in weights.items())
        assert not torch.equal(weights["self_attn.q_proj.weight"], _layer(model, group[0])["self_attn.q_proj.weight"])
        for name, value in layer_slice(sub_lora, i).items():
            assert torch.equal(value, layer_slice(lora, group[-1])[name])


def test_strategies_own_their_transfer(full):
    from server_sdk.config import RunConfig
    from server_sdk.method.strategies import make_strategy

    _, lora = full
    plan = StagePlan(0, 2, [[0, 2, 3], [1, 4, 5]], [0, 1])
    initial = {k: v for k, v in lora.items() if k.startswith(("layers.0.", "layers.1."))}
    trained = {k: v + 1.0 for k, v in initial.items()}
    devft_delta = make_strategy(RunConfig(transfer="delta")).finish_stage(lora, trained, initial, plan)
    fedit = make_strategy(RunConfig(strategy="fedit", transfer="delta")).finish_stage(lora, trained, initial, plan)
    key = "layers.2.self_attn.q_proj.lora_A"
    torch.testing.assert_close(devft_delta[key], lora[key] + 1.0)
    assert torch.equal(fedit[key], trained["layers.0.self_attn.q_proj.lora_A"])  # FedIT always copies
