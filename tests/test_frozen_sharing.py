"""One copy of the frozen weights: evaluation model and stage submodels share the base's tensors."""

import pickle

import torch

from server_sdk.config import LoraSettings
from server_sdk.engine.eval_cache import weights_digest
from server_sdk.engine.frozen import frozen_state, holds_exactly, read_frozen, same_tensors, write_frozen
from server_sdk.method.lora import attach_lora, read_lora
from server_sdk.method.strategies import make_strategy
from server_sdk.method.submodel import StagePlan, share_model


def _frozen_ptrs(model) -> dict[str, int]:
    return {k: t.data_ptr() for k, t in frozen_state(model).items()}


def test_eval_model_and_fedit_submodel_share_every_frozen_tensor(tiny_base, tiny_cfg):
    cfg = tiny_cfg(strategy="fedit")
    base_ptrs = _frozen_ptrs(tiny_base.model)
    eval_model = attach_lora(share_model(tiny_base.model), cfg.lora, seed=0)
    assert _frozen_ptrs(eval_model) == base_ptrs
    strategy = make_strategy(cfg)
    plan, _ = strategy.configure_stage(0, tiny_base.model, read_lora(eval_model), tiny_base.n_layers)
    sub, _ = strategy.build_submodel(tiny_base.model, read_lora(eval_model), plan)
    assert _frozen_ptrs(sub) == base_ptrs
    # training still reaches only LoRA: the shared tensors are frozen
    assert not any(p.requires_grad for n, p in sub.named_parameters() if "lora_" not in n)


def test_devft_submodel_shares_unfused_layers_and_owns_fused_ones(tiny_base, tiny_cfg):
    cfg = tiny_cfg(strategy="devft", beta=0.2)
    lora = read_lora(attach_lora(share_model(tiny_base.model), cfg.lora, seed=0))
    plan = StagePlan(0, 3, [[0], [1, 2, 3], [4, 5]], [0, 2, 4])
    sub, _ = make_strategy(cfg).build_submodel(tiny_base.model, lora, plan)
    base, ours = _frozen_ptrs(tiny_base.model), _frozen_ptrs(sub)
    assert ours["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]
    assert ours["model.norm.weight"] == base["model.norm.weight"]
    assert ours["model.layers.0.self_attn.q_proj.weight"] == base["model.layers.0.self_attn.q_proj.weight"]
    fused = sub.get_base_model().model.layers[1].self_attn.q_proj.base_layer.weight
    assert ours["model.layers.1.self_attn.q_proj.weight"] not in base.values()
    layers = tiny_base.model.model.layers
    anchor, others = layers[2].self_attn.q_proj.weight, [layers[1].self_attn.q_proj.weight, layers[3].self_attn.q_proj.weight]
    assert torch.allclose(fused, anchor + 0.2 * sum(o - anchor for o in others))


def test_stage_file_round_trips_exactly_and_maps_instead_of_copying(tiny_base, tmp_path):
    state = frozen_state(tiny_base.model)
    assert "lm_head.weight" not in state  # tied to the embeddings: stored once
    size = write_frozen(tmp_path / "s.safetensors", state)
    assert size == (tmp_path / "s.safetensors").stat().st_size
    back = read_frozen(tmp_path / "s.safetensors")
    assert back.keys() == state.keys()
    assert all(torch.equal(torch.from_numpy(back[k].copy()), state[k]) for k in state)
    assert all(not a.flags.owndata for a in back.values())  # views of the mapped file
    buffers = []  # plain arrays, not np.memmap: pickled out-of-band, so Ray maps them instead of copying
    pickle.dumps(back, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == len(back)
    from safetensors.torch import load_file  # the file is plain safetensors

    assert torch.equal(load_file(str(tmp_path / "s.safetensors"))["model.norm.weight"], state["model.norm.weight"])


def test_the_base_models_own_file_is_recognised_and_digested_without_mapping_it(tiny_base, tiny_base_from_file):
    base = tiny_base_from_file
    assert base.weights_file is not None and base.weights_file.name == "model.safetensors"
    state = frozen_state(base.model)
    assert holds_exactly(base.weights_file, state)  # the names workers load (tied head absent), dtypes, shapes
    assert read_frozen(base.weights_file).keys() == state.keys()
    assert not holds_exactly(base.weights_file, {k: v.half() for k, v in state.items()})  # a converting load
    assert not holds_exactly(base.weights_file, dict(list(state.items())[1:]))
    assert not holds_exactly(base.weights_file.with_name("config.json"), state)
    # the base-evaluation cache key reads the file instead of the weights, and is the same key
    assert weights_digest(base.model, base.weights_file) == weights_digest(base.model) == weights_digest(tiny_base.model)
    # a FedIT submodel is the base model's tensors; a copy of them is not
    sub = attach_lora(share_model(base.model), LoraSettings(r=2, alpha=4), seed=0)
    assert same_tensors(frozen_state(sub), state)
    assert not same_tensors({k: v.clone() for k, v in state.items()}, state)
