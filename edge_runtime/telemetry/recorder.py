"""What one local training run cost a device: memory, time, throughput, energy and carbon.

with TelemetryRecorder(device_profile="raspberry-pi-5-8gb", carbon_intensity="DEU") as rec:
    for batch in batches:
        with rec.step(tokens=batch.num_tokens):
            train_step(batch)
payload = rec.report()   # JSON-serialisable dict, every energy figure labelled
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

import numpy as np

from edge_runtime.telemetry.carbon import (
    CarbonIntensity,
    carbon_grams,
    resolve_carbon_intensity,
)
from edge_runtime.telemetry.detect import detect_meter
from edge_runtime.telemetry.memory import PeakRss, PeakRssSampler
from edge_runtime.telemetry.meters import EnergyMeter, process_cpu_time
from edge_runtime.telemetry.profiles import DeviceProfile, device_profile, fits

PROFILE_ENV = "DEVFT_DEVICE_PROFILE"


def latency_summary(latencies_s: list[float], include_all: bool = False) -> dict[str, Any]:
    """p50/p95/mean of step latencies; percentiles interpolate linearly between ranks (numpy's default)."""
    if not latencies_s:
        summary: dict[str, Any] = {"p50": None, "p95": None, "mean": None}
    else:
        values = np.asarray(latencies_s, dtype=float)
        summary = {
            "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)),
            "mean": float(values.mean()),
        }
    if include_all:
        summary["all"] = list(latencies_s)
    return summary


class TelemetryRecorder:
    """Records a training run entered with ``with``; ``report()`` after the block.

    ``meter`` defaults to ``detect_meter`` with the device profile's power model (or
    ``x86-laptop``). ``clock`` and ``cpu_time`` are injectable so tests control time.
    Without ``device_profile`` the environment variable DEVFT_DEVICE_PROFILE names it: that is
    how a fleet device (``devft-edge run``) declares which board it is, so `devft report` can
    judge its peak memory against that board's usable RAM.
    """

    def __init__(
        self,
        meter: EnergyMeter | None = None,
        carbon_intensity: float | str | CarbonIntensity | None = None,
        device_profile: str | DeviceProfile | None = None,
        *,
        rss_hz: float = 20.0,
        include_all_latencies: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        cpu_time: Callable[[], float] = process_cpu_time,
    ) -> None:
        self.profile = _as_profile(device_profile or os.environ.get(PROFILE_ENV) or None)
        if meter is None:
            meter = detect_meter(power_model=self.profile.power_model if self.profile else "x86-laptop")
        self.meter = meter
        self.carbon_intensity = resolve_carbon_intensity(carbon_intensity)
        self.rss = PeakRssSampler(hz=rss_hz)
        self.include_all_latencies = include_all_latencies
        self.clock = clock
        self.cpu_time = cpu_time
        self.latencies_s: list[float] = []
        self.tokens = 0
        self._started = False
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> Self:
        self.latencies_s = []
        self.tokens = 0
        self._result = None
        self.rss.start()
        try:
            self.meter.start()
        except BaseException:
            self.rss.stop()
            raise
        self._t0 = self.clock()
        self._cpu0 = self.cpu_time()
        self._started = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        duration = self.clock() - self._t0
        cpu = self.cpu_time() - self._cpu0
        try:
            energy_j = self.meter.stop()
        finally:
            peak = self.rss.stop()
            self._started = False
        self._result = self._build(duration, cpu, energy_j, peak)

    @contextmanager
    def step(self, tokens: int = 0) -> Iterator[None]:
        """Time one training step; a step that raises is not counted."""
        if not self._started:
            raise RuntimeError("rec.step() must be used inside `with TelemetryRecorder(...) as rec:`")
        t0 = self.clock()
        yield
        self.latencies_s.append(self.clock() - t0)
        self.tokens += tokens

    def report(self) -> dict[str, Any]:
        if self._result is None:
            raise RuntimeError("report() is available after the `with TelemetryRecorder(...)` block ends")
        return dict(self._result)

    def _build(self, duration: float, cpu: float, energy_j: float, peak: PeakRss) -> dict[str, Any]:
        step_time = sum(self.latencies_s)
        intensity = self.carbon_intensity
        return {
            "steps": len(self.latencies_s),
            "tokens": self.tokens,
            "step_latency_s": latency_summary(self.latencies_s, self.include_all_latencies),
            # throughput while training: tokens over time spent inside steps
            "tokens_per_s": self.tokens / step_time if step_time > 0 else None,
            "duration_s": duration,
            "cpu_time_s": cpu,
            "peak_rss_bytes": peak.peak_bytes,
            "rss_source": peak.source,
            "peak_rss_sampled_bytes": peak.sampled_peak_bytes,
            "ru_maxrss_bytes": peak.ru_maxrss_bytes,
            "energy_j": energy_j,
            "energy_source": self.meter.label,
            "energy_detail": self.meter.detail,
            "carbon_g": carbon_grams(energy_j, intensity.g_per_kwh),
            "carbon_intensity_g_per_kwh": intensity.g_per_kwh,
            "carbon_intensity_source": intensity.source,
            "country_iso_code": intensity.country_iso_code,
            "country_name": intensity.country_name,
            "device_profile": self.profile.name if self.profile else None,
            "usable_ram_bytes": self.profile.usable_ram_bytes if self.profile else None,
            "fits_device_profile": fits(peak.peak_bytes, self.profile) if self.profile else None,
        }


def _as_profile(profile: str | DeviceProfile | None) -> DeviceProfile | None:
    if profile is None or isinstance(profile, DeviceProfile):
        return profile
    return device_profile(profile)
