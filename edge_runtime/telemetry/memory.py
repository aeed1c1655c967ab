"""Peak resident memory of this process over a recorded region.

Two sources, because neither is enough alone: a sampler thread reading RSS at ~20 Hz sees the
region only but can miss a spike shorter than 50 ms, while ``ru_maxrss`` is exact but covers the
process's whole life. If ``ru_maxrss`` rose during the region, the process's peak happened in
it and is exact; otherwise the lifetime peak came earlier and only the samples describe the run.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime.telemetry.poller import Poller

try:
    import psutil
except ImportError:  # e.g. Android builds without psutil: fall back to /proc
    psutil = None

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def current_rss_bytes() -> int:
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ru_maxrss_bytes() -> int | None:
    """Lifetime peak RSS of this process from getrusage, or None where unavailable."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


@dataclass(frozen=True)
class PeakRss:
    peak_bytes: int
    source: str  # "ru_maxrss" or "sampled@<hz>Hz"
    sampled_peak_bytes: int
    ru_maxrss_bytes: int | None
    samples: int


class PeakRssSampler:
    """Background thread tracking the highest RSS seen between ``start()`` and ``stop()``."""

    def __init__(self, hz: float = 20.0, read_rss: Callable[[], int] = current_rss_bytes) -> None:
        if hz <= 0:
            raise ValueError(f"RSS sampling rate must be positive, got {hz!r} Hz")
        self.hz = hz
        self.read_rss = read_rss
        self.peak_bytes = 0
        self.samples = 0
        self._ru_at_start: int | None = None
        self._changed = threading.Condition()
        self._poller = Poller("PeakRssSampler", self._tick, lambda: 1.0 / self.hz)

    def _sample(self) -> None:
        rss = self.read_rss()
        with self._changed:
            self.peak_bytes = max(self.peak_bytes, rss)
            self.samples += 1
            self._changed.notify_all()

    def _tick(self) -> None:
        try:
            self._sample()
        except Exception:  # keep sampling; the report still has start/stop samples
            log.warning("RSS sample failed", exc_info=True)

    def wait_for_samples(self, n: int = 1, timeout_s: float = 10.0) -> bool:
        """Block until the thread has taken ``n`` more samples; False on timeout."""
        with self._changed:
            target = self.samples + n
            return self._changed.wait_for(lambda: self.samples >= target, timeout=timeout_s)

    def start(self) -> None:
        self._ru_at_start = ru_maxrss_bytes()
        self.peak_bytes = 0
        self.samples = 0
        self._sample()
        self._poller.start("rss sampler")

    def stop(self) -> PeakRss:
        self._poller.stop()
        self._sample()
        ru_end = ru_maxrss_bytes()
        sampled = f"sampled@{self.hz:g}Hz"
        rose = ru_end is not None and self._ru_at_start is not None and ru_end > self._ru_at_start
        if rose and ru_end is not None and ru_end >= self.peak_bytes:
            peak, source = ru_end, "ru_maxrss"
        else:
            peak, source = self.peak_bytes, sampled
        return PeakRss(peak, source, self.peak_bytes, ru_end, self.samples)
