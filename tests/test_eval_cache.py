"""The base model's held-out evaluation is computed once per machine and reused only when it must match."""

from __future__ import annotations

import torch

from server_sdk.config import DataSettings, LoraSettings
from server_sdk.data import build_client_data, build_eval_data
from server_sdk.engine.eval_cache import base_evaluation, cache_dir, eval_key
from server_sdk.engine.trainer import evaluate
from server_sdk.method.lora import attach_lora
from server_sdk.method.submodel import share_model

KW = dict(seq_len=64, generate=True, max_new_tokens=3)


def test_base_evaluation_is_cached_and_keyed_by_everything_it_depends_on(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path))
    data = DataSettings(tasks=["chain_sum", "basic_arithmetic"], examples_per_client=2, eval_examples_per_task=2)
    held_out = build_eval_data(tiny_base.tokenizer, data, 0, build_client_data(tiny_base.tokenizer, data, 2, 0))
    model = attach_lora(share_model(tiny_base.model), LoraSettings(r=2, alpha=4), seed=0)

    direct = evaluate(tiny_base.model, tiny_base.tokenizer, held_out, **KW)
    first = base_evaluation(model, tiny_base, held_out, **KW)
    assert first == direct  # B = 0: the fresh adapter is the base model, bit for bit
    entries = list(cache_dir().glob("*.json"))
    assert len(entries) == 1
    entries[0].write_text(entries[0].read_text().replace(str(first["eval_loss"]), "1234.5"))
    assert base_evaluation(model, tiny_base, held_out, **KW)["eval_loss"] == 1234.5  # read back, not recomputed

    # another held-out set, other settings or other weights are other entries
    assert eval_key(tiny_base, held_out[:-1], batch_size=16, **KW) != eval_key(tiny_base, held_out, batch_size=16, **KW)
    assert eval_key(tiny_base, held_out, batch_size=16, **{**KW, "max_new_tokens": 4}) != \
        eval_key(tiny_base, held_out, batch_size=16, **KW)
    assert eval_key(tiny_base, held_out, batch_size=16, precision="bf16", **KW) != \
        eval_key(tiny_base, held_out, batch_size=16, precision="fp32", **KW) == eval_key(tiny_base, held_out, batch_size=16, **KW)
    other = share_model(tiny_base.model)  # shares the session's tensors: replace one, never write into it
    other.model.norm.weight = torch.nn.Parameter(other.model.norm.weight.detach() + 1e-3, requires_grad=False)
    moved = type(tiny_base)(model=other, tokenizer=tiny_base.tokenizer, name=tiny_base.name, source="test")
    assert eval_key(moved, held_out, batch_size=16, **KW) != eval_key(tiny_base, held_out, batch_size=16, **KW)

    # an adapter that is not the identity is never answered from the cache
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    trained = base_evaluation(model, tiny_base, held_out, **KW)
    assert trained["eval_loss"] != 1234.5 and len(list(cache_dir().glob("*.json"))) == 1


def test_a_damaged_cache_entry_is_recomputed(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path))
    data = DataSettings(tasks=["chain_sum"], examples_per_client=2, eval_examples_per_task=2)
    held_out = build_eval_data(tiny_base.tokenizer, data, 0, build_client_data(tiny_base.tokenizer, data, 1, 0))
    model = attach_lora(share_model(tiny_base.model), LoraSettings(r=2, alpha=4), seed=0)
    good = base_evaluation(model, tiny_base, held_out, **KW)
    (entry,) = cache_dir().glob("*.json")
    entry.write_text("{not json")
    assert base_evaluation(model, tiny_base, held_out, **KW) == good
