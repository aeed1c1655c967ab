"""The last step of every export: stamp the manifest with where the submodel comes from, then swap the
finished directory into place.

Artifacts are built in a temporary directory beside `out_dir` (`staging`) and renamed into place at the
end (`publish`), so a device, a cache or a coordinator never sees a half-written artifact directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.manifest import Manifest, write_manifest
from export.common import copy_tokenizer, json_config


@contextlib.contextmanager
def staging(out_dir: str | os.PathLike[str]) -> Iterator[tuple[Path, Path]]:
    """(resolved out_dir, an empty build directory beside it); the build directory is gone afterwards."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield out, build
    finally:
        shutil.rmtree(build, ignore_errors=True)


@dataclass(frozen=True)
class StageInfo:
    """Where a stage submodel comes from, as every exporter records it in the manifest: the run, the stage,
    the layer groups and anchors it was built from, and the tokenizer (copied beside the artifacts)."""

    run_id: str = ""
    stage: int = 0
    groups: Sequence[Sequence[int]] | None = None
    anchors: Sequence[int] | None = None
    tokenizer_dir: str | os.PathLike[str] | None = None
    chat_template: str | None = None  # None: the one saved with the tokenizer, if any


def publish_stage(build: Path, out_dir: Path, manifest: Manifest, peft_model: Any, info: StageInfo) -> Path:
    """Record `info`, the model config and the tokenizer in `manifest`, then publish."""
    if info.tokenizer_dir is not None:
        saved_template = copy_tokenizer(info.tokenizer_dir, build)
        manifest.chat_template = info.chat_template if info.chat_template is not None else saved_template
        manifest.tokenizer_file = "tokenizer.json"
    manifest.run_id, manifest.stage = info.run_id, info.stage
    manifest.model_config = json_config(peft_model)
    manifest.groups = [list(map(int, g)) for g in info.groups or []]
    manifest.anchors = [int(a) for a in info.anchors or []]
    return publish(build, out_dir, manifest)


def publish_from_template(template: Path, graphs: Iterable[str], write_weights: Callable[[Path], None],
                          out_dir: str | os.PathLike[str], manifest: Manifest, peft_model: Any, info: StageInfo) -> Path:
    """A stage directory from a cached export of the same shape: copy its `graphs`, let `write_weights(build)`
    write this submodel's tensors beside them, record `info` and publish."""
    with staging(out_dir) as (out, build):
        for name in graphs:
            shutil.copyfile(template / name, build / name)
        write_weights(build)
        return publish_stage(build, out, manifest, peft_model, info)


def publish(build: Path, out_dir: Path, manifest: Manifest) -> Path:
    write_manifest(build, manifest)
    build.chmod(0o755)  # mkdtemp makes it private; the broker may serve it as another user
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(build, out_dir)
    return out_dir
