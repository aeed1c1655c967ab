"""Aggregation rules that no single client can dominate, and the bounds the fleet applies before them.

FedAvg weights every delta by the sample count its client reports. Over a real fleet that
count is a claim: one device saying it trained on 10^12 examples would own the round. So the
coordinator bounds each weight by what it knows itself (`cap_samples`: the shard it wrote for
that client), and bounds each delta's norm relative to the fleet (`adaptive_norm_bound`: k times
the lower median norm of the round) instead of by a fixed constant.

The robust rules follow Flower's reference strategies, unweighted as there:

- `FedMedian`: the coordinate-wise median of the deltas;
- `FedTrimmedAvg` (beta = 0.2): per coordinate, drop the `int(beta * n)` smallest and largest
  values and average the rest.

Both run inside `Clipped`, a wrapper around any rule that first clips every delta to
`ROBUST_CLIP_K` times the round's lower median norm, so a device's influence on the coordinates
the median or mean does keep is bounded too.

Each rule is an `Aggregator` over `LoraState` / `ClientResult`; `FedAvg` alone `folds` (FedAvgSum:
its running sum, which a fleet coordinator fills as updates arrive instead of holding them).
`AGGREGATIONS` maps `RunConfig.aggregation`'s names to the rules (`make_aggregator`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from edge_runtime.optim import ADAMW_BETAS

if TYPE_CHECKING:
    from server_sdk.method.lora import LoraState
    from server_sdk.method.strategies.base import ClientResult

TRIM_FRACTION = 0.2  # Flower's FedTrimmedAvg default `beta`
ROBUST_CLIP_K = 3.0  # the robust rules clip deltas to this many lower-median norms
NORM_BOUND_SLACK = 1.01  # adamw_norm_bound's margin for float32 rounding
K = TypeVar("K")


# --------------------------------------------------------------------------- bounds


def update_norm(delta: LoraState) -> float:
    """L2 norm of a whole delta (all tensors as one vector), in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def lower_median(values: Sequence[float]) -> float:
    """The median, taking the lower middle value for an even count.

    With two values it is the smaller one, so one outlier beside one honest value cannot
    lift the bound; in general the bound holds while at most half the values are outliers.
    """
    if not values:
        raise ValueError("lower_median of an empty list")
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def adamw_norm_bound(lr: float, steps: int, numel: int, betas: tuple[float, float] = ADAMW_BETAS) -> float:
    """The largest L2 norm an honest AdamW delta can have: `steps` steps at learning rate `lr` over `numel` coordinates.

    Each AdamW step moves a coordinate by lr * m_hat / (sqrt(v_hat) + eps) (no weight decay: edge_runtime/optim.py).
    Both moments are weighted sums of the same gradients, m_t = sum_i a_i g_i and v_t = sum_i b_i g_i^2 (bias
    corrections folded into a_i and b_i), so by Cauchy-Schwarz |m_hat| <= sqrt(sum_i a_i^2 / b_i) * sqrt(v_hat)
    whatever the gradients are. That factor is 1 at the first step and 1.005 on average over 5 steps (1.06 over 20),
    so a delta's norm is at most lr * sqrt(numel) * (the factors summed over the steps). Measured honest SmolLM2-135M
    deltas (5 steps, lr 1e-3, every stage) sit at 0.48-0.70 of it. Depends on no other device: a device cannot move
    this bound, unlike the round's median. `NORM_BOUND_SLACK` covers float32 rounding."""
    b1, b2 = betas
    total, ratio_sum = 0.0, 0.0
    for t in range(1, steps + 1):
        ratio_sum = ratio_sum * (b1 * b1 / b2) + 1.0  # sum_{j<t} (b1^2 / b2)^j
        total += math.sqrt((1 - b1) ** 2 / (1 - b2) * (1 - b2 ** t) / (1 - b1 ** t) ** 2 * ratio_sum)
    return NORM_BOUND_SLACK * lr * math.sqrt(numel) * total


def adaptive_norm_bound(norms: Sequence[float], k: float) -> float:
    """k times the lower median of the round's update norms: the norm bound that follows the fleet."""
    if k <= 0:
        raise ValueError(f"norm bound factor k={k} must be positive, e.g. 5")
    return k * lower_median(norms)


def norm_outliers(norms: Mapping[K, float], k: float, floor: float = 0.0) -> tuple[list[K], float]:
    """(the keys whose norm is over the bound, the bound): k x the lower median of the non-zero norms, never
    below `floor` (adamw_norm_bound, which no device can move).

    Without the floor one update could pull the median down: with two updates, an all-zero delta made the bound
    0 and the honest update an outlier. Zero norms carry no scale and never count toward the median (a run
    without a floor, SGD, keeps that much)."""
    scaled = [n for n in norms.values() if n > 0]
    bound = max(adaptive_norm_bound(scaled, k) if scaled else 0.0, floor)
    return sorted((key for key, n in norms.items() if n > bound), key=str), bound


def clip_delta(delta: LoraState, bound: float) -> LoraState:
    """The delta scaled down to L2 norm `bound` if it is longer; otherwise unchanged."""
    norm = update_norm(delta)
    if norm <= bound or norm == 0.0:
        return delta
    scale = bound / norm
    return {k: v * scale for k, v in delta.items()}


def cap_samples(claimed: int, cap: int | None) -> int:
    """The weight an update gets: what the device claims, never more than what the coordinator knows."""
    if claimed <= 0:
        raise ValueError(f"num_samples={claimed} must be positive")
    return claimed if cap is None else min(claimed, cap)


# --------------------------------------------------------------------------- rules


class FedAvgSum:
    """FedAvg as updates arrive: sum_k n_k * delta_k and sum_k n_k, kept instead of the deltas.

    The products are exact in float64 (a float32 times an integer below 2^29) and their sum rounds in
    float64's last bits only, so the order updates arrive in does not show once the mean is rounded to
    float32 (it could only at a coordinate within one float64 step of a float32 rounding boundary). A fleet
    round over SmolLM2's full-model adapter holds 19.5 MB here instead of 9.8 MB per accepted update."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weight = 0
        self.count = 0

    def add(self, num_samples: int, delta: LoraState) -> None:
        if num_samples <= 0:
            raise ValueError(f"FedAvg: num_samples={num_samples} must be positive")
        if self.sums and set(delta) != set(self.sums):
            raise ValueError(f"FedAvg: an update sent tensors {sorted(set(delta) ^ set(self.sums))[:3]} that the "
                             "others did not; every client must send the same tensors")
        for key, value in delta.items():
            # in numpy, one thread: torch's threaded elementwise ops cost 7x more on a busy coordinator (45 vs 6 ms
            # per SmolLM2-sized update on 2 shared cores); the same float64 products and sums, bit for bit
            arr = value.detach().cpu()
            arr = (arr if arr.dtype in (torch.float32, torch.float64, torch.float16) else arr.double()).numpy()
            term = np.multiply(arr, num_samples, dtype=np.float64)
            if key in self.sums:
                total = self.sums[key].numpy()
                np.add(total, term, out=total)
            else:
                self.sums[key] = torch.from_numpy(term)
        self.weight += num_samples
        self.count += 1

    def apply(self, global_lora: LoraState) -> LoraState:
        """global + sum_k n_k * delta_k / sum_k n_k; tensors no client sent stay as they were."""
        if self.count == 0:
            raise ValueError("FedAvg needs at least one client result")
        out = {k: v.clone() for k, v in global_lora.items()}
        for key, total in self.sums.items():
            out[key] = out[key] + (total / self.weight).to(out[key].dtype)
        return out


class RoundResults(list):
    """A round's client results (a list of ClientResult), and where the executor summed their deltas as they
    arrived (a fleet under a rule that `folds`, FleetExecutor): `folded`, with each result's delta then empty."""

    folded: FedAvgSum | None = None


class Aggregator(ABC):
    """One aggregation rule: the round's new global LoRA from the client results (Flower's aggregate_fit)."""

    name = ""  # as in the config's `aggregation`, for messages
    folds = False  # whether an executor may sum deltas as they arrive (FedAvgSum) instead of keeping them

    def aggregate(self, global_lora: LoraState, results: list[ClientResult]) -> LoraState:
        """global + the rule's combination of the deltas (or the sum an executor folded them into)."""
        folded = getattr(results, "folded", None)
        if folded is not None:
            if not self.folds:
                raise ValueError(f"aggregation {self.name!r} needs every delta, but the executor summed them "
                                 "for FedAvg")
            return folded.apply(global_lora)
        return self.combine(global_lora, results, _check(results, self.name))

    @abstractmethod
    def combine(self, global_lora: LoraState, results: list[ClientResult], keys: list[str]) -> LoraState:
        """The rule itself, over results that all carry the tensors `keys`."""


class FedAvg(Aggregator):
    """global + sum_k (n_k / N) * delta_k: FedAvgSum over the results in client order."""

    name = "fedavg"
    folds = True

    def combine(self, global_lora, results, keys):
        acc = FedAvgSum()
        for r in results:
            acc.add(r.num_samples, r.delta)
        return acc.apply(global_lora)


class CoordinateRule(Aggregator):
    """A rule over each coordinate's sorted client values, unweighted (Flower's robust strategies)."""

    def combine(self, global_lora, results, keys):
        out = {k: v.clone() for k, v in global_lora.items()}
        for key in keys:
            ordered = torch.stack([r.delta[key].float() for r in results]).sort(dim=0).values
            out[key] = out[key] + self.pick(ordered).to(out[key].dtype)
        return out

    @abstractmethod
    def pick(self, ordered: torch.Tensor) -> torch.Tensor:
        """The delta of each coordinate from its n client values, sorted along dim 0."""


class FedMedian(CoordinateRule):
    """The coordinate-wise median (mean of the two middle values for even n, as np.median)."""

    name = "median"

    def pick(self, ordered):
        n = len(ordered)
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class FedTrimmedAvg(CoordinateRule):
    """Per coordinate, the mean after dropping the int(beta * n) lowest and highest values."""

    name = "trimmed-mean"

    def __init__(self, beta: float = TRIM_FRACTION):
        if not 0 <= beta < 0.5:
            raise ValueError(f"trim fraction beta={beta} must lie in [0, 0.5)")
        self.beta = beta

    def pick(self, ordered):
        n = len(ordered)
        cut = int(self.beta * n)
        return ordered[cut:n - cut].mean(dim=0)


class Clipped(Aggregator):
    """Any rule over the deltas clipped first to k times the round's lower median norm (the shape of Flower's
    differential-privacy clipping wrapper, with the fleet's adaptive bound instead of a fixed one)."""

    def __init__(self, rule: Aggregator, k: float = ROBUST_CLIP_K):
        self.rule, self.k, self.name = rule, k, rule.name

    def combine(self, global_lora, results, keys):
        return self.rule.aggregate(global_lora, clip_results(results, self.k))


def clip_results(results: list[ClientResult], k: float) -> list[ClientResult]:
    """Every delta clipped to k times the lower median norm of the results."""
    bound = adaptive_norm_bound([update_norm(r.delta) for r in results], k)
    return [replace(r, delta=clip_delta(r.delta, bound)) for r in results]


def _check(results: list[ClientResult], rule: str) -> list[str]:
    if not results:
        raise ValueError(f"{rule} needs at least one client result")
    keys = list(results[0].delta)
    for r in results[1:]:
        if set(r.delta) != set(keys):
            raise ValueError(f"{rule}: client {r.client} sent tensors {sorted(set(r.delta) ^ set(keys))[:3]} "
                             f"that client {results[0].client} did not; every client must send the same tensors")
    return keys


AGGREGATIONS: dict[str, Callable[[], Aggregator]] = {  # the one registry of rules: RunConfig.aggregation's choices
    "fedavg": FedAvg,
    "median": lambda: Clipped(FedMedian()),
    "trimmed-mean": lambda: Clipped(FedTrimmedAvg()),
}


def make_aggregator(method: str) -> Aggregator:
    """The rule `method` names (a key of AGGREGATIONS)."""
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation {method!r} is not one of {list(AGGREGATIONS)}")
    return AGGREGATIONS[method]()


def aggregate(method: str, global_lora: LoraState, results: list[ClientResult]) -> LoraState:
    """The new global LoRA under the rule `method` names."""
    return make_aggregator(method).aggregate(global_lora, results)
