"""Fixtures that run a real, secured Mosquitto for a test: own dir, own port.

A test module loads them with `pytest_plugins = ("tests.broker_fixtures",)`.
Tests never use a system broker (apt's mosquitto service on 1883 is ignored).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from edge_runtime.mqtt import MqttClient, MqttSettings
from server_sdk.fleet.broker import (
    BrokerProcess,
    Credentials,
    MosquittoNotFound,
    add_device,
    fleet_init,
    register_run,
    require_mosquitto,
)

DEVICES = ("dev1", "dev2")
RUNS = ("run1", "fleetrun")  # the run ids the tests' devices publish under (devices may publish only under registered runs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Fleet:
    dir: Path
    port: int
    server: Credentials
    devices: dict[str, Credentials]


def settings_for(creds: Credentials, **overrides: object) -> MqttSettings:
    base = MqttSettings(
        host="localhost",
        port=creds.port,
        username=creds.username,
        password=creds.password,
        ca_file=creds.ca_file,
        client_id=creds.client_id,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )
    return replace(base, **overrides)


@contextlib.contextmanager
def runtime_dir_in(variable: str, prefix: str) -> Iterator[Path]:
    """A throwaway directory named by environment `variable` while the block runs (the runtime directory of a
    broker or an nginx started by root): mode 0755, so the server's own user reaches its subdirectory."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    old = os.environ.get(variable)
    os.environ[variable] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = old
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def broker_runtime_dir() -> Iterator[Path]:
    """Where a broker started by root keeps its staged files: one throwaway directory per test session."""
    with runtime_dir_in("DEVFT_BROKER_RUNTIME", "devft-broker-tests-") as path:
        yield path


@pytest.fixture
def unused_port() -> Callable[[], int]:
    return free_port


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    try:
        require_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    port = free_port()
    fleet_dir = tmp_path / "fleet"
    server = fleet_init(fleet_dir, hostnames=["localhost", "127.0.0.1"], port=port)
    for run in RUNS:
        register_run(fleet_dir, run)
    devices = {name: add_device(fleet_dir, name) for name in DEVICES}
    return Fleet(dir=fleet_dir, port=port, server=server, devices=devices)


@pytest.fixture
def broker(fleet: Fleet) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(fleet.dir, fleet.port).start()
    yield proc
    proc.stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., MqttClient]]:
    """Factory `clients(creds, connect=True, **settings_overrides)`; all closed at teardown."""
    made: list[MqttClient] = []

    def make(creds: Credentials, connect: bool = True, **overrides: object) -> MqttClient:
        client = MqttClient(settings_for(creds, **overrides))
        made.append(client)
        if connect:
            client.connect(timeout_s=10)
        return client

    yield make
    for c in made:
        c.close()
