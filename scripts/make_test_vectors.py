"""Write docs/test-vectors/: the tiny artifact (exported with torch) and the JSON vectors.

    python scripts/make_test_vectors.py [--out docs/test-vectors] [--keep-artifact]

The artifact is a random 1-layer Llama (hidden 32, vocab 64, LoRA r=4 on q_proj and v_proj)
exported to the portable onnx format with seq_len 16: about 100 kB. With --keep-artifact only the
JSON vectors are recomputed from the artifact already there (what `python -m edge_runtime.vectors
write` does; no torch needed). Regenerating the artifact changes its graph bytes with the torch
and onnx versions, and so every vector that depends on it: commit them together.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def export_tiny(out: Path) -> None:
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from export import StageInfo
    from export.onnx import export_onnx_artifacts

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, vocab_size=64, intermediate_size=64,
                                         tie_word_embeddings=True, use_cache=False, bos_token_id=1, eos_token_id=2))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # nonzero, so lora_A has gradients too
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as templates:
        export_onnx_artifacts(peft, out, templates, StageInfo(run_id="vectors", stage=0, groups=[[0]], anchors=[0]),
                              seq_len=16)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "test-vectors"))
    p.add_argument("--keep-artifact", action="store_true", help="reuse the exported artifact; recompute the JSON only")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from edge_runtime import vectors

    if not args.keep_artifact:
        export_tiny(out / vectors.ARTIFACT)
    vectors.write(out)
    print("\n".join(vectors.check(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
