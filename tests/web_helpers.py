"""Fleet runs where a driver process stands in for some devices: Node's browser-devices.mjs driving device pages
in headless Chromium through a web gateway (tests/test_web_device.py), or `devft rig`'s emulated phones
(tests/test_web_rig.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.test_fleet import FleetRun


class DriverRun(FleetRun):
    """A FleetRun whose devices `driven` are one driver process, started in the place of the last of them (with a
    web gateway first when `gateway`): `command(job)` run in `cwd`, its output in `log`, known to the fleet as
    devices[key] (its exit code in `codes[key]`). After the run the driver gets `wait_s` more seconds to finish
    (copying its pages' rounds out, adding its report section) before the fleet is closed; the gateway stops
    with the run."""

    def __init__(self, run_dir: Path, cfg, base, n: int, settings, *, driven: tuple[str, ...],
                 command: Callable[[DriverRun], list[str]], cwd: Path, log: Path, key: str = "browsers",
                 wait_s: float | None = None, gateway: bool = False) -> None:
        self.driven, self.command, self.cwd, self.log, self.key = driven, command, cwd, log, key
        self.wait_s, self.with_gateway, self.gateway = wait_s, gateway, None
        super().__init__(run_dir, cfg, base, n, settings)  # starts the run: the devices come after this is set

    def start_device(self, name: str, code: str | None = None):
        if name not in self.driven:
            return super().start_device(name, code)
        if name != self.driven[-1]:
            return None
        if self.with_gateway:
            from server_sdk.fleet.web_gateway import WebGateway

            self.gateway = WebGateway(self.fleet.dir, self.fleet.port).start()
        with open(self.log, "ab") as logf:
            proc = subprocess.Popen(self.command(self), cwd=self.cwd, stdout=logf, stderr=subprocess.STDOUT)
        self.fleet.devices[self.key] = proc
        return proc

    def finish(self, timeout_s: float = 600) -> dict:
        try:
            self.thread.join(timeout_s)
            driver = self.fleet.devices.get(self.key)
            if driver is not None and self.wait_s is not None:
                try:
                    driver.wait(self.wait_s)
                except subprocess.TimeoutExpired:
                    pass  # its exit code stays None and the caller's assertion says so
            return super().finish(timeout_s)
        finally:
            if self.gateway is not None:
                self.gateway.stop()


def browser_devices(out: Path, timeout_s: int, *options: str) -> Callable[[DriverRun], list[str]]:
    """The command of web/test/browser-devices.mjs for a DriverRun's driven devices, one page each, through its
    gateway: round files under `out`, `options` before the devices (--keep-blobs, --close NAME, --quota BYTES)."""
    from server_sdk.fleet.web_gateway import spki_sha256

    def command(job: DriverRun) -> list[str]:
        gw = job.gateway
        cmd = ["node", "test/browser-devices.mjs", "--page", gw.page_url, "--ws", gw.ws_url, "--run", job.run_dir.name,
               "--spki", spki_sha256(job.fleet.dir / "server.pem"), "--out", str(out), "--timeout-s", str(timeout_s),
               *options]
        for b in job.driven:
            cmd += ["--device", f"{b}={job.fleet.device_credentials(b)},{job.shards[b]}"]
        return cmd

    return command
