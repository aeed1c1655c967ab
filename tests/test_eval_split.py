"""Held-out evaluation split at batch boundaries (as the Ray executor splits it across workers) gives
evaluate()'s numbers bit for bit."""

from __future__ import annotations

import pytest
import torch

from server_sdk.config import DataSettings, LoraSettings
from server_sdk.data import build_client_data, build_eval_data
from server_sdk.engine.trainer import EvalPart, combine_eval, eval_chunks, evaluate, evaluate_part
from server_sdk.method.lora import attach_lora
from server_sdk.method.submodel import share_model


def test_chunks_are_whole_batches_in_order_and_as_even_as_batches_allow():
    for n in range(0, 40):
        for batch_size in (1, 3, 4, 16):
            for parts in (1, 2, 3, 5):
                chunks = eval_chunks(n, batch_size, parts)
                assert [i for c in chunks for i in c] == list(range(n))  # contiguous, in order, all of them
                assert len(chunks) == min(parts, -(-n // batch_size))  # no empty chunk
                assert all(len(c) % batch_size == 0 for c in chunks[:-1])  # every boundary is a batch boundary
                batches = [-(-len(c) // batch_size) for c in chunks]
                assert not batches or max(batches) - min(batches) <= 1
    assert eval_chunks(37, 4, 3) == [range(0, 16), range(16, 28), range(28, 37)]
    assert eval_chunks(10, 16, 4) == [range(0, 10)]  # one batch: one chunk
    with pytest.raises(ValueError):
        eval_chunks(10, 0, 2)


def test_combine_refuses_parts_that_do_not_match_generate():
    with pytest.raises(ValueError, match="without generation"):
        combine_eval([EvalPart(["t"], [1.0], None)], generate=True)
    with pytest.raises(FloatingPointError, match="not finite"):
        combine_eval([EvalPart(["t"], [1.0], None), EvalPart(["t"], [float("nan")], None)], generate=False)


@pytest.mark.parametrize("generate", [False, True])
def test_parts_combined_equal_evaluating_all_at_once_bit_for_bit(tiny_base, generate):
    data = DataSettings(tasks=["chain_sum", "basic_arithmetic", "spell_backward"], examples_per_client=2,
                        eval_examples_per_task=4)
    held_out = build_eval_data(tiny_base.tokenizer, data, 0, build_client_data(tiny_base.tokenizer, data, 2, 0))
    assert len(held_out) == 12
    model = attach_lora(share_model(tiny_base.model), LoraSettings(r=2, alpha=4), seed=0)
    with torch.no_grad():  # an adapter that changes the numbers (B = 0 would be the base model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    kw = dict(seq_len=64, generate=generate, max_new_tokens=2, batch_size=3)
    whole = evaluate(model, tiny_base.tokenizer, held_out, **kw)
    for parts in (2, 3, 4):
        chunks = eval_chunks(len(held_out), 3, parts)
        split = combine_eval([evaluate_part(model, tiny_base.tokenizer, held_out[c.start:c.stop], **kw)
                              for c in chunks], generate=generate)
        assert split == whole  # == on floats: bit for bit
    assert ("accuracy" in whole) == generate and len(whole["per_task"]) == 3


def test_an_example_with_no_answer_token_in_seq_len_is_left_out_not_scored_zero(tiny_base, caplog):
    """An answer wholly past seq_len leaves no token to score: that example is left out of the loss (it used to
    count as 0, pulling the eval loss down); with none left the error names the fix."""
    data = DataSettings(tasks=["chain_sum"], examples_per_client=2, eval_examples_per_task=3)
    held_out = build_eval_data(tiny_base.tokenizer, data, 0, build_client_data(tiny_base.tokenizer, data, 2, 0))
    model = attach_lora(share_model(tiny_base.model), LoraSettings(r=2, alpha=4), seed=0)
    kw = dict(seq_len=64, generate=False, batch_size=3)
    whole = evaluate(model, tiny_base.tokenizer, held_out, **kw)
    part = evaluate_part(model, tiny_base.tokenizer, held_out, **kw)
    assert None not in part.losses
    cut = EvalPart(part.tasks, [part.losses[0], None, part.losses[2]], None)
    with caplog.at_level("WARNING"):
        out = combine_eval([cut], generate=False)
    assert out["eval_loss"] == pytest.approx((part.losses[0] + part.losses[2]) / 2) != whole["eval_loss"]
    assert "left out 1 held-out example" in caplog.text
    with pytest.raises(ValueError, match="raise seq_len"):
        evaluate(model, tiny_base.tokenizer, held_out, seq_len=4, generate=False, batch_size=3)
