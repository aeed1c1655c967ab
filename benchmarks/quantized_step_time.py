"""Quantized frozen weights (issue #24): is an int8 / int4 training step at most 10% slower than fp32's?

    python -m benchmarks.quantized_step_time                    # stages 4 and 30, 8 alternating cycles
    python -m benchmarks.quantized_step_time --stages 30 --cycles 12
    python -m benchmarks.quantized_step_time --kernels   # only the dequantization kernels, old lowering vs new

One step time is noise on a shared machine, and so is one process's: this machine's speed drifts by 10-20%
over minutes, more than the 10% the goal allows. So one process per stage opens the fp32, int8 and int4
trainers side by side (edge_runtime.bench.load_trainer on the device benchmark's cached artifacts: the same
export, the same code a board runs) and alternates their steps: each cycle runs one step of each, in an order
that rotates from cycle to cycle, and a cycle's ratio compares steps taken within seconds of each other. A
ratio is the median of the per-cycle ratios; the table keeps their range. Time is the process's CPU seconds
per step with one intra-op thread (what a step costs, less sensitive to other jobs than wall time); wall time
is kept too. The three sessions share one process's memory, so this measures time only (benchmarks/device.py
measures memory, one trainer a process).

`--kernels` times what one dequantization costs on onnxruntime's CPU kernels (one thread, SmolLM2's 6144 x 576
LM head slice shape, random codes), each lowering beside the blockwise DequantizeLinear it replaced, checking the
two give the same bits.

Results: benchmarks/results/quantized-step-time.json (kernels: -kernels.json) and the generated blocks in
benchmarks/RESULTS.md. Earlier runs are kept beside it: the one-process-a-measurement design's
(quantized-step-time-de39af0.json, -40b14f5.json, -88b5d18.json) and a 12-cycle run (-alternating-12.json).
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
KERNELS_OUT = device.RESULTS / "quantized-step-time-kernels.json"
SCHEMES = ("onnx", "onnx-int8", "onnx-int4")
GOAL = 1.10  # issue #24: a quantized step at most 10% slower than fp32's


def measure_alternating(stages: list[int], cycles: int, warmup: int, threads: int,
                        envs: Envs) -> list[dict[str, Any]]:
    """Per stage, one worker process alternating the schemes' steps; returns every timed step."""
    import subprocess

    from tqdm import tqdm

    runs = []
    python, env = envs.command("onnx")
    for n in tqdm(stages, desc="stages", unit="stage"):
        d = device.stage_dir(n)
        cmd = python + ["-m", "benchmarks.quantized_step_time", "--worker", *(str(d / b) for b in SCHEMES),
                        "--cycles", str(cycles), "--warmup", str(warmup), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=device.ROOT.parent, timeout=7200,
                              env={**env, "OMP_NUM_THREADS": str(threads)})
        if proc.returncode != 0:
            raise SystemExit(f"the {n}-layer worker failed: {proc.stderr.strip()[-2000:]}")
        steps = json.loads(proc.stdout.strip().splitlines()[-1])
        runs += [{"stage_layers": n, **x} for x in steps]
        fp32 = statistics.median(x["cpu_s"] for x in steps if x["backend"] == "onnx")
        tqdm.write(f"{n} layers: fp32 {fp32:.3f} CPU s/step (median of {cycles})")
    return runs


def worker(dirs: list[str], cycles: int, warmup: int, threads: int) -> list[dict[str, Any]]:
    """Open a trainer per artifact dir, warm each up, then `cycles` cycles of one step each (rotating order)."""
    import time

    from edge_runtime.bench import DEFAULT_SEQ, load_trainer, random_batch
    from edge_runtime.manifest import load_manifest

    vocab = int(load_manifest(Path(dirs[0])).model_config["vocab_size"])
    ids, labels = random_batch(vocab, device.BATCH, DEFAULT_SEQ)
    trainers = [load_trainer("onnx", Path(d), device.LR, threads) for d in dirs]
    for t in trainers:
        for _ in range(warmup):
            t.train_step(ids, labels)
    out = []
    for c in range(cycles):
        for k in range(len(dirs)):
            i = (c + k) % len(dirs)
            cpu, wall = time.process_time(), time.perf_counter()
            loss = trainers[i].train_step(ids, labels)
            out.append({"cycle": c, "backend": Path(dirs[i]).name, "cpu_s": time.process_time() - cpu,
                        "wall_s": time.perf_counter() - wall, "loss": float(loss)})
    return out


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage and quantized scheme: the per-cycle CPU-time ratios against the same cycle's fp32 step, their
    median, and the median wall-time ratio."""
    at = {(x["stage_layers"], x["cycle"], x["backend"]): x for x in runs}
    out = []
    for n in sorted({x["stage_layers"] for x in runs}):
        cycles = sorted({x["cycle"] for x in runs if x["stage_layers"] == n})
        for b in SCHEMES[1:]:
            pairs = [(at[(n, c, b)], at[(n, c, "onnx")]) for c in cycles if (n, c, b) in at and (n, c, "onnx") in at]
            per = [q["cpu_s"] / f["cpu_s"] for q, f in pairs]
            if per:
                med = statistics.median(per)
                out.append({"stage_layers": n, "backend": b, "cpu_ratio_per_cycle": per, "cpu_ratio": med,
                            "wall_ratio": statistics.median(q["wall_s"] / f["wall_s"] for q, f in pairs),
                            "goal_met": med <= GOAL})
    return out


def markdown(doc: dict[str, Any]) -> str:
    meta, runs = doc["meta"], doc["runs"]
    lines = ["### Quantized frozen weights: step time against fp32, alternating steps (issue #24)", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; machine: {meta['machine']['cpu_model']}, "
             f"{meta['machine']['logical_cpus']} logical CPUs, load average {meta['load_average_start']} at the start, "
             f"{meta['load_average_end']} at the end; {meta['threads']} thread(s); batch {meta['batch']} x "
             f"{meta['seq']}, every position supervised; one process a stage with the three trainers, "
             f"{meta['warmup']} warm-up step(s) each, then {meta['cycles']} cycles of one step of each (order rotating).",
             ""]
    head = ["stage layers", "weights", "CPU s/step, median (range)", "vs fp32: median of per-cycle ratios",
            "per-cycle ratios, range", "wall vs fp32", "goal <= 1.10x"]
    rows = []
    ratio = {(x["stage_layers"], x["backend"]): x for x in doc["ratios"]}
    for n in meta["stages"]:
        for b in SCHEMES:
            cpu = [x["cpu_s"] for x in runs if x["stage_layers"] == n and x["backend"] == b]
            q = ratio.get((n, b))
            rows.append([n, {"onnx": "fp32"}.get(b, b.removeprefix("onnx-")),
                         f"{statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f})"] +
                        ([f"{q['cpu_ratio']:.3f}x", f"{min(q['cpu_ratio_per_cycle']):.2f}-"
                          f"{max(q['cpu_ratio_per_cycle']):.2f}", f"{q['wall_ratio']:.3f}x",
                          "met" if q["goal_met"] else "**not met**"] if q else ["", "", "", ""]))
    lines += [*md_table(head, rows), "", "JSON: `benchmarks/results/quantized-step-time.json` (every step)."]
    return "\n".join(lines)


def kernel_rows(rows: int = 6144, cols: int = 576, repeats: int = 40) -> list[dict[str, Any]]:
    """ns per dequantized value of each lowering (export/quant_graph.py) beside the blockwise DequantizeLinear."""
    import time

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge_runtime.backends.onnx_backend import session_options
    from export.quant import BLOCK, pack_int4
    from export.quant_graph import DOMAIN, lower_int4, lower_int8

    rng = np.random.default_rng(0)
    nb = cols // BLOCK
    scale16 = (rng.random((rows, nb)) * 0.01 + 0.001).astype(np.float16)
    min16 = (rng.random((rows, nb)) * -0.1).astype(np.float16)
    const = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731

    def timed(nodes: list[Any], inits: list[Any], lower: Any = None) -> tuple[float, np.ndarray]:
        graph = helper.make_graph(nodes, "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
        model.ir_version = 10
        if lower:
            lower(model)
        session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"],
                                       disabled_optimizers=["ConstantFolding"])  # as devft-edge opens a graph
        (out,) = session.run(None, {})
        best = float("inf")
        for _ in range(repeats):  # the fastest run: the kernel, less the machine's other jobs
            start = time.perf_counter()
            session.run(None, {})
            best = min(best, time.perf_counter() - start)
        return best / (rows * cols) * 1e9, out

    def blockwise(codes: Any, with_min: bool) -> list[Any]:
        nodes = [helper.make_node("Cast", ["t.qscale"], ["s"], to=TensorProto.FLOAT),
                 helper.make_node("DequantizeLinear", [codes, "s"], ["d" if with_min else "y"], axis=1,
                                  block_size=BLOCK)]
        if with_min:
            nodes += [helper.make_node("Cast", ["t.qmin"], ["m"], to=TensorProto.FLOAT),
                      helper.make_node("Reshape", ["d", "blocks"], ["d3"]),
                      helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]), helper.make_node("Add", ["d3", "m3"], ["p"]),
                      helper.make_node("Reshape", ["p", "flat"], ["y"])]
        return nodes

    shapes = [const("blocks", [rows, nb, BLOCK]), const("flat", [rows, cols]), const("axis", [2])]
    scales = [numpy_helper.from_array(scale16, "t.qscale"), numpy_helper.from_array(min16, "t.qmin")]
    u8 = numpy_helper.from_array(rng.integers(0, 256, (rows, cols), dtype=np.uint8), "t.qweight")
    values4 = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
    u4 = onnx.TensorProto(name="t.qweight", data_type=TensorProto.UINT4, dims=[rows, cols],  # ONNX's packing
                          raw_data=(values4[:, 0::2] | (values4[:, 1::2] << 4)).tobytes())
    q4_1 = numpy_helper.from_array(pack_int4(values4), "t.qweight")  # the stored int4-asym codes
    i8 = numpy_helper.from_array(rng.integers(-127, 128, (rows, cols), dtype=np.int8), "t.qweight")
    placeholder = [helper.make_node("DequantizeInt4", ["t.qweight", "t.qscale", "t.qmin"], ["y"], domain=DOMAIN)]
    traced_int8 = [helper.make_node("Cast", ["t.qweight"], ["f"], to=TensorProto.FLOAT),
                   helper.make_node("Reshape", ["f", "blocks"], ["fb"]),
                   helper.make_node("Cast", ["t.qscale"], ["s"], to=TensorProto.FLOAT),
                   helper.make_node("Unsqueeze", ["s", "axis"], ["su"]), helper.make_node("Mul", ["fb", "su"], ["wb"]),
                   helper.make_node("Reshape", ["wb", "flat"], ["y"])]
    cases = [("int8-sym (the table)", blockwise("t.qweight", False), traced_int8, i8, i8, lower_int8),
             ("int8-asym", blockwise("t.qweight", True), placeholder, u8, u8, lower_int4),
             ("int4-asym", blockwise("t.qweight", True), placeholder, u4, q4_1, lower_int4)]
    out = []
    for name, old_nodes, new_nodes, old_codes, new_codes, lower in cases:
        old_ns, old = timed(old_nodes, [old_codes] + scales + shapes)
        new_ns, new = timed(new_nodes, [new_codes] + scales + shapes, lower)
        out.append({"scheme": name, "blockwise_ns_per_value": old_ns, "lowered_ns_per_value": new_ns,
                    "same_bits": bool(old.tobytes() == new.tobytes()), "shape": [rows, cols], "repeats": repeats})
    return out


def kernels_markdown(doc: dict[str, Any]) -> str:
    lines = ["### Dequantization kernels: the lowering against the blockwise DequantizeLinear (issue #24)", "",
             f"Command: `python -m benchmarks.quantized_step_time --kernels`; {doc['date']}; one thread, a "
             f"{doc['rows'][0]['shape'][0]} x {doc['rows'][0]['shape'][1]} weight (SmolLM2's LM head slice), "
             f"the fastest of {doc['rows'][0]['repeats']} runs each, onnxruntime {doc['onnxruntime']} with devft-edge's session "
             "options (no CPU arena, no constant folding).", ""]
    rows = [[r["scheme"], f"{r['blockwise_ns_per_value']:.2f}", f"{r['lowered_ns_per_value']:.2f}",
             f"{r['lowered_ns_per_value'] / r['blockwise_ns_per_value']:.2f}x", "yes" if r["same_bits"] else "**no**"]
            for r in doc["rows"]]
    lines += md_table(["codes", "blockwise DequantizeLinear (+ Add of minimums) ns/value", "as exported now ns/value",
                       "ratio", "same bits"], rows)
    lines += ["", "int4-asym's blockwise column reads the same values as ONNX's UINT4 tensor (two a byte, low nibble "
              "first), the one as exported reads them as stored, in Q4_1's nibble order (BitwiseAnd, BitShift and a "
              "Concat split a block's 16 bytes into its 32 values before the per-row DequantizeLinear)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantized_step_time", description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="4,30", help="comma-separated stage sizes of SmolLM2-135M (default 4,30)")
    p.add_argument("--cycles", type=int, default=8, help="alternating cycles, one step of each scheme (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each trainer first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--summary", action="store_true", help="only rewrite RESULTS.md's block from the JSON")
    p.add_argument("--kernels", action="store_true", help="only the dequantization kernels (seconds)")
    p.add_argument("--markdown", type=Path, default=RESULTS_MD)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # internal: the artifact dirs to alternate
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.cycles, args.warmup, args.threads)))
        return 0
    if args.kernels:
        import onnxruntime

        doc = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "onnxruntime": onnxruntime.__version__,
               "rows": kernel_rows()}
        write_atomic(KERNELS_OUT, json.dumps(doc, indent=1) + "\n")
        section = kernels_markdown(doc)
        replace_block("quantized-step-time-kernels", section, args.markdown)
        print(section)
        return 0 if all(r["same_bits"] for r in doc["rows"]) else 1
    if args.summary:
        doc = json.loads(OUT.read_text())
    else:
        if args.cycles < 1 or args.warmup < 0:
            p.error(f"need --cycles >= 1 and --warmup >= 0, got {args.cycles} and {args.warmup}")
        stages = [int(s) for s in args.stages.split(",") if s]
        envs = Envs(None)
        device.prepare(stages, list(SCHEMES), [], envs)
        start = load_average()
        runs = measure_alternating(stages, args.cycles, args.warmup, args.threads, envs)
        from edge_runtime.bench import DEFAULT_SEQ, machine_info

        doc = {"meta": {"command": "python -m benchmarks.quantized_step_time " + " ".join(
                            sys.argv[1:] if argv is None else argv),
                        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
                        "load_average_start": start, "load_average_end": load_average(), "stages": stages,
                        "cycles": args.cycles, "warmup": args.warmup, "threads": args.threads,
                        "batch": device.BATCH, "seq": DEFAULT_SEQ},
               "runs": runs, "ratios": ratios(runs)}
        write_atomic(OUT, json.dumps(doc, indent=1) + "\n")
    section = markdown(doc)
    replace_block("quantized-step-time", section, args.markdown)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
