"""The one mapping between artifact tensor names and PEFT state_dict keys.

The exporter wraps the PeftModel in a small module whose attribute is called
`model` (see export/ort.py), so every ONNX initializer is the PEFT key with
`model.` in front:

    model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
          \\______________________ PEFT state_dict key ______________________/

Tied embeddings (SmolLM2): PEFT's state_dict lists the one tensor twice, as
`...model.embed_tokens.weight` and `...lm_head.weight`; the ONNX graph has one
initializer, named `lm_head.weight` by the dynamo exporter and `embed_tokens.weight`
by the TorchScript one. Both names are valid PEFT keys, so the mapping stays a
plain prefix; `tied_alias` gives the other name when a caller needs it.

Export and import-back both go through this file; nothing else may build names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

ARTIFACT_PREFIX = "model."  # attribute name of the export wrapper that holds the PeftModel
LORA_MARKER = "lora_"
_TIED = ("model.embed_tokens.weight", "lm_head.weight")


def is_lora(name: str) -> bool:
    """LoRA tensors are the only trainable ones; everything else is frozen base weight."""
    return LORA_MARKER in name


def to_artifact_name(peft_name: str) -> str:
    return ARTIFACT_PREFIX + peft_name


def to_peft_name(artifact_name: str) -> str:
    if not artifact_name.startswith(ARTIFACT_PREFIX):
        raise ValueError(
            f"artifact tensor {artifact_name!r} does not start with {ARTIFACT_PREFIX!r}: "
            "the artifacts were not made by export/ort.py; re-export them with `devft export`"
        )
    return artifact_name[len(ARTIFACT_PREFIX) :]


def tied_alias(peft_name: str) -> str | None:
    """The other PEFT key of a tied input/output embedding, or None."""
    for mine, other in (_TIED, _TIED[::-1]):
        if peft_name.endswith(mine):
            return peft_name[: -len(mine)] + other
    return None


def state_key(state: Mapping[str, Any], artifact_name: str, what: str) -> str:
    """The key in a submodel's `state` of the exported tensor `artifact_name`: its PEFT name, or the tied
    embedding it shares storage with. Raises KeyError naming it as `what` when neither is there."""
    key = to_peft_name(artifact_name)
    if key not in state:
        alias = tied_alias(key)
        if alias is None or alias not in state:
            raise KeyError(f"{what} {artifact_name!r} has no counterpart {key!r} in the submodel; delete the "
                           "export template cache and retry")
        key = alias
    return key


def lora_peft_names(keys: Iterable[str]) -> list[str]:
    """The LoRA keys of a PEFT state_dict, sorted, i.e. the tensors a device trains."""
    return sorted(k for k in keys if is_lora(k))


def load_lora_into_peft(peft_model: Any, lora: Mapping[str, Any]) -> None:
    """Copy LoRA tensors keyed by PEFT name into `peft_model`, refusing partial or foreign sets.

    A silent partial load would leave stale adapters in the model and the next
    stage would start from a mix of rounds, so every LoRA key must be given.
    """
    import torch  # export side only; this module's names are importable without torch

    state = peft_model.state_dict()
    expected = set(lora_peft_names(state))
    unknown = sorted(set(lora) - expected)
    missing = sorted(expected - set(lora))
    if unknown or missing:
        raise ValueError(
            f"LoRA tensors do not match the model: unknown {unknown[:5]}, missing {missing[:5]} "
            f"(model has {len(expected)} LoRA tensors, got {len(lora)}); were they trained on "
            "artifacts of this exact stage submodel and LoRA config?"
        )
    tensors = {}
    for name, value in lora.items():
        t = torch.as_tensor(value).to(state[name].dtype)
        if tuple(t.shape) != tuple(state[name].shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} but the model has {tuple(state[name].shape)}")
        tensors[name] = t
    result = peft_model.load_state_dict(tensors, strict=False)
    not_loaded = [k for k in result.missing_keys if is_lora(k)]
    if result.unexpected_keys or not_loaded:
        raise RuntimeError(
            f"load_state_dict rejected LoRA tensors: unexpected {result.unexpected_keys[:5]}, "
            f"missing LoRA {not_loaded[:5]}"
        )
