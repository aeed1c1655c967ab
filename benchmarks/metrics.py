"""Figures computed from a run's per-round records: simulated federated wall time,
time-to-target, bytes-to-target. Pure functions, tested on synthetic records."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Link:
    """A device's network link; defaults are the issue's stated assumption."""

    up_mbit_s: float = 10.0
    down_mbit_s: float = 50.0

    def seconds(self, bytes_down: float, bytes_up: float) -> float:
        return bytes_down * 8 / (self.down_mbit_s * 1e6) + bytes_up * 8 / (self.up_mbit_s * 1e6)


def round_records(records: list[dict]) -> list[dict]:
    """Training rounds only (the report's first record is the base model before training)."""
    return [r for r in records if r["stage"] >= 0]


def client_cpu(records: list[dict]) -> float:
    """Client CPU seconds a run's training rounds spent (report.json's `client_cpu_seconds`)."""
    return sum(c for r in round_records(records) for c in (r.get("client_cpu_seconds") or []) if c is not None)


def simulated_round_seconds(rec: dict, link: Link, compute_key: str = "client_seconds",
                            include_stage_download: bool = True) -> float:
    """Clients train in parallel on real devices: a round lasts as long as its slowest client's
    local training plus the transfer of its payloads; when a stage starts, a device new to the
    stage first downloads the stage submodel (counted for the slowest client, conservatively)."""
    compute = [c for c in (rec.get(compute_key) or rec.get("client_seconds") or []) if c is not None]
    per_down = rec["bytes_down"] / max(len(rec.get("clients") or []), 1)
    per_up = rec["bytes_up"] / max(len(compute), 1)
    new = rec.get("stage_new_devices", 0)
    artifact = rec.get("stage_download_bytes", 0) / new if (include_stage_download and new) else 0.0
    return (max(compute) if compute else 0.0) + link.seconds(per_down + artifact, per_up)


def cumulative(records: list[dict], link: Link, compute_key: str = "client_seconds",
               include_stage_download: bool = True) -> dict[str, np.ndarray]:
    """Per training round: cumulative simulated seconds, client compute seconds, LoRA bytes,
    LoRA + stage-download bytes, and the eval loss (nan where not evaluated)."""
    recs = round_records(records)
    sim = np.cumsum([simulated_round_seconds(r, link, compute_key, include_stage_download) for r in recs])
    comp = np.cumsum([sum(c for c in (r.get(compute_key) or r["client_seconds"]) if c is not None) for r in recs])
    lora = np.cumsum([r["bytes_down"] + r["bytes_up"] for r in recs])
    total = lora + np.cumsum([r.get("stage_download_bytes", 0) for r in recs])
    loss = np.array([np.nan if r.get("eval_loss") is None else r["eval_loss"] for r in recs])
    return {"round": np.array([r["round"] for r in recs]), "sim_seconds": sim, "compute_seconds": comp,
            "lora_bytes": lora, "total_bytes": total, "eval_loss": loss}


def first_reaching(curve: dict[str, np.ndarray], target: float, key: str) -> float:
    """The value of `key` at the first round whose eval loss is <= target; inf if never reached."""
    hit = np.flatnonzero(curve["eval_loss"] <= target + 1e-12)
    return float(curve[key][hit[0]]) if len(hit) else math.inf


def ratio(baseline: float, method: float) -> float:
    """How many times less the method needs than the baseline (inf/nan handled: never reached -> 0)."""
    if math.isinf(method):
        return 0.0
    if method <= 0:
        return math.inf
    return baseline / method


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array(values, dtype=float)
    if len(arr) == 0:
        return math.nan, math.nan
    if np.isinf(arr).any():
        return math.inf, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
