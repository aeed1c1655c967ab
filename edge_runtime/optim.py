"""The device-side optimisers for the portable format, in numpy.

The portable training graph (export/onnx.py) returns the loss and the LoRA gradients; the
update happens here. AdamW follows `torch.optim.AdamW` step for step (the server's simulated
clients use it with weight_decay=0), so a device and a simulated client given the same
batches end up with the same LoRA to float32 rounding. Torch-free.

State lives as long as the optimiser: a device builds a new one each round (the global LoRA
it starts from is new, and so is the learning rate the coordinator sends), so moments and the
step count reset every round, exactly as the server's trainer does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping

import numpy as np

OPTIMIZERS = ("adamw", "sgd")
ADAMW_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which the server's simulated clients use


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments), float32."""

    def __init__(self, lr: float, betas: tuple[float, float] = ADAMW_BETAS, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), betas, float(eps), float(weight_decay)
        self.step_count = 0
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}

    def step(self, params: MutableMapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """Update every tensor named in `grads` in place."""
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.step_count)
        step_size = np.float32(self.lr / bc1)
        for name, g in grads.items():
            p = params[name]
            if self.weight_decay:
                p *= np.float32(1.0 - self.lr * self.weight_decay)
            m = self._m.setdefault(name, np.zeros_like(p))
            v = self._v.setdefault(name, np.zeros_like(p))
            m += np.float32(1.0 - b1) * (g - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v *= np.float32(b2)
            v += np.float32(1.0 - b2) * g * g
            denom = np.sqrt(v) / np.float32(bc2_sqrt) + np.float32(self.eps)
            p -= step_size * (m / denom)


class SGD:
    """Plain SGD with optional momentum (torch.optim.SGD's update, dampening 0)."""

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        self.lr, self.momentum = float(lr), float(momentum)
        self.step_count = 0
        self._buf: dict[str, np.ndarray] = {}

    def step(self, params: MutableMapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self.step_count += 1
        for name, g in grads.items():
            if self.momentum:
                buf = self._buf.get(name)
                buf = g.copy() if buf is None else buf * np.float32(self.momentum) + g
                self._buf[name] = buf
                g = buf
            params[name] -= np.float32(self.lr) * g


def make_optimizer(name: str, lr: float) -> AdamW | SGD:
    if name == "adamw":
        return AdamW(lr)
    if name == "sgd":
        return SGD(lr)
    raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
