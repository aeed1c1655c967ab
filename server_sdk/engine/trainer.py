"""Local LoRA training as a simulated client runs it, and held-out evaluation.

The device runtime trains the same loss on the same batches from exported artifacts;
here eager torch stands in for a device so one process can simulate a fleet.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from edge_runtime.batching import IGNORE_INDEX, collate
from edge_runtime.optim import OPTIMIZERS
from edge_runtime.sampler import round_draws
from server_sdk.data import Example, encode, score
from server_sdk.engine.precision import compute
from server_sdk.method.lora import read_lora
from server_sdk.method.strategies.base import ClientResult

log = logging.getLogger(__name__)


def token_losses(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each supervised (label != -100) next token, and its example index.

    The LM head runs only on supervised positions: the same loss as HF's shifted loss, but on
    a 49k-token vocabulary it skips most of the head's compute (prompts are masked)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = inner.model(input_ids=ids).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logits = inner.lm_head(hidden[mask]).float()
    return torch.nn.functional.cross_entropy(logits, target[mask], reduction="none"), mask.nonzero()[:, 0]


def trainable_params(model: PeftModel, is_trainable: Callable[[str], bool]) -> list[torch.nn.Parameter]:
    """Set requires_grad on LoRA tensors per the strategy (e.g. FFA-LoRA freezes A)."""
    params = []
    for name, p in model.named_parameters():
        on = "lora_" in name and is_trainable(name)
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


def local_train(model: PeftModel, tokenizer, examples: list[Example], *, steps: int, batch_size: int, lr: float,
                seq_len: int, seed: int, is_trainable: Callable[[str], bool], client: int = 0,
                progress: Callable[[], None] | None = None, precision: str = "fp32",
                optimizer: str = "adamw") -> ClientResult:
    """Train the model's LoRA in place on `steps` drawn batches; return the delta of trained tensors.

    `optimizer` is "adamw" (weight decay 0) or "sgd", as a device builds it (edge_runtime/optim.py).
    A batch with no target token is skipped without an optimiser step, exactly as a device skips
    it (docs/device-client.md section 4), so simulation and fleet take the same steps.
    `precision` is the forward's compute precision (server_sdk.engine.precision); LoRA weights, their gradients
    and the optimizer state are float32 either way."""
    if not examples:
        raise ValueError(f"client {client} has no training examples")
    start_state = read_lora(model)
    torch.manual_seed(seed)
    params = trainable_params(model, is_trainable)
    opt = make_torch_optimizer(optimizer, params, lr)
    encoded = [encode(tokenizer, ex, seq_len) for ex in examples]
    pad = tokenizer.pad_token_id
    model.train()
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    for idx in round_draws(seed, len(encoded), batch_size, steps):  # the devices' sampler, so fleet == simulation
        ids, labels = collate([encoded[i] for i in idx], pad)
        if not (labels[:, 1:] != IGNORE_INDEX).any():
            continue  # nothing to learn from: no step, as on a device
        with compute(model, precision):
            tok_loss, _ = token_losses(model, torch.from_numpy(ids), torch.from_numpy(labels))
        loss = tok_loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            progress()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    end_state = read_lora(model)
    delta = {k: end_state[k] - start_state[k] for k in end_state if is_trainable(k)}
    loss = float(np.mean(losses)) if losses else float("nan")
    return ClientResult(client, len(examples), delta, loss, seconds, cpu_seconds=cpu_seconds)


def make_torch_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The torch twin of edge_runtime.optim.make_optimizer (same names, same update)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")


def evaluate(model, tokenizer, examples: list[Example], *, seq_len: int, generate: bool = True,
             max_new_tokens: int = 24, batch_size: int = 16, progress: str | None = None,
             precision: str = "fp32") -> dict:
    """Held-out loss (mean per-example token loss) and exact-match accuracy (reasoning-gym scorer).

    `progress` names a bar over the examples (generation makes this the slowest phase of a run).
    The same as combine_eval([evaluate_part(...)]) over all the examples; the Ray executor computes
    the parts of eval_chunks on several workers and combines them, with the same numbers."""
    from server_sdk.progress import counting_bar

    with counting_bar(progress or "", len(examples), enabled=progress is not None, unit="ex") as bar:
        part = evaluate_part(model, tokenizer, examples, seq_len=seq_len, generate=generate,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, done=bar.update,
                             precision=precision)
    return combine_eval([part], generate=generate)


@dataclass
class EvalPart:
    """Per-example results of a contiguous run of held-out examples, in example order."""

    tasks: list[str]
    losses: list[float | None]  # mean token loss of each example; None where no answer token fits in seq_len
    correct: list[float] | None  # 1.0 where the greedy answer scores full marks; None without generation


def eval_chunks(n: int, batch_size: int, parts: int) -> list[range]:
    """Split examples 0..n-1 into at most `parts` contiguous ranges of whole evaluation batches (every
    size a multiple of batch_size but the last range's), as even as batches allow. Each example is then
    evaluated in exactly the batch evaluate() puts it in (the same padding, so the same numbers), and
    combine_eval of the ranges' parts, in order, equals evaluating all n examples at once, bit for bit."""
    if batch_size < 1 or parts < 1:
        raise ValueError(f"batch_size={batch_size} and parts={parts} must be at least 1")
    batches = math.ceil(n / batch_size)
    q, r = divmod(batches, parts)
    chunks, start = [], 0
    for i in range(min(parts, batches)):
        stop = min(start + (q + (i < r)) * batch_size, n)
        chunks.append(range(start, stop))
        start = stop
    return chunks


@torch.no_grad()
def evaluate_part(model, tokenizer, examples: list[Example], *, seq_len: int, generate: bool = True,
                  max_new_tokens: int = 24, batch_size: int = 16,
                  done: Callable[[int], object] | None = None, precision: str = "fp32") -> EvalPart:
    """Per-example loss (and correctness) of `examples`, evaluated in batches of batch_size from the first
    (a slice of a held-out set must start at a batch boundary of it for the same numbers: eval_chunks).
    `done(n)` is called after each batch of n examples; `precision`: server_sdk.engine.precision."""
    model.eval()
    pad = tokenizer.pad_token_id
    losses: list[float | None] = []
    correct: list[float] | None = [] if generate else None
    for b in range(0, len(examples), batch_size):
        batch = examples[b:b + batch_size]
        ids, labels = collate([encode(tokenizer, ex, seq_len) for ex in batch], pad)
        with compute(model, precision):
            tok_loss, owner = token_losses(model, torch.from_numpy(ids), torch.from_numpy(labels))
        sums = torch.zeros(len(batch)).index_add_(0, owner, tok_loss)
        counts = torch.zeros(len(batch)).index_add_(0, owner, torch.ones_like(tok_loss))
        # an example whose answer lies wholly past seq_len has no token to score: None, left out by combine_eval
        # (it used to count as loss 0, which pulled the reported eval loss down)
        losses.extend(loss if n > 0 else None for loss, n in zip((sums / counts.clamp(min=1)).tolist(), counts.tolist()))
        if correct is not None:
            with compute(model, precision):
                answers = generate_answers(model, tokenizer, batch, max_new_tokens)
            correct.extend(float(score(ex.task, text, ex) >= 1.0) for ex, text in zip(batch, answers))
        if done:
            done(len(batch))
    return EvalPart([ex.task for ex in examples], losses, correct)


def combine_eval(parts: list[EvalPart], *, generate: bool) -> dict:
    """evaluate()'s result from the parts of consecutive ranges of the held-out set, in order: the loss
    (and accuracy) per task and over all examples, averaged exactly as evaluating them at once does."""
    losses: dict[str, list[float | None]] = defaultdict(list)
    correct: dict[str, list[float]] = defaultdict(list)
    for part in parts:
        if (part.correct is not None) != generate:
            raise ValueError(f"an evaluation part {'without' if generate else 'with'} generation, "
                             f"combined with generate={generate}")
        for i, (task, loss) in enumerate(zip(part.tasks, part.losses, strict=True)):
            losses[task].append(loss)
            if generate:
                correct[task].append(part.correct[i])
    scored = _scored(losses)
    per_task = {t: {**({"eval_loss": float(np.mean(scored[t]))} if scored[t] else {}),
                    **({"accuracy": float(np.mean(correct[t]))} if generate else {})} for t in sorted(losses)}
    per_task = {t: v for t, v in per_task.items() if v}
    all_losses = [x for v in scored.values() for x in v]
    result = {"eval_loss": float(np.mean(all_losses)), "per_task": per_task}
    if generate:
        result["accuracy"] = float(np.mean([x for v in correct.values() for x in v]))
    if not math.isfinite(result["eval_loss"]):
        raise FloatingPointError("evaluation loss is not finite: the adapter diverged; lower lr")
    return result


def _scored(losses: dict[str, list[float | None]]) -> dict[str, list[float]]:
    """Per task, the losses of the examples that had an answer token within seq_len (evaluate_part gives the
    others None; a NaN loss is a diverged adapter and stays, for the caller's check). What is left out is
    logged (a task with none left keeps only its accuracy in per_task); with nothing left at all the run stops
    with the fix (a longer seq_len): a loss of no tokens measures nothing."""
    kept = {t: [x for x in v if x is not None] for t, v in losses.items()}
    left_out = {t: len(v) - len(kept[t]) for t, v in losses.items() if len(v) != len(kept[t])}
    if left_out and not any(kept.values()):
        raise ValueError("no held-out example has an answer token within seq_len: the prompts are longer than "
                         "seq_len; raise seq_len (-o seq_len=...)")
    if left_out:
        log.warning("evaluation left out %s held-out example(s) whose answer lies past seq_len (%s); raise seq_len "
                    "to score them", sum(left_out.values()), ", ".join(f"{t}: {n}" for t, n in sorted(left_out.items())))
    return kept


def generate_answers(model, tokenizer, batch: list[Example], max_new_tokens: int) -> list[str]:
    """Greedy answers, left-padded batch, cut at the end-of-turn token."""
    prompts = [tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] for ex in batch]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    end_ids = [i for i in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} if i is not None]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         use_cache=True, eos_token_id=end_ids, pad_token_id=pad)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.strip() for t in texts]
