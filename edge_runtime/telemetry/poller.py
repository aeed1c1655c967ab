"""A daemon thread that calls a function at a fixed interval between start() and stop().

The RSS sampler and the RAPL meter both poll in the background; this is their one thread."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Poller:
    """Calls `tick` every `interval_s()` seconds on a daemon thread; `tick` handles its own errors.

    `owner` names the object in the error raised when stop() comes before start()."""

    def __init__(self, owner: str, tick: Callable[[], None], interval_s: Callable[[], float]) -> None:
        self.owner, self.tick, self.interval_s = owner, tick, interval_s
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s()):
            self.tick()

    def start(self, name: str) -> None:
        """Start the thread, named `name`."""
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (a tick in progress finishes first)."""
        if self._thread is None:
            raise RuntimeError(f"{self.owner}.stop() called before start()")
        self._stop_event.set()
        self._thread.join()
        self._thread = None
