"""The last step of every export: write the manifest and swap the finished directory into place.

Artifacts are built in a temporary directory beside `out_dir` and renamed into place at the
end, so a device, a cache or a coordinator never sees a half-written artifact directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from edge_runtime.manifest import Manifest, write_manifest


def publish(build: Path, out_dir: Path, manifest: Manifest) -> Path:
    write_manifest(build, manifest)
    build.chmod(0o755)  # mkdtemp makes it private; the broker may serve it as another user
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(build, out_dir)
    return out_dir
