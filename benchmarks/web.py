"""The web device side by side with native onnxruntime, in one run on the same cores.

Per stage (the contract's tiny test artifact, and SmolLM2-135M's fresh 4-layer stage at batch 4 x 128):
median time of one training step (train.onnx forward + backward, then AdamW on the LoRA tensors, on
the same seeded batch) and the peak memory of the process that ran it, for
- Python onnxruntime (devft-edge's OnnxTrainer, one intra-op thread), in its own child process;
- onnxruntime-node (web/bench/step.mjs, one thread) and onnxruntime-web's WASM build in Node (one thread);
- onnxruntime-web in Debian's headless Chromium (web/bench/browser.mjs, a fresh browser each): one
  thread; two WASM threads (the page is cross-origin isolated by the gateway's COOP/COEP headers); one
  thread under 4x CPU throttling (DevTools `Emulation.setCPUThrottlingRate`, a phone-class device).
  onnxruntime-web 1.31 ships only its SIMD build, so "no SIMD" cannot be measured; every WASM number is SIMD.
Also the transport: a device's own 200 B and 60 kB messages round-tripped through the broker over
MQTT/TLS and through the WebSocket gateway (websockify + the loopback TLS forwarder), same Node client.

    python -m benchmarks.web [--stages tiny,smollm2-4] [--steps 5] [--warmup 1]

Writes benchmarks/results/web.json and replaces the `web` block of benchmarks/RESULTS.md.
SmolLM2's stage is exported once into benchmarks/results/cache/web/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .results_md import md_table, replace_block

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "cache" / "web"
TINY = REPO / "docs" / "test-vectors" / "tiny"
BROWSER_CONFIGS = {"chromium 1 thread": "threads=1,throttle=1", "chromium 2 threads": "threads=2,throttle=1",
                   "chromium 1 thread, 4x throttled": "threads=1,throttle=4"}


def stage_dir(name: str, batch: int) -> tuple[Path, int]:
    """<CACHE>/<name> with the artifact in onnx/ (exported or copied once) and batch.json; its seq len."""
    out = CACHE / name
    art = out / "onnx"
    if not (art / "manifest.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        if name == "tiny":
            shutil.copytree(TINY, art)
        else:
            layers = int(name.rsplit("-", 1)[1])
            code = ("import json,sys; from pathlib import Path; from benchmarks.export import child_export; "
                    f"print(json.dumps(child_export('onnx', {layers}, Path(sys.argv[1]), 128, {batch}, 1)))")
            subprocess.run([sys.executable, "-c", code, str(art)], cwd=REPO, check=True, env=env())
    manifest = json.loads((art / "manifest.json").read_text())
    seq = min(128, int(manifest["seq_len"]))
    from benchmarks.export import make_batch

    ids, labels = make_batch(int(manifest["model_config"]["vocab_size"]), batch, seq, 0.5)
    (art / "batch.json").write_text(json.dumps({"ids": ids.tolist(), "labels": labels.tolist()}))
    return out, seq


def env() -> dict[str, str]:
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *paths]), "OMP_NUM_THREADS": "1"}


def last_json(cmd: list[str], cwd: Path, timeout: float) -> Any:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith(("{", "["))]


def python_engine(stage: Path, batch: int, seq: int, warmup: int, steps: int) -> dict[str, Any]:
    args = ["train", "onnx", str(stage), str(batch), str(seq), str(warmup), str(steps), "1", "0.5", "{}"]
    out = last_json([sys.executable, "-m", "benchmarks.export", *args], REPO, 3600)
    if isinstance(out, dict):
        return out
    r = out[-1]
    import onnxruntime

    return {"engine": f"onnxruntime {onnxruntime.__version__} (python)", "threads": 1, "step_s": r["step_s"],
            "step_times": r["step_times"], "losses": r["losses"], "peak_rss_bytes": int(r["peak_rss_mb"] * 2**20)}


def node_engine(stage: Path, engine: str, warmup: int, steps: int) -> dict[str, Any]:
    art = stage / "onnx"
    out = last_json(["node", "bench/step.mjs", "--art", str(art), "--batch", str(art / "batch.json"), "--engine",
                     engine, "--threads", "1", "--warmup", str(warmup), "--steps", str(steps)], WEB, 3600)
    return out if isinstance(out, dict) else out[-1]


def browser_engines(stage: Path, warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    from server_sdk.fleet.local_fleet import LocalFleet
    from server_sdk.fleet.web_gateway import WebGateway, spki_sha256

    with LocalFleet(CACHE / "fleet", 1) as fleet:  # its CA and certificate serve the page; no broker needed here
        gw = WebGateway(fleet.dir, 1, extra={"/bench/": stage}).start()
        try:
            cmd = ["node", "bench/browser.mjs", "--page", gw.page_url.replace("/app/", "/app/bench.html"),
                   "--base", "/bench/onnx/", "--spki", spki_sha256(fleet.dir / "server.pem"),
                   "--warmup", str(warmup), "--steps", str(steps)]
            for cfg in BROWSER_CONFIGS.values():
                cmd += ["--config", cfg]
            out = last_json(cmd, WEB, 3600)
        finally:
            gw.stop()
    if isinstance(out, dict):
        return {name: out for name in BROWSER_CONFIGS}
    return dict(zip(BROWSER_CONFIGS, out))


def transport(n: int) -> Any:
    from server_sdk.fleet.local_fleet import LocalFleet
    from server_sdk.fleet.web_gateway import WebGateway

    with LocalFleet(CACHE / "transport-fleet", 1) as fleet:
        fleet.start_broker()
        with WebGateway(fleet.dir, fleet.port) as gw:
            out = last_json(["node", "bench/transport.mjs", "--credentials", str(fleet.device_credentials("dev-000")),
                             "--mqtts", f"localhost:{fleet.port}", "--wss", gw.ws_url, "--n", str(n)], WEB, 600)
    return out if isinstance(out, dict) else out[-1]


def run(stages: list[str], warmup: int, steps: int, batch: int) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_average_start": list(os.getloadavg())},
                              "settings": {"warmup": warmup, "steps": steps, "batch": batch}, "stages": {}}
    for name in stages:
        stage, seq = stage_dir(name, batch)
        rows = {"python onnxruntime": python_engine(stage, batch, seq, warmup, steps),
                "onnxruntime-node": node_engine(stage, "node", warmup, steps),
                "onnxruntime-web in node": node_engine(stage, "web", warmup, steps),
                **browser_engines(stage, warmup, steps)}
        result["stages"][name] = {"seq": seq, "batch": batch, "engines": rows}
        print(name, {k: v.get("step_s", v.get("error")) for k, v in rows.items()}, flush=True)
    result["transport"] = transport(100)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


def table(result: dict[str, Any]) -> str:
    lines = []
    for name, st in result["stages"].items():
        rows = []
        native = st["engines"]["python onnxruntime"].get("step_s")
        for engine, r in st["engines"].items():
            step = r.get("step_s")
            rows.append([engine, r.get("engine", "") if "error" not in r else f"error: {r['error'][:60]}",
                         f"{step * 1e3:.1f}" if step else "-",
                         f"{step / native:.2f}x" if step and native else "-",
                         f"{r['peak_rss_bytes'] / 2**20:.0f}" if r.get("peak_rss_bytes") else "-"])
        lines.append(f"**{name}** (batch {st['batch']} x {st['seq']}):\n")
        lines += md_table(["engine", "runtime", "step ms (median)", "vs python onnxruntime", "peak RSS MiB"], rows)
        lines.append("")
    tr = result.get("transport")
    if isinstance(tr, list):
        rows = [[t["transport"], t["bytes"], f"{t['round_trip_median_s'] * 1e3:.2f}", f"{t['connect_s'] * 1e3:.0f}"]
                for t in tr]
        lines.append("Transport (a device's own message through the broker and back, median of 100):\n")
        lines += md_table(["path", "bytes", "round trip ms", "connect ms"], rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.web", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="tiny,smollm2-4")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--no-results-md", action="store_true")
    args = p.parse_args(argv)
    t0 = time.time()
    result = run(args.stages.split(","), args.warmup, args.steps, args.batch)
    result["wall_s"] = time.time() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "web.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    print(text)
    if not args.no_results_md:
        replace_block("web", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
