"""Federated strategies behind one interface; a new method is a new file."""

from ..config import RunConfig
from .base import Strategy, fedavg
from .devft import DevFT
from .fedit import FedIT
from .ffa_lora import FFALoRA

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (DevFT, FedIT, FFALoRA)}


def make_strategy(cfg: RunConfig) -> Strategy:
    return STRATEGIES[cfg.strategy](cfg)


__all__ = ["Strategy", "DevFT", "FedIT", "FFALoRA", "STRATEGIES", "make_strategy", "fedavg"]
