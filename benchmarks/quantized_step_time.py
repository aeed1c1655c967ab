"""Quantized frozen weights (issue #24): is an int8 / int4 training step at most 10% slower than fp32's?

    python -m benchmarks.quantized_step_time                    # stages 4 and 30, 3 interleaved rounds
    python -m benchmarks.quantized_step_time --stages 4 --rounds 5

One step time is noise on a shared machine; a ratio is only worth reading when the two sides ran side by
side. So each round measures fp32, int8 and int4 of a stage one after the other, each in a fresh process
(edge_runtime.bench on the device benchmark's cached artifacts: the same export, the same code a board
runs), and the rounds repeat. A ratio is the median of the per-round ratios (each against the same
round's fp32), and the table keeps every round so drift shows. Time is CPU seconds per step with one
intra-op thread (what a step costs, less sensitive to other jobs than wall time); wall p50 is kept too.

Results: benchmarks/results/quantized-step-time.json and the generated block in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from . import device
from .export import Envs, load_average
from .results_md import RESULTS_MD, md_table, replace_block, write_atomic

OUT = device.RESULTS / "quantized-step-time.json"
SCHEMES = ("onnx", "onnx-int8", "onnx-int4")
GOAL = 1.10  # issue #24: a quantized step at most 10% slower than fp32's


def measure_rounds(stages: list[int], rounds: int, steps: int, warmup: int, threads: int,
                   envs: Envs) -> list[dict[str, Any]]:
    from tqdm import tqdm

    runs = []
    jobs = [(r, n, b) for n in stages for r in range(rounds) for b in SCHEMES]
    for r, n, b in tqdm(jobs, desc="interleaved steps", unit="run"):
        row = device.run_one(b, n, steps, warmup, threads, envs)
        if "error" in row:
            raise SystemExit(f"{b} at {n} layers failed: {row['error']}")
        runs.append({"round": r, "stage_layers": n, "backend": b,
                     "cpu_s_per_step": row["cpu_s_per_step"], "wall_p50_s": row["step_latency_s"]["p50"],
                     "load_average_before": row["load_average_before"],
                     "peak_rss_bytes": max(row["peak_rss_bytes"], row["process_peak_rss_bytes"] or 0)})
        tqdm.write(f"round {r + 1}, {n} layers, {b}: {row['cpu_s_per_step']:.3f} CPU s/step, "
                   f"load {row['load_average_before']}")
    return runs


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage and quantized scheme: the per-round CPU-time ratios against that round's fp32, and their median."""
    at = {(x["stage_layers"], x["round"], x["backend"]): x for x in runs}
    out = []
    for n in sorted({x["stage_layers"] for x in runs}):
        rounds = sorted({x["round"] for x in runs if x["stage_layers"] == n})
        for b in SCHEMES[1:]:
            per = [at[(n, r, b)]["cpu_s_per_step"] / at[(n, r, "onnx")]["cpu_s_per_step"] for r in rounds
                   if (n, r, b) in at and (n, r, "onnx") in at]
            wall = [at[(n, r, b)]["wall_p50_s"] / at[(n, r, "onnx")]["wall_p50_s"] for r in rounds
                    if (n, r, b) in at and (n, r, "onnx") in at]
            if per:
                med = statistics.median(per)
                out.append({"stage_layers": n, "backend": b, "cpu_ratio_per_round": per, "cpu_ratio": med,
                            "wall_ratio": statistics.median(wall), "goal_met": med <= GOAL})
    return out


def markdown(doc: dict[str, Any]) -> str:
    meta, runs = doc["meta"], doc["runs"]
    lines = ["### Quantized frozen weights: step time against fp32, interleaved (issue #24)", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; machine: {meta['machine']['cpu_model']}, "
             f"{meta['machine']['logical_cpus']} logical CPUs, load average {meta['load_average_start']} at the start, "
             f"{meta['load_average_end']} at the end; {meta['threads']} thread(s); batch {meta['batch']} x "
             f"{meta['seq']}, every position supervised; {meta['warmup']} warm-up + {meta['steps']} timed steps "
             "per process; each round runs fp32, int8, int4 one after the other.", ""]
    head = ["stage layers", "weights"] + [f"round {r + 1} CPU s/step" for r in range(meta["rounds"])] + \
        ["vs fp32 (median of per-round ratios)", "wall p50 vs fp32", "goal <= 1.10x"]
    rows = []
    ratio = {(x["stage_layers"], x["backend"]): x for x in doc["ratios"]}
    for n in meta["stages"]:
        for b in SCHEMES:
            cells = [f"{x['cpu_s_per_step']:.3f}" for x in sorted(
                (x for x in runs if x["stage_layers"] == n and x["backend"] == b), key=lambda x: x["round"])]
            q = ratio.get((n, b))
            rows.append([n, {"onnx": "fp32"}.get(b, b.removeprefix("onnx-"))] + cells +
                        ([f"{q['cpu_ratio']:.3f}x ({', '.join(f'{v:.2f}' for v in q['cpu_ratio_per_round'])})",
                          f"{q['wall_ratio']:.3f}x", "met" if q["goal_met"] else "**not met**"] if q else ["", "", ""]))
    lines += [*md_table(head, rows), "", "JSON: `benchmarks/results/quantized-step-time.json`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantized_step_time", description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="4,30", help="comma-separated stage sizes of SmolLM2-135M (default 4,30)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per process (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--summary", action="store_true", help="only rewrite RESULTS.md's block from the JSON")
    p.add_argument("--markdown", type=Path, default=RESULTS_MD)
    args = p.parse_args(argv)
    if args.summary:
        doc = json.loads(OUT.read_text())
    else:
        if args.rounds < 1:
            p.error(f"--rounds must be at least 1, got {args.rounds}")
        stages = [int(s) for s in args.stages.split(",") if s]
        envs = Envs(None)
        device.prepare(stages, list(SCHEMES), [], envs)
        start = load_average()
        runs = measure_rounds(stages, args.rounds, args.steps, args.warmup, args.threads, envs)
        from edge_runtime.bench import DEFAULT_SEQ, machine_info

        doc = {"meta": {"command": "python -m benchmarks.quantized_step_time " + " ".join(
                            sys.argv[1:] if argv is None else argv),
                        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
                        "load_average_start": start, "load_average_end": load_average(), "stages": stages,
                        "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                        "batch": device.BATCH, "seq": DEFAULT_SEQ},
               "runs": runs, "ratios": ratios(runs)}
        write_atomic(OUT, json.dumps(doc, indent=1) + "\n")
    section = markdown(doc)
    replace_block("quantized-step-time", section, args.markdown)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
