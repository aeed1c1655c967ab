"""Helpers for the processes the fleet starts and stops (mosquitto, nginx, the web gateway's relay): a free port,
whether something listens, a child that dies with its parent, stopping a child (its own signal, then SIGKILL), a
service's foreground `run` until SIGTERM or SIGINT, whether a process catches SIGHUP yet.
"""

from __future__ import annotations

import ctypes
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port free on loopback now (for a broker, a gateway or an origin this process starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_stop_signal(running: Callable[[], bool]) -> None:
    """Block while `running()` holds, until SIGTERM or SIGINT (the foreground `run` commands of the origin and the
    web gateway); the previous handlers are restored."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running() and not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    """Send a running child `sig` (its own clean stop) and wait up to timeout_s for it to exit; SIGKILL it after."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_in_foreground(name: str, start: Callable[[], object], stop: Callable[[], object],
                      running: Callable[[], bool], errors: type[Exception], ready: Callable[[], str]) -> int:
    """A service's foreground `run` command (the origin, the web gateway): start it, print `ready()` (how to reach
    it), serve until SIGTERM or SIGINT or until it exits, then stop it; 0, or 2 after `name: error: ...` when it
    could not start (`errors`)."""
    try:
        start()
    except errors as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    print(ready())
    try:
        wait_for_stop_signal(running)
    finally:
        stop()
    return 0


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: the signal handlers of `run` (and `devft run`) still stop mosquitto


_PRCTL = _find_prctl()  # looked up here: the child of a threaded parent should do as little as possible


def set_parent_death_signal() -> None:
    """A subprocess's preexec_fn (mosquitto, nginx, the web gateway's relay): Linux sends the child SIGTERM when
    its parent dies, even by SIGKILL. prctl was looked up at import, so the child does no more than this call."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def catches_sighup(pid: int) -> bool:
    """Whether mosquitto has installed its SIGHUP handler: it listens before it does, and until then a reload's
    SIGHUP would kill it (the default action). Where /proc cannot say, assume so."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    m = re.search(r"^SigCgt:\s*([0-9a-fA-F]+)$", status, re.M)
    return m is None or bool(int(m.group(1), 16) & (1 << (signal.SIGHUP - 1)))

