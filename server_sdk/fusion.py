"""Differential-based layer fusion (DEVFT §3.3) and its ablations.

A group of layers becomes one representative layer: the anchor plus beta times the
sum of every member's difference from it. beta = 0 is the anchor, beta = 1/m the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


def choose_anchor(group: Sequence[int], similarity: np.ndarray, rule: str = "medoid") -> int:
    """The member most similar on average to the others (medoid), or the shallowest (first)."""
    if rule == "first" or len(group) == 1:
        return group[0]
    if rule != "medoid":
        raise ValueError(f"unknown anchor rule {rule!r}; use medoid or first")
    sub = similarity[np.ix_(group, group)]
    mean_sim = (sub.sum(axis=1) - np.diag(sub)) / (len(group) - 1)
    return int(group[int(np.argmax(mean_sim))])  # ties -> shallowest, argmax takes the first


def fuse_group(members: Sequence[Tensors], anchor_pos: int, beta: float, method: str = "differential") -> Tensors:
    """Fuse tensors of the group members (same keys, same shapes) into one set.

    members[anchor_pos] is the anchor. `mean` and `select` are the ablations."""
    if not members:
        raise ValueError("cannot fuse an empty group")
    anchor = members[anchor_pos]
    if method == "select" or len(members) == 1:
        return {k: v.clone() for k, v in anchor.items()}
    if method == "mean":
        return {k: torch.stack([m[k] for m in members]).mean(dim=0) for k in anchor}
    if method != "differential":
        raise ValueError(f"unknown fusion method {method!r}; use differential, mean or select")
    fused = {}
    for k, a in anchor.items():
        diff = torch.zeros_like(a)
        for j, m in enumerate(members):
            if j != anchor_pos:
                diff += m[k] - a
        fused[k] = a + beta * diff
    return fused
