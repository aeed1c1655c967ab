"""How alike the decoder layers are: the input of deconfliction-guided grouping (DEVFT §3.2)
and of the medoid anchor rule."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaForCausalLM

from server_sdk.method.lora import LoraState, layer_slice


def layer_similarity(model: LlamaForCausalLM, lora: LoraState | None = None, scaling: float = 1.0) -> np.ndarray:
    """Cosine similarity between decoder layers' effective adapted weights W + scaling * B @ A.

    Accumulated tensor by tensor as a Gram matrix, so the full model is never flattened at once."""
    layers = model.model.layers
    n = len(layers)
    gram = torch.zeros(n, n, dtype=torch.float64)
    names = [name for name, _ in layers[0].named_parameters()]
    for name in names:
        rows = []
        for i, layer in enumerate(layers):
            w = layer.get_parameter(name).detach().to(torch.float64)
            module = name.removesuffix(".weight")
            if lora is not None and name.endswith(".weight"):
                sl = layer_slice(lora, i)
                a, b = sl.get(f"{module}.lora_A"), sl.get(f"{module}.lora_B")
                if a is not None and b is not None:
                    w = w + scaling * (b.to(torch.float64) @ a.to(torch.float64))
            rows.append(w.reshape(-1))
        x = torch.stack(rows)
        gram += x @ x.T
    norms = torch.sqrt(torch.clamp(torch.diag(gram), min=1e-30))
    return (gram / norms[:, None] / norms[None, :]).numpy()
