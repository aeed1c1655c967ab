"""Stage schedules decided at runtime (issue #12: the paper's open question of when to grow).

A small submodel's stage is worth a round only if the round lowers the full model's held-out
loss by about as much, per unit of client cost, as a full-model round would. The `auto`
schedule measures that after every evaluated round (the round loop evaluates the full model
with the stage's LoRA folded back) and ends a stage that stops paying:

* relative gain of the last evaluated round(s): g = (loss before - loss now) / loss before;
* the stage's cost relative to a full-model round: layers / n_layers;
* a full-model round is expected to cut the loss by `expected_gain` (a prior, config
  `schedule_expected_gain`), so the stage pays while g >= expected_gain * layers / n_layers.

When the stage stops paying after its first round, the submodels gain the full model nothing and every
remaining round goes to the full model (so DEVFT costs at most one small round more than
FedIT); after later rounds, it grows to the next stage with this stage's unused rounds. The
total round budget never changes. `fixed` keeps the configured rounds (the paper's method).

Under `auto` a small stage that did not pay for itself over its rounds (its whole loss drop below
its cost's share, as above, times its rounds; a stage ended after its first round never did) is
rolled back (Strategy.keeps_stage): the round loop keeps the full model's LoRA from before the
stage and marks the stage's last record `rolled_back`. A fold-back that buys a sliver of loss can
still steer the full model's training off its course (seen on SmolLM2-135M: the full model's
first round ended higher after a kept 0.2-0.5% gain). With the full-model stage drawing
clients and seeds as FedIT does (StagePlan.draw_key), a run whose first small round is rolled
back trains exactly FedIT's rounds, one small round later.
"""

from __future__ import annotations

from collections.abc import Callable

from server_sdk.method.records import RoundRecord
from server_sdk.method.stage_gain import stage_gains

ScheduleRule = Callable[[int, int, list[RoundRecord], list[int], list[int], float], list[int]]


def fixed_rounds(stage: int, stage_round: int, records: list[RoundRecord], rounds: list[int], layers: list[int],
                 expected_gain: float) -> list[int]:
    """The configured schedule, unchanged."""
    return list(rounds)


def last_relative_gain(records: list[RoundRecord]) -> float | None:
    """Relative drop of the full model's eval loss between the last two evaluated records (None
    if fewer than two): positive when the latest round(s) helped."""
    losses = [r.eval_loss for r in records if r.eval_loss is not None]
    if len(losses) < 2 or losses[-2] <= 0:
        return None
    return (losses[-2] - losses[-1]) / losses[-2]


def paid_for_itself(records: list[RoundRecord], stage: int, layers: list[int], expected_gain: float) -> bool:
    """Whether `stage` lowered the full model's eval loss (from stage_gains' loss_start: the base
    model's, or the last kept stage's end) by at least its cost's share of what as many full-model
    rounds are expected to buy: relative drop >= expected_gain * layers / n_layers * its rounds.
    Unknown (nothing evaluated) counts as paid."""
    entry = next((e for e in stage_gains(records) if e["stage"] == stage), None)
    if entry is None or entry["loss_change"] is None or not entry["loss_start"]:
        return True
    drop = -entry["loss_change"] / entry["loss_start"]
    return drop >= expected_gain * layers[stage] / layers[-1] * entry["rounds"]


def auto_rounds(stage: int, stage_round: int, records: list[RoundRecord], rounds: list[int], layers: list[int],
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
    if stage_round == 0:  # no gain at all: stop paying for small submodels
        for j in range(stage + 1, last):
            leftover += new[j]
            new[j] = 0
        new[last] += leftover
    else:
        new[stage + 1] += leftover
    return new


SCHEDULES: dict[str, ScheduleRule] = {"fixed": fixed_rounds, "auto": auto_rounds}
