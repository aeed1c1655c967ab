"""Energy meters: one class per source, all behind the small ``EnergyMeter`` interface.

Every meter carries a ``label`` that a report copies verbatim: ``measured:<source>`` when a
hardware counter or sensor was read, ``estimated:<model>`` when energy was inferred from CPU
time. Nothing here returns a made-up number under a ``measured:`` label; a meter that cannot
read its hardware raises ``MeterUnavailable`` when it is built, so ``detect_meter`` can move on.

Filesystem roots are parameters so tests can point a meter at a fake sysfs tree.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence

from edge_runtime.telemetry.board_meters import (
    MODULE_INPUT_RAILS,
    JetsonIna3221Meter,
    PowerRail,
    RaplDomain,
    RaplMeter,
    RaspberryPiPmicMeter,
    find_ina3221_rails,
    find_rapl_packages,
    parse_pmic_adc,
    wrapped_delta,
)
from edge_runtime.telemetry.meter_base import EnergyMeter, MeterUnavailable, PowerIntegrator, SampledPowerMeter
from edge_runtime.telemetry.profiles import PowerModel, power_model

__all__ = [  # every meter, wherever it lives (meter_base.py: the interface; board_meters.py: board sensors)
    "MODULE_INPUT_RAILS", "CombinedMeter", "EnergyMeter", "EstimatedMeter", "ExternalCommandMeter",
    "JetsonIna3221Meter", "MeterUnavailable", "NvmlMeter", "PowerIntegrator", "PowerRail", "RaplDomain", "RaplMeter",
    "RaspberryPiPmicMeter", "SampledPowerMeter", "find_ina3221_rails", "find_rapl_packages", "parse_pmic_adc",
    "process_cpu_time", "wrapped_delta",
]

# --------------------------------------------------------------------------- NVIDIA NVML


class NvmlMeter(EnergyMeter):
    """GPU energy from NVML's total-energy counter (Volta and newer), summed over GPUs.

    Covers the GPUs only, not the CPU or the rest of the machine.
    """

    label = "measured:nvml"

    def __init__(self, device_indices: Sequence[int] | None = None) -> None:
        try:
            import pynvml  # type: ignore[import-not-found]  # from nvidia-ml-py, optional
        except ImportError as err:
            raise MeterUnavailable("pynvml is not installed (pip install nvidia-ml-py)") from err
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            indices = range(pynvml.nvmlDeviceGetCount()) if device_indices is None else device_indices
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            for handle in self._handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError as err:
            raise MeterUnavailable(f"NVML has no energy counter here: {err}") from err
        if not self._handles:
            raise MeterUnavailable("NVML found no GPUs")
        self.detail = f"NVML total energy counter of {len(self._handles)} GPU(s)"
        self._start_mj: list[int] = []

    def _read_mj(self) -> list[int]:
        return [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]

    def start(self) -> None:
        self._start_mj = self._read_mj()

    def stop(self) -> float:
        end = self._read_mj()
        return sum(after - before for before, after in zip(self._start_mj, end, strict=True)) / 1e3


# --------------------------------------------------------------------------- external command


class ExternalCommandMeter(EnergyMeter):
    """Energy from a user-given shell command that prints cumulative joules (USB meter, plug)."""

    label = "measured:external"

    def __init__(self, command: str, timeout_s: float = 10.0) -> None:
        self.command = command
        self.timeout_s = timeout_s
        self.detail = f"external command: {command}"
        self._start_j: float | None = None

    def read_joules(self) -> float:
        proc = subprocess.run(
            self.command,
            shell=True,
            capture_output=True,
            text=True,
            timeout=self.timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"energy command {self.command!r} exited with {proc.returncode}: {proc.stderr.strip()}")
        try:
            return float(proc.stdout.strip())
        except ValueError:
            raise ValueError(
                f"energy command {self.command!r} must print one number (cumulative joules), it printed {proc.stdout!r}"
            ) from None

    def start(self) -> None:
        self._start_j = self.read_joules()

    def stop(self) -> float:
        if self._start_j is None:
            raise RuntimeError("ExternalCommandMeter.stop() called before start()")
        end = self.read_joules()
        if end < self._start_j:
            raise ValueError(
                f"energy command {self.command!r} went backwards ({self._start_j} J -> {end} J);"
                " was the meter reset during the run?"
            )
        return end - self._start_j


# --------------------------------------------------------------------------- estimate


def process_cpu_time() -> float:
    """User + system CPU seconds of this process (all threads) and its waited-for children."""
    children = os.times()
    return time.process_time() + children.children_user + children.children_system


class EstimatedMeter(EnergyMeter):
    """Energy inferred as process CPU seconds x the power model's watts per busy CPU."""

    def __init__(self, model: str | PowerModel, cpu_time: Callable[[], float] = process_cpu_time) -> None:
        self.model = power_model(model) if isinstance(model, str) else model
        self.label = f"estimated:{self.model.name}"
        self.detail = f"{self.model.watts_per_busy_cpu:.3g} W per busy CPU ({self.model.source})"
        self.cpu_time = cpu_time
        self._start_cpu: float | None = None

    def start(self) -> None:
        self._start_cpu = self.cpu_time()

    def stop(self) -> float:
        if self._start_cpu is None:
            raise RuntimeError("EstimatedMeter.stop() called before start()")
        return (self.cpu_time() - self._start_cpu) * self.model.watts_per_busy_cpu


# --------------------------------------------------------------------------- combined


class CombinedMeter(EnergyMeter):
    """Sum of measured meters over disjoint hardware, e.g. CPU package (RAPL) + GPU (NVML)."""

    def __init__(self, meters: Sequence[EnergyMeter]) -> None:
        estimated = [m.label for m in meters if not m.measured]
        if estimated:
            raise ValueError(f"CombinedMeter only sums measured meters, got {estimated}")
        self.meters = list(meters)
        self.label = "measured:" + "+".join(m.label.removeprefix("measured:") for m in meters)
        self.detail = "; ".join(m.detail for m in meters)

    def start(self) -> None:
        for meter in self.meters:
            meter.start()

    def stop(self) -> float:
        return sum(meter.stop() for meter in self.meters)
