"""Do two runs agree on everything but measurements? For refactors that must not change behaviour (issue #25).

    python scripts/compare_runs.py RUN_A RUN_B      # exit 0: same adapters, checkpoints, stage LoRA, data, losses

Tensors (the adapter, the checkpoint, each stage's LoRA) must match byte for byte; report.json and the
checkpoint's meta.json must match in every value except measurements: times, CPU seconds, memory (a device's
offered RAM, its free memory at start, too), energy,
bytes on the wire (an update's header carries its telemetry, so its size varies), the fleet's event log, and
artifact ids (each stage's manifest names its run).
"""

import json
import math
import re
import sys
from pathlib import Path

from safetensors.numpy import load_file

MEASURED = re.compile(r"(second|_s$|_s\b|time|cpu|rss|energy|carbon|bytes|tokens_per_s|process|started_unix|"
                      r"^events$|^adapter$|latency|^artifact_id$|^ram_mb$)")


def values(x, path=""):
    """Leaves of a JSON value as (path, value), measurements left out."""
    if isinstance(x, dict):
        for k, v in x.items():
            if not MEASURED.search(k):
                yield from values(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from values(v, f"{path}[{i}]")
    else:
        yield path, x


def same_value(x, y) -> bool:
    """Equal, or both NaN (a round whose clients' loss was NaN in both runs is the same round)."""
    return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))


def main(a: Path, b: Path) -> int:
    same = True
    tensors = ["adapter/adapter_model.safetensors", "checkpoint/state.safetensors",
               *sorted(str(p.relative_to(a)) for p in (a / "stages").glob("*.safetensors"))]
    for rel in tensors:
        ta, tb = load_file(a / rel), load_file(b / rel)
        ok = ta.keys() == tb.keys() and all(ta[k].tobytes() == tb[k].tobytes() for k in ta)
        same &= ok
        print(f"{'same' if ok else 'DIFFERENT'}  {rel} ({len(ta)} tensors, byte for byte)")
    for rel in ["report.json", "checkpoint/meta.json"]:
        va, vb = dict(values(json.loads((a / rel).read_text()))), dict(values(json.loads((b / rel).read_text())))
        diff = sorted(k for k in va.keys() | vb.keys() if not same_value(va.get(k), vb.get(k)))
        same &= not diff
        print(f"{'same' if not diff else 'DIFFERENT'}  {rel} ({len(va)} values; measurements left out)")
        for k in diff[:10]:
            print(f"    {k}: {va.get(k)!r} vs {vb.get(k)!r}")
    for p in sorted((a / "data").glob("*")):
        ok = p.read_bytes() == (b / "data" / p.name).read_bytes()
        same &= ok
        print(f"{'same' if ok else 'DIFFERENT'}  data/{p.name}")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
