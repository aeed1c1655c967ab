"""Resume benchmark (issue #27, hole 11): how long a killed `devft serve` takes from restart to its first round.

    python -m benchmarks.resume_time            # tiny random LLaMA, 3 local devices, a few minutes

A local secured mosquitto and 3 `devft-edge` processes follow a run that `devft serve` (a subprocess)
coordinates. Once the first round's checkpoint is written the coordinator is SIGKILLed (mid-round:
the next round's control is out); then `devft serve --resume` starts. Reported, from the resumed
process's start: seconds to its first `round_start` event, and the stage-ready wait inside that
(`stage_ready`'s `waited_s` and who was not ready). The devices stay connected throughout, as on a
real fleet whose coordinator crashed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "fleet_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _wait(pred, timeout_s: float, what: str):
    from tests.serve_helpers import wait_for

    return wait_for(pred, timeout_s, what, TimeoutError)


def measure(work: Path) -> dict:
    from server_sdk.config import RunConfig
    from server_sdk.engine.model import tiny_random_model
    from server_sdk.fleet.local_fleet import LocalFleet
    from tests.serve_helpers import serve_command, serve_until_killed

    tiny = tiny_random_model(n_layers=4, hidden=32, seed=0)
    model_dir = work / "model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    cfg = RunConfig.load("resume-time").with_overrides({"model": str(model_dir)})
    cfg.to_json(work / "cfg.json")
    run_dir = work / "resume"
    out: dict = {}
    with LocalFleet(work / "fleet", 3) as fleet:
        fleet.start_broker()
        serve, env = serve_command(fleet, 120)
        with open(work / "serve.log", "ab") as logf:
            serve_until_killed(fleet, serve, env, work / "cfg.json", run_dir, logf, _wait, shards_s=300,
                               until=lambda: any(e["event"] == "round_start" and e["round"] == 1
                                                 for e in _events(run_dir)),
                               until_s=600, what="round 1 to start")
            before = len(_events(run_dir))
            t0 = time.time()
            resumed = subprocess.Popen([*serve, "--resume", str(run_dir)], stdout=logf, stderr=subprocess.STDOUT,
                                       env=env)
            try:
                start = _wait(lambda: next((e for e in _events(run_dir)[before:] if e["event"] == "round_start"),
                                           None), 300, "the resumed coordinator's first round")
                ready = next((e for e in _events(run_dir)[before:] if e["event"] == "stage_ready"), {})
                out = {"restart_to_first_round_s": round(start["t"] - t0, 2), "round": start["round"],
                       "stage_ready_waited_s": ready.get("waited_s"), "not_ready": ready.get("not_ready")}
                resumed.wait(600)
                out["resumed_exit_code"] = resumed.returncode
            finally:
                if resumed.poll() is None:
                    resumed.kill()
        fleet.wait_devices(30)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.work:
        if Path(args.work).exists() and any(Path(args.work).iterdir()):
            # the broker keeps a fleet directory's retained messages (a finished run's `done`) across runs
            parser.error(f"--work {args.work}: use a new or empty directory")
        Path(args.work).mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure(Path(args.work)), indent=1))
    else:
        with tempfile.TemporaryDirectory(prefix="devft-resume-") as tmp:
            print(json.dumps(measure(Path(tmp)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
