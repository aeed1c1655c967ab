"""End-to-end runs of the simulation on a tiny random LLaMA with real reasoning-gym data."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from server_sdk.engine.rounds import run
from server_sdk.method.lora import read_lora
from server_sdk.method.submodel import share_model


def test_devft_run_lowers_training_loss_and_writes_outputs(tiny_base, tiny_cfg, tmp_path):
    cfg = tiny_cfg(rounds_per_stage=[3, 1, 1], num_clients=2, clients_per_round=2, local_steps=4, lr=2e-2)
    report = run(cfg, tmp_path / "r", base=tiny_base, progress=False)
    recs = [r for r in report.records if r.stage >= 0]
    stage0 = [r.train_loss for r in recs if r.stage == 0]
    assert stage0[-1] < stage0[0] - 0.05, stage0
    assert [r.layers for r in recs] == [2, 2, 2, 4, 6]
    assert all(r.bytes_up > 0 and r.bytes_down > 0 for r in recs)
    assert recs[0].bytes_down < recs[-1].bytes_down  # a 2-layer submodel's LoRA is smaller
    assert recs[0].stage_download_bytes > 0
    for name in ("report.json", "curves.png", "groups.png", "config.json", "data/client_000.jsonl", "data/eval.jsonl"):
        assert (tmp_path / "r" / name).exists(), name
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["stages"] == [2, 4, 6] and len(saved["stage_plans"]) == 3
    assert saved == report.report and saved["records"] == [r.to_dict() for r in report.records]
    assert saved["after"] == report.after.to_dict() and not report.interrupted


def test_adapter_reloads_with_peft_and_gives_identical_logits(tiny_base, tiny_cfg, tmp_path):
    cfg = tiny_cfg(strategy="fedit", rounds_per_stage=1, lr=2e-2)
    run(cfg, tmp_path / "r", base=tiny_base, progress=False)
    adapter = tmp_path / "r" / "adapter"
    ckpt_full = load_file(tmp_path / "r" / "checkpoint" / "state.safetensors")
    full = {k.split("/", 1)[1]: v for k, v in ckpt_full.items() if k.startswith("full/")}
    reloaded = PeftModel.from_pretrained(share_model(tiny_base.model), adapter)
    got = read_lora(reloaded)
    assert set(got) == set(full) and all(torch.equal(got[k], full[k]) for k in full)
    again = PeftModel.from_pretrained(share_model(tiny_base.model), adapter)
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, again(input_ids=ids).logits)
        # and the adapter really changes the model
        assert not torch.equal(reloaded(input_ids=ids).logits, tiny_base.model(input_ids=ids).logits)


def test_ffa_lora_never_changes_A(tiny_base, tiny_cfg, tmp_path):
    cfg = tiny_cfg(strategy="ffa-lora", rounds_per_stage=2, lr=2e-2)
    report = run(cfg, tmp_path / "r", base=tiny_base, progress=False)
    final = read_lora(PeftModel.from_pretrained(share_model(tiny_base.model), tmp_path / "r" / "adapter"))
    torch.manual_seed(cfg.seed)
    from server_sdk.method.lora import attach_lora

    initial = read_lora(attach_lora(share_model(tiny_base.model), cfg.lora, seed=cfg.seed))
    for k in final:
        if "lora_A" in k:
            assert torch.equal(final[k], initial[k]), k
        else:
            assert not torch.equal(final[k], initial[k]), k
    fedit = run(tiny_cfg(strategy="fedit", rounds_per_stage=2, lr=2e-2), tmp_path / "f", base=tiny_base,
                progress=False)
    assert report.records[1].bytes_up < 0.75 * fedit.records[1].bytes_up  # only B travels up


def test_resume_after_interruption_gives_the_same_adapter(tiny_base, tiny_cfg, tmp_path):
    cfg = tiny_cfg(rounds_per_stage=[2, 2, 1])
    run(cfg, tmp_path / "full", base=tiny_base, progress=False)
    partial = run(cfg, tmp_path / "cut", base=tiny_base, progress=False, stop_after_rounds=3)
    assert partial.interrupted and not partial.stopped_early and len(partial.records) == 4  # base + 3 rounds
    assert not (tmp_path / "cut" / "adapter").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg, tmp_path / "cut", base=tiny_base, progress=False)
    run(cfg, tmp_path / "cut", base=tiny_base, progress=False, resume=True)
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "full" / "report.json").read_text())["records"]
    rb = json.loads((tmp_path / "cut" / "report.json").read_text())["records"]
    assert [r["eval_loss"] for r in ra] == [r["eval_loss"] for r in rb]


def test_accuracy_at_the_end_only_generates_for_the_base_model_and_the_last_round(tiny_base, tiny_cfg, tmp_path):
    cfg = tiny_cfg(stages=[2, 6], rounds_per_stage=[2, 1], num_clients=2, local_steps=1, accuracy_every="end",
                   gen_max_new_tokens=2)
    report = run(cfg, tmp_path / "r", base=tiny_base, progress=False)
    recs = [r for r in report.records if r.stage >= 0]
    assert report.before.accuracy is not None and report.after.accuracy is not None
    assert [r.accuracy for r in recs[:-1]] == [None, None] and all(r.eval_loss for r in recs)
