"""A line while a long test runs: `bash scripts/test.sh` is never silent for more than HEARTBEAT_S seconds.

The suite's slowest tests (a SmolLM2 export, a fleet on a real broker) run for minutes; `pytest -q`
printed one dot per test and sat silent for up to 861 s on a loaded machine (issue 26). scripts/test.sh
runs pytest with -v (a line per test, with its percentage), and this plugin adds
`... tests/x.py::test_y still running (1:30)` every DEVFT_TEST_HEARTBEAT_S seconds (default 30; 0 turns
it off) while one test runs. tests/conftest.py loads it for every pytest run."""

from __future__ import annotations

import os
import threading
import time

import pytest

HEARTBEAT_ENV = "DEVFT_TEST_HEARTBEAT_S"


def interval_s() -> float:
    try:
        return float(os.environ.get(HEARTBEAT_ENV, "30"))
    except ValueError:
        return 30.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    capture = item.config.pluginmanager.get_plugin("capturemanager")
    interval = interval_s()
    if reporter is None or interval <= 0:
        yield
        return
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(interval):
            s = int(time.monotonic() - start)
            line = f"... {item.nodeid} still running ({s // 60}:{s % 60:02d})"
            if capture is None:
                reporter.write_line(line)
                continue
            with capture.global_and_fixture_disabled():  # as pytest's live logging writes from any thread
                reporter.write_line(line)

    thread = threading.Thread(target=beat, name="test-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(1.0)


# Under pytest-xdist (`-n 2`) tests run in worker processes, which have no terminal: the controller prints
# the heartbeat instead, for every test a worker has been running for longer than the interval.
_running: dict[str, float] = {}  # nodeid -> when a worker started it (controller side)
_lock = threading.Lock()


def pytest_runtest_logstart(nodeid: str, location) -> None:
    with _lock:
        _running[nodeid] = time.monotonic()


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    with _lock:
        _running.pop(nodeid, None)


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    workers = getattr(config.option, "numprocesses", None)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    interval = interval_s()
    if not workers or hasattr(config, "workerinput") or reporter is None or interval <= 0:
        return  # serial runs beat per test (pytest_runtest_protocol); workers have no terminal

    def beat() -> None:
        while True:
            time.sleep(interval)
            now = time.monotonic()
            with _lock:
                long = sorted((now - t, n) for n, t in _running.items() if now - t >= interval)
            for elapsed, nodeid in long:
                s = int(elapsed)
                reporter.write_line(f"... {nodeid} still running ({s // 60}:{s % 60:02d})")

    threading.Thread(target=beat, name="test-heartbeat-controller", daemon=True).start()
