"""bf16 mixed precision for simulated training and evaluation (server_sdk.engine.precision)."""

import pytest
import torch

from server_sdk.config import ConfigError
from server_sdk.data import build_client_data, build_eval_data
from server_sdk.engine.precision import ATTENTION, compute
from server_sdk.engine.rounds import run
from server_sdk.engine.trainer import evaluate, local_train, token_losses
from server_sdk.method.lora import attach_lora, read_lora, write_lora
from server_sdk.method.submodel import share_model


@pytest.fixture
def model(tiny_base, tiny_cfg):
    return attach_lora(share_model(tiny_base.model), tiny_cfg().lora, seed=0)


@pytest.fixture
def data(tiny_base, tiny_cfg):
    cfg = tiny_cfg()
    clients = build_client_data(tiny_base.tokenizer, cfg.data, 2, 0)
    return clients, build_eval_data(tiny_base.tokenizer, cfg.data, 0, clients)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_token_loss_never_depends_on_later_tokens(model, precision):
    """Causal masking holds in both precisions (transformers builds no mask for an attention
    implementation without a registered mask function: bf16 would then see the future)."""
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (2, 24))
    labels = ids.clone()
    later = ids.clone()
    later[:, 16:] = torch.randint(10, 1000, (2, 8))
    with torch.no_grad(), compute(model, precision):
        a, _ = token_losses(model, ids, labels)
        b, _ = token_losses(model, later, labels)
    # losses of next tokens 1..15 (positions 0..14) see only tokens before position 16
    a, b = a.view(2, 23), b.view(2, 23)
    assert torch.equal(a[:, :15], b[:, :15])
    assert not torch.equal(a[:, 16:], b[:, 16:])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_left_padding_is_masked_as_generation_needs(model, precision):
    """A left-padded prompt in a batch (generation's layout) gives its next-token logits as alone."""
    torch.manual_seed(1)
    long, short = torch.randint(10, 1000, (12,)), torch.randint(10, 1000, (6,))
    ids = torch.stack([long, torch.cat([torch.zeros(6, dtype=torch.long), short])])
    mask = torch.tensor([[1] * 12, [0] * 6 + [1] * 6])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), compute(model, precision):
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[1, -1].float()
        alone = model(input_ids=short[None]).logits[0, -1].float()
    assert torch.allclose(batch, alone, atol=2e-2 if precision == "bf16" else 1e-5)


def test_bf16_computes_the_fp32_function_approximately_and_restores_the_model(model, tiny_base, data):
    _, held_out = data
    impl = [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")
            and hasattr(m.config, "_attn_implementation")]
    fp32 = evaluate(model, tiny_base.tokenizer, held_out, seq_len=64, generate=False)
    bf16 = evaluate(model, tiny_base.tokenizer, held_out, seq_len=64, generate=False, precision="bf16")
    assert fp32["eval_loss"] != bf16["eval_loss"]  # it did run in bf16
    assert bf16["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=0.02)
    after = [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")
             and hasattr(m.config, "_attn_implementation")]
    assert after == impl and ATTENTION not in after
    assert evaluate(model, tiny_base.tokenizer, held_out, seq_len=64, generate=False) == fp32


def test_bf16_training_keeps_float32_lora_and_optimizer_and_learns(model, tiny_base, data):
    clients, held_out = data
    start = read_lora(model)
    before = evaluate(model, tiny_base.tokenizer, held_out, seq_len=64, generate=False, precision="bf16")
    result = local_train(model, tiny_base.tokenizer, clients[0], steps=6, batch_size=2, lr=5e-2, seq_len=64, seed=0,
                         is_trainable=lambda n: "lora_" in n, precision="bf16")
    assert all(t.dtype == torch.float32 for t in result.delta.values())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert any(float(t.abs().max()) > 0 for t in result.delta.values())
    # the delta of a bf16 run differs from the fp32 one's, from the same start and seed
    write_lora(model, start)
    fp32 = local_train(model, tiny_base.tokenizer, clients[0], steps=6, batch_size=2, lr=5e-2, seq_len=64, seed=0,
                       is_trainable=lambda n: "lora_" in n)
    assert any(not torch.equal(fp32.delta[k], result.delta[k]) for k in fp32.delta)
    write_lora(model, {k: start[k] + result.delta.get(k, 0) for k in start})
    after = evaluate(model, tiny_base.tokenizer, held_out, seq_len=64, generate=False, precision="bf16")
    assert torch.isfinite(torch.tensor(after["eval_loss"])) and after["eval_loss"] != before["eval_loss"]


def test_a_bf16_run_is_a_different_run_and_resumes_as_bf16(tiny_base, tiny_cfg, tmp_path):
    fp32 = run(tiny_cfg(strategy="fedit", rounds_per_stage=2, torch_threads=1), tmp_path / "fp32", base=tiny_base,
               progress=False)
    cfg = tiny_cfg(strategy="fedit", rounds_per_stage=2, torch_threads=1, precision="bf16")
    part = run(cfg, tmp_path / "bf16", base=tiny_base, progress=False, stop_after_rounds=1)
    assert part.interrupted
    bf16 = run(cfg, tmp_path / "bf16", base=tiny_base, progress=False, resume=True)
    whole = run(cfg, tmp_path / "bf16-whole", base=tiny_base, progress=False)
    losses = lambda rep: [r.eval_loss for r in rep.records]  # noqa: E731
    assert losses(bf16) == losses(whole)  # resumed as bf16 (the saved config), same numbers
    assert losses(bf16)[1:] != losses(fp32)[1:]
    assert losses(bf16) == pytest.approx(losses(fp32), rel=0.05)


def test_a_fleet_run_refuses_bf16(tiny_base, tiny_cfg, tmp_path):
    from server_sdk.fleet.coordinator import fleet_executor_factory

    make = fleet_executor_factory(tmp_path, creds=None)
    with pytest.raises(ConfigError, match="fleet devices train their fp32 graphs"):
        make(tiny_cfg(precision="bf16"), tiny_base, [[]])
