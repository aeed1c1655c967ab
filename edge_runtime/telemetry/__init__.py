"""Device telemetry for local training runs: peak memory, step latency, energy, carbon.

Torch-free on purpose (stdlib, numpy, psutil; pynvml only if present): it runs on the device.
Every energy figure is labelled ``measured:<source>`` or ``estimated:<model>``.
"""

from edge_runtime.telemetry.carbon import (
    CODECARBON_COLUMNS,
    CarbonIntensity,
    append_codecarbon_csv,
    carbon_grams,
    codecarbon_row,
    codecarbon_table_path,
    resolve_carbon_intensity,
)
from edge_runtime.telemetry.detect import METER_NAMES, detect_meter
from edge_runtime.telemetry.memory import PeakRss, PeakRssSampler
from edge_runtime.telemetry.meters import (
    CombinedMeter,
    EnergyMeter,
    EstimatedMeter,
    ExternalCommandMeter,
    JetsonIna3221Meter,
    MeterUnavailable,
    NvmlMeter,
    PowerIntegrator,
    RaplMeter,
    RaspberryPiPmicMeter,
    parse_pmic_adc,
)
from edge_runtime.telemetry.profiles import (
    DEVICE_PROFILES,
    POWER_MODELS,
    DeviceProfile,
    PowerModel,
    fits,
)
from edge_runtime.telemetry.recorder import TelemetryRecorder, latency_summary

__all__ = [
    "CODECARBON_COLUMNS",
    "DEVICE_PROFILES",
    "METER_NAMES",
    "POWER_MODELS",
    "CarbonIntensity",
    "CombinedMeter",
    "DeviceProfile",
    "EnergyMeter",
    "EstimatedMeter",
    "ExternalCommandMeter",
    "JetsonIna3221Meter",
    "MeterUnavailable",
    "NvmlMeter",
    "PeakRss",
    "PeakRssSampler",
    "PowerIntegrator",
    "PowerModel",
    "RaplMeter",
    "RaspberryPiPmicMeter",
    "TelemetryRecorder",
    "append_codecarbon_csv",
    "carbon_grams",
    "codecarbon_row",
    "codecarbon_table_path",
    "detect_meter",
    "fits",
    "latency_summary",
    "parse_pmic_adc",
    "resolve_carbon_intensity",
]
