"""What the coordinator keeps of the telemetry a device sends with its update: checked fields only.

Telemetry travels in an update's JSON header (docs/protocol.md §4, docs/device-client.md §6) and ends
up in report.json, the run's fleet summary and `devft report`. All of it is device-sent, so a device
could put anything there: a list where a process id belongs, a string where a byte count belongs, a
megabyte of text. `clean_telemetry` keeps each known key only with a value of its type and range,
keeps a few unknown scalar keys (a newer or third-party client's extras) up to small bounds, and drops
the rest, saying what it dropped. Everything that reads telemetry later can rely on the types below.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

MAX_TEXT = 200  # characters of a string value
MAX_EXTRA_KEYS = 32  # unknown scalar keys kept per update
MAX_LATENCIES = 10_000  # step_latency_s.all entries kept
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_BIG = 1e15  # bytes, counts and seconds all stay far below this
COUNTS = ("steps", "tokens", "threads", "process", "peak_rss_bytes", "peak_rss_sampled_bytes", "ru_maxrss_bytes",
          "usable_ram_bytes", "download_bytes", "stage_download_bytes", "prefetch_bytes",
          "cache_bytes_downloaded_total", "mqtt_payload_bytes_received")
SECONDS = ("duration_s", "cpu_time_s", "train_s", "setup_s", "fetch_s", "stage_fetch_s", "prefetch_s")
NUMBERS = ("tokens_per_s", "energy_j", "carbon_g", "carbon_intensity_g_per_kwh", "started_unix")
TEXTS = ("rss_source", "energy_source", "energy_detail", "carbon_intensity_source", "country_iso_code", "country_name",
         "device_profile", "backend", "artifact_id", "platform", "runtime")
FLAGS = ("fits_device_profile",)


def number(value: Any, low: float = 0.0, high: float = _BIG) -> float | None:
    """A device-sent number if it is a real, finite number within [low, high), else None (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) and low <= f < high else None


def _count(value: Any) -> int | None:
    f = number(value)
    return int(f) if f is not None and f == int(f) else None


def _latency(value: Any) -> dict[str, Any] | None:
    """step_latency_s: {p50, p95, mean: seconds or null, all: [seconds]}."""
    if not isinstance(value, dict):
        return None
    out: dict[str, Any] = {k: number(value.get(k), 0, 1e7) for k in ("p50", "p95", "mean")}
    raw = value.get("all")
    if isinstance(raw, list):
        out["all"] = [x for x in (number(v, 0, 1e7) for v in raw[:MAX_LATENCIES]) if x is not None]
    return out


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _never(value: Any) -> None:
    """A key the coordinator sets itself: a device's value is dropped."""
    return None


_CHECKS: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(COUNTS, _count),
    **dict.fromkeys(SECONDS, lambda v: number(v, 0, 1e9)),
    **dict.fromkeys(NUMBERS, lambda v: number(v, -_BIG, _BIG)),
    **dict.fromkeys(TEXTS, _text),
    **dict.fromkeys(FLAGS, _flag),
    "step_latency_s": _latency,
    "device": _never,  # the coordinator's to say
    "replaces": _never,
}


def _extra_ok(key: Any, value: Any) -> bool:
    """An unknown key is kept if its name is plain and its value a bool, a number in range or a short string."""
    return (isinstance(key, str) and bool(_KEY.match(key))
            and (isinstance(value, bool) or number(value, -_BIG, _BIG) is not None
                 or (isinstance(value, str) and len(value) <= MAX_TEXT)))


def clean_telemetry(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """(the telemetry the coordinator keeps, the keys it dropped) of one update's device-sent telemetry."""
    if not isinstance(raw, dict):
        return {}, ["<telemetry is not an object>"]
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    extras = 0
    for key, value in raw.items():
        if value is None:
            continue
        check = _CHECKS.get(key)
        if check is not None:
            checked = check(value)
        elif extras < MAX_EXTRA_KEYS and _extra_ok(key, value):
            checked, extras = value, extras + 1
        else:
            checked = None
        if checked is None:
            dropped.append(str(key)[:64])
        else:
            kept[key] = checked
    return kept, dropped
