"""Progress a person can see: every phase that can take more than a few seconds says so.

A run used to sit silent for minutes (base-model evaluation, a stage's export, a round
waiting for devices) and a newcomer took it for a hang. `phase()` shows a status line whose
elapsed time ticks every second; `counting_bar()` is a bar that ticks the same way, for work
counted in examples; `bar()` is any other bar (the round loop's). All write to stderr.

On a terminal they are tqdm bars that redraw in place and vanish when done. Written to a file
or a pipe, redraws are noise: a quickstart's log held 1,782 redraws with cursor-up escapes and
still had a 280 s stretch with nothing new (issue 26). So where stderr is not a terminal (or
DEVFT_PROGRESS=plain) they print plain lines instead: one when a phase or bar starts, one per
milestone (a round's summary), one when it ends, and, while any of them is running, a
heartbeat line naming what is running whenever HEARTBEAT_S (DEVFT_HEARTBEAT_S, default 30)
seconds passed without a line. DEVFT_PROGRESS=bars forces the terminal form.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from server_sdk.method.records import RoundRecord

TICK_S = 1.0
PHASE_POSITION = 1  # under the round bar
MODE_ENV = "DEVFT_PROGRESS"  # plain | bars; unset: bars on a terminal, plain lines elsewhere
HEARTBEAT_ENV = "DEVFT_HEARTBEAT_S"
HEARTBEAT_S = 30.0


def plain() -> bool:
    """Plain lines instead of redrawn bars: DEVFT_PROGRESS says so, or stderr is not a terminal."""
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode in ("plain", "bars"):
        return mode == "plain"
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return True


def heartbeat_s() -> float:
    try:
        return max(float(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_S)), 0.05)
    except ValueError:
        return HEARTBEAT_S


def clock(seconds: float) -> str:
    """m:ss (h:mm:ss past an hour), as tqdm shows elapsed time."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Lines:
    """Where plain lines go, and the heartbeat that speaks up when none came for a while."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: list[PlainBar] = []
        self.last_line = time.monotonic()
        self.thread: threading.Thread | None = None

    def write(self, line: str) -> None:
        with self.lock:
            self._write(line)

    def _write(self, line: str) -> None:
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):  # a closed pipe: nothing to say it on
            pass
        self.last_line = time.monotonic()

    def start(self, item: PlainBar) -> None:
        with self.lock:
            self.active.append(item)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
                self.thread.start()

    def stop(self, item: PlainBar) -> None:
        with self.lock:
            if item in self.active:
                self.active.remove(item)

    def _beat(self) -> None:
        while True:
            interval = heartbeat_s()
            time.sleep(min(interval / 4, 1.0))
            with self.lock:
                if not self.active:
                    self.thread = None
                    return
                quiet_for = time.monotonic() - self.last_line
                if quiet_for >= interval:
                    shown = [b.status() for b in self.active if b.lines or b.n]
                    self._write(f"... still working ({clock(quiet_for)} since the last line): " + " | ".join(shown))


_LINES = _Lines()


class PlainBar:
    """tqdm's interface as the round loop and the evaluators use it, printed as plain lines.

    A line when it starts, one per set_postfix_str (a milestone: the round loop's round summary),
    one when it closes; `lines=False` (the local-steps bar, updated many times a round) prints none
    and only shows up in heartbeats. update() alone prints nothing: the heartbeat reports counts."""

    def __init__(self, desc: str, total: int | None = None, *, initial: int = 0, unit: str = "it",
                 lines: bool = True) -> None:
        self.desc, self.total, self.n, self.unit, self.lines = desc, total, initial, unit, lines
        self.disable = False
        self.postfix = ""
        self.started = time.monotonic()
        self.closed = False
        if lines:
            _LINES.write(f"{desc}: {self._count()}" if total is not None else f"{desc} ...")
        _LINES.start(self)

    def _count(self) -> str:
        unit = "" if self.unit == "it" else f" {self.unit}"
        return f"{self.n}/{self.total}{unit}" if self.total is not None else f"{self.n}{unit}"

    def status(self) -> str:
        count = f" {self.n}/{self.total}" if self.total is not None else ""
        return f"{self.desc}{count} ({clock(time.monotonic() - self.started)})"

    def update(self, n: int = 1) -> None:
        self.n += n

    def reset(self, total: int | None = None) -> None:
        self.n = 0
        if total is not None:
            self.total = total

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        if self.lines:
            _LINES.write(f"{self.desc} {self.n}/{self.total}: {s}" if self.total is not None else f"{self.desc}: {s}")

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _LINES.stop(self)
        if self.lines:
            took = clock(time.monotonic() - self.started)
            done = f"{self._count()} in {took}" if self.total is not None else f"done in {took}"
            _LINES.write(f"{self.desc}: {done}")

    def __enter__(self) -> PlainBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Ticker:
    """Redraws a bar every TICK_S so its elapsed time moves while one step of work is long."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-ticker", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.bar.refresh()
            except Exception:  # noqa: BLE001 - a closed bar or a gone terminal; nothing to draw on
                return

    def start(self) -> _Ticker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2 * TICK_S)


def bar(desc: str, total: int | None, *, enabled: bool = True, initial: int = 0, unit: str = "it",
        position: int = PHASE_POSITION, leave: bool = False, lines: bool = True) -> Any:
    """A progress bar: tqdm on a terminal, a PlainBar elsewhere, a disabled tqdm when not enabled.

    `lines=False` keeps a bar updated many times (local steps) out of the plain lines except heartbeats."""
    if enabled and plain():
        return PlainBar(desc, total, initial=initial, unit=unit, lines=lines)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, position=position,
                disable=not enabled, dynamic_ncols=True)


@contextmanager
def phase(desc: str, enabled: bool = True, position: int = PHASE_POSITION) -> Iterator[Any]:
    """A status line `desc: 0:42` for as long as the block runs (nothing when not enabled)."""
    if not enabled:
        yield None
        return
    with counting_bar(desc, None, enabled=True, position=position, bar_format="{desc}: {elapsed}") as b:
        yield b


@contextmanager
def counting_bar(desc: str, total: int | None, *, enabled: bool = True, unit: str = "it",
                 position: int = PHASE_POSITION, bar_format: str | None = None) -> Iterator[Any]:
    """A bar that redraws itself every second on a terminal (its elapsed time never freezes); plain
    lines and heartbeats elsewhere."""
    if enabled and plain():
        with PlainBar(desc, total, unit=unit) as b:
            yield b
        return
    b = tqdm(total=total, desc=desc, unit=unit, leave=False, position=position, disable=not enabled,
             bar_format=bar_format, dynamic_ncols=True)
    ticker = _Ticker(b).start() if enabled else None
    try:
        yield b
    finally:
        if ticker is not None:
            ticker.stop()
        b.close()


def note(line: str) -> None:
    """One line above the bars (stderr), for a phase worth remembering once it is done."""
    if plain():
        _LINES.write(line)
    else:
        tqdm.write(line, file=sys.stderr)


def round_postfix(stage: int, n_stages: int, layers: int, records: list[RoundRecord]) -> str:
    """What the round bar says after a round: stage (1-based), then both losses, labelled.

    The devices' training loss is that of the fused stage submodel (a few layers standing in
    for the whole model), so early stages sit far above the full model's held-out loss; shown
    side by side unlabelled, it read like divergence. The eval loss is the full model's."""
    parts = [f"stage {stage + 1}/{n_stages} ({layers} layers)"]
    if records and records[-1].train_loss is not None:
        parts.append(f"submodel train loss {records[-1].train_loss:.3f}")
    known = [r for r in records if r.eval_loss is not None]
    if known:
        r = known[-1]
        where = "base model" if r.stage < 0 else f"round {r.round}"
        parts.append(f"full-model eval loss {r.eval_loss:.3f} ({where})")
    return ", ".join(parts)
