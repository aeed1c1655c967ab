"""Disk a run leaves behind, and `devft clean` to free it.

A fleet quickstart used to leave ~11 GB under runs/: every stage's ONNX Runtime artifacts
(twice: as exported and split into tensor files for the chunk server) and one full artifact
cache per device. Now the devices of a local fleet share one blob store (edge_runtime/
fetch.py), finished stages' artifacts are pruned when the next stage starts (unless
`--keep-artifacts`: FleetSettings.keep_artifacts), and `devft clean` frees the rest:

    runs/<name>/artifacts/             stage artifacts the coordinator served
    runs/<name>/fleet/devices/*/cache  each local device's artifact cache (hard links)
    runs/<name>/fleet/blobs/           the local devices' shared blob store
    DEVFT_CACHE/onnx-templates/        per-shape traced training graphs (--all; the next run traces again)
    DEVFT_CACHE/ort-templates/         the same for the legacy ort format (--all)
    DEVFT_CACHE/base-eval/             cached base-model evaluations (--all)

Reports, adapters, checkpoints, data shards, fleet credentials and the converted base model
are never touched: a cleaned run can still be reported on, evaluated and resumed.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where devft caches per machine: the converted model, export templates, base evaluations."""
    return Path(os.environ.get("DEVFT_CACHE", Path.home() / ".cache" / "devft"))


def disk_bytes(paths: Iterable[Path]) -> int:
    """Bytes on disk under `paths`, each hard-linked file counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in paths:
        if not root.exists():
            continue
        files = [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def stage_artifact_dirs(run_dir: Path, stage: int) -> list[Path]:
    """What the coordinator wrote for one stage (fleet.py: artifacts/stage<N> and its .tensors split)."""
    base = Path(run_dir) / "artifacts"
    return [base / f"stage{stage}", base / f"stage{stage}.tensors"]


def prune_finished_stages(run_dir: Path, current_stage: int) -> int:
    """Delete the artifacts of stages before `current_stage` (its devices have moved on); bytes freed.

    The fleet calls it once the new stage is being served, unless its settings keep them (--keep-artifacts:
    for `devft-edge bench` on a stage's files, say)."""
    dirs = [d for s in range(current_stage) for d in stage_artifact_dirs(run_dir, s) if d.exists()]
    freed = disk_bytes(dirs)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return freed


def cleanable(runs: list[Path], include_caches: bool) -> list[tuple[str, Path]]:
    """(what it is, path) for everything `devft clean` would delete."""
    from export import TEMPLATE_DIRS

    found: list[tuple[str, Path]] = []
    for run in runs:
        found += [("stage artifacts", run / "artifacts"), ("shared device blobs", run / "fleet" / "blobs")]
        found += [(f"device cache {d.name}", d / "cache") for d in sorted((run / "fleet" / "devices").glob("*"))]
    if include_caches:
        found += [(f"{fmt} export templates", cache_root() / folder) for fmt, folder in TEMPLATE_DIRS.items()]
        found += [("base-model evaluations", cache_root() / "base-eval")]
    return [(what, p) for what, p in found if p.exists()]


def _runs(args: argparse.Namespace) -> list[Path]:
    if args.run:
        runs = [Path(r) for r in args.run]
        for r in runs:
            if not (r / "config.json").exists():
                raise FileNotFoundError(f"{r} is not a devft run directory (no config.json); pass runs/<name>")
        return runs
    root = Path(args.runs_dir)
    return sorted(p for p in root.glob("*") if (p / "config.json").exists()) if root.is_dir() else []


def cache_hint(include_caches: bool) -> str | None:
    """What `--all` would free besides, when it was not asked for (the export templates are the bulk:
    about 1.3 GB after a SmolLM2 quickstart, next to its 0.5 GB converted model, which stays)."""
    if include_caches:
        return None
    caches = [p for _, p in cleanable([], include_caches=True)]
    size = disk_bytes(caches)
    if size < 1e6:
        return None
    return (f"{size / 1e6:>10.1f} MB  more under {cache_root()} (export templates, base-model evaluations): "
            "`devft clean --all` frees them too; later runs trace and evaluate again")


def cmd_clean(args: argparse.Namespace) -> int:
    items = cleanable(_runs(args), include_caches=args.all)
    hint = cache_hint(args.all)
    if not items:
        print("nothing to clean" + (f"\n{hint}" if hint else ""))
        return 0
    sizes = [disk_bytes([p]) for _, p in items]
    print("        MB  (device caches hard-link the shared blobs: the total counts each file once)")
    for (what, path), size in zip(items, sizes):
        print(f"{size / 1e6:>10.1f} MB  {what:<24} {path}")
    total = disk_bytes([p for _, p in items])  # hard links shared between items counted once
    if args.dry_run:
        print(f"{total / 1e6:>10.1f} MB  would be freed (dry run: nothing deleted)")
    else:
        for _, path in items:
            shutil.rmtree(path, ignore_errors=True)
        print(f"{total / 1e6:>10.1f} MB  freed")
    if hint:
        print(hint)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("clean", help="free the disk runs leave behind: stage artifacts and device caches",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="*", help="run directories (default: every run under --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where runs are (default: runs)")
    p.add_argument("--all", action="store_true", help="also the shared caches under DEVFT_CACHE: export templates "
                   "and base-model evaluations (the converted base model stays)")
    p.add_argument("--dry-run", action="store_true", help="list what would be freed, delete nothing")
    p.set_defaults(func=cmd_clean)
