"""The energy meters' interface (``EnergyMeter``, ``MeterUnavailable``) and the sampling machinery of meters that
read power rather than energy (``SampledPowerMeter`` over ``PowerIntegrator``). Part of meters.py, which
re-exports it.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from edge_runtime.telemetry.poller import Poller

log = logging.getLogger("edge_runtime.telemetry.meters")  # the meters' one logger, as before the split


class MeterUnavailable(RuntimeError):
    """The meter's hardware, driver or permission is missing on this device."""


class EnergyMeter(ABC):
    """Joules consumed between ``start()`` and ``stop()``, with a label saying where they came from."""

    label: str
    detail: str = ""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> float:
        """Stop measuring and return joules since ``start()``."""

    @property
    def measured(self) -> bool:
        return self.label.startswith("measured:")


# --------------------------------------------------------------------------- sampling


class PowerIntegrator:
    """Trapezoidal integral of (time, watts) samples: joules for meters that only report power."""

    def __init__(self) -> None:
        self.joules = 0.0
        self.samples = 0
        self._first_t: float | None = None
        self._last: tuple[float, float] | None = None

    def add(self, t: float, watts: float) -> None:
        if self._last is None:
            self._first_t = t
        else:
            t0, w0 = self._last
            self.joules += (t - t0) * (w0 + watts) / 2.0
        self._last = (t, watts)
        self.samples += 1

    @property
    def elapsed_s(self) -> float:
        if self._last is None or self._first_t is None:
            return 0.0
        return self._last[0] - self._first_t


class SampledPowerMeter(EnergyMeter):
    """Base for sensors that report instantaneous watts: a thread samples them and integrates.

    One sample is taken synchronously in ``start()`` and one in ``stop()``, so even a run shorter
    than the sampling interval has a two-point integral.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError(f"sampling interval must be positive, got {interval_s!r} s")
        self.interval_s = interval_s
        self.clock = clock
        self.failed_samples = 0
        self._integrator = PowerIntegrator()
        self._poller = Poller(type(self).__name__, self._tick, lambda: self.interval_s)

    @abstractmethod
    def read_watts(self) -> float: ...

    @property
    def elapsed_s(self) -> float:
        """Time covered by the samples, by the meter's clock."""
        return self._integrator.elapsed_s

    def _sample(self) -> None:
        watts = self.read_watts()
        self._integrator.add(self.clock(), watts)

    def _tick(self) -> None:
        try:
            self._sample()
        except Exception:  # a flaky sensor read: log it, integrate across the gap
            self.failed_samples += 1
            log.warning("%s: power sample failed, skipping it", self.label, exc_info=True)

    def start(self) -> None:
        self._integrator = PowerIntegrator()
        self.failed_samples = 0
        self._sample()
        self._poller.start(f"{self.label} sampler")

    def stop(self) -> float:
        self._poller.stop()
        try:
            self._sample()
        except Exception:
            if self._integrator.samples < 2:
                raise  # one sample integrates to 0 J: better no figure than a fake one
            log.warning("%s: final power sample failed", self.label, exc_info=True)
        return self._integrator.joules
