"""The base model's held-out evaluation, computed once per machine.

Every run starts by evaluating the model before fine-tuning, and with exact-match generation
over the whole held-out set that was the longest silent phase of the quickstart (minutes on a
busy machine), for a result that only depends on the base weights, the tokenizer, the
held-out examples and the evaluation settings. So it is cached as JSON under
DEVFT_CACHE/base-eval/<key>.json, the key a sha256 over exactly those inputs (and the library
versions whose arithmetic or scoring could change it).

The run evaluates the full model with its freshly initialised LoRA attached. LoRA's B starts
at zero, so that adapter adds exactly 0.0 and the scores are the base model's; an adapter
whose B is not zero (a resumed or custom init) is evaluated without the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from server_sdk.data import Example
from server_sdk.engine.model import BaseModel, cache_root
from server_sdk.engine.trainer import evaluate
from server_sdk.progress import note

log = logging.getLogger(__name__)

SCHEMA = 2  # bump when evaluate() changes what it computes (2: an example with no answer token in seq_len is left out)


def cache_dir() -> Path:
    return cache_root() / "base-eval"


def lora_is_identity(model: torch.nn.Module) -> bool:
    """True when every LoRA B is zero: the adapter leaves the base model's outputs bit for bit."""
    found = False
    for name, p in model.named_parameters():
        if "lora_B" in name:
            found = True
            if torch.count_nonzero(p.detach()).item():
                return False
    return found or not any("lora_" in n for n, _ in model.named_parameters())


def weights_digest(model: torch.nn.Module, weights_file: Path | None = None) -> str:
    """sha256 over names, dtypes, shapes and bytes of the base weights (LoRA tensors excluded).

    Where `weights_file` holds exactly the model's frozen tensors (the file it was loaded from,
    frozen.holds_exactly), their bytes are read from the file instead of from the tensors: the same
    digest, but the weights stay out of this process's memory (a Ray coordinator never needs them)."""
    from server_sdk.engine.frozen import frozen_state, holds_exactly, tensor_bytes

    stored: dict[int, tuple[str, tuple]] = {}  # data_ptr -> (name in the file, shape); a tied head finds its twin
    if weights_file is not None:
        frozen = frozen_state(model)
        if holds_exactly(weights_file, frozen):
            stored = {t.data_ptr(): (k, tuple(t.shape)) for k, t in frozen.items()}
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        src, shape = stored.get(t.data_ptr(), (None, None))
        if src is not None and shape == tuple(t.shape) and t.is_contiguous():
            for block in tensor_bytes(weights_file, src):
                h.update(block)
            continue
        t = t.detach().contiguous().cpu()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "-"


def eval_key(base: BaseModel, held_out: list[Example], *, seq_len: int, generate: bool, max_new_tokens: int,
             batch_size: int, precision: str = "fp32") -> str:
    """The cache key: everything the base model's held-out scores depend on (fp32 keys predate `precision`
    and leave it out, so their entries stay valid)."""
    parts = {
        "schema": SCHEMA,
        "weights": weights_digest(base.model, base.weights_file),
        "tokenizer": tokenizer_digest(base.tokenizer),
        "examples": hashlib.sha256(json.dumps([vars(ex) for ex in held_out], sort_keys=True,
                                              default=str).encode()).hexdigest(),
        "settings": {"seq_len": seq_len, "generate": generate, "max_new_tokens": max_new_tokens,
                     "batch_size": batch_size, **({"precision": precision} if precision != "fp32" else {})},
        "versions": {p: _version(p) for p in ("torch", "transformers", "peft", "reasoning-gym")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def base_evaluation(eval_model: torch.nn.Module, base: BaseModel, held_out: list[Example], *, seq_len: int,
                    generate: bool, max_new_tokens: int, batch_size: int = 16, progress: bool = False,
                    use_cache: bool = True, evaluator: Callable[..., dict] = evaluate, precision: str = "fp32") -> dict:
    """`evaluate()` of the run's starting model, from the cache when this machine computed it before.

    `evaluator` computes it otherwise, with trainer.evaluate's signature: the round loop passes its
    executor's `evaluate` (the Ray executor evaluates on a worker)."""
    kw = dict(seq_len=seq_len, generate=generate, max_new_tokens=max_new_tokens, batch_size=batch_size,
              precision=precision)
    label = "base model evaluation" if progress else None
    if not use_cache or not lora_is_identity(eval_model):
        return evaluator(eval_model, base.tokenizer, held_out, progress=label, **kw)
    key = eval_key(base, held_out, **kw)
    path = cache_dir() / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        if progress:
            note(f"base model evaluation: cached ({path})")
        return cached["result"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged entry is recomputed, not trusted
        log.warning("ignoring unreadable base-evaluation cache %s: %s", path, exc)
    result = evaluator(eval_model, base.tokenizer, held_out, progress=label, **kw)
    _write_atomic(path, {"model": base.name, "examples": len(held_out), **kw, "result": result})
    return result


def _write_atomic(path: Path, obj: dict) -> None:
    """Runs on the same machine may finish together: each writes its own temp file, then renames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
