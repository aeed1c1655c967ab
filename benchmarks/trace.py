"""How long a machine's first trace of each SmolLM2-135M stage shape takes (the portable onnx graph).

    python -m benchmarks.trace                 # 4, 8, 16, 30 layers
    python -m benchmarks.trace --layers 4 8

A stage's training graph depends only on its shape, so a machine traces each shape once
(`export.onnx.ensure_template`) and later stages and runs only restamp weights. Each depth is
traced from scratch into a fresh template directory, in its own child process with one torch
thread, from SmolLM2-135M's config with zero weights (server_sdk.engine.warm.shaped_submodel: the
shape the fleet's warm-up process traces). Reported per depth: CPU seconds of the child (what
a busy machine cannot hide) and wall seconds. Writes benchmarks/results/trace.json and the
`trace` block of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .results_md import RESULTS_MD, md_table, replace_block

RESULTS = Path(__file__).parent / "results"


def child(layers: int) -> dict:
    """Trace one depth into a fresh template directory; this process's CPU and wall seconds."""
    import torch

    from export.onnx import ensure_template
    from server_sdk.config import LoraSettings, RunConfig
    from server_sdk.engine.model import load_base_model
    from server_sdk.engine.warm import shaped_submodel
    from server_sdk.quiet import install

    install()
    torch.set_num_threads(1)
    cfg = RunConfig()
    config = load_base_model(cfg.model).model.config.to_dict()
    model = shaped_submodel(config, layers, LoraSettings())
    with tempfile.TemporaryDirectory() as root:
        c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        ensure_template(model, root, seq_len=cfg.seq_len)
        wall = time.perf_counter() - t0
        c1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"layers": layers, "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1),
            "wall_s": round(wall, 1), "seq_len": cfg.seq_len}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 30])
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    rows = []
    for n in args.layers:
        out = subprocess.run([sys.executable, "-m", "benchmarks.trace", "--child", str(n)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    (RESULTS / "trace.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    table = md_table(["layers", "CPU s", "wall s"], [[r["layers"], r["cpu_s"], r["wall_s"]] for r in rows])
    replace_block("trace", "### First trace of each stage shape (`python -m benchmarks.trace`)\n\n" + "\n".join(table) +
                  f"\nGenerated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", RESULTS_MD)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
