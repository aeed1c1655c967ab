"""Stage schedules decided at runtime (issue #12: the paper's open question of when to grow).

A small submodel's stage is worth a round only if the round lowers the full model's held-out
loss by about as much, per unit of client cost, as a full-model round would. The `auto`
schedule measures that after every evaluated round (the round loop evaluates the full model
with the stage's LoRA transferred back) and ends a stage that stops paying:

* relative gain of the last evaluated round(s): g = (loss before - loss now) / loss before;
* the stage's cost relative to a full-model round: layers / n_layers;
* a full-model round is expected to cut the loss by `expected_gain` (a prior, config
  `schedule_expected_gain`), so the stage pays while g >= expected_gain * layers / n_layers.

When the stage stops paying after its first round, the submodels transfer nothing and every
remaining round goes to the full model (so DEVFT costs at most one small round more than
FedIT); after later rounds, it grows to the next stage with this stage's unused rounds. The
total round budget never changes. `fixed` keeps the configured rounds (the paper's method).

A stage whose transfer left the full model's held-out loss no lower than at the stage's start is
rolled back under `auto` (Strategy.keeps_stage; the round loop keeps the full model's LoRA from
before the stage and marks the stage's last record `rolled_back`). With the full-model stage
drawing clients and seeds as FedIT does (StagePlan.draw_key), a run whose first small round is
rejected and rolled back then trains exactly FedIT's rounds, one small round later.
"""

from __future__ import annotations

from collections.abc import Callable

from .stage_transfer import stage_transfer

ScheduleRule = Callable[[int, int, list[dict], list[int], list[int], float], list[int]]


def fixed_rounds(stage: int, stage_round: int, records: list[dict], rounds: list[int], layers: list[int],
                 expected_gain: float) -> list[int]:
    """The configured schedule, unchanged."""
    return list(rounds)


def last_relative_gain(records: list[dict]) -> float | None:
    """Relative drop of the full model's eval loss between the last two evaluated records (None
    if fewer than two): positive when the latest round(s) helped."""
    losses = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    if len(losses) < 2 or losses[-2] <= 0:
        return None
    return (losses[-2] - losses[-1]) / losses[-2]


def lowered_full_loss(records: list[dict], stage: int) -> bool:
    """True unless `stage`'s last evaluated full-model loss is at or above the loss before the stage
    (the base model's, or the last kept stage's end: stage_transfer's loss_start); unknown counts as lowered."""
    entry = next((e for e in stage_transfer(records) if e["stage"] == stage), None)
    return entry is None or entry["loss_change"] is None or entry["loss_change"] < 0


def auto_rounds(stage: int, stage_round: int, records: list[dict], rounds: list[int], layers: list[int],
                expected_gain: float) -> list[int]:
    """End stage `stage` now if its last evaluated round bought less than its cost's share of what a
    full-model round is expected to buy; see the module docstring for where its rounds go."""
    last = len(rounds) - 1
    if stage >= last or stage_round >= rounds[stage] - 1:
        return list(rounds)  # the final stage, or the stage ends now anyway
    gain = last_relative_gain(records)
    if gain is None or gain >= expected_gain * layers[stage] / layers[last]:
        return list(rounds)
    new = list(rounds)
    leftover = new[stage] - (stage_round + 1)
    new[stage] = stage_round + 1
    if stage_round == 0:  # no transfer at all: stop paying for small submodels
        for j in range(stage + 1, last):
            leftover += new[j]
            new[j] = 0
        new[last] += leftover
    else:
        new[stage + 1] += leftover
    return new


SCHEDULES: dict[str, ScheduleRule] = {"fixed": fixed_rounds, "auto": auto_rounds}
