"""Differential-based layer fusion (DEVFT §3.3), its inverse (the fold-back) and their ablations.

A group of layers becomes one representative layer: the anchor plus beta times the
sum of every member's difference from it. beta = 0 is the anchor, beta = 1/m the mean.
When the stage ends, the fused layer's trained LoRA is folded back into every member.

Each rule family is one registry (name -> function): `ANCHORS`, `FUSIONS`, `FOLD_BACKS`.
The config validates its `anchor`, `fusion` and `transfer` fields against them (`transfer`, the
config key runs have always used, names the fold-back rule), so a new rule is one function added
here plus its test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]
AnchorRule = Callable[[Sequence[int], np.ndarray], int]
FusionRule = Callable[[Sequence[Tensors], int, float], Tensors]
FoldBackRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
T = TypeVar("T")


def pick(registry: Mapping[str, T], family: str, name: str) -> T:
    """registry[name], or a ValueError naming the family, the unknown name and the choices."""
    if name not in registry:
        raise ValueError(f"unknown {family} {name!r}; use one of {list(registry)}")
    return registry[name]


# ---- anchors: which member a group is fused around ---------------------------------------
def medoid_anchor(group: Sequence[int], similarity: np.ndarray) -> int:
    """The member most similar on average to the others (ties -> shallowest)."""
    sub = similarity[np.ix_(group, group)]
    mean_sim = (sub.sum(axis=1) - np.diag(sub)) / (len(group) - 1)
    return int(group[int(np.argmax(mean_sim))])  # argmax takes the first


def first_anchor(group: Sequence[int], similarity: np.ndarray) -> int:
    """Ablation: the shallowest member."""
    return group[0]


def last_anchor(group: Sequence[int], similarity: np.ndarray) -> int:
    """The deepest member (with `first-last` grouping: the model's last layer stands for the tail)."""
    return group[-1]


ANCHORS: dict[str, AnchorRule] = {"medoid": medoid_anchor, "first": first_anchor, "last": last_anchor}


def choose_anchor(group: Sequence[int], similarity: np.ndarray, rule: str = "medoid") -> int:
    if len(group) == 1:
        return group[0]
    return pick(ANCHORS, "anchor rule", rule)(group, similarity)


# ---- fusion: a group's tensors -> one layer's tensors ------------------------------------
def fuse_differential(members: Sequence[Tensors], anchor_pos: int, beta: float) -> Tensors:
    """anchor + beta * sum of every other member's difference from the anchor."""
    anchor = members[anchor_pos]
    fused = {}
    for k, a in anchor.items():
        diff = torch.zeros_like(a)
        for j, m in enumerate(members):
            if j != anchor_pos:
                diff += m[k] - a
        fused[k] = a + beta * diff
    return fused


def fuse_mean(members: Sequence[Tensors], anchor_pos: int, beta: float) -> Tensors:
    """Ablation: the members' mean (beta is not used)."""
    return {k: torch.stack([m[k] for m in members]).mean(dim=0) for k in members[anchor_pos]}


def fuse_select(members: Sequence[Tensors], anchor_pos: int, beta: float) -> Tensors:
    """Ablation: the anchor alone."""
    return {k: v.clone() for k, v in members[anchor_pos].items()}


FUSIONS: dict[str, FusionRule] = {"differential": fuse_differential, "mean": fuse_mean, "select": fuse_select}


def fuse_group(members: Sequence[Tensors], anchor_pos: int, beta: float, method: str = "differential") -> Tensors:
    """Fuse tensors of the group members (same keys, same shapes) into one set; members[anchor_pos]
    is the anchor. A group of one is its member, whatever the rule."""
    if not members:
        raise ValueError("cannot fuse an empty group")
    rule = pick(FUSIONS, "fusion method", method)
    return fuse_select(members, anchor_pos, beta) if len(members) == 1 else rule(members, anchor_pos, beta)


# ---- fold-back: a fused layer's trained LoRA -> each member's LoRA -----------------------
def fold_back_copy(own: torch.Tensor, trained: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """The member takes the trained tensor."""
    return trained.clone()


def fold_back_delta(own: torch.Tensor, trained: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """The member adds what training changed (trained - initial) to its own tensor."""
    return own + (trained - initial)


# "anchor": only each group's anchor takes the trained tensors, the other members keep theirs
# (the strategy narrows the groups to their anchors, then copies: strategies/devft.py)
FOLD_BACKS: dict[str, FoldBackRule] = {"copy": fold_back_copy, "delta": fold_back_delta, "anchor": fold_back_copy}
