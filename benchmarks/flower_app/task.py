"""What the Flower ServerApp and ClientApp share: the run's settings, the FedIT model, LoRA <-> arrays.

The settings come from the JSON file named by $DEVFT_FLOWER_SETTINGS (written by
benchmarks/simulation.py): the devft run directory whose config.json and data/ the app
reads, and where the server writes its per-round log."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import torch

from server_sdk.config import RunConfig
from server_sdk.data import Example, read_jsonl
from server_sdk.engine.model import BaseModel, load_base_model
from server_sdk.method.lora import LoraState, attach_lora, read_lora
from server_sdk.method.submodel import share_model

SETTINGS_ENV = "DEVFT_FLOWER_SETTINGS"


@cache
def settings() -> dict:
    path = os.environ.get(SETTINGS_ENV)
    if not path:
        raise RuntimeError(f"${SETTINGS_ENV} must name the settings JSON (benchmarks/simulation.py writes it)")
    return json.loads(Path(path).read_text())


@cache
def run_config() -> RunConfig:
    return RunConfig.from_file(Path(settings()["run_dir"]) / "config.json")


@cache
def base_model() -> BaseModel:
    """The base model, loaded once per process (each Flower client process loads its own, as Flower apps do)."""
    cfg = run_config()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    return load_base_model(cfg.model)


@cache
def fedit_model():
    """The full model with LoRA on every layer (FedIT), seeded like devft's run start."""
    cfg = run_config()
    return attach_lora(share_model(base_model().model), cfg.lora, seed=cfg.seed)


def initial_lora() -> LoraState:
    """devft's starting adapter: the same seed, the same attach order, so the same tensors."""
    return read_lora(fedit_model())


def shard(client: int) -> list[Example]:
    return read_jsonl(Path(settings()["run_dir"]) / "data" / f"client_{client:03d}.jsonl")


def held_out() -> list[Example]:
    return read_jsonl(Path(settings()["run_dir"]) / "data" / "eval.jsonl")


def from_arrays(arrays: dict) -> LoraState:
    """An ArrayRecord's torch state dict -> float32 LoRA tensors under devft's canonical names."""
    return {k: v.detach().to(torch.float32).contiguous() for k, v in arrays.items()}
