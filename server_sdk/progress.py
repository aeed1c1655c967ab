"""Progress a person can see: every phase that can take more than a few seconds says so.

A run used to sit silent for minutes (base-model evaluation, a stage's export, a round
waiting for devices) and a newcomer took it for a hang. `phase()` shows a status line whose
elapsed time ticks every second; `counting_bar()` is a tqdm bar that ticks the same way, for
work counted in examples. Both write to stderr like the round bar and vanish when done.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

TICK_S = 1.0
PHASE_POSITION = 1  # under the round bar


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


@contextmanager
def phase(desc: str, enabled: bool = True, position: int = PHASE_POSITION) -> Iterator[tqdm | None]:
    """A status line `desc: 0:42` for as long as the block runs (nothing when not enabled)."""
    if not enabled:
        yield None
        return
    with counting_bar(desc, None, enabled=True, position=position, bar_format="{desc}: {elapsed}") as bar:
        yield bar


@contextmanager
def counting_bar(desc: str, total: int | None, *, enabled: bool = True, unit: str = "it",
                 position: int = PHASE_POSITION, bar_format: str | None = None) -> Iterator[tqdm]:
    """A tqdm bar that redraws itself every second (its elapsed time never freezes)."""
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, position=position, disable=not enabled,
               bar_format=bar_format, dynamic_ncols=True)
    ticker = _Ticker(bar).start() if enabled else None
    try:
        yield bar
    finally:
        if ticker is not None:
            ticker.stop()
        bar.close()


def note(line: str) -> None:
    """One line above the bars (stderr), for a phase worth remembering once it is done."""
    tqdm.write(line, file=sys.stderr)


def round_postfix(stage: int, n_stages: int, layers: int, records: list[dict]) -> str:
    """What the round bar says after a round: stage (1-based), then both losses, labelled.

    The devices' training loss is that of the fused stage submodel (a few layers standing in
    for the whole model), so early stages sit far above the full model's held-out loss; shown
    side by side unlabelled, it read like divergence. The eval loss is the full model's."""
    last = records[-1] if records else {}
    parts = [f"stage {stage + 1}/{n_stages} ({layers} layers)"]
    if last.get("train_loss") is not None:
        parts.append(f"submodel train loss {last['train_loss']:.3f}")
    known = [r for r in records if r.get("eval_loss") is not None]
    if known:
        r = known[-1]
        where = "base model" if r["stage"] < 0 else f"round {r['round']}"
        parts.append(f"full-model eval loss {r['eval_loss']:.3f} ({where})")
    return ", ".join(parts)
