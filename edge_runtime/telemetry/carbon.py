"""Grid carbon intensity, gCO2e from joules, and rows in codecarbon's ``emissions.csv`` format.

Intensity is configured per device, either as a number (gCO2e/kWh, e.g. from the device's
electricity contract) or as an ISO 3166-1 alpha-3 country code. Country codes are looked up in
codecarbon's own energy-mix table when codecarbon happens to be installed (more countries),
else in the small table shipped in ``edge_runtime/data/carbon_intensity.json``; the source of
the number used is always reported with it.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:
    psutil = None

OWN_TABLE = Path(__file__).resolve().parent.parent / "data" / "carbon_intensity.json"
JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True)
class CarbonIntensity:
    g_per_kwh: float
    source: str
    country_iso_code: str = ""
    country_name: str = ""


def carbon_grams(energy_j: float, g_per_kwh: float) -> float:
    """gCO2e for ``energy_j`` joules drawn from a grid at ``g_per_kwh``."""
    return energy_j / JOULES_PER_KWH * g_per_kwh


@cache
def _load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def codecarbon_table_path() -> Path | None:
    """codecarbon's per-country energy-mix JSON, if codecarbon is installed (not imported)."""
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "private_infra" / "global_energy_mix.json"
        if path.is_file():
            return path
    return None


def _from_codecarbon(iso3: str) -> CarbonIntensity | None:
    path = codecarbon_table_path()
    if path is None:
        return None
    entry = _load_json(path).get(iso3)
    if not entry or "carbon_intensity" not in entry:
        return None
    try:
        version = importlib.metadata.version("codecarbon")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return CarbonIntensity(
        float(entry["carbon_intensity"]),
        f"codecarbon {version} global_energy_mix.json (Our World in Data), {iso3} {entry.get('year', '')}".rstrip(),
        iso3,
        entry.get("country_name", ""),
    )


def _from_own_table(iso3: str, table_path: Path) -> CarbonIntensity:
    table = _load_json(table_path)
    entry = table["countries"].get(iso3)
    if entry is None:
        raise ValueError(
            f"no carbon intensity for country {iso3!r} in {table_path} (and codecarbon is not"
            f" installed or lacks it); configure a number in gCO2e/kWh instead, or one of"
            f" {sorted(table['countries'])}"
        )
    return CarbonIntensity(
        float(entry["g_per_kwh"]),
        f"{table_path.name}: Our World in Data carbon_intensity_elec, {iso3} {entry['year']}",
        iso3,
        entry["name"],
    )


def world_average(table_path: Path = OWN_TABLE) -> CarbonIntensity:
    world = _load_json(table_path)["world_average"]
    return CarbonIntensity(
        float(world["g_per_kwh"]),
        f"default world average: {world['source']}, {world['year']}",
    )


def resolve_carbon_intensity(
    value: float | str | CarbonIntensity | None,
    *,
    table_path: str | os.PathLike[str] = OWN_TABLE,
    use_codecarbon: bool = True,
) -> CarbonIntensity:
    """A number (gCO2e/kWh), an ISO3 country code, or None (world average, labelled so)."""
    table_path = Path(table_path)
    if isinstance(value, CarbonIntensity):
        return value
    if value is None:
        return world_average(table_path)
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"carbon intensity must be >= 0 gCO2e/kWh, got {value!r}")
        return CarbonIntensity(float(value), "configured")
    iso3 = value.strip().upper()
    if len(iso3) != 3 or not iso3.isalpha():
        raise ValueError(
            f"carbon intensity {value!r} is neither a number in gCO2e/kWh nor an ISO 3166-1"
            " alpha-3 country code such as 'FRA'"
        )
    found = _from_codecarbon(iso3) if use_codecarbon else None
    return found or _from_own_table(iso3, table_path)


# --------------------------------------------------------------------------- codecarbon CSV

# The field order of codecarbon 3.3.2's EmissionsData (codecarbon/output_methods/emissions_data.py),
# which its FileOutput writes as the header of emissions.csv.
CODECARBON_COLUMNS = (
    "timestamp",
    "project_name",
    "run_id",
    "experiment_id",
    "duration",
    "emissions",
    "emissions_rate",
    "cpu_power",
    "gpu_power",
    "ram_power",
    "cpu_energy",
    "gpu_energy",
    "ram_energy",
    "energy_consumed",
    "water_consumed",
    "country_name",
    "country_iso_code",
    "region",
    "cloud_provider",
    "cloud_region",
    "os",
    "python_version",
    "codecarbon_version",
    "cpu_count",
    "cpu_model",
    "gpu_count",
    "gpu_model",
    "longitude",
    "latitude",
    "ram_total_size",
    "tracking_mode",
    "cpu_utilization_percent",
    "gpu_utilization_percent",
    "ram_utilization_percent",
    "ram_used_gb",
    "on_cloud",
    "pue",
    "wue",
)


def _component(energy_source: str) -> str:
    """Which codecarbon energy column a meter's joules belong to."""
    if energy_source == "measured:rapl" or energy_source.startswith("estimated:"):
        return "cpu"
    if energy_source == "measured:nvml":
        return "gpu"
    return "total"  # whole-board meters and sums: only energy_consumed


def codecarbon_row(
    report: dict[str, Any],
    *,
    project_name: str = "devft",
    run_id: str = "",
    experiment_id: str = "",
    country_iso_code: str | None = None,
    country_name: str | None = None,
    ram_total_bytes: int | None = None,
) -> dict[str, Any]:
    """One emissions.csv row (codecarbon units: kWh, kg, W, s, GB) from ``TelemetryRecorder.report()``.

    codecarbon has no column for where the energy came from, so ``tracking_mode`` carries our
    label (``measured:rapl``, ``estimated:raspberry-pi-4``...) instead of machine/process, and
    estimates stay recognisable in the CSV.
    """
    duration = float(report["duration_s"])
    energy_kwh = float(report["energy_j"]) / JOULES_PER_KWH
    emissions_kg = float(report["carbon_g"]) / 1000.0
    watts = float(report["energy_j"]) / duration if duration > 0 else 0.0
    component = _component(report["energy_source"])
    cpu_count = os.cpu_count() or 1
    if ram_total_bytes is None and psutil is not None:
        ram_total_bytes = int(psutil.virtual_memory().total)
    ram_gb = ram_total_bytes / 1024**3 if ram_total_bytes else ""
    return {
        "timestamp": datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
        "project_name": project_name,
        "run_id": run_id,
        "experiment_id": experiment_id,
        "duration": duration,
        "emissions": emissions_kg,
        "emissions_rate": emissions_kg / duration if duration > 0 else 0.0,
        "cpu_power": watts if component == "cpu" else 0.0,
        "gpu_power": watts if component == "gpu" else 0.0,
        "ram_power": 0.0,
        "cpu_energy": energy_kwh if component == "cpu" else 0.0,
        "gpu_energy": energy_kwh if component == "gpu" else 0.0,
        "ram_energy": 0.0,
        "energy_consumed": energy_kwh,
        "water_consumed": 0.0,
        "country_name": country_name or report.get("country_name") or "",
        "country_iso_code": country_iso_code or report.get("country_iso_code") or "",
        "region": "",
        "cloud_provider": "",
        "cloud_region": "",
        "os": platform.platform(),
        "python_version": platform.python_version(),
        "codecarbon_version": "",
        "cpu_count": cpu_count,
        "cpu_model": platform.processor() or platform.machine(),
        "gpu_count": 0,
        "gpu_model": "",
        "longitude": "",
        "latitude": "",
        "ram_total_size": ram_gb,
        "tracking_mode": report["energy_source"],
        "cpu_utilization_percent": 100.0 * report["cpu_time_s"] / duration / cpu_count if duration > 0 else 0.0,
        "gpu_utilization_percent": 0.0,
        "ram_utilization_percent": 100.0 * report["peak_rss_bytes"] / ram_total_bytes if ram_total_bytes else 0.0,
        "ram_used_gb": report["peak_rss_bytes"] / 1024**3,
        "on_cloud": "N",
        "pue": 1.0,
        "wue": 0.0,
    }


def append_codecarbon_csv(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append ``row`` to a codecarbon-format CSV, writing the header only when the file is new.

    A file whose header is not codecarbon's is refused rather than overwritten or backed up.
    """
    path = Path(path)
    missing = [c for c in CODECARBON_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"row lacks codecarbon columns {missing}; build it with codecarbon_row()")
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if sorted(header) != sorted(CODECARBON_COLUMNS):
            raise ValueError(
                f"{path} exists but its header is not codecarbon's emissions.csv header"
                f" (got {header}); write to another file"
            )
    else:
        header = list(CODECARBON_COLUMNS)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
