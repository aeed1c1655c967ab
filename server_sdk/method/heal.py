"""Healed submodels (issue #12): before devices train a stage, the server distils the fused
submodel toward the full model and folds the repair into the submodel's frozen weights.

A fused submodel of SmolLM2-135M computes something far from the full model (4 fused layers:
held-out loss 15 against the full model's 4.9), so the devices' LoRA is spent repairing the
fusion and folds nothing useful back. Healing trains the fused layers' own weights (a small,
full-rank update, the fold of a LoRA-and-merge) so that the submodel's output matches the
full model's with its current LoRA; the devices then train a task LoRA on a submodel that
behaves like the full model. The distillation text needs no client data: prompts from the
public reasoning-gym generators at seeds no client shard or held-out set uses, without their
answers (only the full model's outputs are targets).

Rules (`HEALS`, config `heal`): `none` (the paper's method), `hidden` (MSE between the final,
normed hidden states: the LM head is shared, so equal hidden states mean equal logits; cheap),
`logits` (KL from the full model's next-token distribution; costs the 49k-vocabulary head).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from edge_runtime.batching import IGNORE_INDEX, collate
from server_sdk.method.lora import LoraState, attach_lora, write_lora
from server_sdk.method.submodel import share_model

if TYPE_CHECKING:
    from server_sdk.config import RunConfig

HEAL_SEED_BASE = 20_000_003  # generator seeds of heal prompts: disjoint from shards (seed*7919+t) and eval (1e7+)
HealLoss = Callable[[torch.Tensor, torch.Tensor, torch.nn.Module], torch.Tensor]


def _hidden_loss(student: torch.Tensor, teacher: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return torch.nn.functional.mse_loss(student, teacher)


def _logit_loss(student: torch.Tensor, teacher: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        target = torch.log_softmax(head(teacher).float(), dim=-1)
    return torch.nn.functional.kl_div(torch.log_softmax(head(student).float(), dim=-1), target,
                                      log_target=True, reduction="batchmean")


HEALS: dict[str, HealLoss | None] = {"none": None, "hidden": _hidden_loss, "logits": _logit_loss}


def heal_prompts(tokenizer, cfg: RunConfig) -> list[list[int]]:
    """Token ids of `cfg.heal_examples` chat-rendered task prompts (questions only, no answers)
    from generator seeds that neither client shards nor the held-out set use."""
    from server_sdk.data import generate

    tasks = cfg.data.tasks
    per = -(-cfg.heal_examples // len(tasks))
    out: list[list[int]] = []
    for t, task in enumerate(tasks):
        for ex in generate(tokenizer, task, per, seed=HEAL_SEED_BASE + cfg.seed * 31 + t):
            out.append(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"][:cfg.seq_len])
    return out[:cfg.heal_examples]


def _final_hidden(model: LlamaForCausalLM | PeftModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner.model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]


def heal_submodel(sub: PeftModel, full_model: LlamaForCausalLM, full_lora: LoraState, prompts: list[list[int]],
                  cfg: RunConfig, pad_id: int, batch_size: int = 8) -> dict:
    """Train the submodel's decoder-layer weights (not its LoRA) in place toward the full model with
    `full_lora`, on `prompts`; afterwards every weight is frozen again. Returns what it cost and did:
    server CPU and wall seconds, the distillation loss before and after."""
    loss_fn = HEALS[cfg.heal]
    if loss_fn is None:
        return {}
    t0, c0 = time.perf_counter(), time.process_time()
    teacher = attach_lora(share_model(full_model), cfg.lora)
    write_lora(teacher, full_lora)
    teacher.eval()
    batches = []
    with torch.no_grad():
        for b in range(0, len(prompts), batch_size):
            chunk = prompts[b:b + batch_size]
            ids = torch.from_numpy(collate([(p, [IGNORE_INDEX] * len(p)) for p in chunk], pad_id)[0])
            mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor([len(p) for p in chunk])[:, None]).long()
            batches.append((ids, mask, _final_hidden(teacher, ids, mask)))
    del teacher
    inner = sub.get_base_model()
    head = inner.lm_head
    # the submodel's unfused layers share their tensors with the base model (submodel.share_model): give every
    # weight healing trains a private copy first, or the base model itself would be trained in place
    for module in inner.model.layers.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if "lora_" not in name:
                setattr(module, name, torch.nn.Parameter(p.detach().clone()))
    params = []
    for name, p in inner.model.layers.named_parameters():
        on = "lora_" not in name
        p.requires_grad_(on)
        if on:
            params.append(p)
    opt = torch.optim.Adam(params, lr=cfg.heal_lr)
    torch.manual_seed(cfg.seed)
    losses = []
    sub.train()
    for step in range(cfg.heal_steps):
        ids, mask, target = batches[step % len(batches)]
        loss = loss_fn(_final_hidden(sub, ids, mask), target, head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    sub.eval()
    for p in sub.parameters():
        p.requires_grad_(False)
    return {"heal": cfg.heal, "heal_steps": cfg.heal_steps, "heal_loss_first": losses[0], "heal_loss_last": losses[-1],
            "server_cpu_seconds": time.process_time() - c0, "server_seconds": time.perf_counter() - t0}
