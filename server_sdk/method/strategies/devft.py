"""DEVFT: developmental stages of growing submodels built by deconfliction-guided grouping
and differential fusion, with the trained LoRA folded back into every group member.

The config's `grouping`, `anchor`, `fusion`, `beta` and `transfer` pick the rules from
their registries (grouping.py, fusion.py); `stages` is the schedule (default: doubling).
Issue #12's hypotheses are config values too: `heal` (heal.py: distil each fused submodel
toward the full model before devices train it), `schedule` (schedule.py: `auto` ends a stage
whose gain to the full model stops paying) and the `first-last` grouping with the `last`
anchor, `select` fusion and `anchor` fold-back (`transfer`) (a submodel of the first layers plus the last)."""

from __future__ import annotations

from server_sdk.config import ConfigError
from server_sdk.method.fusion import choose_anchor
from server_sdk.method.grouping import make_groups
from server_sdk.method.heal import heal_prompts, heal_submodel
from server_sdk.method.lora import scaling
from server_sdk.method.schedule import SCHEDULES, paid_for_itself
from server_sdk.method.similarity import layer_similarity
from server_sdk.method.strategies.base import Strategy
from server_sdk.method.submodel import StagePlan, build_submodel, fold_back_lora, identity_plan


def default_schedule(n_layers: int) -> list[int]:
    """4 -> 8 -> 16 -> ... -> n_layers (doubling, capped, always ending at the full model)."""
    stages, s = [], 4
    while s < n_layers:
        stages.append(s)
        s *= 2
    return [*stages, n_layers] if n_layers >= 1 else [n_layers]


class DevFT(Strategy):
    name = "devft"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._layers: list[int] = []  # the schedule, once stage_sizes was asked
        self._notes: dict[int, dict] = {}  # per stage: what healing cost and did
        self._prompts: list[list[int]] | None = None

    def stage_sizes(self, n_layers):
        stages = list(self.cfg.stages) if self.cfg.stages is not None else default_schedule(n_layers)
        if stages[-1] > n_layers:
            raise ConfigError(f"stages={stages}: stage of {stages[-1]} layers is larger than the model's {n_layers} layers")
        if stages[-1] != n_layers:
            raise ConfigError(f"stages={stages}: the last stage must be the full model ({n_layers} layers); "
                              f"append {n_layers}")
        self._layers = stages
        return stages

    def configure_stage(self, stage, model, full_lora, n_sub_layers):
        """Group the current (adapted) full model into n_sub_layers groups, ordered by anchor depth;
        the full model's stage keeps every layer as its own group, in depth order."""
        sim = layer_similarity(model, full_lora, scaling(self.cfg.lora))
        n = len(model.model.layers)
        if n_sub_layers == n:
            return identity_plan(n, stage), sim
        groups = make_groups(self.cfg.grouping, sim, n_sub_layers, seed=self.cfg.seed + 1000 * stage)
        anchors = [choose_anchor(g, sim, self.cfg.anchor) for g in groups]
        order = sorted(range(len(groups)), key=lambda i: anchors[i])
        return StagePlan(stage, n_sub_layers, [groups[i] for i in order], [anchors[i] for i in order]), sim

    def build_submodel(self, model, full_lora, plan):
        sub, sub_lora = build_submodel(model, full_lora, plan, self.cfg.beta, self.cfg.fusion, self.cfg.lora)
        if self.cfg.heal != "none" and plan.n_layers < len(model.model.layers):
            if self.tokenizer is None:
                raise ValueError(f"heal={self.cfg.heal!r} needs the tokenizer: set strategy.tokenizer before "
                                 "building submodels (the round loop does)")
            if self._prompts is None:
                self._prompts = heal_prompts(self.tokenizer, self.cfg)
            self._notes[plan.stage] = heal_submodel(sub, model, full_lora, self._prompts, self.cfg,
                                                    self.tokenizer.pad_token_id)
        return sub, sub_lora

    def speculate_stage(self, stage, model, full_lora, n_sub_layers):
        if self.cfg.heal != "none" and n_sub_layers < len(model.model.layers):
            return None  # healing trains the fused weights: a guess would cost a second distillation
        return super().speculate_stage(stage, model, full_lora, n_sub_layers)

    def stage_notes(self, stage):
        return self._notes.get(stage, {})

    def replan_rounds(self, stage, stage_round, records, rounds):
        rule = SCHEDULES[self.cfg.schedule]
        return rule(stage, stage_round, records, rounds, self._layers, self.cfg.schedule_expected_gain)

    def keeps_stage(self, stage, records):
        return self.cfg.schedule != "auto" or paid_for_itself(records, stage, self._layers,
                                                              self.cfg.schedule_expected_gain)

    def finish_stage(self, full_lora, trained, initial, plan):
        if self.cfg.transfer == "anchor":  # only each group's anchor takes the trained LoRA
            plan = StagePlan(plan.stage, plan.n_layers, [[a] for a in plan.anchors], plan.anchors, plan.full)
            return fold_back_lora(full_lora, trained, initial, plan, "copy")
        return fold_back_lora(full_lora, trained, initial, plan, self.cfg.transfer)
