"""Progress written to a file or a pipe (issue 26): plain lines, no redraws, and a heartbeat while work goes on.

On a terminal the bars redraw in place; a quickstart's log file held 1,782 redraws with cursor-up escapes and
a 280 s stretch with nothing new. These run real code in a subprocess whose stderr is a pipe, as `> log 2>&1`
or `| tee` makes it."""

from __future__ import annotations

import os
import subprocess
import sys

from server_sdk.fleet.local_fleet import REPO_ROOT

ESCAPES = ("\r", "\x1b[")
SLOW_PHASE = """
import time
from server_sdk.progress import counting_bar, note, phase
note("a milestone")
with phase("exporting the stage"):
    time.sleep(2.0)
with counting_bar("evaluating", 4, unit="ex") as bar:
    for _ in range(4):
        time.sleep(0.4)
        bar.update(1)
"""


def _run(code: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env_extra}
    for key in ("DEVFT_PROGRESS", "DEVFT_HEARTBEAT_S"):
        if key not in env_extra:
            env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120)
    # bytes decoded without universal newlines, so that a carriage return (a redraw) stays visible
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def test_to_a_pipe_progress_is_plain_lines_with_a_heartbeat():
    done = _run(SLOW_PHASE, DEVFT_HEARTBEAT_S="0.3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [e for e in ESCAPES if e in done.stderr], repr(done.stderr[-500:])
    lines = done.stderr.split("\n")[:-1]
    assert lines[:2] == ["a milestone", "exporting the stage ..."], lines
    assert lines[-1].startswith("evaluating: 4/4 ex in "), lines
    assert any(line.startswith("exporting the stage: done in 0:0") for line in lines), lines
    # nothing new for longer than the interval while the phase ran: the heartbeat said what is running
    beats = [line for line in lines if line.startswith("... still working")]
    assert any("exporting the stage (0:0" in line for line in beats), lines
    assert not [line for line in lines if "%|" in line], lines  # no bar drawn


def test_the_default_heartbeat_is_quiet_for_short_work_and_bars_can_be_forced():
    done = _run(SLOW_PHASE)  # 30 s default: a 3.6 s run has nothing to fill
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [line for line in done.stderr.splitlines() if line.startswith("... still working")]
    bars = _run(SLOW_PHASE, DEVFT_PROGRESS="bars")  # the terminal form, redrawn in place
    assert bars.returncode == 0, bars.stderr[-2000:]
    assert "\r" in bars.stderr and "\x1b[A" in bars.stderr and "exporting the stage: 00:0" in bars.stderr


def test_a_long_test_prints_a_heartbeat_line(tmp_path):
    """bash scripts/test.sh is never silent for long (tests/heartbeat.py): pytest itself, on a slow test."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(1.5)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DEVFT_TEST_HEARTBEAT_S": "0.3"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "tests.heartbeat", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_slow.py")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "test_slow.py::test_slow still running (0:0" in done.stdout, done.stdout[-2000:]
    assert "test_slow PASSED" in done.stdout or "PASSED" in done.stdout


def test_a_long_test_prints_a_heartbeat_line_under_xdist(tmp_path):
    """With `-n 2` the tests run in workers without a terminal: the controller beats for them."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(2.5)\n\n"
                                           "def test_quick():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DEVFT_TEST_HEARTBEAT_S": "0.5"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-v", "-n", "2", "-p", "tests.heartbeat", "-p",
                           "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_slow.py")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "test_slow.py::test_slow still running (0:0" in done.stdout, done.stdout[-2000:]
    assert "test_quick still running" not in done.stdout
