"""What the coordinator tells its operator: fleet_events.jsonl and log lines, bounded per device.

A device can make the coordinator say the same thing over and over (refused updates, statuses for other
devices); `_limited` keeps at most a budget of such lines per key and device (ratelimit.py) and writes a
summary of what it held back, so one device cannot grow the coordinator's disk use at will.

`FleetEvents` holds the methods; their state lives in `FleetExecutor` (coordinator.py), which mixes this
class in.
"""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger(__name__)


class FleetEvents:
    """The coordinator's event log and bounded log lines (mixed into FleetExecutor)."""

    def _retained_cleared(self, **fields) -> None:
        self._event("retained_cleared", **fields)

    def _limited(self, key, warning: str | None, args: tuple, kind: str, **fields) -> None:
        """An event (and a log warning) a device can cause at will: the first few per `key` in full, then a
        `suppressed` summary with the count at most once per period (ratelimit.LogBudget); key None = always."""
        verdict, skipped = ("full", 0) if key is None else self._log_budget.take(key)
        if verdict == "full":
            if warning is not None:
                log.warning(warning, *args)
            self._write_event(kind, fields)
        elif verdict == "summary":
            self._summary(key, skipped)

    def _summary(self, key: tuple, count: int) -> None:
        kind, device, *rest = key
        what = f"{kind} {rest[0]}" if rest else kind
        log.warning("%s: %d more %s since the last line (not logged one by one)", device, count, what)
        self._write_event("suppressed", {"of": kind, "device": device, **({"reason": rest[0]} if rest else {}),
                                         "count": count})

    def _event(self, kind: str, **fields) -> None:
        """One JSON line per coordinator decision in run_dir/fleet_events.jsonl (for people and tests); a
        `duplicate` (a device can resend an update at will) is bounded per device like a refusal."""
        if kind == "duplicate":
            self._limited(("duplicate", fields.get("device")), None, (), kind, **fields)
        else:
            self._write_event(kind, fields)

    def _write_event(self, kind: str, fields: dict) -> None:
        line = json.dumps({"t": round(time.time(), 3), "event": kind, **fields}, default=str)
        with self._events_lock, open(self.events_path, "a") as f:
            f.write(line + "\n")
