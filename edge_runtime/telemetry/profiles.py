"""Device profiles: how much RAM a training process can use, and how much power a busy CPU draws.

Both tables are planning numbers, not measurements of the device a run is on. They exist so a
server can ask "will this stage fit on a 4 GB Pi?" before sending it, and so a device without
any energy meter can still report an energy figure -- always labelled ``estimated:<model>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

GIB = 1024**3


def by_name(items: Iterable[T]) -> dict[str, T]:
    """A table keyed by each entry's `name`, in the order given."""
    return {item.name: item for item in items}


@dataclass(frozen=True)
class PowerModel:
    """Watts drawn per busy logical CPU, used as ``joules = process CPU seconds x watts``.

    The figure is whole-board (or whole-package, for the laptop) power at all-core load divided
    by the number of logical CPUs, so a process keeping every core busy for T seconds is charged
    the full-load board power for T seconds. Idle power while the process waits is not charged.
    """

    name: str
    watts_per_busy_cpu: float
    source: str


# Sources, so the numbers can be checked and replaced by measured ones:
# - x86-laptop: 15 W, the TDP of Intel Core U-series laptop processors (Intel ARK), over 8
#   logical CPUs (4 cores x 2 threads) -> ~1.9 W. Package power only, no screen or RAM.
# - raspberry-pi-4: ~6.4 W at the wall under an all-core stress test, as reported in public
#   Raspberry Pi 4 Model B reviews (e.g. Tom's Hardware, 2019), over 4 cores -> 1.6 W.
# - raspberry-pi-5: ~8 W at the wall under an all-core stress test, as reported in public
#   Raspberry Pi 5 reviews (e.g. Jeff Geerling, Tom's Hardware, 2023), over 4 cores -> 2.0 W.
# - jetson-orin-nano: the 15 W power mode of the Jetson Orin Nano module (NVIDIA Jetson Orin
#   Nano series datasheet), over its 6 Cortex-A78AE cores -> 2.5 W. A module budget, so it
#   overstates CPU-only work.
# - android-phone: a sustained SoC power envelope of ~5 W for a phone under all-core load
#   (the thermal limit reported in AnandTech SoC reviews), over 8 cores -> ~0.6 W.
# All are rounded approximations from public figures, not measurements made by this project.
POWER_MODELS: dict[str, PowerModel] = by_name(
    (
        PowerModel("x86-laptop", 15.0 / 8, "15 W U-series TDP (Intel ARK) / 8 logical CPUs"),
        PowerModel("raspberry-pi-4", 6.4 / 4, "~6.4 W all-core load (public reviews) / 4 cores"),
        PowerModel("raspberry-pi-5", 8.0 / 4, "~8 W all-core load (public reviews) / 4 cores"),
        PowerModel("jetson-orin-nano", 15.0 / 6, "15 W power mode (NVIDIA datasheet) / 6 cores"),
        PowerModel("android-phone", 5.0 / 8, "~5 W sustained SoC envelope (reviews) / 8 cores"),
    )
)


@dataclass(frozen=True)
class DeviceProfile:
    """RAM a single training process may use on a device class, and its power model.

    ``usable_ram_bytes`` is the kernel's MemTotal on a typical image minus headroom for the OS
    and background services; exceeding it means swapping or the OOM / low-memory killer.
    """

    name: str
    total_ram_bytes: int
    usable_ram_bytes: int
    power_model: str
    note: str


DEVICE_PROFILES: dict[str, DeviceProfile] = by_name(
    (
        DeviceProfile(
            "raspberry-pi-4-4gb",
            4 * GIB,
            int(3.2 * GIB),
            "raspberry-pi-4",
            "MemTotal ~3.7 GiB on Raspberry Pi OS Lite, minus ~0.5 GiB for the OS",
        ),
        DeviceProfile(
            "raspberry-pi-5-8gb",
            8 * GIB,
            int(7.2 * GIB),
            "raspberry-pi-5",
            "MemTotal ~7.9 GiB on Raspberry Pi OS Lite, minus ~0.7 GiB for the OS",
        ),
        DeviceProfile(
            "jetson-orin-nano-8gb",
            8 * GIB,
            int(6.0 * GIB),
            "jetson-orin-nano",
            "8 GB shared by CPU and GPU; MemTotal ~7.4 GiB, headless JetPack uses ~1.4 GiB",
        ),
        DeviceProfile(
            "android-6gb",
            6 * GIB,
            int(3.0 * GIB),
            "android-phone",
            "Android and resident apps hold ~3 GB; beyond that the low-memory killer acts",
        ),
    )
)


def device_profile(name: str) -> DeviceProfile:
    try:
        return DEVICE_PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown device profile {name!r}; known profiles: {sorted(DEVICE_PROFILES)}") from None


def power_model(name: str) -> PowerModel:
    try:
        return POWER_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown power model {name!r}; known models: {sorted(POWER_MODELS)}") from None


def fits(peak_rss_bytes: int, profile: str | DeviceProfile) -> bool:
    """True when a run whose peak resident memory was ``peak_rss_bytes`` fits the device."""
    if isinstance(profile, str):
        profile = device_profile(profile)
    return peak_rss_bytes <= profile.usable_ram_bytes
