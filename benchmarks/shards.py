"""Client shards and held-out sets that several runs of a benchmark share.

reasoning-gym's generators take minutes on a busy machine, and every run of one data config
and seed gets the same data, so it is generated once under <cache>/data-<hash>/data and copied
into each run directory (early_stages, robust_aggregation)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from server_sdk.config import RunConfig


def shared_data(cfg: RunConfig, base_model, cache: Path) -> Path:
    """The directory whose `data/` holds cfg's client shards and held-out set (made on first use)."""
    from server_sdk.engine.rounds import prepare_data

    ident = {"data": cfg.to_dict()["data"], "num_clients": cfg.num_clients, "seed": cfg.seed, "model": cfg.model}
    shared = cache / f"data-{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]}"
    prepare_data(cfg, base_model, shared)
    return shared
