"""Stage gain: what each stage bought the full model, per client CPU second; the metric that says
whether DEVFT's small early stages pay (issue #12).

A stage of a small submodel is only worth its rounds if the LoRA it trains, folded back into the
full model's layers, lowers the *full* model's held-out loss. The round loop evaluates the full model
with the stage's LoRA folded back at every stage end, so each stage's effect is the eval loss at
its end minus the eval loss at its start (the previous stage's end, or the base model), and
its cost is the client CPU seconds its rounds spent. Dividing gives a rate that a FedIT run
of the same profile also has (its one stage), so the two compare directly. Pure functions
over the run's records (RoundRecord), used by report.json (under the key `stage_transfer`, its name before
"transfer" was split into fold-back, fetch and stage gain; kept for readers of saved reports), the
auto schedule and benchmarks/early_stages.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server_sdk.method.records import RoundRecord

COMPUTE_KEY = "client_cpu_seconds"


def _cost(rec: RoundRecord, compute_key: str) -> float:
    values = getattr(rec, compute_key) or rec.client_seconds or []
    return float(sum(v for v in values if v is not None))


def stage_gains(records: list[RoundRecord], compute_key: str = COMPUTE_KEY) -> list[dict[str, Any]]:
    """One entry per stage present in `records` (the run's rows, base model first).

    Each entry: stage, layers, rounds (training rounds of the stage seen), loss_start (the last
    evaluated loss before the stage's first round), loss_end (the stage's last evaluated loss),
    loss_change (end - start: negative is good), client_cpu_seconds and lora_bytes spent up to
    that last evaluation, and loss_change_per_client_cpu_s. Loss fields are None when the stage
    has no evaluated round yet, or when nothing before it was evaluated. A run stopped mid-stage
    (a screen) reports the part it ran, up to its last evaluation. A stage whose last record says
    `rolled_back` (the auto schedule undid its fold-back) keeps its own numbers, and the next stage
    starts from the loss before it."""
    out: list[dict[str, Any]] = []
    last_loss: float | None = None
    stages: dict[int, list[RoundRecord]] = {}
    order: list[int] = []
    for rec in records:
        if rec.stage < 0:
            if rec.eval_loss is not None:
                last_loss = float(rec.eval_loss)
            continue
        if rec.stage not in stages:
            stages[rec.stage] = []
            order.append(rec.stage)
        stages[rec.stage].append(rec)
    for s in order:
        recs = stages[s]
        evaluated = [i for i, r in enumerate(recs) if r.eval_loss is not None]
        start = last_loss
        entry: dict[str, Any] = {"stage": s, "layers": recs[0].layers, "rounds": len(recs), "loss_start": start,
                                 "loss_end": None, "loss_change": None, "client_cpu_seconds": None,
                                 "lora_bytes": None, "loss_change_per_client_cpu_s": None,
                                 "rolled_back": recs[-1].rolled_back}
        if evaluated:
            upto = recs[:evaluated[-1] + 1]
            end = float(recs[evaluated[-1]].eval_loss)
            cost = sum(_cost(r, compute_key) for r in upto)
            entry.update(loss_end=end, client_cpu_seconds=cost,
                         lora_bytes=int(sum(r.bytes_down + r.bytes_up for r in upto)))
            if start is not None:
                entry["loss_change"] = end - start
                entry["loss_change_per_client_cpu_s"] = (end - start) / cost if cost > 0 else None
            if not entry["rolled_back"]:
                last_loss = end
        out.append(entry)
    return out


def relative_rate(stage_rate: float | None, reference_rate: float | None) -> float | None:
    """A stage's loss change per client CPU second as a multiple of a reference's (FedIT's):
    1.0 = buys as much per CPU second as FedIT, 0 = nothing, negative = made the full model worse.
    None when either is unknown or the reference bought nothing (no scale to compare against)."""
    if stage_rate is None or reference_rate is None or reference_rate >= 0:
        return None
    return stage_rate / reference_rate
