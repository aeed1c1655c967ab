"""A device's training data: its JSONL shard of prompt and completion strings, tokenised exactly as the server
does, and the round's batches drawn by edge_runtime.sampler. Part of edge_runtime/client.py, which re-exports it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import protocol as P
from edge_runtime.batching import collate, join
from edge_runtime.device_setup import DeviceError
from edge_runtime.sampler import round_draws


@dataclass
class Shard:
    """The device's training examples: rendered prompt and completion strings."""

    prompts: list[str]
    completions: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def read_shard(path: str | Path) -> Shard:
    prompts, completions = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            prompts.append(str(rec["prompt"]))
            completions.append(str(rec["completion"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DeviceError(f"{path}:{n}: not a devft example record ({exc!r}); it needs prompt and completion") from None
    if not prompts:
        raise DeviceError(f"{path} holds no examples; a device needs a non-empty shard")
    return Shard(prompts, completions)


def encode(tokenizer: Any, shard: Shard, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example, exactly as the server builds them (edge_runtime.batching)."""
    return [join(tokenizer.encode(p, add_special_tokens=False).ids, tokenizer.encode(c, add_special_tokens=False).ids,
                 seq_len) for p, c in zip(shard.prompts, shard.completions)]

def round_batches(encoded: list[tuple[list[int], list[int]]], hp: P.TrainSettings, device_id: str,
                  pad: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """The round's batches as every device draws them: (input_ids, labels, real tokens) per local step.

    edge_runtime.sampler draws `batch_size` distinct examples per step (as the simulation does); a batch
    whose labels are all -100 after the first position is still yielded (the caller skips it, and says so)."""
    for idx in round_draws(hp.seeds[device_id], len(encoded), hp.batch_size, hp.local_steps):
        ids, labels = collate([encoded[i] for i in idx], pad)
        yield ids, labels, int(sum(len(encoded[i][0]) for i in idx))


def pad_id(model_config: dict) -> int:
    """Pads are labelled -100 and come after every real token, so any valid id is exact."""
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = model_config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0
