"""Federated strategies behind one interface; a new method is a new file registered here.

`STRATEGIES` is the one list of strategy names: the config's `strategy` field and the
command line take their choices from it."""

from server_sdk.config import RunConfig, check_choice
from server_sdk.method.strategies.base import Strategy
from server_sdk.method.strategies.devft import DevFT
from server_sdk.method.strategies.fedit import FedIT
from server_sdk.method.strategies.ffa_lora import FFALoRA

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (DevFT, FedIT, FFALoRA)}


def make_strategy(cfg: RunConfig) -> Strategy:
    """The strategy the config names; ConfigError (with the choices) for an unknown name."""
    check_choice("strategy", cfg.strategy, STRATEGIES)
    return STRATEGIES[cfg.strategy](cfg)


__all__ = ["Strategy", "DevFT", "FedIT", "FFALoRA", "STRATEGIES", "make_strategy"]
