"""The terminal stays readable: without --verbose no library INFO line or warning reaches stderr.

These run the CLI as the README does (`devft run ...`, `devft run --fleet local:N ...`) in a
subprocess, with progress bars on, on a tiny model, and read what reached stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server_sdk.fleet.local_fleet import REPO_ROOT, LogRelay

TINY = ["--model", "tiny-random-L4", "-o", "stages=[2, 4]", "-o", "rounds_per_stage=1", "-o", "num_clients=2",
        "-o", "local_steps=1", "-o", "batch_size=2", "-o", "seq_len=128", "-o", "lora.r=2",
        "-o", "data.examples_per_client=4", "-o", "data.eval_examples_per_task=1", "-o", "accuracy_every=stage",
        "-o", "gen_max_new_tokens=4", "-o", "torch_threads=1"]
# what library noise looks like: logging levels, ONNX Runtime's own format, Python warnings, known lines
NOISE = re.compile(r"\b(INFO|DEBUG|WARNING)\b|\[[IWV]:onnxruntime|Warning:|warnings\.warn|torchvision is not "
                   r"installed|Failed to load|^W\d{4} ", re.M)


def devft(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None,
          timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}
    for key in ("DEVFT_VERBOSE", "DEVFT_PROGRESS", "DEVFT_HEARTBEAT_S"):
        if key not in (env_extra or {}):
            env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "server_sdk.cli.main", *args], cwd=cwd, capture_output=True, env=env,
                          timeout=timeout)
    # decoded without universal newlines: a carriage return (a bar redrawn in place) stays visible
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def redraws(stderr: str) -> list[str]:
    """Carriage returns and escape sequences: a bar redrawn in place, which a log file or a pipe should not get."""
    return [code for code in ("\r", "\x1b[") if code in stderr]


def lines_of(stderr: str) -> list[str]:
    """stderr as a terminal would show it, line by line: bar redraws split, cursor codes dropped."""
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr).replace("\r", "\n").splitlines()


def noise(stderr: str) -> list[str]:
    return [line for line in lines_of(stderr) if NOISE.search(line)]


def test_simulated_run_is_quiet_and_verbose_shows_the_library_output(tmp_path):
    cache = {"DEVFT_CACHE": str(tmp_path / "cache")}
    quiet = devft(["run", *TINY, "--name", "q", "--runs-dir", "runs"], tmp_path, cache)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "fine-tuned" in quiet.stdout
    assert noise(quiet.stderr) == [], noise(quiet.stderr)[:10]
    assert redraws(quiet.stderr) == [], quiet.stderr[-2000:]  # stderr is a pipe: plain lines (issue 26)
    assert re.search(r"^devft rounds 2/2: stage 2/2 \(4 layers\), submodel train loss", quiet.stderr, re.M)
    assert "base model evaluation" in quiet.stderr and "evaluating after round" in quiet.stderr  # progress is shown
    assert "submodel train loss" in quiet.stderr and "full-model eval loss" in quiet.stderr

    loud = devft(["--verbose", "run", *TINY, "--name", "v", "--runs-dir", "runs"], tmp_path, cache)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert re.search(r"^DEBUG ", loud.stderr, re.M), "--verbose shows debug logs"
    assert "FutureWarning" in loud.stderr, "--verbose shows the warnings the default run hides"


def test_fleet_run_is_quiet_and_devices_print_one_line_per_round(tmp_path):
    from server_sdk.fleet.broker import MosquittoNotFound, require_mosquitto

    try:
        require_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    # a fresh cache: the stage exports really run (their graph builder is where ORT's INFO lines came from)
    # a heartbeat every 0.5 s without a line (30 s by default) shows while the coordinator waits for devices
    done = devft(["run", "--fleet", "local:2", *TINY, "--name", "f", "--runs-dir", "runs", "--round-timeout", "120"],
                 tmp_path, {"DEVFT_CACHE": str(tmp_path / "cache"), "DEVFT_HEARTBEAT_S": "0.5"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert noise(done.stderr) == [], noise(done.stderr)[:10]
    assert redraws(done.stderr) == [], done.stderr[-2000:]
    beats = [line for line in done.stderr.splitlines() if line.startswith("... still working")]
    assert any("devft rounds" in line for line in beats), done.stderr[-3000:]
    rounds = re.findall(r"^(dev-00[01]): stage (\d) round (\d): \d+ steps", "\n".join(lines_of(done.stderr)), re.M)
    assert sorted(set(rounds)) == [("dev-000", "1", "1"), ("dev-000", "2", "2"), ("dev-001", "1", "1"),
                                   ("dev-001", "2", "2")], rounds
    assert "waiting for 2 devices" in done.stderr and "preparing the 2-layer submodel" in done.stderr
    # what the devices logged beyond their round lines stays in their logs
    log = (tmp_path / "runs/f/fleet/devices/dev-000/device.log").read_text()
    assert "stage 1 round 1" in log


def test_the_test_commands_model_load_prints_nothing(tmp_path):
    """scripts/test.sh loads the model first; torchao (imported by transformers) used to print here."""
    code = "from server_sdk.engine.model import tiny_random_model; tiny_random_model(2, 32)"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("DEVFT_VERBOSE", None)
    done = subprocess.run([sys.executable, "-c", code + "; import transformers.quantizers.auto"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert noise(done.stderr) == [], done.stderr[-2000:]


def test_log_relay_shows_round_lines_and_errors_only(tmp_path):
    class Fleet:
        names = ["dev-000"]

        def device_dir(self, name):
            return tmp_path / name

    (tmp_path / "dev-000").mkdir()
    shown: list[str] = []
    relay = LogRelay(Fleet(), shown.append)  # type: ignore[arg-type]
    with open(tmp_path / "dev-000" / "device.log", "a") as f:
        f.write("2026-01-01 00:00:00,000 INFO devft.edge: dev-000: stage 1 round 1: 2 steps in 0.1 s\n"
                "2026-01-01 00:00:00,000 INFO edge_runtime.telemetry.detect: no energy meter\n"
                "2026-01-01 00:00:00,000 WARNING devft.edge: a batch has no completion tokens\n"
                "2026-01-01 00:00:00,000 ERROR devft.edge: dev-000: stage 1 round 2 abandoned: boom\n"
                "2026-01-01 00:00:00,000 INFO devft.edge: half a li")
    relay.poll()
    assert shown == ["dev-000: stage 1 round 1: 2 steps in 0.1 s", "error: dev-000: stage 1 round 2 abandoned: boom"]
    with open(tmp_path / "dev-000" / "device.log", "a") as f:
        f.write("ne\n")
    relay.poll()
    assert shown[-1] == "half a line"


# transformers' own bars (issue 26): the GGUF conversion's, from_pretrained's and save_pretrained's
LIBRARY_BARS = ("Converting and de-quantizing GGUF tensors", "Loading weights", "Writing model shards")
BARS_CODE = """
import server_sdk, sys
import transformers.modeling_gguf_pytorch_utils as gguf
from server_sdk.engine.model import load_base_model, tiny_random_model
list(gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))  # the bar _convert_gguf draws
base = tiny_random_model(2, 32)
base.model.save_pretrained(sys.argv[1])
base.tokenizer.save_pretrained(sys.argv[1])
load_base_model(sys.argv[1])
"""


def test_library_progress_bars_show_only_with_verbose(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("DEVFT_VERBOSE", None)
    quiet = subprocess.run([sys.executable, "-c", BARS_CODE, str(tmp_path / "m")], capture_output=True, text=True,
                           env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert [b for b in LIBRARY_BARS if b in quiet.stderr] == [] and "%|" not in quiet.stderr, quiet.stderr[-2000:]
    plan = devft(["plan", "--model", str(tmp_path / "m"), "-o", "stages=[1, 2]"], tmp_path)  # from_pretrained
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "stage 1 groups" in plan.stdout and plan.stderr == "", plan.stderr[-2000:]

    loud = subprocess.run([sys.executable, "-c", BARS_CODE, str(tmp_path / "v")], capture_output=True, text=True,
                          env={**env, "DEVFT_VERBOSE": "1"}, timeout=300)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert [b for b in LIBRARY_BARS if b not in loud.stderr] == [], loud.stderr[-2000:]
