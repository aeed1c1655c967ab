"""A seeded fleet run reproduces its numbers (issue 26): two `devft run --fleet local:2` runs of one seed, on a
real Mosquitto with real torch-free device processes, print and record the same losses, groups and clients.

What may differ is timing (wall and CPU seconds), what a device had to download (the second run finds
the first's export templates) and a few bytes of upload headers; the README says so next to its figures."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_quiet import TINY, devft

SEEDED = [*TINY, "-o", "stages=[2, 4, 6]", "--model", "tiny-random-L6", "-o", "rounds_per_stage=1",
          "-o", "num_clients=4", "-o", "schedule=fixed", "-o", "seed=3"]
TIMINGS = re.compile(r"client compute .*|for \d+ client CPU s")


def _numbers(report: dict) -> dict:
    """Everything in report.json a seed decides: per round the clients, losses and accuracy; the stages' groups."""
    keys = ("stage", "round", "clients", "train_loss", "eval_loss", "accuracy", "per_task", "bytes_down")
    return {"records": [{k: r.get(k) for k in keys} for r in report["records"]],
            "groups": [(p["groups"], p["anchors"]) for p in report["stage_plans"]],
            "loss_change": [e["loss_change"] for e in report["stage_transfer"]]}


@pytest.mark.slow
def test_a_seeded_fleet_run_reproduces_its_numbers(tmp_path):
    from server_sdk.fleet.broker import MosquittoNotFound, require_mosquitto

    try:
        require_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    env = {"DEVFT_CACHE": str(tmp_path / "cache")}  # the first run traces the graphs, the second reuses them
    runs = []
    for name in ("first", "second"):
        done = devft(["run", "--fleet", "local:2", *SEEDED, "--name", name, "--runs-dir", "runs", "--round-timeout",
                      "120"], tmp_path, env)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append((done.stdout, json.loads((tmp_path / "runs" / name / "report.json").read_text())))
    (out1, rep1), (out2, rep2) = runs
    assert len([r for r in rep1["records"] if r["stage"] >= 0]) == 3 and len(rep1["stage_plans"]) == 3
    assert _numbers(rep1) == _numbers(rep2)  # bit for bit: floats compared exactly
    summary = lambda out: [TIMINGS.sub("", line) for line in out.split("report:")[0].splitlines()[1:]]  # noqa: E731
    assert summary(out1) == summary(out2) and len(summary(out1)) == 6, out1  # the per-device lines are timings
    assert "full-model eval loss change per small stage: 2 layers" in out1 and "s wall" in out1
