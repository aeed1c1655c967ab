"""`devft serve` as a subprocess on a local fleet, SIGKILLed mid-run: the steps that the resume test
(tests/test_fleet.py) and the resume benchmark (benchmarks/resume_time.py) share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from server_sdk.fleet.local_fleet import REPO_ROOT, LocalFleet


def wait_for(pred: Callable[[], Any], timeout_s: float, what: str, error: type[Exception] = AssertionError) -> Any:
    """pred()'s first truthy value, polled every 50 ms; `error` naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise error(f"timed out after {timeout_s}s waiting for {what}")


def serve_command(fleet: LocalFleet, round_timeout_s: int) -> tuple[list[str], dict[str, str]]:
    """`devft serve` on the fleet's broker (the run's options still to add) and its environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    serve = [sys.executable, "-m", "server_sdk.cli.main", "serve", "--broker-url", f"mqtts://localhost:{fleet.port}",
             "--fleet-dir", str(fleet.dir), "--quiet", "--round-timeout", str(round_timeout_s)]
    return serve, env


def serve_until_killed(fleet: LocalFleet, serve: list[str], env: dict[str, str], config: Path, run_dir: Path,
                       log: IO[bytes], wait: Callable[[Callable[[], Any], float, str], Any], *, shards_s: float,
                       until: Callable[[], Any], until_s: float, what: str) -> None:
    """Start `devft serve` on `config` as run `run_dir`, start the fleet's devices on the shards it writes (within
    `shards_s`), and SIGKILL it once `until()` holds (within `until_s`; `what` names it): no clean shutdown, so the
    next round may be half done. `wait(pred, timeout_s, what)` is the caller's wait."""
    first = subprocess.Popen([*serve, "--config", str(config), "--name", run_dir.name, "--runs-dir", str(run_dir.parent)],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        shards = [run_dir / "data" / f"client_{c:03d}.jsonl" for c in range(len(fleet.names))]
        wait(lambda: all(p.exists() for p in shards), shards_s, "the client shards")
        for name, shard in zip(fleet.names, shards):
            fleet.start_device(name, shard, run_dir.name)
        wait(until, until_s, what)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
