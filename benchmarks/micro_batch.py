"""Micro-batches give the whole batch's loss and gradients, to float32 rounding: measured per micro-batch size.

    python -m benchmarks.micro_batch [ARTIFACT_DIR ...]

For each portable (`onnx`) artifact directory (default: the contract's tiny model, docs/test-vectors/tiny,
and the SmolLM2-135M 4-layer stages benchmarks.device exported, fp32/int8/int4, where present) one batch of 4
rows of random tokens with prompts of different lengths masked (-100), so the micro-batches carry different
numbers of supervised positions and their weights n_i / N differ: the loss and every LoRA gradient from the
whole batch at once, then from micro-batches of 1, 2 and 3 rows (docs/device-client.md section 4,
"Micro-batches, exactly"); printed: |loss difference|, the largest |gradient difference| over all LoRA
tensors and the largest |gradient| (the scale). The table goes into benchmarks/RESULTS.md (generated block).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edge_runtime.backends import open_trainer
from edge_runtime.batching import IGNORE_INDEX
from edge_runtime.manifest import load_manifest

from .device import stage_dir
from .results_md import RESULTS_MD, replace_block

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "docs" / "test-vectors" / "tiny"
ROWS = 4


def batch(vocab: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ROWS rows of random ids; row r's first (r + 1) * seq / (ROWS + 2) positions are prompt (-100)."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=(ROWS, seq), dtype=np.int64)
    labels = ids.copy()
    for r in range(ROWS):
        labels[r, : (r + 1) * seq // (ROWS + 2)] = IGNORE_INDEX
    return ids, labels


def compare(art: Path) -> list[dict]:
    man = load_manifest(art, verify_hashes=False)
    ids, labels = batch(int(man.model_config["vocab_size"]), man.seq_len)
    loss, grads = open_trainer("onnx", art, lr=1e-3, threads=1).loss_and_grads(ids, labels)
    scale = max(float(np.abs(g).max()) for g in grads.values())
    rows = []
    for micro in (1, 2, 3):
        mloss, mgrads = open_trainer("onnx", art, lr=1e-3, threads=1, micro_batch=micro).loss_and_grads(ids, labels)
        rows.append({"artifact": art, "layers": man.model_config["num_hidden_layers"], "weights": man.weights,
                     "seq": man.seq_len, "micro": micro, "loss": loss, "loss_diff": abs(mloss - loss),
                     "grad_diff": max(float(np.abs(mgrads[k] - g).max()) for k, g in grads.items()),
                     "grad_scale": scale})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | weights | batch x seq | micro-batch | loss | abs loss diff | max abs grad diff | max abs grad |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = "tiny (test vectors)" if Path(r["artifact"]).resolve() == TINY else f"SmolLM2-135M {r['layers']} layers"
        lines.append(f"| {name} | {r['weights']} | {ROWS} x {r['seq']} | {r['micro']} | {r['loss']:.6f} | "
                     f"{r['loss_diff']:.2g} | {r['grad_diff']:.2g} | {r['grad_scale']:.2g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = stage_dir(4)  # benchmarks.device's SmolLM2-135M 4-layer stage
    arts = [Path(a) for a in argv] or [TINY] + [stage / b for b in ("onnx", "onnx-int8", "onnx-int4")
                                               if (stage / b / "manifest.json").exists()]
    rows = [r for art in arts for r in compare(art)]
    section = ("Micro-batches against the whole batch (`python -m benchmarks.micro_batch`): one batch of 4 rows, "
               "prompts of different lengths masked, so each micro-batch has its own share of the supervised "
               "positions; onnxruntime, 1 thread.\n\n" + table(rows))
    if not argv:
        replace_block("micro-batch-equality", section, RESULTS_MD)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
