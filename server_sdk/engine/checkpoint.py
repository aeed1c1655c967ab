"""Atomic round checkpoints: a crash at any point leaves either the previous or the new
checkpoint complete on disk, never a mix, so `--resume` continues exactly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from server_sdk.method.lora import LoraState

NAME = "checkpoint"


def save(run_dir: Path, meta: dict, tensors: dict[str, LoraState]) -> None:
    new, cur, old = run_dir / f"{NAME}.new", run_dir / NAME, run_dir / f"{NAME}.old"
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    flat = {f"{group}/{k}": v.contiguous() for group, state in tensors.items() for k, v in state.items()}
    save_file(flat, new / "state.safetensors")
    (new / "meta.json").write_text(json.dumps(meta, indent=1))
    for f in new.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if old.exists():
        shutil.rmtree(old)
    if cur.exists():
        cur.rename(old)
    new.rename(cur)
    if old.exists():
        shutil.rmtree(old)


def load(run_dir: Path) -> tuple[dict, dict[str, LoraState]] | None:
    """The newest complete checkpoint, or None if the run has none yet."""
    for d in (run_dir / NAME, run_dir / f"{NAME}.old"):
        if (d / "meta.json").exists() and (d / "state.safetensors").exists():
            meta = json.loads((d / "meta.json").read_text())
            tensors: dict[str, LoraState] = {}
            for key, value in load_file(d / "state.safetensors").items():
                group, name = key.split("/", 1)
                tensors.setdefault(group, {})[name] = value
            return meta, tensors
    return None


def save_stage_start(run_dir: Path, stage: int, plan: dict, full_lora: LoraState) -> Path:
    """Keep each stage's plan and starting full LoRA (a few MB), so any stage's submodel can be
    rebuilt and exported later (`devft export --run ... --stage N`)."""
    d = run_dir / "stages"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"stage{stage}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in full_lora.items()}, tmp, metadata={"plan": json.dumps(plan)})
    tmp.replace(path)
    return path


def load_stage_start(run_dir: Path, stage: int) -> tuple[dict, LoraState] | None:
    """(plan, full LoRA at the stage's start), or None if the run did not keep it."""
    from safetensors import safe_open

    path = run_dir / "stages" / f"stage{stage}.safetensors"
    if not path.exists():
        return None
    with safe_open(path, "pt") as f:
        plan = json.loads(f.metadata()["plan"])
    return plan, load_file(path)
