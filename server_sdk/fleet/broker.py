"""Run a secured Mosquitto broker for a device fleet.

`fleet_init` creates everything the broker needs in one directory: a private
CA, a server certificate, a password file, an ACL and the persistence store.
`add_device` registers a device and returns what it needs to connect.
`start_broker` runs mosquitto on that directory and waits until it listens.

The ACL is the security boundary: a device may publish only on its own
update/status/fetch topics, only under the fleet's registered runs (`register_run`),
and read only what the server broadcasts, so a compromised device cannot
impersonate another one, read others' updates, or park retained messages under
made-up run ids. mosquitto.conf bounds what the broker queues per client
(`write_config`; docs/protocol.md §8 states the per-device bounds).
The broker takes every client id from the username (`use_username_as_clientid`),
so no login can take over another one's session; the coordinator's two
connections log in as two server users (`server`, `server-artifacts`).

Layout of a fleet directory:

    fleet.json            settings (hostnames, port, bind address, server users, runs, fleet_id)
    broker.pid            the mosquitto serving the fleet (reload_running_broker, stop_stale_broker)
    ca.pem                the fleet CA certificate
    ca/ca.key             the CA private key: the broker never reads it; keep it off devices
    server.pem / .key     broker TLS certificate for the hostnames
    passwd / acl          mosquitto password file and ACL
    mosquitto.conf        generated at every start (in the runtime directory when started by root)
    data/                 mosquitto persistence (sessions, queued QoS 1 messages)
    credentials/<user>.json  connection details for the server and each device (mode 0600)

Mosquitto never runs as root. Started by root, it runs as the `mosquitto` system
user (else the sudo caller), and reads copies of only the files it needs
(ca.pem, server.pem, server.key, passwd, acl) from a runtime directory that user
owns, `/var/lib/devft-broker/<fleet>-<fleet_id>/` (`DEVFT_BROKER_RUNTIME` overrides the
parent; the id is random, from fleet.json, so a fleet made anew never finds an old one's
persistence), where its persistence lives too; the fleet directory itself may stay
private to root. Started by anyone else, it runs as that user on the fleet directory.

The broker is in parts: broker_setup.py (the fleet directory's CA, certificates, ACL, passwords and
credentials), broker_config.py (mosquitto.conf and the runtime directory), processes.py (process helpers
the origin and the web gateway share); this module runs mosquitto (`BrokerProcess`) and re-exports the
parts' public names, so `from server_sdk.fleet.broker import ...` reaches all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from server_sdk.fleet.broker_config import (
    BROKER_FILES,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
    RUNTIME_ROOT,
    broker_user,
    runtime_dir,
    stage_runtime,
    write_config,
)
from server_sdk.fleet.broker_setup import (
    ARTIFACTS_SUFFIX,
    DEFAULT_TLS_PORT,
    SERVER_USER,
    BrokerError,
    Credentials,
    MosquittoNotFound,
    acl_text,
    add_device,
    add_operator,
    artifact_credentials,
    fleet_init,
    load_settings,
    mosquitto_version,
    register_run,
    require_mosquitto,
    server_credentials,
    upgrade_fleet,
    write_acl,
    write_private,
)
from server_sdk.fleet.processes import (
    catches_sighup,
    free_port,
    listening,
    set_parent_death_signal,
    stop_process,
    wait_for_stop_signal,
)

__all__ = [  # the broker's public names, wherever they live (broker_setup.py, broker_config.py, processes.py)
    "ARTIFACTS_SUFFIX", "BROKER_FILES", "DEFAULT_TLS_PORT", "MAX_QUEUED_BYTES", "MAX_QUEUED_MESSAGES", "PID_FILE",
    "RUNTIME_ROOT", "SERVER_USER", "BrokerError", "BrokerProcess", "Credentials", "MosquittoNotFound", "acl_text",
    "add_device", "add_operator", "artifact_credentials", "broker_user", "fleet_init", "free_port", "load_settings",
    "main", "mosquitto_version", "register_run", "reload_running_broker", "require_mosquitto", "restart_broker",
    "runtime_dir", "serve_until_signalled", "server_credentials", "set_parent_death_signal", "start_broker",
    "stop_broker", "stop_stale_broker", "wait_for_stop_signal", "write_acl", "write_config", "write_private",
]

PID_FILE = "broker.pid"  # in the fleet directory: the mosquitto serving it, so a later start can find a stale one


def _mosquitto_of(pid: int, conf: Path) -> bool:
    """Whether `pid` is a live mosquitto started on `conf` (this fleet's generated config)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(args) and Path(args[0].decode(errors="replace")).name == "mosquitto" and str(conf).encode() in args


def reload_running_broker(fleet_dir: str | Path) -> bool:
    """SIGHUP the mosquitto serving this fleet (found by its pid file) so it rereads passwords and ACL;
    False when none runs here (a broker elsewhere, or started by another user: reload it there)."""
    fleet = Path(fleet_dir).resolve()
    try:
        pid = int(json.loads((fleet / PID_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not _mosquitto_of(pid, runtime_dir(fleet) / "mosquitto.conf") or not catches_sighup(pid):
        return False
    if os.geteuid() == 0:
        stage_runtime(fleet, broker_user())  # mosquitto reads the copies
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        return False
    return True


def stop_stale_broker(fleet_dir: str | Path, timeout_s: float = 10.0) -> int | None:
    """Stop a mosquitto left running for this fleet by a process that died without stopping it (SIGKILL of a
    `devft run --fleet local:N` before it set the parent-death signal, a crash of an older version).

    Only the pid in the fleet's pid file, and only if it is a mosquitto running this fleet's config; returns it."""
    fleet = Path(fleet_dir).resolve()
    try:
        pid = int(json.loads((fleet / PID_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _mosquitto_of(pid, runtime_dir(fleet) / "mosquitto.conf"):
        return None
    os.kill(pid, signal.SIGTERM)  # mosquitto saves its persistence on SIGTERM
    deadline = time.monotonic() + timeout_s
    while _mosquitto_of(pid, runtime_dir(fleet) / "mosquitto.conf") and time.monotonic() < deadline:
        time.sleep(0.05)
    if _mosquitto_of(pid, runtime_dir(fleet) / "mosquitto.conf"):
        os.kill(pid, signal.SIGKILL)
    return pid


def _listen_host(bind_address: str | None) -> str:
    return "127.0.0.1" if bind_address in (None, "0.0.0.0", "::") else bind_address


class BrokerProcess:
    """A mosquitto process serving one fleet directory.

    `die_with_parent` makes mosquitto exit when this process dies, even by SIGKILL (the `run` command,
    `devft run --fleet local:N`). Linux ties that signal to the thread that forked, so it applies only
    when the main thread starts the broker; a worker thread's broker would die with the thread.
    `start` writes the fleet's pid file and first stops a stale mosquitto of the same fleet
    (`stop_stale_broker`) that still holds the port."""

    def __init__(self, fleet_dir: str | Path, port: int | None = None, *, bind_address: str | None = None,
                 die_with_parent: bool = False) -> None:
        self.fleet_dir = Path(fleet_dir).resolve()
        settings = load_settings(self.fleet_dir)
        self.port = port or settings["port"]
        self.bind_address = bind_address or settings.get("bind_address")
        self.log_path = self.fleet_dir / "mosquitto.log"
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None

    @property
    def runtime_dir(self) -> Path:
        return runtime_dir(self.fleet_dir)

    def config_extra(self, runtime: Path) -> list[str]:
        """Lines added to mosquitto.conf (an edge broker's bridge: server_sdk/fleet/bridge.py)."""
        return []

    def start(self, timeout_s: float = 10.0) -> BrokerProcess:
        broker_bin, _ = require_mosquitto()
        host = _listen_host(self.bind_address)
        if listening(self.port, host) and stop_stale_broker(self.fleet_dir) is not None:
            log_stale = f"stopped a stale mosquitto of {self.fleet_dir} that still held port {self.port}"
            print(f"devft: {log_stale}", file=sys.stderr)
            deadline = time.monotonic() + timeout_s
            while listening(self.port, host) and time.monotonic() < deadline:
                time.sleep(0.05)
        if listening(self.port, host):
            raise BrokerError(f"port {self.port} is already in use; pick another port for this fleet")
        upgrade_fleet(self.fleet_dir)
        conf = write_config(self.fleet_dir, self.port, self.bind_address, extra=self.config_extra)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        # as root, start it as its user outright: it never holds root, and the parent-death signal
        # survives (a set-uid inside mosquitto would clear it)
        account = pwd.getpwnam(broker_user()) if os.geteuid() == 0 else None
        with_parent = self.die_with_parent and threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen([broker_bin, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=set_parent_death_signal if with_parent else None,
                                     user=account.pw_uid if account else None,
                                     group=account.pw_gid if account else None,
                                     extra_groups=[] if account else None)
        log.close()
        write_private(self.fleet_dir / PID_FILE, json.dumps({"pid": self.proc.pid, "port": self.port}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with code {self.proc.returncode} on start; log {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if listening(self.port, host) and catches_sighup(self.proc.pid):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout_s}s; see {self.log_path}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, so mosquitto saves sessions and queued messages to disk."""
        stop_process(self.proc, signal.SIGTERM, timeout_s)

    def restart(self, timeout_s: float = 10.0) -> BrokerProcess:
        self.stop()
        deadline = time.monotonic() + timeout_s
        while listening(self.port, _listen_host(self.bind_address)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.start(timeout_s)

    def reload(self) -> None:
        """SIGHUP: re-read password file and ACL (after add_device)."""
        if self.proc is None or self.proc.poll() is not None:
            raise BrokerError("broker is not running; start it before reload")
        if os.geteuid() == 0:
            stage_runtime(self.fleet_dir, broker_user())  # mosquitto reads the copies
        self.proc.send_signal(signal.SIGHUP)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_broker(fleet_dir: str | Path, port: int | None = None, timeout_s: float = 10.0) -> BrokerProcess:
    """Start mosquitto for a fleet and return once it accepts TCP connections."""
    return BrokerProcess(fleet_dir, port).start(timeout_s)


def stop_broker(broker: BrokerProcess) -> None:
    broker.stop()


def restart_broker(broker: BrokerProcess) -> BrokerProcess:
    return broker.restart()


def serve_until_signalled(broker: BrokerProcess, on_ready: Callable[[BrokerProcess], None] | None = None) -> int:
    """Start the broker and run until SIGTERM/SIGINT (then stop mosquitto and wait for it) or until it exits.

    The handlers are in place before mosquitto starts, so no signal can orphan it. SIGHUP reloads
    passwords and ACL. Returns mosquitto's exit code, or 0 after a signal."""
    stop = threading.Event()
    reload = threading.Event()

    def on_stop(signum, frame) -> None:
        stop.set()

    def on_hup(signum, frame) -> None:
        reload.set()

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        broker.start()
        if on_ready is not None:
            on_ready(broker)
        while not stop.is_set() and broker.running:
            stop.wait(0.2)
            if reload.is_set():
                reload.clear()
                broker.reload()
        if stop.is_set():
            broker.stop()
            return 0
        return broker.proc.returncode if broker.proc is not None else 1
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m server_sdk.fleet.broker init|add-device|add-operator|run ...` for operators."""
    parser = argparse.ArgumentParser(prog="python -m server_sdk.fleet.broker", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="create CA, certs, ACL and the server users")
    p_init.add_argument("dir")
    p_init.add_argument("--hostname", action="append", help="broker hostname/IP for the cert (repeatable)")
    p_init.add_argument("--port", type=int, default=DEFAULT_TLS_PORT)
    p_init.add_argument("--bind", default=None, help="address the TLS listener binds to (default: all interfaces)")
    p_init.add_argument("--plaintext-loopback-port", type=int, default=None)
    p_add = sub.add_parser("add-device", help="register a device; writes its credentials file (mode 0600)")
    p_add.add_argument("dir")
    p_add.add_argument("name")
    p_add.add_argument("--host", default=None, help="hostname the device should connect to")
    p_op = sub.add_parser("add-operator", help="another login with the server's rights (a monitor, an outside "
                          "tool); writes its credentials file (mode 0600)")
    p_op.add_argument("dir")
    p_op.add_argument("name")
    p_reg = sub.add_parser("register-run", help="let the fleet's devices publish under a run id (and reload a "
                           "broker of this fleet running here); `devft serve` does it for its run")
    p_reg.add_argument("dir")
    p_reg.add_argument("run_id")
    p_run = sub.add_parser("run", help="run mosquitto for the fleet until SIGTERM or Ctrl-C")
    p_run.add_argument("dir")
    p_run.add_argument("--port", type=int, default=None)
    p_run.add_argument("--bind", default=None, help="address to listen on (default: the fleet's setting)")
    args = parser.parse_args(argv)
    if args.cmd == "init":
        creds = fleet_init(args.dir, hostnames=args.hostname, port=args.port, bind_address=args.bind,
                           plaintext_loopback_port=args.plaintext_loopback_port)
        print(f"fleet ready in {args.dir}; server credentials in {args.dir}/credentials/{creds.username}.json")
    elif args.cmd == "register-run":
        new = register_run(args.dir, args.run_id)
        reloaded = reload_running_broker(args.dir)
        print(f"run {args.run_id} {'registered' if new else 'was already registered'} in {args.dir}; "
              + ("the broker running here reloaded its ACL" if reloaded else
                 "no broker of this fleet runs here: reload yours (SIGHUP) so devices may publish under it"))
    elif args.cmd == "add-device":
        creds = add_device(args.dir, args.name, host=args.host)
        print(Path(args.dir) / "credentials" / f"{creds.username}.json")
    elif args.cmd == "add-operator":
        creds = add_operator(args.dir, args.name)
        print(Path(args.dir) / "credentials" / f"{creds.username}.json")
    else:
        def announce(broker: BrokerProcess) -> None:
            print(f"mosquitto (pid {broker.proc.pid}) listening on {broker.bind_address or '*'}:{broker.port} "
                  f"(TLS); log {broker.log_path}; SIGTERM or Ctrl-C stops it", flush=True)

        broker = BrokerProcess(args.dir, args.port, bind_address=args.bind, die_with_parent=True)
        return serve_until_signalled(broker, announce)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
