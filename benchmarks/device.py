"""What one local training step of each DEVFT stage costs a device: memory, time, energy.

    python -m benchmarks.device            # stages 4, 8, 16, 30 x every available backend (~20 min)
    python -m benchmarks.device --quick    # stages 4 and 30, fewer steps
    python -m benchmarks.device --model smollm2-1.7b-shape --stages 4,24 --backends onnx-int4 --batch 1
                                           # a 1.7B-class shape, random weights (own results file and block)

For each stage submodel of SmolLM2-135M and each backend (the portable `onnx` format on plain
onnxruntime, legacy ONNX Runtime Training, ExecuTorch when its exporter and device backend are
installed -- by default for the 4-layer stage only, because its export takes minutes per stage --,
and the eager torch reference, which is what devft's simulated clients run) one measurement runs
in its own process, so a row's peak memory is that backend's alone: edge_runtime/bench.py for the
artifact backends (the same code `devft-edge bench` runs on a board), `--worker-torch` here for
torch. Legacy ORT Training owns the same `onnxruntime` module as plain onnxruntime, so its export
and measurement run with --legacy-python (default .venv-legacy/bin/python, scripts/setup_legacy.sh)
and PYTHONPATH set to this repository only; without one its rows say so.

Submodels are built as DEVFT stage 1 builds them (the DevFT strategy's configure_stage with the
default RunConfig: deconfliction grouping, medoid anchors, differential fusion, seed 0) on the
base model with freshly initialised LoRA (r=8 on q,k,v,o,gate,up,down). The 30-layer stage is
the full model (identity plan). Cost depends on the number of layers, not on which layers were
grouped. Batch 4 x seq 128 of random tokens with every position supervised (the LM head runs
over all 4 x 127 positions; --prompt-fraction masks a prompt, and the LM head of torch and onnx then
runs on the answer positions only), AdamW for onnx, ORT and torch, lr 1e-4, threads = logical CPUs.

Artifacts and submodels are cached under benchmarks/results/cache/device/ (git-ignored), and the
onnx and ORT graphs per shape under DEVFT_CACHE's templates, so a rerun only measures. Results:
benchmarks/results/device.json (rows in the format of edge_runtime.bench), benchmarks/results/device.png,
and the generated section of benchmarks/RESULTS.md (other sections of that file are kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_runtime.bench import DEFAULT_BATCH, DEFAULT_SEQ, append_rows, machine_info, measure, summary_line
from edge_runtime.telemetry import DEVICE_PROFILES
from export.memory import (  # the one floor model (the fleet samples by it)
    activation_bytes,
    lora_bytes_of,
    lora_state_copies,
    weight_bytes_of,
)
from export.options import GraphOptions

from .export import DEFAULT_LEGACY_PYTHON, Envs, TorchStep, load_average
from .results_md import RESULTS_MD, replace_block, save_figure

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = RESULTS / "cache" / "device"
MARKDOWN = RESULTS_MD
MODEL = "smollm2-135m"  # --model: a name load_base_model knows, a local Hugging Face directory, or a SHAPES name
BATCH = DEFAULT_BATCH  # --batch: rows per measured step (the artifacts do not depend on it)
# randomly initialised models of a real model's configuration: memory and step time depend on shapes, not values.
# Each stage is a fresh random model of that depth (what a DEVFT stage of it costs), without loading the full model.
SHAPES = {"smollm2-1.7b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                                     tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                     rope_theta=130000.0)}
STAGES, QUICK_STAGES = (4, 8, 16, 30), (4, 30)
BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-int4", "onnx-recompute", "onnx-int8-recompute", "onnx-int4-recompute",
            "ort", "executorch")
# variants of the portable format (export/options.py): frozen weights as stored (export --weights, export/quant.py),
# whether the training graph recomputes each layer's activations in its backward (export --recompute)
VARIANTS = {"onnx": GraphOptions(), "onnx-int8": GraphOptions("int8"), "onnx-int4": GraphOptions("int4"),
            "onnx-recompute": GraphOptions(recompute=True), "onnx-int8-recompute": GraphOptions("int8", True),
            "onnx-int4-recompute": GraphOptions("int4", True)}
ARTIFACT_BACKENDS = (*VARIANTS, "ort", "executorch")
LR = 1e-4
CACHE_VERSION = 7  # bump when the submodel recipe or export settings change (4: the head slices chained; 5: quantized
# graphs: dequantizations deferred to their use, the table's int8 as DequantizeLinear; 6: a byte a value dequantized
# one block a row, the head slice's two products share one dequantization; 7: int4 in Q4_1's nibble order, split by
# bit operations and dequantized one block a row)


# --------------------------------------------------------------------------- preparation (server side)


def executorch_unavailable() -> str | None:
    """Why the ExecuTorch rows cannot be measured here, or None when they can."""
    missing = [m for m in ("executorch", "export.executorch", "edge_runtime.backends.executorch_backend")
               if _find_spec(m) is None]
    if missing:
        return f"not installed in this environment: {', '.join(missing)}"
    return None


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def model_slug() -> str:
    """MODEL as a cache directory name (a path: its last part and a hash of the whole)."""
    if MODEL in SHAPES or "/" not in MODEL:
        return MODEL
    import hashlib

    return f"{Path(MODEL).name}-{hashlib.sha256(str(Path(MODEL).resolve()).encode()).hexdigest()[:8]}"


def results_suffix() -> str:
    """'' for SmolLM2-135M at the default batch (benchmarks/results/device.json, RESULTS.md's `device` block), else
    -MODEL-bBATCH: another model's or batch's rows get their own file and block instead of replacing these."""
    return "" if (MODEL, BATCH) == ("smollm2-135m", DEFAULT_BATCH) else f"-{model_slug()}-b{BATCH}"


def stage_dir(n_layers: int) -> Path:
    return CACHE / f"{model_slug()}-L{n_layers}-b{DEFAULT_BATCH}-s{DEFAULT_SEQ}-v{CACHE_VERSION}"


def model_stages(quick: bool) -> list[int]:
    """The stage depths of MODEL's DEVFT plan (default RunConfig): all, or the first and the full model."""
    from server_sdk.config import RunConfig
    from server_sdk.method.strategies import make_strategy

    if MODEL in SHAPES:
        n = SHAPES[MODEL]["num_hidden_layers"]
    elif MODEL == "smollm2-135m":
        n = 30
    else:
        n = int(json.loads((Path(MODEL) / "config.json").read_text())["num_hidden_layers"])
    stages = make_strategy(RunConfig()).stage_sizes(n)
    return [stages[0], stages[-1]] if quick and len(stages) > 1 else stages


def prepare(stages: list[int], backends: list[str], et_stages: list[int], envs: Envs) -> dict[int, dict[str, Any]]:
    """Build each stage submodel once and export it for every artifact backend; reuse the cache.

    The legacy ORT export runs in a child with the legacy interpreter (its onnxruntime-training)."""
    wanted = {n: [b for b in backends if b != "executorch" or n in et_stages] for n in stages}
    todo = {n: [b for b in bs if b != "ort"] for n, bs in wanted.items() if not _prepared(n, [b for b in bs if b != "ort"])}
    if todo:
        _build(todo)
    legacy = [n for n, bs in wanted.items() if "ort" in bs and not _prepared(n, ["ort"])]
    if legacy:
        python, env = envs.command("ort")
        cmd = python + ["-m", "benchmarks.device", "--model", MODEL, "--worker-export-ort", ",".join(map(str, legacy))]
        proc = subprocess.run(cmd, env=env, cwd=ROOT.parent, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            print(f"ORT export failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    infos = {n: json.loads((stage_dir(n) / "stage.json").read_text()) for n in stages}
    for n, info in infos.items():
        info["config"] = json.loads((stage_dir(n) / "torch" / "base" / "config.json").read_text())
    return infos


def stored_weight_bytes(artifact_dir: Path) -> int:
    """Bytes of the frozen weights as an artifact directory stores them (its weights/ files)."""
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    return sum(int(f["size"]) for name, f in manifest["files"].items() if name.startswith("weights/"))


def _prepared(n: int, backends: list[str]) -> bool:
    d = stage_dir(n)
    need = ["stage.json", "torch/base/config.json", "torch/adapter/adapter_config.json"]
    need += [f"{b}/manifest.json" for b in backends if b != "torch"]
    return all((d / f).exists() for f in need) and ("torch" not in backends or _has_torch_weights(d))


def _has_torch_weights(d: Path) -> bool:
    return any((d / "torch" / "base").glob("*.safetensors"))


def _build(todo: dict[int, list[str]]) -> None:
    import torch
    from tqdm import tqdm

    import export
    from server_sdk.config import RunConfig
    from server_sdk.engine.model import cache_root, load_base_model
    from server_sdk.method.lora import attach_lora, read_lora
    from server_sdk.method.strategies import make_strategy
    from server_sdk.method.submodel import share_model, submodel_bytes

    torch.manual_seed(0)
    cfg = RunConfig()
    if MODEL not in SHAPES:
        base = load_base_model(MODEL)
        strategy = make_strategy(cfg)
        full_lora = read_lora(attach_lora(share_model(base.model), cfg.lora, seed=cfg.seed))
    for n, backends in tqdm(todo.items(), desc="build + export stages", unit="stage"):
        d = stage_dir(n)
        if MODEL in SHAPES:
            plan, sub = _shape_stage(n, cfg)
        else:
            plan, _ = strategy.configure_stage(0, base.model, full_lora, min(n, base.n_layers))
            sub, _ = strategy.build_submodel(base.model, full_lora, plan)
        sub.float()
        for b in backends:
            if b in ARTIFACT_BACKENDS and not (d / b / "manifest.json").exists():
                export.export_artifacts("onnx" if b in VARIANTS else b, sub, d / b,
                                        export.StageInfo(stage=0, groups=plan.groups, anchors=plan.anchors),
                                        seq_len=DEFAULT_SEQ, max_batch=DEFAULT_BATCH,
                                        template_root=None if b == "executorch" else cache_root(),
                                        graph=VARIANTS.get(b, GraphOptions()))
        if not (d / "stage.json").exists():
            inner = sub.get_base_model()
            emb = inner.model.embed_tokens.weight
            shares = {
                "frozen_bytes": submodel_bytes(sub),
                "embedding_bytes": emb.numel() * emb.element_size(),  # tied with the LM head: held once
                "lora_bytes": sum(p.numel() * p.element_size() for p in sub.parameters() if p.requires_grad),
            }
            sub.save_pretrained(d / "torch" / "adapter")
            inner.config.save_pretrained(d / "torch" / "base")
            full_depth = SHAPES[MODEL]["num_hidden_layers"] if MODEL in SHAPES else base.n_layers
            stage = {"n_layers": n, "groups": plan.groups, "anchors": plan.anchors, **shares,
                     "grouping": "identity (full model)" if n >= full_depth else
                     f"random {n}-layer model of {MODEL}'s configuration" if MODEL in SHAPES else
                     f"DEVFT stage-1 plan: {cfg.grouping} grouping, {cfg.anchor} anchors, {cfg.fusion} fusion"}
            (d / "stage.json").write_text(json.dumps(stage, indent=1) + "\n")
        # the base weights for the torch rows: a 1.7B shape's are 6.8 GB to write (and a copy in RAM), so a
        # random shape writes them only when torch is measured
        if ("torch" in backends or MODEL not in SHAPES) and not _has_torch_weights(d):
            sub.unload().save_pretrained(d / "torch" / "base")


def _shape_stage(n: int, cfg: Any) -> tuple[Any, Any]:
    """(identity plan, PEFT model) of a random `n`-layer model of SHAPES[MODEL], LoRA as RunConfig's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from server_sdk.method.lora import attach_lora
    from server_sdk.method.submodel import identity_plan

    config = LlamaConfig(**{**SHAPES[MODEL], "num_hidden_layers": n}, use_cache=False, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return identity_plan(n, 0), attach_lora(model, cfg.lora, seed=cfg.seed)


# --------------------------------------------------------------------------- the memory floor

# What each backend's process holds before it loads a model: the interpreter and the runtime's libraries
BASELINE_IMPORTS = {"torch": "import torch, transformers, peft",
                    "onnx": "import numpy, safetensors, onnxruntime, edge_runtime.backends.onnx_backend"}


def runtime_baseline(backend: str, envs: Envs) -> int | None:
    """RSS (bytes) of a fresh process of `backend`'s interpreter after importing its runtime, nothing loaded."""
    imports = BASELINE_IMPORTS.get(backend.split("-")[0])
    if imports is None:
        return None
    python, env = envs.command(backend.split("-")[0])
    code = f"{imports}\nfrom edge_runtime.telemetry.memory import current_rss_bytes\nprint(current_rss_bytes())"
    proc = subprocess.run(python + ["-c", code], capture_output=True, text=True, env=env, cwd=ROOT.parent, timeout=300)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def floor(row: dict[str, Any], info: dict[str, Any], baseline: int | None) -> dict[str, int] | None:
    """The physical floor of a row's step, each part named: frozen weights once (as the row's artifacts store
    them), LoRA + gradients + AdamW's two moments, one batch's activations, the runtime's own baseline."""
    cfg = row.get("model") or {}
    if "error" in row or "unavailable" in row or not cfg.get("hidden_size") or baseline is None:
        return None
    full = {**info.get("config", {}), **{k: v for k, v in cfg.items() if v is not None}}
    if "num_attention_heads" not in full:
        return None
    rows = row.get("micro_batch") or row["batch"]  # a micro-batched step holds the activations of its rows
    supervised = min(row["supervised_positions"], rows * (row["seq"] - 1))
    act = activation_bytes(full, rows, row["seq"], supervised,
                           recompute=VARIANTS.get(row["backend"], GraphOptions()).recompute)
    head = act["head_full"] if row["backend"] == "torch" else act["head_chunked"]
    parts = {"weights": int(row.get("frozen_bytes") or info.get("frozen_bytes", 0)),
             "lora_state": lora_state_copies(row["batch"], rows) * int(info.get("lora_bytes", 0)),
             "activations": act["decoder"] + head,
             "runtime": baseline}
    return {**parts, "total": sum(parts.values())}


def predicted_floors(cfg: dict[str, Any], stages: list[int], baseline: int, batch: int = DEFAULT_BATCH,
                     seq: int = DEFAULT_SEQ) -> list[dict[str, Any]]:
    """The floor of each stage x weight scheme of the portable format, from shapes alone (no measurement):
    what a model too big to measure here needs at least, and which device profiles that leaves."""
    rows = []
    for n in stages:
        act = activation_bytes({**cfg, "num_hidden_layers": n}, batch, seq, batch * (seq - 1))
        for scheme in ("fp32", "int8", "int4"):
            parts = {"weights": weight_bytes_of(cfg, n, scheme), "lora_state": 4 * lora_bytes_of(cfg, n),
                     "activations": act["decoder"] + act["head_chunked"], "runtime": baseline}
            total = sum(parts.values())
            rows.append({"stage_layers": n, "weights_scheme": scheme, "batch": batch, "seq": seq, **parts,
                         "total": total, "fits": [p for p, prof in DEVICE_PROFILES.items()
                                                  if total <= prof.usable_ram_bytes]})
    return rows


def floor_table(rows: list[dict[str, Any]]) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = ["| stage layers | weights | batch x seq | weights (MiB) | LoRA, grads, AdamW | activations | runtime | "
             "floor (MiB) | fits (floor <= usable RAM) |", "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['stage_layers']} | {r['weights_scheme']} | {r['batch']} x {r['seq']} | {mib(r['weights'])} | "
                     f"{mib(r['lora_state'])} | {mib(r['activations'])} | {mib(r['runtime'])} | {mib(r['total'])} | "
                     f"{', '.join(r['fits']) or 'none'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- eager torch worker


def torch_row(model_dir: Path, steps: int, warmup: int, threads: int | None, prompt_fraction: float = 0.0,
              ) -> dict[str, Any]:
    import torch
    import transformers

    config = json.loads((model_dir / "base" / "config.json").read_text())
    return measure(model_dir, backend="torch", steps=steps, warmup=warmup, threads=threads, lr=LR,
                   prompt_fraction=prompt_fraction, batch=BATCH,
                   make_trainer=lambda: TorchStep.saved(model_dir, threads, LR), model_config=config,
                   versions={"runtime": f"torch=={torch.__version__}", "transformers": transformers.__version__,
                             "attention": "eager (as devft's simulated clients)"})


# --------------------------------------------------------------------------- orchestration


def run_one(backend: str, n: int, steps: int, warmup: int, threads: int, envs: Envs,
            prompt_fraction: float = 0.0, micro_batch: int | None = None) -> dict[str, Any]:
    """One measurement in a fresh process; returns its row, or a row saying why it failed. `micro_batch`: rows
    per graph run of the portable format (edge_runtime.bench --micro-batch; None: the whole batch)."""
    d = stage_dir(n)
    python, env = envs.command(backend)
    if backend == "torch":
        cmd = python + ["-m", "benchmarks.device", "--worker-torch", str(d / "torch")]
    else:
        cmd = python + ["-m", "edge_runtime.bench", str(d / backend), "--backend", backend.split("-")[0], "--lr", str(LR)]
    cmd += ["--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads),
            "--prompt-fraction", str(prompt_fraction), "--batch", str(BATCH)]
    if micro_batch is not None:
        cmd += ["--micro-batch", str(micro_batch)]
    env = {**env, "OMP_NUM_THREADS": str(threads)}
    load = load_average()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT.parent, timeout=900)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"backend": backend, "stage_layers": n, "micro_batch": micro_batch,
                "error": " | ".join(tail) or f"exit {proc.returncode}"}
    row = {**json.loads(proc.stdout), "load_average_before": load, "backend": backend}
    if backend.startswith("onnx"):
        row["frozen_bytes"] = stored_weight_bytes(d / backend)
    return row


def carried_over(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the previous results file for (backend, stage) pairs this run did not measure, marked as such.

    A run over some stages or backends replaces only what it re-measures; the table says which rows are older."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    measured = {row_key(r) for r in rows}
    kept = []
    for r in old.get("rows", []):
        if row_key(r) in measured or "error" in r or "unavailable" in r:
            continue
        kept.append({**r, "carried_over_from": r.get("carried_over_from") or old.get("meta", {}).get("date", "?"),
                     "carried_over_threads": r.get("carried_over_threads") or r.get("threads")})
    return kept


def row_key(r: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(backend, stage layers, rows per graph run): a micro-batched row beside its whole-batch one."""
    return r.get("backend"), r.get("stage_layers"), micro_of(r)


def micro_of(r: dict[str, Any]) -> int | None:
    """The row's micro-batch when it is smaller than its batch, else None (a whole-batch row)."""
    m, batch = r.get("micro_batch"), r.get("batch")
    return m if m and batch and m < batch else None


def backend_label(r: dict[str, Any]) -> str:
    return r["backend"] + (f", micro-batch {micro_of(r)}" if micro_of(r) else "")


def micro_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each micro-batched row against the same run's whole-batch row of its backend and stage."""
    ok = [r for r in rows if "error" not in r and "unavailable" not in r and "carried_over_from" not in r]
    whole = {(r["backend"], r["stage_layers"]): r for r in ok if micro_of(r) is None}
    peak = lambda r: max(r["peak_rss_bytes"], r["process_peak_rss_bytes"] or 0)  # noqa: E731
    lines = []
    for r in sorted((r for r in ok if micro_of(r)), key=lambda r: (r["stage_layers"], r["backend"], micro_of(r))):
        w = whole.get((r["backend"], r["stage_layers"]))
        over = f", {peak(r) / r['floor']['total']:.2f}x its floor {r['floor']['total'] / 2**20:.0f} MiB" \
            if r.get("floor") else ""
        vs = (f" vs {peak(w) / 2**20:.0f} MiB for the whole batch (x{peak(r) / peak(w):.2f}); CPU time per step "
              f"x{r['cpu_s_per_step'] / w['cpu_s_per_step']:.2f}") if w else ""
        lines.append(f"- {r['stage_layers']} layers, {r['backend']}, micro-batch {micro_of(r)} of {r['batch']}: peak "
                     f"{peak(r) / 2**20:.0f} MiB{over}{vs}")
    return lines


def headline(rows: list[dict[str, Any]], stages_info: dict[int, dict[str, Any]]) -> dict[str, Any]:
    ok = {(r["backend"], r["stage_layers"]): r for r in rows
          if "error" not in r and "unavailable" not in r and "carried_over_from" not in r and micro_of(r) is None}
    peak = lambda r: max(r["peak_rss_bytes"], r["process_peak_rss_bytes"] or 0)  # noqa: E731
    p50 = lambda r: r["step_latency_s"]["p50"]  # noqa: E731
    out: dict[str, Any] = {"stage1_vs_full": {}, "vs_torch": {}, "fits": {}}
    stages = sorted({n for _, n in ok})
    first, full = (stages[0], stages[-1]) if stages else (None, None)
    if full is not None and not str(stages_info.get(full, {}).get("grouping", "")).startswith("identity"):
        full = None  # the largest stage measured is not the full model: no stage-1-vs-full ratio
    for b in BACKENDS:
        if full is not None and (b, first) in ok and (b, full) in ok and first != full:
            s, f = ok[(b, first)], ok[(b, full)]
            out["stage1_vs_full"][b] = {"stage": first, "full": full, "memory_ratio": peak(s) / peak(f),
                                        "time_ratio": p50(s) / p50(f),
                                        "cpu_time_ratio": s["cpu_s_per_step"] / f["cpu_s_per_step"]}
    for b in ARTIFACT_BACKENDS:
        for n in stages:
            if (b, n) not in ok or ("torch", n) not in ok:
                continue
            o, t = ok[(b, n)], ok[("torch", n)]
            speedup, mem = p50(t) / p50(o), peak(o) / peak(t)
            info = stages_info.get(n, {})
            out["vs_torch"].setdefault(b, {})[n] = {
                "speedup": speedup, "speedup_cpu_time": t["cpu_s_per_step"] / o["cpu_s_per_step"], "memory_ratio": mem,
                "rss_after_load_ratio": (o["rss_after_load_bytes"] / t["rss_after_load_bytes"]
                                         if o.get("rss_after_load_bytes") and t.get("rss_after_load_bytes") else None),
                "speed_goal_met": speedup >= 1.5, "memory_goal_met": mem <= 0.6,
                "frozen_mib": info.get("frozen_bytes", 0) / 2**20,
                "embedding_share_of_frozen": info["embedding_bytes"] / info["frozen_bytes"] if info.get("frozen_bytes") else None,
            }
    for (b, n), r in sorted(ok.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        out["fits"].setdefault(str(n), {})[b] = [p for p, yes in r["fits"].items() if yes]
    return out


def floor_cell(r: dict[str, Any]) -> tuple[str, str]:
    """(floor in MiB with its parts, measured peak / floor) for the table."""
    f = r.get("floor")
    if not f:
        return "-", "-"
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    peak = max(r["peak_rss_bytes"], r["process_peak_rss_bytes"] or 0)
    return (f"{mib(f['total'])} = {mib(f['weights'])} w + {mib(f['lora_state'])} LoRA/AdamW + "
            f"{mib(f['activations'])} act + {mib(f['runtime'])} rt", f"{peak / f['total']:.2f}x")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage layers | backend | RSS after load (MiB) | peak RSS (MiB) | floor (MiB) = weights + LoRA, grads, "
             "AdamW + activations + runtime | peak / floor | p50 step (s) | p95 step (s) | CPU s/step "
             "| tokens/s | J/step (source) | fits | measured on |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["stage_layers"], BACKENDS.index(r["backend"]), -(micro_of(r) or 1e9))):
        if "error" in r or "unavailable" in r:
            why = r.get("unavailable") or f"failed: {r['error']}"
            lines.append(f"| {r['stage_layers']} | {backend_label(r)} | not available: {why} | | | | | | | | | | |")
            continue
        floor_mib, over = floor_cell(r)
        lat, mib = r["step_latency_s"], max(r["peak_rss_bytes"], r["process_peak_rss_bytes"] or 0) / 2**20
        fit = ", ".join(p for p, yes in r["fits"].items() if yes) or "none"
        on = r["measured_on"]
        when = (f"; earlier run {r['carried_over_from']}, {r['carried_over_threads']} threads"
                if "carried_over_from" in r else "")
        loaded = f"{r['rss_after_load_bytes'] / 2**20:.0f}" if r.get("rss_after_load_bytes") else "-"
        lines.append(f"| {r['stage_layers']} | {backend_label(r)} | {loaded} | {mib:.0f} | {floor_mib} | {over} | "
                     f"{lat['p50']:.3f} | {lat['p95']:.3f} | "
                     f"{r['cpu_s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['energy_j_per_step']:.2f} ({r['energy_source']}) | {fit} | "
                     f"{on['machine']}, {on['cpu_model']}, {on['logical_cpus']} CPUs{when} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and "unavailable" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for b in BACKENDS:
        rs = sorted((r for r in ok if r["backend"] == b and micro_of(r) is None), key=lambda r: r["stage_layers"])
        if not rs:
            continue
        x = [r["stage_layers"] for r in rs]
        axes[0].plot(x, [max(r["peak_rss_bytes"], r["process_peak_rss_bytes"] or 0) / 2**30 for r in rs], "o-", label=b)
        p50 = [r["step_latency_s"]["p50"] for r in rs]
        p95 = [r["step_latency_s"]["p95"] for r in rs]
        axes[1].errorbar(x, p50, yerr=[[0] * len(x), [b_ - a for a, b_ in zip(p50, p95)]], fmt="o-", capsize=3, label=b)
        axes[2].plot(x, [r["energy_j_per_step"] for r in rs], "o-", label=f"{b} ({rs[0]['energy_source']})")
    for name, prof in DEVICE_PROFILES.items():
        axes[0].axhline(prof.usable_ram_bytes / 2**30, ls=":", lw=1, color="grey")
        axes[0].annotate(name, (0.01, prof.usable_ram_bytes / 2**30), xycoords=("axes fraction", "data"), fontsize=7,
                         va="bottom", color="grey")
    axes[0].set_ylabel("peak RSS (GiB); dotted: device profiles' usable RAM")
    axes[1].set_ylabel("step latency (s), p50 with bar to p95")
    axes[2].set_ylabel("energy per step (J)")
    on = ok[0]["measured_on"] if ok else {"machine": "?", "cpu_model": "?"}
    for ax in axes:
        ax.set_xlabel("stage submodel layers")
        ax.legend(fontsize=8)
    save_figure(fig, path, f"{MODEL} stages, batch {BATCH} x seq {DEFAULT_SEQ}, measured on "
                f"{on['machine']} {on['cpu_model']} (not ARM timings)")


def _ratio_line(backend: str, n: int, v: dict[str, Any]) -> str:
    verdict = ("reached" if v["speed_goal_met"] and v["memory_goal_met"] else
               "not reached (" + ", ".join(g for g, met in (("speed", v["speed_goal_met"]), ("memory", v["memory_goal_met"]))
                                           if not met) + ")")
    share = v["embedding_share_of_frozen"]
    loaded = f", RSS after load x{v['rss_after_load_ratio']:.2f}" if v.get("rss_after_load_ratio") else ""
    return (f"- {n} layers, {backend} vs eager torch: {v['speedup']:.2f}x faster (wall p50; "
            f"{v['speedup_cpu_time']:.2f}x by CPU time per step), peak memory x{v['memory_ratio']:.2f}{loaded} "
            f"(goal >=1.5x and <=0.6x: {verdict}); frozen weights {v['frozen_mib']:.0f} MiB, of which the "
            f"tied embedding/LM head is {100 * share:.0f}%")


def markdown(doc: dict[str, Any]) -> str:
    meta, head = doc["meta"], doc["headline"]
    title = "## Device cost per training step" if not results_suffix() else f"### {MODEL}: device cost per training step"
    lines = [f"{title} (benchmarks/device.py)", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ",
             f"Machine: {meta['machine']['cpu_model']} ({meta['machine']['machine']}, "
             f"{meta['machine']['logical_cpus']} logical CPUs, shared with other jobs: load average "
             f"{meta.get('load_average_start')} at the start), {meta['threads']} threads  ",
             f"Workload: batch {meta['batch']} x seq {meta['seq']} random tokens, "
             + (f"the first {meta['prompt_fraction']:.0%} of each row masked as prompt; " if meta.get("prompt_fraction")
                else "all positions supervised; ") +
             f"{meta['warmup']} warm-up + {meta['steps']} timed steps, each measurement in its own process.  ",
             f"Submodels: {meta['submodels']}.", "",
             "**Rows measured on this x86_64 machine are not ARM timings.** Memory carries over to a board "
             "roughly (same fp32 weights and graphs; allocators differ); time and energy do not. Energy labelled "
             "`estimated:x86-laptop` is CPU seconds x 1.9 W per busy CPU, not a measurement. Add a board's row "
             "with `devft-edge bench ARTIFACT_DIR --out benchmarks/results/device.json` (edge_runtime/bench.py).",
             "", table(doc["rows"]), "", "### Headline ratios (same run, side by side)", ""]
    for b, v in head["stage1_vs_full"].items():
        lines.append(f"- {b}: stage-1 submodel ({v['stage']} layers) vs full ({v['full']}): peak memory x"
                     f"{v['memory_ratio']:.2f}, time per step x{v['time_ratio']:.2f} (wall p50), "
                     f"x{v['cpu_time_ratio']:.2f} (CPU time)")
    for b, per_stage in head["vs_torch"].items():
        for n, v in per_stage.items():
            lines.append(_ratio_line(b, n, v))
    lines += micro_lines(doc["rows"])
    lines += ["", "Which stage fits which device profile (measured peak RSS, the larger of training loop and "
              "process lifetime, against each profile's usable RAM):", ""]
    for n, per_backend in head["fits"].items():
        lines.append(f"- {n} layers: " + "; ".join(f"{b}: {', '.join(p) or 'none'}" for b, p in per_backend.items()))
    name = f"device{results_suffix()}"
    lines += ["", f"JSON: `benchmarks/results/{name}.json`; plot: `benchmarks/results/{name}.png`."]
    return "\n".join(lines)


def model_config() -> dict[str, Any]:
    if MODEL in SHAPES:
        return dict(SHAPES[MODEL])
    from server_sdk.engine.model import load_base_model

    return load_base_model(MODEL).model.config.to_dict()


def print_floors(stages: list[int], envs: Envs, markdown_path: Path) -> int:
    """--floor-only: the predicted floors of MODEL's stages, printed and kept in RESULTS.md's floor block."""
    cfg = model_config()
    baseline = runtime_baseline("onnx", envs) or 0
    for batch in (DEFAULT_BATCH, 1):
        section = (f"Predicted floor of the portable step, {MODEL} (`python -m benchmarks.device --model {MODEL} "
                   f"--floor-only`), batch {batch} x seq {DEFAULT_SEQ}, every position supervised; runtime = this "
                   f"machine's onnxruntime process after imports ({baseline / 2**20:.0f} MiB). Not measured.\n\n"
                   + floor_table(predicted_floors(cfg, stages, baseline, batch=batch)))
        replace_block(f"device-floor-{model_slug()}-b{batch}", section, markdown_path)
        print(section + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    global MODEL, BATCH
    p = argparse.ArgumentParser(prog="python -m benchmarks.device", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="stages 4 and 30, 1 warm-up + 3 timed steps")
    p.add_argument("--model", default=MODEL, help=f"smollm2-135m (default), {', '.join(SHAPES)} (random weights "
                   "of that configuration) or a local Hugging Face model directory")
    p.add_argument("--stages", help="comma-separated stage sizes (default: the model's DEVFT stages, 4,8,16,30)")
    p.add_argument("--backends", default="torch,onnx,ort,executorch",
                   help=f"subset of {','.join(BACKENDS)} (onnx-int8/-int4: the portable format with quantized weights; "
                        "-recompute: its graph recomputes each layer's activations in the backward)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"rows per step (default {DEFAULT_BATCH}); another model or batch than the default's "
                        "writes its own results file and RESULTS.md block (device-MODEL-bBATCH)")
    p.add_argument("--steps", type=int, help="timed steps (default 6; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps (default 1)")
    p.add_argument("--executorch-stages", default="4",
                   help="stages measured with ExecuTorch (default 4: its export takes >10 min a stage on 2 busy cores)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-fraction", type=float, default=0.0,
                   help="share of each row masked as prompt (default 0: every position supervised)")
    p.add_argument("--micro-batches", default="",
                   help="comma-separated rows per graph run measured beside the whole batch for the onnx backends "
                   f"(e.g. 1,2: gradients accumulated over micro-batches, docs/protocol.md); at most {DEFAULT_BATCH}")
    p.add_argument("--legacy-python", type=Path,
                   default=DEFAULT_LEGACY_PYTHON if DEFAULT_LEGACY_PYTHON.exists() else None,
                   help="interpreter with onnxruntime-training for the ort rows (default .venv-legacy/bin/python)")
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/device.json, or "
                   "device-MODEL-bBATCH.json for another model or batch)")
    p.add_argument("--markdown", type=Path, default=MARKDOWN, help="file whose generated section is replaced")
    p.add_argument("--floor-only", action="store_true",
                   help="print the predicted floor of every stage x fp32/int8/int4 (shapes only, nothing measured)")
    p.add_argument("--worker-torch", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-export-ort", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = args.steps or (3 if args.quick else 6)
    BATCH = args.batch
    warmup = args.warmup if args.warmup is not None else 1
    if args.worker_torch:
        print(json.dumps(torch_row(args.worker_torch, steps, warmup, args.threads, args.prompt_fraction)))
        return 0
    if args.worker_export_ort:  # in the legacy environment: onnxruntime-training exports the ORT artifacts
        _build({int(n): ["ort"] for n in args.worker_export_ort.split(",")})
        return 0
    MODEL = args.model
    args.out = args.out or RESULTS / f"device{results_suffix()}.json"
    envs = Envs(args.legacy_python)
    start_load = load_average()

    from tqdm import tqdm

    stages = [int(s) for s in args.stages.split(",")] if args.stages else model_stages(args.quick)
    if args.floor_only:
        return print_floors(stages, envs, args.markdown)
    wanted = [b for b in args.backends.split(",") if b]
    if unknown := sorted(set(wanted) - set(BACKENDS)):
        p.error(f"unknown backends {unknown}; choose from {BACKENDS}")
    et_reason = executorch_unavailable() if "executorch" in wanted else None
    backends = [b for b in wanted if not (b == "executorch" and et_reason) and not (b == "ort" and envs.legacy_problem)]
    et_stages = [int(s) for s in args.executorch_stages.split(",") if s]
    stages_info = prepare(stages, backends, et_stages, envs)
    baselines = {b: runtime_baseline(b, envs) for b in backends}
    rows: list[dict[str, Any]] = []
    # per stage side by side: drift on a shared machine hits every backend of a stage alike
    micros = sorted({int(m) for m in args.micro_batches.split(",") if m and int(m) < DEFAULT_BATCH})
    if any(m < 1 for m in micros):
        p.error(f"--micro-batches must be whole numbers in [1, {DEFAULT_BATCH}], got {args.micro_batches}")
    jobs = [(b, n, None) for n in stages for b in backends if b != "executorch" or n in et_stages]
    jobs = [j for b, n, _ in jobs for j in [(b, n, None)] + [(b, n, m) for m in micros if b.startswith("onnx")]]
    for b, n, m in tqdm(jobs, desc="measure", unit="run"):
        row = run_one(b, n, steps, warmup, args.threads, envs, args.prompt_fraction, m)
        row["floor"] = floor(row, stages_info[n], baselines.get(b))
        tqdm.write(summary_line(row) if "error" not in row else f"{b} {n} layers failed: {row['error']}")
        rows.append(row)
    if "ort" in wanted and envs.legacy_problem:
        rows += [{"backend": "ort", "stage_layers": n, "unavailable": envs.legacy_problem} for n in stages]
    if et_reason:
        rows += [{"backend": "executorch", "stage_layers": n, "unavailable": et_reason} for n in stages]
    elif "executorch" in backends:
        rows += [{"backend": "executorch", "stage_layers": n, "unavailable": "not measured in this run (export takes "
                  "minutes per stage here); add it with --executorch-stages"} for n in stages if n not in et_stages]
    doc = {
        "meta": {"command": "python -m benchmarks.device " + " ".join(sys.argv[1:] if argv is None else argv),
                 "load_average_start": start_load, "prompt_fraction": args.prompt_fraction,
                 "legacy": envs.legacy_problem or str(envs.legacy_python),
                 "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
                 "threads": args.threads, "steps": steps, "warmup": warmup, "batch": BATCH, "seq": DEFAULT_SEQ,
                 "submodels": f"a random model of {MODEL}'s configuration per stage depth (cost depends on shapes, "
                              "not values), identity plan" if MODEL in SHAPES else
                              "DEVFT stage-1 plan (DevFT.configure_stage, default RunConfig) for sub-full "
                              "sizes, identity plan for the full model", "stages": stages_info},
        "headline": headline(rows, stages_info),
        "rows": [],
    }
    rows += carried_over(args.out, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    append_rows(args.out, rows)
    plot(rows, args.out.with_suffix(".png"))
    section = markdown({**doc, "rows": rows})
    replace_block(f"device{results_suffix()}", section, args.markdown)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
