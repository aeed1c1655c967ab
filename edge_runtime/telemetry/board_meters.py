"""Energy meters that read a board's own counters and sensors: Intel/AMD RAPL (powercap), Jetson INA3221 power
rails (hwmon), Raspberry Pi 5 PMIC (vcgencmd). Filesystem roots and commands are parameters so tests can point a
meter at a fake tree. Part of meters.py, which re-exports them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.telemetry.meter_base import EnergyMeter, MeterUnavailable, SampledPowerMeter
from edge_runtime.telemetry.poller import Poller

log = logging.getLogger("edge_runtime.telemetry.meters")  # the meters' one logger, as before the split


@dataclass(frozen=True)
class RaplDomain:
    path: Path
    name: str
    max_energy_range_uj: int

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text())


def wrapped_delta(previous: int, now: int, max_range: int) -> int:
    """Counter increase from ``previous`` to ``now`` for a counter that wraps at ``max_range``."""
    return now - previous if now >= previous else now + max_range - previous


def find_rapl_packages(
    root: str | os.PathLike[str] = "/sys/class/powercap",
) -> list[RaplDomain]:
    """The package-level RAPL domains under a powercap root.

    Only zones named ``package-*`` count: the sub-zones ``intel-rapl:N:M`` (core, uncore,
    dram) are parts of a package, and ``psys`` covers the whole SoC, so adding either would
    count energy twice. AMD Zen CPUs appear under the same ``intel-rapl`` names.
    """
    root = Path(root)
    if not root.is_dir():
        raise MeterUnavailable(f"{root} does not exist: no powercap (RAPL) driver on this device")
    domains = []
    for zone in sorted(root.glob("intel-rapl:*")):
        try:
            name = (zone / "name").read_text().strip()
            if not name.startswith("package"):
                continue
            max_range = int((zone / "max_energy_range_uj").read_text())
            int((zone / "energy_uj").read_text())
        except PermissionError as err:
            raise MeterUnavailable(
                f"cannot read {zone}: {err}. RAPL energy counters are root-only since Linux 5.10;"
                f" run as root or make {zone / 'energy_uj'} readable"
            ) from err
        except (OSError, ValueError) as err:
            raise MeterUnavailable(f"cannot read RAPL zone {zone}: {err}") from err
        domains.append(RaplDomain(zone, name, max_range))
    if not domains:
        raise MeterUnavailable(f"no RAPL package domains under {root}")
    return domains


class RaplMeter(EnergyMeter):
    """CPU package energy from Intel/AMD RAPL counters through powercap sysfs.

    The counters wrap (at ``max_energy_range_uj``, minutes to an hour at full load), so a
    background thread folds them into a running total every ``poll_interval_s``; a single wrap
    between two polls is undone exactly, two would be lost, hence the short default.
    """

    label = "measured:rapl"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/sys/class/powercap",
        poll_interval_s: float = 10.0,
    ) -> None:
        self.domains = find_rapl_packages(root)
        self.detail = "RAPL package domains: " + ", ".join(d.name for d in self.domains)
        self.poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self._last: list[int] = []
        self._total_uj = 0
        self._poller = Poller("RaplMeter", self._tick, lambda: self.poll_interval_s)

    def poll(self) -> None:
        """Fold the counters' increase since the last poll into the total."""
        with self._lock:
            now = [d.read_uj() for d in self.domains]
            for domain, before, after in zip(self.domains, self._last, now, strict=True):
                self._total_uj += wrapped_delta(before, after, domain.max_energy_range_uj)
            self._last = now

    def _tick(self) -> None:
        try:
            self.poll()
        except OSError:
            log.warning("RAPL poll failed; a counter wrap may be missed", exc_info=True)

    def start(self) -> None:
        with self._lock:
            self._last = [d.read_uj() for d in self.domains]
            self._total_uj = 0
        self._poller.start("rapl poller")

    def stop(self) -> float:
        self._poller.stop()
        self.poll()
        return self._total_uj / 1e6


# --------------------------------------------------------------------------- Jetson INA3221


@dataclass(frozen=True)
class PowerRail:
    """One INA3221 channel: either a voltage/current pair (mV, mA) or a power file (uW)."""

    label: str
    voltage_path: Path | None = None
    current_path: Path | None = None
    power_path: Path | None = None

    def read_watts(self) -> float:
        if self.power_path is not None:
            return int(self.power_path.read_text()) / 1e6
        assert self.voltage_path is not None and self.current_path is not None
        millivolts = int(self.voltage_path.read_text())
        milliamps = int(self.current_path.read_text())
        return millivolts * milliamps / 1e6


# Rails that measure the whole module's input; the other rails are parts of it.
MODULE_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


def _channel(path: Path) -> str:
    match = re.search(r"(\d+)_input$", path.name)
    return match.group(1) if match else ""


def find_ina3221_rails(
    root: str | os.PathLike[str] = "/sys/class/hwmon",
) -> list[PowerRail]:
    """Every rail of every INA3221 hwmon device under ``root`` (hwmon units: mV, mA, uW)."""
    root = Path(root)
    if not root.is_dir():
        raise MeterUnavailable(f"{root} does not exist: no hwmon sensors on this device")
    rails: list[PowerRail] = []
    for hwmon in sorted(root.iterdir()):
        for base in (hwmon, hwmon / "device"):
            name_file = base / "name"
            if not name_file.is_file() or "ina3221" not in name_file.read_text():
                continue
            for current in sorted(base.glob("curr*_input")):
                n = _channel(current)
                voltage = base / f"in{n}_input"
                if voltage.is_file():
                    rails.append(PowerRail(_rail_label(base, n), voltage, current))
            for power in sorted(base.glob("power*_input")):
                n = _channel(power)
                if not (base / f"curr{n}_input").is_file():
                    rails.append(PowerRail(_rail_label(base, n), power_path=power))
            break
    if not rails:
        raise MeterUnavailable(f"no INA3221 power rails under {root}")
    return rails


def _rail_label(base: Path, channel: str) -> str:
    label_file = base / f"in{channel}_label"
    return label_file.read_text().strip() if label_file.is_file() else f"in{channel}"


class JetsonIna3221Meter(SampledPowerMeter):
    """Board power from the Jetson's INA3221 monitors, sampled and integrated.

    By default only the module input rail (VDD_IN on Orin, POM_5V_IN on older Jetsons) is
    counted when present, because the CPU/GPU/SoC rails are already inside it; otherwise all
    rails are summed. ``rails`` picks rails by label.
    """

    label = "measured:jetson-ina3221"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/sys/class/hwmon",
        rails: Sequence[str] | None = None,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval_s, clock)
        found = find_ina3221_rails(root)
        by_label = {rail.label: rail for rail in found}
        if rails is None:
            inputs = [by_label[name] for name in MODULE_INPUT_RAILS if name in by_label]
            self.rails = inputs[:1] or found
        else:
            missing = [name for name in rails if name not in by_label]
            if missing:
                raise MeterUnavailable(f"INA3221 rails {missing} not found; present: {sorted(by_label)}")
            self.rails = [by_label[name] for name in rails]
        self.detail = "INA3221 rails: " + ", ".join(rail.label for rail in self.rails)

    def read_watts(self) -> float:
        return sum(rail.read_watts() for rail in self.rails)


# --------------------------------------------------------------------------- Raspberry Pi 5 PMIC

_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<kind>[AV])\s+\w+\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$")


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Watts per rail from ``vcgencmd pmic_read_adc`` output (rails with both _V and _A lines)."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _PMIC_LINE.match(line)
        if match:
            table = amps if match["kind"] == "A" else volts
            table[match["rail"]] = float(match["value"])
    return {rail: volts[rail] * amps[rail] for rail in amps if rail in volts}


class RaspberryPiPmicMeter(SampledPowerMeter):
    """Raspberry Pi 5 power from its PMIC's ADCs (``vcgencmd pmic_read_adc``), sampled.

    The sum covers the PMIC's output rails (SoC, RAM, I/O), not the 5 V input's conversion
    losses or USB peripherals, so it reads below wall power. Each sample runs vcgencmd, which
    takes tens of milliseconds, hence the 0.5 s default interval.
    """

    label = "measured:rpi5-pmic"

    def __init__(
        self,
        vcgencmd: str = "vcgencmd",
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval_s, clock)
        path = shutil.which(vcgencmd)
        if path is None:
            raise MeterUnavailable(f"{vcgencmd!r} not found on PATH: not a Raspberry Pi OS device")
        self.vcgencmd = path
        try:
            rails = self.read_rails()
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            raise MeterUnavailable(f"{path} pmic_read_adc failed (a Pi 5 is needed): {err}") from err
        self.detail = f"sum of {len(rails)} PMIC rails from vcgencmd pmic_read_adc"

    def read_rails(self) -> dict[str, float]:
        proc = subprocess.run(
            [self.vcgencmd, "pmic_read_adc"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        rails = parse_pmic_adc(proc.stdout)
        if not rails:
            raise ValueError(f"no NAME_V/NAME_A rail pairs in pmic_read_adc output: {proc.stdout!r}")
        return rails

    def read_watts(self) -> float:
        return sum(self.read_rails().values())
