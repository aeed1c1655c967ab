"""Pick the best energy meter a device has, or the one a user forces."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from edge_runtime.telemetry.meters import (
    CombinedMeter,
    EnergyMeter,
    EstimatedMeter,
    ExternalCommandMeter,
    JetsonIna3221Meter,
    MeterUnavailable,
    NvmlMeter,
    RaplMeter,
    RaspberryPiPmicMeter,
)
from edge_runtime.telemetry.profiles import power_model as lookup_power_model

log = logging.getLogger(__name__)

METER_NAMES = ("external", "jetson-ina3221", "rpi5-pmic", "rapl", "nvml", "estimate")


def detect_meter(
    preferred: str | None = None,
    external_cmd: str | None = None,
    power_model: str = "x86-laptop",
    *,
    powercap_root: str | os.PathLike[str] = "/sys/class/powercap",
    hwmon_root: str | os.PathLike[str] = "/sys/class/hwmon",
    vcgencmd: str = "vcgencmd",
) -> EnergyMeter:
    """The best available meter, or ``preferred`` (one of ``METER_NAMES``) if it is available.

    Order when not forced: a user's external command (they asked for it), then board-level
    sensors that see the whole device (Jetson INA3221, Pi 5 PMIC), then CPU package (RAPL) and
    GPU (NVML) counters, summed when both exist, and last an estimate from CPU time labelled
    ``estimated:<power_model>``. A forced meter that is unavailable raises rather than silently
    falling back, and so does a broken external command.
    """
    model = lookup_power_model(power_model)
    if preferred is not None and preferred not in METER_NAMES:
        raise ValueError(f"unknown energy meter {preferred!r}; choose one of {METER_NAMES}")

    def external() -> EnergyMeter:
        if not external_cmd:
            raise MeterUnavailable("no external energy command was given (external_cmd)")
        meter = ExternalCommandMeter(external_cmd)
        meter.read_joules()  # fail now, with the command's own error, not at the end of a run
        return meter

    builders: dict[str, Callable[[], EnergyMeter]] = {
        "external": external,
        "jetson-ina3221": lambda: JetsonIna3221Meter(root=hwmon_root),
        "rpi5-pmic": lambda: RaspberryPiPmicMeter(vcgencmd=vcgencmd),
        "rapl": lambda: RaplMeter(root=powercap_root),
        "nvml": NvmlMeter,
        "estimate": lambda: EstimatedMeter(model),
    }

    if preferred is not None:
        try:
            return builders[preferred]()
        except MeterUnavailable as err:
            raise MeterUnavailable(f"energy meter {preferred!r} was requested but is not available: {err}") from err

    if external_cmd:
        return external()

    reasons: list[str] = []
    for name in ("jetson-ina3221", "rpi5-pmic"):
        try:
            return builders[name]()
        except MeterUnavailable as err:
            reasons.append(f"{name}: {err}")

    found: list[EnergyMeter] = []
    for name in ("rapl", "nvml"):
        try:
            found.append(builders[name]())
        except MeterUnavailable as err:
            reasons.append(f"{name}: {err}")
    if len(found) == 1:
        return found[0]
    if found:
        return CombinedMeter(found)

    log.info(
        "no energy meter on this device (%s); estimating from CPU time",
        "; ".join(reasons),
    )
    meter = EstimatedMeter(model)
    meter.detail += "; no meter found: " + "; ".join(reasons)
    return meter
