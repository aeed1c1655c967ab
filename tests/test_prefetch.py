"""Devices fetch the next stage's files before it starts (server_sdk/fleet/prefetch.py), against a real mosquitto.

Two fleet runs of the tiny model (stages [2, 4], rounds [2, 1], 3 devices): one where the
coordinator's guess at stage 1 is right (stage 1 is the full model: always right), one where
the guess is forced wrong. The first must download (nearly) nothing when stage 1 starts; the
second must train exactly as the first: a wrong guess costs bytes, never correctness.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from server_sdk.fleet.coordinator import FleetExecutor
from server_sdk.fleet.settings import FleetSettings
from server_sdk.method.strategies.devft import DevFT
from server_sdk.method.submodel import StagePlan
from tests.test_fleet import FleetRun, events, fleet_cfg

pytest_plugins = ("tests.broker_fixtures",)


@pytest.fixture(scope="module")
def tiny4():
    from server_sdk.engine.model import tiny_random_model

    return tiny_random_model(n_layers=4, hidden=32, seed=0)


def _run(run_dir: Path, base, keep_artifacts: bool = False) -> tuple[dict, list[dict]]:
    job = FleetRun(run_dir, fleet_cfg(), base, 3, FleetSettings(round_timeout_s=120, keep_artifacts=keep_artifacts))
    report = job.finish()
    assert job.codes == {"dev-000": 0, "dev-001": 0, "dev-002": 0}
    return report, events(run_dir)


def _stage1_first_round(report: dict) -> dict[str, dict]:
    rec = next(r for r in report["records"] if r["stage"] == 1 and r["stage_round"] == 0)
    return rec["telemetry"]


def _files(artifact_dir: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, size)} of an exported artifact directory."""
    from edge_runtime.fetch import sha256_file

    return {p.relative_to(artifact_dir).as_posix(): (sha256_file(p), p.stat().st_size)
            for p in sorted(artifact_dir.rglob("*")) if p.is_file()}


def test_prefetch_makes_a_stage_start_download_nearly_nothing_and_a_wrong_guess_trains_the_same(
        tiny4, tmp_path, monkeypatch):
    begin_stage = FleetExecutor.begin_stage

    def slow_begin_stage(self, stage, plan, sub_model):
        # between stages a coordinator evaluates, plans and exports: tens of seconds on SmolLM2, a fraction
        # of a second on this tiny model; 2 s lets the devices finish the prefetch it leaves them time for
        time.sleep(2 if stage else 0)
        return begin_stage(self, stage, plan, sub_model)

    monkeypatch.setattr(FleetExecutor, "begin_stage", slow_begin_stage)
    devices_started = FleetExecutor._devices_started
    seen_at_guess: list[tuple[int, dict]] = []

    def recorded_devices_started(self, devices, wr, *args):
        t0 = time.monotonic()
        devices_started(self, devices, wr, *args)
        seen_at_guess.append((wr, {d: self.device_status.get(d, {}).get("round") for d in devices},
                              time.monotonic() - t0))

    monkeypatch.setattr(FleetExecutor, "_devices_started", recorded_devices_started)
    right, right_events = _run(tmp_path / "right", tiny4, keep_artifacts=True)  # stage 0's files, to compare with
    # the guess's export began only once every sampled device had reported it started the round (its `busy`
    # status), not by the timeout: on a shared machine the export must not delay the devices' start
    [(wr, rounds, waited)] = seen_at_guess
    assert wr == 1 and set(rounds.values()) == {1} and waited < 1.0, seen_at_guess

    # the guess is announced during stage 0's last round (wire round 1), before stage 1 starts
    kinds = [(e["event"], e.get("stage"), e.get("round")) for e in right_events]
    assert kinds.index(("round_start", 0, 1)) < kinds.index(("prefetch", 1, None)) < kinds.index(("stage", 1, None))
    ready = [e for e in right_events if e["event"] == "stage_ready"]
    assert [e["stage"] for e in ready] == [0, 1] and all(e["not_ready"] == [] for e in ready), ready

    # the guess had every frozen weight and both graphs of the real stage 1; only the files that depend on
    # the LoRA trained in the last round (the initial LoRA, the manifest listing its hash) differ
    artifacts = tmp_path / "right" / "artifacts"
    real, guess = _files(artifacts / "stage1" / "onnx"), _files(artifacts / "stage1" / "prefetch-onnx")
    had = {sha for sha, _ in _files(artifacts / "stage0" / "onnx").values()}  # devices hold these already
    new = {p for p, (sha, _) in real.items() if sha not in had}
    unguessed = {p for p in new if real[p][0] not in {sha for sha, _ in guess.values()}}
    assert unguessed <= {"manifest.json", "lora.safetensors"}, unguessed
    new_bytes, unguessed_bytes = (sum(real[p][1] for p in files) for files in (new, unguessed))
    assert unguessed_bytes < 0.1 * new_bytes, (unguessed_bytes, new_bytes)

    for device, tel in _stage1_first_round(right).items():
        assert tel["download_bytes"] == 0 and tel["fetch_s"] < 1, (device, tel)  # nothing fetched in the round
        # at the stage start a device fetched only the unguessable files (a chunk another device asked for
        # may arrive twice); the rest came with the prefetch during stage 0's last round
        assert 0 < tel["stage_download_bytes"] <= 3 * unguessed_bytes, (device, tel["stage_download_bytes"])
        assert tel["prefetch_bytes"] >= new_bytes - unguessed_bytes, (device, tel["prefetch_bytes"])

    order: list[str] = []
    returned = threading.Event()
    train_round = FleetExecutor.train_round

    def watched_train_round(self, stage, rnd, *args):
        try:
            return train_round(self, stage, rnd, *args)
        finally:
            if (stage, rnd) == (0, 1):
                order.append("stage 0's last round returned")
                returned.set()

    def wrong_guess(self, stage, model, full_lora, n_sub_layers):  # a plan the real stage 1 never uses
        # and one still being made when the round's updates are in: the round must not wait for it, and it is
        # announced all the same, while the coordinator aggregates and evaluates
        returned.wait(60)  # a round that waits for its guess returns only after this: `order` says so
        order.append("guess made")
        plan = StagePlan(stage, 2, [[0, 3], [1, 2]], [3, 2])
        return plan, self.build_submodel(model, full_lora, plan)[0]

    monkeypatch.setattr(DevFT, "speculate_stage", wrong_guess)
    monkeypatch.setattr(FleetExecutor, "train_round", watched_train_round)
    wrong, wrong_events = _run(tmp_path / "wrong", tiny4)
    # without keep_artifacts (--keep-artifacts) stage 0's files went once stage 1 was served
    assert not (tmp_path / "wrong" / "artifacts" / "stage0").exists()
    assert (tmp_path / "wrong" / "artifacts" / "stage1" / "onnx" / "manifest.json").exists()
    assert order == ["stage 0's last round returned", "guess made"]
    hint = next(e for e in wrong_events if e["event"] == "prefetch")
    assert hint["groups"] == [[0, 3], [1, 2]]
    kinds = [(e["event"], e.get("stage"), e.get("round")) for e in wrong_events]
    assert kinds.index(("round_end", 0, 1)) < kinds.index(("prefetch", 1, None)) < kinds.index(("stage", 1, None))
    # devices fetched the late hint (on the round's train control, republished after the round): the guess cost
    # its bytes; stage 1 was fetched at its start
    for tel in _stage1_first_round(wrong).values():
        assert tel["prefetch_bytes"] > 0 and tel["stage_download_bytes"] > 0.5 * new_bytes

    # same plans, same aggregation, same numbers: the guess never touches what is trained
    assert right["stage_plans"] == wrong["stage_plans"]
    assert [r["eval_loss"] for r in right["records"]] == [r["eval_loss"] for r in wrong["records"]]
    assert [r["train_loss"] for r in right["records"]] == [r["train_loss"] for r in wrong["records"]]
