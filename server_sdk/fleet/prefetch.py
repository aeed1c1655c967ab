"""Have devices fetch the next stage's files before that stage begins.

A stage's plan is only final when the stage ends (DEVFT groups the full model's layers by
the LoRA trained so far), so the coordinator guesses: during a stage's last round, once
the sampled devices report they started training (their `busy` status; at most 1 s), it
builds the next stage's submodel from the LoRA as it stood when that
round began, exports it, and announces the files as the control message's `prefetch` hint
(docs/protocol.md §3). Devices fetch the hint when they are idle. When the stage really
starts, its plan is made as always; the frozen weight files of a right guess (the same
groups; the full-model stage always) are the same blobs, so devices find them cached. A
wrong guess costs bytes only: devices never train on the hint and verify every file.

`Speculation` runs that guess in a background thread while the round's updates come in, and
on while the coordinator aggregates and evaluates the round if it is slower than the devices
(FleetExecutor._finish_speculation). The guess runs under its own copy of torch's random state,
what runs beside it draws no random numbers, and the next stage is planned only once the guess
is announced, so the run's plans, aggregation and numbers are exactly those of a run without
prefetch. A guess slower than the round and its evaluation delays the stage start by the
difference.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from server_sdk.method.submodel import StagePlan

log = logging.getLogger(__name__)

Speculate = Callable[[], "tuple[StagePlan, Any] | None"]  # -> (plan, submodel), or None: no guess


class Speculation:
    """Build a guessed stage (`speculate()`), then hand it to `announce(plan, submodel)`, in a thread.

    `join()` returns once it is announced, or failed (logged: devices then fetch the stage when it starts)."""

    def __init__(self, stage: int, speculate: Speculate, announce: Callable[[StagePlan, Any], None],
                 wait: Callable[[], object] | None = None) -> None:
        """`wait()`, if given, runs first in the thread (the fleet waits there for the round's devices to start,
        so that the guess's CPU-heavy export does not delay them on a machine they share)."""
        self.stage = stage
        self._speculate = speculate
        self._announce = announce
        self._wait = wait
        self._thread = threading.Thread(target=self._run, name=f"prefetch-stage{stage}", daemon=True)

    def start(self) -> Speculation:
        self._thread.start()
        return self

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            if self._wait is not None:
                self._wait()
            with torch.random.fork_rng(devices=[]):  # the guess leaves the run's random state as it was
                built = self._speculate()
                if built is not None:
                    self._announce(*built)
        except Exception:  # noqa: BLE001 - a failed guess only costs the prefetch
            log.exception("guessing stage %d's files for prefetch failed; devices fetch them when it starts",
                          self.stage)
