"""Pick the best energy meter a device has, or the one a user forces."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from edge_runtime.telemetry import meters
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
) -> meters.EnergyMeter:
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

    def external() -> meters.EnergyMeter:
        if not external_cmd:
            raise meters.MeterUnavailable("no external energy command was given (external_cmd)")
        meter = meters.ExternalCommandMeter(external_cmd)
        meter.read_joules()  # fail now, with the command's own error, not at the end of a run
        return meter

    builders: dict[str, Callable[[], meters.EnergyMeter]] = {
        "external": external,
        "jetson-ina3221": lambda: meters.JetsonIna3221Meter(root=hwmon_root),
        "rpi5-pmic": lambda: meters.RaspberryPiPmicMeter(vcgencmd=vcgencmd),
        "rapl": lambda: meters.RaplMeter(root=powercap_root),
        "nvml": meters.NvmlMeter,
        "estimate": lambda: meters.EstimatedMeter(model),
    }

    if preferred is not None:
        try:
            return builders[preferred]()
        except meters.MeterUnavailable as err:
            raise meters.MeterUnavailable(f"energy meter {preferred!r} was requested but is not available: {err}") from err

    if external_cmd:
        return external()

    reasons: list[str] = []
    for name in ("jetson-ina3221", "rpi5-pmic"):
        try:
            return builders[name]()
        except meters.MeterUnavailable as err:
            reasons.append(f"{name}: {err}")

    found: list[meters.EnergyMeter] = []
    for name in ("rapl", "nvml"):
        try:
            found.append(builders[name]())
        except meters.MeterUnavailable as err:
            reasons.append(f"{name}: {err}")
    if len(found) == 1:
        return found[0]
    if found:
        return meters.CombinedMeter(found)

    log.info(
        "no energy meter on this device (%s); estimating from CPU time",
        "; ".join(reasons),
    )
    meter = meters.EstimatedMeter(model)
    meter.detail += "; no meter found: " + "; ".join(reasons)
    return meter
