"""The JavaScript device (web/) against the contract's test vectors and in a real fleet.

The vectors run through the JS sampler, optimisers, frames, artifact ids and the tiny graph on
onnxruntime-node (bit for bit: same x86_64 numerics as devft-edge) and on onnxruntime-web's WASM
build (within 1e-5). Needs `scripts/setup.sh` (Node.js and `npm ci` in web/).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"

needs_web = pytest.mark.skipif(shutil.which("node") is None or not (WEB / "node_modules").is_dir(),
                               reason="the web device needs Node.js and web/node_modules: run scripts/setup.sh")


@needs_web
@pytest.mark.parametrize("engine", ["node", "web"])
def test_js_device_reproduces_the_test_vectors(engine):
    out = subprocess.run(["node", "test/vectors.mjs", "--engine", engine], cwd=WEB, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"all checks passed ({engine})" in out.stdout
    if engine == "node":  # bit for bit where the vectors' runtime numerics are ours
        assert "train_step gradients bit for bit" in out.stdout and "delta bit for bit" in out.stdout
