"""Bounded logging of things a device can make the coordinator say over and over.

A device can send a status, an update or a chunk request as often as it likes; if every refusal
wrote a line to fleet_events.jsonl and the log, one device could grow the coordinator's disk at will
(issue #27, hole 6: 10,000 forged statuses appended 1.6 MB). `LogBudget` writes the first `first`
occurrences of each key (a device and a reason) in full, then only a summary line with how many
were skipped, at most once per period; the period doubles after each summary, from `period_s` up
to `max_period_s`. Counters stay exact: only the lines are bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

FIRST = 5  # occurrences of one (device, reason) written in full
PERIOD_S = 60.0  # then a summary at most this often, the period doubling after each one
MAX_PERIOD_S = 3600.0
DETAIL_CHARS = 300  # device-derived text in a line is cut to this many characters


class LogBudget:
    """Decides, per key, whether an occurrence is written in full, summarised, or only counted."""

    def __init__(self, first: int = FIRST, period_s: float = PERIOD_S, max_period_s: float = MAX_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first, self.period_s, self.max_period_s, self.clock = first, period_s, max_period_s, clock
        self._seen: dict[Hashable, int] = {}  # key -> occurrences so far
        self._skipped: dict[Hashable, int] = {}  # key -> occurrences not written since its last line
        self._next: dict[Hashable, tuple[float, float]] = {}  # key -> (earliest next summary, current period)
        self._lock = threading.Lock()

    def take(self, key: Hashable) -> tuple[str, int]:
        """("full", 0) to write this occurrence; ("summary", n) to write one line for n occurrences (this one
        included) not written so far; ("skip", 0) to only count it."""
        with self._lock:
            seen = self._seen[key] = self._seen.get(key, 0) + 1
            if seen <= self.first:
                return "full", 0
            now = self.clock()
            skipped = self._skipped[key] = self._skipped.get(key, 0) + 1
            due, period = self._next.get(key, (now + self.period_s, self.period_s))
            self._next[key] = (due, period)
            if now < due:
                return "skip", 0
            self._skipped[key] = 0
            period = min(period * 2, self.max_period_s)
            self._next[key] = (now + period, period)
            return "summary", skipped

    def pending(self) -> dict[Hashable, int]:
        """Occurrences not written yet, per key (cleared): for a last summary when the run ends."""
        with self._lock:
            out = {k: n for k, n in self._skipped.items() if n}
            for k in out:
                self._skipped[k] = 0
            return out


def cut(text: str, limit: int = DETAIL_CHARS) -> str:
    """Device-derived text, at most `limit` characters."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"
