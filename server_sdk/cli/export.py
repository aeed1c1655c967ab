"""`devft export`: turn a stage submodel into device artifacts (ORT or ExecuTorch).

The server builds the submodel (through the run's strategy) and export.stage writes and
verifies the artifacts; export/ never imports the server. Two sources of a submodel:
- a run directory (`--run runs/NAME --stage N`): the stage's plan from the run and the
  full LoRA at that stage's start, rebuilt by the run's strategy (`Strategy.build_submodel`);
- a base model (`--model smollm2-135m --layers K`): a fresh first-stage submodel of K
  layers, for benchmarks and smoke tests.

Stages are numbered from 0, as in report.json's `stage_plans`.

A run keeps every stage's plan and starting full LoRA in `runs/NAME/stages/` (a few MB
each), so any stage can be exported as devices received it; `--final` exports the last
stage (the full model) with the run's final adapter instead. Runs made before stage starts
were kept fall back to the checkpoint (the stage in progress) and the final adapter, and
asking them for an earlier stage is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from edge_runtime.manifest import BACKENDS, load_manifest
from export.options import GraphOptions
from export.stage import DEFAULT_MAX_BATCH, DEFAULT_SEQ_LEN, ExportError, StageSource, export_submodel
from server_sdk.config import RunConfig
from server_sdk.disk import cache_root


def run_stage_source(run_dir: str | os.PathLike[str], stage: int, final: bool = False) -> StageSource:
    """Rebuild stage `stage` of a run: its plan and the full LoRA at its start (see module docstring).

    final=True (last stage only): the full model with the run's final LoRA instead."""
    # the server's model code is loaded only when a command needs it, so `devft --help` stays quick
    from server_sdk.engine import checkpoint
    from server_sdk.engine.model import load_base_model
    from server_sdk.method.strategies import make_strategy
    from server_sdk.method.submodel import StagePlan, identity_plan

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ExportError(f"{run_dir} is not a devft run directory (no config.json); pass --run runs/<name>")
    cfg = RunConfig.of_run(run_dir)
    base = load_base_model(cfg.model)
    strategy = make_strategy(cfg)
    stages = strategy.stage_sizes(base.n_layers)
    last = len(stages) - 1
    if not 0 <= stage <= last:
        raise ExportError(f"run {run_dir} has stages 0..{last} ({stages} layers); got --stage {stage}")
    if final and stage != last:
        raise ExportError(f"--final exports the last stage (--stage {last}) with the final adapter; got --stage {stage}")
    kept = None if final else checkpoint.load_stage_start(run_dir, stage)
    loaded = checkpoint.load(run_dir)
    meta, tensors = loaded if loaded else ({}, {})
    current = meta.get("stage")
    if kept is not None:
        plan, full = StagePlan.from_dict(kept[0]), kept[1]
        note = f"stage {stage}: its plan and starting full LoRA kept in {run_dir / 'stages'}"
    elif current == stage and meta.get("plan") is not None:
        plan = StagePlan.from_dict(meta["plan"])
        full, note = tensors["full"], f"stage {stage} in progress: its plan and starting full LoRA from the checkpoint"
    elif stage == last and (current == len(stages) or (run_dir / "adapter").is_dir()):
        plan = identity_plan(base.n_layers, stage)
        full, note = _final_lora(run_dir, base, tensors if current == len(stages) else None)
    else:
        where = "the run has no checkpoint" if current is None else f"the checkpoint is at stage {current}"
        raise ExportError(
            f"run {run_dir}: the full LoRA at the start of stage {stage} is not kept ({where}); a run keeps only the "
            f"starting LoRA of the stage in progress and the final adapter, which goes with the last stage (--stage {last})"
        )
    sub, _ = strategy.build_submodel(base.model, full, plan)
    return StageSource(sub.float(), base.tokenizer, run_dir.resolve().name, stage, plan.groups, plan.anchors, note)


def _final_lora(run_dir: Path, base: Any, tensors: dict | None) -> tuple[dict, str]:
    if tensors is not None:
        return tensors["full"], "last stage (full model) with the final LoRA from the checkpoint"
    from peft import PeftModel

    from server_sdk.method.lora import read_lora
    from server_sdk.method.submodel import share_model

    model = PeftModel.from_pretrained(share_model(base.model), run_dir / "adapter")
    return read_lora(model), "last stage (full model) with the final adapter"


def fresh_stage_source(model: str, layers: int) -> StageSource:
    """The first-stage submodel of `layers` layers of a base model with fresh LoRA (B = 0), default config."""
    from server_sdk.engine.model import load_base_model
    from server_sdk.method.lora import attach_lora, read_lora
    from server_sdk.method.strategies import make_strategy
    from server_sdk.method.submodel import share_model

    cfg = RunConfig(model=model)
    base = load_base_model(model)
    if not 1 <= layers <= base.n_layers:
        raise ExportError(f"--layers must be in 1..{base.n_layers} for {base.name}, got {layers}")
    lora = read_lora(attach_lora(share_model(base.model), cfg.lora, seed=cfg.seed))
    strategy = make_strategy(cfg)
    plan, _ = strategy.configure_stage(0, base.model, lora, layers)
    sub, _ = strategy.build_submodel(base.model, lora, plan)
    return StageSource(sub.float(), base.tokenizer, f"fresh-{base.name}", 0, plan.groups, plan.anchors,
                       f"fresh {layers}-layer first-stage submodel of {base.name}")


def export_stage(run_dir: str | os.PathLike[str], stage: int, backend: str, out_dir: str | os.PathLike[str],
                 final: bool = False, **options: Any) -> Path:
    """Export stage `stage` of the run in `run_dir` in format `backend` (onnx, ort, executorch) into `out_dir`.

    options: seq_len, max_batch (ExecuTorch), optimizer (ORT). Returns the verified artifact dir.
    """
    options.setdefault("template_root", cache_root())
    return export_submodel(run_stage_source(run_dir, stage, final), backend, out_dir, **options)


def cmd_export(args: argparse.Namespace) -> int:
    if (args.run is None) == (args.model is None):
        raise ExportError("pass either --run RUN_DIR --stage N or --model NAME --layers K")
    if args.run is not None:
        if args.stage is None:
            raise ExportError("--run needs --stage N (stages count from 0, as in report.json)")
        source = run_stage_source(args.run, args.stage, args.final)
    else:
        if args.layers is None:
            raise ExportError("--model needs --layers K (the submodel depth)")
        source = fresh_stage_source(args.model, args.layers)
    out = export_submodel(source, args.backend, args.out, seq_len=args.seq_len, max_batch=args.max_batch,
                          optimizer=args.optimizer, template_root=cache_root(),
                          graph=GraphOptions(args.weights, args.recompute))
    manifest = load_manifest(out, verify_hashes=False)  # verified in export_submodel
    summary = {"out": str(out), "backend": manifest.backend, "run_id": manifest.run_id, "stage": manifest.stage,
               "layers": len(manifest.groups), "trainable_tensors": len(manifest.trainable), "source": source.note,
               "files": {k: v.size for k, v in manifest.files.items()}}
    print(json.dumps(summary, indent=1))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export a stage submodel as device training artifacts (onnx: portable, "
                       "plain onnxruntime; ort: legacy ONNX Runtime Training; executorch)")
    p.add_argument("--run", help="run directory, e.g. runs/default (with --stage)")
    p.add_argument("--stage", type=int, help="stage index from 0, as in report.json's stage_plans")
    p.add_argument("--final", action="store_true",
                   help="with --run and the last stage: export the full model with the run's final adapter")
    p.add_argument("--model", help="instead of a run: a base model name or directory (with --layers)")
    p.add_argument("--layers", type=int, help="with --model: depth of the fresh first-stage submodel")
    p.add_argument("--backend", choices=BACKENDS, default="onnx",
                   help="artifact format (default onnx: runs on plain onnxruntime on x86_64, aarch64, Android, iOS)")
    p.add_argument("--out", required=True, help="artifact directory to write (replaced if it exists)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"tokens per example, the run's seq_len (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"ExecuTorch only: largest batch; memory is planned for it (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="ORT only: optimizer graph (ExecuTorch always uses the runtime's SGD)")
    p.add_argument("--weights", choices=("fp32", "int8", "int4"), default="fp32",
                   help="onnx only: frozen weights stored as fp32, or int8/int4 with a scale and minimum per 32 inputs "
                        "(LoRA and optimiser stay fp32; docs/export.md)")
    p.add_argument("--recompute", action="store_true",
                   help="onnx only: the training graph recomputes each decoder layer's activations in its backward "
                        "(less memory, about a forward more time; docs/export.md)")
    p.set_defaults(func=_guarded)


def _guarded(args: argparse.Namespace) -> int:
    try:
        return cmd_export(args)
    except ExportError as err:
        print(f"devft: error: {err}", file=sys.stderr)
        return 2
