"""Export cost and on-device training cost of SmolLM2-135M stage submodels, per backend, side by side.

For each stage depth (default 4, 8, 16, 30 layers) of a fresh first-stage submodel:
- export (the portable `onnx` format; legacy ORT Training; ExecuTorch for the depths in
  --executorch-layers): wall time, whether the shape's traced graph was already cached, peak RSS
  of the exporting process, and artifact bytes (graph vs frozen weights vs LoRA);
- training: one child process per backend that loads only what a device would load (the pickled
  PEFT submodel for eager torch, the artifact directory otherwise) and runs warm-up + measured
  steps at batch x seq: median step time, RSS after load, peak RSS (VmHWM), and for `onnx` also
  the peak once the eval session has been opened after training.

Eager torch runs the server trainer's step (server_sdk/engine/trainer.py `token_losses`: the LM head on
answer positions only, AdamW on LoRA), the same head the portable graph has. Every measurement runs
in its own child process, so peak RSS is that process's alone, and the backends of one depth run
back to back, so their ratios are taken under the same machine load.

Environments: the portable format needs plain onnxruntime, legacy ORT Training needs
onnxruntime-training (which owns the same `onnxruntime` module), so the ORT children run with
another interpreter: --legacy-python (default .venv-legacy/bin/python, made by
scripts/setup_legacy.sh), with PYTHONPATH set to this repository only. Without it the ort column is
skipped with a note. Every other child runs with this interpreter and this process's PYTHONPATH.

    python -m benchmarks.export                              # 4/8/16/30 layers
    python -m benchmarks.export --layers 4 --steps 3         # quick look
    python -m benchmarks.export --onnx-sweep                 # session options of the onnx backend, 4 layers
Writes benchmarks/results/export.json (export-onnx-sweep.json) and a plot, prints a table, and
replaces the `export` (`export-onnx-sweep`) block of benchmarks/RESULTS.md. Artifacts stay under
benchmarks/results/cache/export/ (git-ignored) and onnx/ORT graphs in the template cache
(DEVFT_CACHE), so a rerun exports in seconds and only measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .results_md import RESULTS_MD, replace_block, save_figure

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "cache" / "export"
MODEL = "smollm2-135m"
BACKENDS = ("torch", "onnx", "ort", "executorch")
ARTIFACT_BACKENDS = ("onnx", "ort", "executorch")
DEFAULT_LEGACY_PYTHON = REPO / ".venv-legacy" / "bin" / "python"
SUBMODEL = "submodel.pt"
# the portable backend's session options compared by --onnx-sweep (SessionChoices fields, relative to its
# defaults; "eval_at_load" opens the eval session before training instead of on first use)
SWEEP = [
    {},  # the current defaults (edge_runtime/backends/onnx_backend.py DEFAULT_SESSION)
    {"order": "default"},
    {"folding": True, "prepacking": True, "order": "default"},  # the defaults before this sweep
    {"arena": "on", "folding": True, "prepacking": True, "order": "default"},  # onnxruntime's own defaults
    {"folding": True},
    {"prepacking": True},
    {"optimization": "extended"},
    {"optimization": "basic"},
    {"optimization": "disabled"},
    {"arena": "on"},
    {"arena": "exact"},
    {"eval_at_load": True},
    {"eval_at_load": True, "folding": True, "prepacking": True, "order": "default"},
]


def _peak_rss_mb() -> float:
    from edge_runtime.bench import process_peak_rss_bytes

    return (process_peak_rss_bytes() or 0) / 2**20  # VmHWM: this process's own, not an inherited ru_maxrss


def _rss_mb() -> float:
    from edge_runtime.telemetry.memory import current_rss_bytes

    return current_rss_bytes() / 2**20


# --- children -------------------------------------------------------------------------------------


def stage_source(layers: int) -> Any:
    """The fresh first-stage submodel of `layers` layers, built through the run's strategy."""
    from server_sdk.cli.export import fresh_stage_source

    return fresh_stage_source(MODEL, layers)


def artifact_bytes(out: Path, frozen: int, trainable: int) -> dict[str, int]:
    """Bytes of an artifact directory by kind: graphs, frozen weights, LoRA, the rest."""
    files = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    graph = sum(v for k, v in files.items() if k.endswith(".onnx"))
    lora = files.get("lora.safetensors", 0)
    meta = files.get("tokenizer.json", 0) + files.get("manifest.json", 0)
    weights = sum(files.values()) - graph - lora - meta
    if not graph:  # ExecuTorch: weights live inside the .pte programs; what is beyond the raw tensors is program
        graph = max(0, weights - frozen - trainable)  # its dedup of equal constants can make this < 0: reported 0
        weights -= graph
    return {"total": sum(files.values()), "graph": graph, "weights": weights, "lora": lora, "manifest_tokenizer": meta,
            "frozen_weights_in_model": frozen, "trainable_in_model": trainable}


def child_export(backend: str, layers: int, out: Path, seq: int, batch: int, threads: int) -> dict[str, Any]:
    """Build the submodel, export it with `backend` (graph templates cached by shape); pickle it for torch."""
    import torch

    import export
    from server_sdk.engine.model import cache_root

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    source = stage_source(layers)
    build_s = time.perf_counter() - t0
    model = source.peft_model
    if not (out.parent / SUBMODEL).exists():
        tmp = out.parent / (SUBMODEL + ".tmp")
        torch.save(model, tmp)
        tmp.replace(out.parent / SUBMODEL)
    templates = cache_root()
    before = {p.name for p in (templates / f"{backend}-templates").glob("*")}
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    export.export_artifacts(backend, model, out,
                            export.StageInfo(run_id=source.run_id, stage=source.stage, groups=source.groups,
                                             anchors=source.anchors),
                            seq_len=seq, max_batch=batch, optimizer="adamw",
                            template_root=None if backend == "executorch" else templates)
    export_s = time.perf_counter() - t0
    traced = backend == "executorch" or {p.name for p in (templates / f"{backend}-templates").glob("*")} != before
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() * p.element_size() for p in unique if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in unique if not p.requires_grad)
    return {"backend": backend, "layers": layers, "build_s": build_s, "export_s": export_s, "traced": traced,
            "rss_before_export_mb": rss_before, "peak_rss_mb": _peak_rss_mb(),
            "bytes": artifact_bytes(out, frozen, trainable)}


def make_batch(vocab: int, batch: int, seq: int, prompt_fraction: float) -> tuple[Any, Any]:
    """Random tokens; the first `prompt_fraction` of each row is prompt (label -100), the rest answer."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    labels = ids.copy()
    labels[:, : int(seq * prompt_fraction)] = -100
    return ids, labels


class TorchStep:
    """devft's simulated client step (server_sdk.engine.trainer): token_losses (answer-only LM head), AdamW on LoRA.

    The eager torch reference of this benchmark and of benchmarks/device.py; `pickled` loads the submodel
    this module's children train, `saved` the base + adapter directories device.py writes."""

    def __init__(self, model: Any, lr: float = 1e-4):
        import torch

        from server_sdk.engine.trainer import token_losses

        self.torch, self.token_losses = torch, token_losses
        self.model = model
        self.vocab = self.model.get_base_model().config.vocab_size
        params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.model.train()

    @classmethod
    def pickled(cls, submodel: Path, threads: int, lr: float = 1e-4) -> TorchStep:
        import torch

        torch.set_num_threads(threads)
        return cls(torch.load(submodel, weights_only=False), lr)

    @classmethod
    def saved(cls, model_dir: Path, threads: int | None, lr: float = 1e-4) -> TorchStep:
        """From `model_dir`/base (a transformers model) and `model_dir`/adapter (its PEFT LoRA)."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        base = AutoModelForCausalLM.from_pretrained(model_dir / "base", dtype=torch.float32, attn_implementation="eager")
        return cls(PeftModel.from_pretrained(base, model_dir / "adapter", is_trainable=True), lr)

    def train_step(self, ids: Any, labels: Any) -> float:
        loss = self.token_losses(self.model, self.torch.from_numpy(ids), self.torch.from_numpy(labels))[0].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def child_train(backend: str, stage_dir: Path, batch: int, seq: int, warmup: int, steps: int, threads: int,
                prompt_fraction: float, options: dict[str, Any]) -> dict[str, Any]:
    """Load what a device would load, run warm-up + measured steps; report median step time and RSS."""
    rss_start = _rss_mb()
    t0 = time.perf_counter()
    trainer: Any
    if backend == "torch":
        trainer = TorchStep.pickled(stage_dir / SUBMODEL, threads)
        vocab = trainer.vocab
    else:
        from edge_runtime.manifest import load_manifest

        art = stage_dir / backend
        vocab = load_manifest(art, verify_hashes=False).model_config["vocab_size"]
        if backend == "onnx":
            from edge_runtime.backends.onnx_backend import OnnxTrainer, SessionChoices

            choices = {k: v for k, v in options.items() if k != "eval_at_load"}
            trainer = OnnxTrainer(art, lr=1e-4, threads=threads, session=SessionChoices(**choices))
        else:
            from edge_runtime.backends import open_trainer

            trainer = open_trainer(backend, art, lr=1e-4, threads=threads)
    ids, labels = make_batch(vocab, batch, seq, prompt_fraction)
    if options.get("eval_at_load"):
        trainer.eval_loss(ids, labels)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    losses, times, cpu_times = [], [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(trainer.train_step(ids, labels))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    out = {"backend": backend, "options": options, "step_s": statistics.median(times), "step_times": times,
           "cpu_step_s": statistics.median(cpu_times), "cpu_step_times": cpu_times,
           "losses": losses, "load_s": load_s, "rss_start_mb": rss_start, "rss_after_load_mb": rss_loaded,
           "rss_after_steps_mb": _rss_mb(), "peak_rss_mb": _peak_rss_mb(),
           "supervised_positions": int((labels[:, 1:] != -100).sum()), "torch_imported": "torch" in sys.modules}
    if backend == "onnx":  # what opening the eval session (a device's held-out loss) adds on top
        out["eval_loss"] = trainer.eval_loss(ids, labels)
        out["peak_rss_with_eval_mb"] = _peak_rss_mb()
        out["session"] = trainer.session_choices.label()
    return out


# --- parent --------------------------------------------------------------------------------------


class Envs:
    """Which interpreter and PYTHONPATH a child of each backend runs with."""

    def __init__(self, legacy_python: Path | None):
        self.legacy_python = legacy_python
        self.legacy_problem = None
        if legacy_python is None:
            self.legacy_problem = (f"no legacy ORT Training environment ({DEFAULT_LEGACY_PYTHON.relative_to(REPO)} "
                                   "missing): run scripts/setup_legacy.sh or pass --legacy-python")
        elif not Path(legacy_python).exists():
            self.legacy_problem = f"--legacy-python {legacy_python} does not exist"

    def command(self, backend: str) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if backend == "ort":
            return [str(self.legacy_python)], {**env, "PYTHONPATH": str(REPO)}
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(REPO) not in paths:
            paths.append(str(REPO))
        return [sys.executable], {**env, "PYTHONPATH": os.pathsep.join(paths)}


def _child(envs: Envs, backend: str, args: list[str], timeout: float, nice: int) -> dict[str, Any]:
    python, env = envs.command(backend)
    cmd = (["nice", "-n", str(nice)] if nice else []) + python + ["-m", "benchmarks.export", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": " | ".join(lines[-2:])[:400] if lines else f"exit {proc.returncode}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    from edge_runtime.bench import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine()}


def versions(envs: Envs) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "onnxruntime", "executorch", "transformers", "peft", "onnx", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import onnxruntime

        out["onnxruntime (imported)"] = f"{onnxruntime.__version__} from {Path(onnxruntime.__file__).parent.parent}"
    except ImportError:
        pass
    if envs.legacy_problem is None:
        probe = "from importlib.metadata import version; print(version('onnxruntime-training'))"
        python, env = envs.command("ort")
        got = subprocess.run([*python, "-c", probe], capture_output=True, text=True, env=env)
        out["onnxruntime-training (legacy env)"] = got.stdout.strip() or got.stderr.strip()[-200:]
    return out


def _export(envs: Envs, backend: str, n: int, stage: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """One export child, or its recorded result when the artifacts are already there (a resumed run)."""
    record = stage / f"export-{backend}.json"
    if record.is_file() and (stage / backend / "manifest.json").is_file() and (stage / SUBMODEL).is_file():
        return {**json.loads(record.read_text()), "reused": True}
    print(f"[L{n}] export {backend} ...", flush=True)
    out = _child(envs, backend, ["export", backend, str(n), str(stage / backend), str(settings["seq"]),
                                 str(settings["batch"]), str(settings["threads"])], timeout=3600, nice=settings["nice"])
    if "error" not in out:
        record.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _train(envs: Envs, backend: str, stage: Path, settings: dict[str, Any], options: dict[str, Any] | None = None,
           ) -> dict[str, Any]:
    s = settings
    return _child(envs, backend, ["train", backend, str(stage), str(s["batch"]), str(s["seq"]), str(s["warmup"]),
                                  str(s["steps"]), str(s["threads"]), str(s["prompt_fraction"]),
                                  json.dumps(options or {})], timeout=1200, nice=0)


def run(layers: list[int], et_layers: list[int], settings: dict[str, Any], envs: Envs, work: Path) -> dict[str, Any]:
    rows = []
    for n in layers:
        stage = work / f"L{n}"
        stage.mkdir(parents=True, exist_ok=True)
        row: dict[str, Any] = {"layers": n, "export": {}, "train": {}, "load_average": {}}
        backends = ["onnx", "ort"] + (["executorch"] if n in et_layers else [])
        for b in backends:
            if b == "ort" and envs.legacy_problem:
                row["export"][b] = {"skipped": envs.legacy_problem}
                continue
            row["export"][b] = _export(envs, b, n, stage, settings)
        for b in ["torch"] + backends:
            e = row["export"].get(b, {})
            if b != "torch" and ("error" in e or "skipped" in e):
                row["train"][b] = {"skipped": e.get("skipped") or "export failed"}
                continue
            if b == "torch" and not (stage / SUBMODEL).is_file():
                row["train"][b] = {"skipped": "no pickled submodel (every export failed)"}
                continue
            print(f"[L{n}] train {b} ...", flush=True)
            row["load_average"][b] = load_average()
            row["train"][b] = _train(envs, b, stage, settings)
        row["ratios"] = ratios(row["train"])
        rows.append(row)
        print(table([row]), flush=True)
    return {"model": MODEL, **settings, "machine": machine(), "versions": versions(envs),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


def ratios(train: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each artifact backend against eager torch at the same depth: speed-up and peak-RSS ratio."""
    t = train.get("torch", {})
    out = {}
    for b in ARTIFACT_BACKENDS:
        o = train.get(b, {})
        if "step_s" in t and "step_s" in o:
            out[b] = {"speedup": t["step_s"] / o["step_s"], "speedup_cpu": t["cpu_step_s"] / o["cpu_step_s"],
                      "peak_rss_ratio": o["peak_rss_mb"] / t["peak_rss_mb"],
                      "rss_after_load_ratio": o["rss_after_load_mb"] / t["rss_after_load_mb"]}
    return out


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _mb(by: dict[str, int], key: str) -> str:
    return _f(by[key] / 1e6, ".1f") if key in by else "-"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per depth and backend, then the ratios to eager torch."""
    lines = ["| layers | backend | export s | traced | export peak RSS MiB | weights MB | graph MB | LoRA MB "
             "| step s (median) | CPU s/step | RSS after load MiB | peak RSS MiB | peak RSS with eval session MiB |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for b in BACKENDS:
            e, t = r["export"].get(b), r["train"].get(b)
            if e is None and t is None:
                continue
            e, t = e or {}, t or {}
            why = e.get("error") or e.get("skipped") or t.get("error") or t.get("skipped")
            if why and "step_s" not in t:
                lines.append(f"| {r['layers']} | {b} | not measured: {why} | | | | | | | | | | |")
                continue
            by = e.get("bytes", {})
            traced = "-" if not e else ("yes" if e.get("traced") else "no (cached)")
            lines.append(
                f"| {r['layers']} | {b} | {_f(e.get('export_s'), '.1f')} | {traced} | {_f(e.get('peak_rss_mb'), '.0f')} "
                f"| {_mb(by, 'weights')} | {_mb(by, 'graph')} | {_mb(by, 'lora')} | {_f(t.get('step_s'), '.3f')} "
                f"| {_f(t.get('cpu_step_s'), '.3f')} "
                f"| {_f(t.get('rss_after_load_mb'), '.0f')} | {_f(t.get('peak_rss_mb'), '.0f')} "
                f"| {_f(t.get('peak_rss_with_eval_mb'), '.0f')} |")
    lines += ["", "| layers | backend vs eager torch | speed-up (median wall step) | speed-up (median CPU s/step) "
              "| peak RSS ratio | RSS after load ratio |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        for b, v in r.get("ratios", {}).items():
            lines.append(f"| {r['layers']} | {b} | {v['speedup']:.2f}x | {v['speedup_cpu']:.2f}x | {v['peak_rss_ratio']:.2f}x "
                         f"| {v['rss_after_load_ratio']:.2f}x |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for b, marker in zip(BACKENDS, "os^d"):
        pts = [(r["layers"], r["train"][b]) for r in rows if "step_s" in r["train"].get(b, {})]
        if pts:
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1]["step_s"] for p in pts], marker=marker, label=b)
            axes[1].plot(xs, [p[1]["peak_rss_mb"] for p in pts], marker=marker, label=f"{b} peak")
            axes[1].plot(xs, [p[1]["rss_after_load_mb"] for p in pts], marker=marker, ls=":", label=f"{b} after load")
    axes[0].set(title=f"step time, batch {result['batch']} x {result['seq']}, {result['threads']} thread(s)",
                xlabel="submodel layers", ylabel="s")
    axes[1].set(title="RSS of the training process", xlabel="submodel layers", ylabel="MiB")
    labels, kinds = [], ("weights", "graph", "lora")
    stacks: dict[str, list[float]] = {k: [] for k in kinds}
    for r in rows:
        for b in ARTIFACT_BACKENDS:
            by = r["export"].get(b, {}).get("bytes")
            if by:
                labels.append(f"{r['layers']}\n{b[:4]}")
                for k in kinds:
                    stacks[k].append(by[k] / 1e6)
    bottom = [0.0] * len(labels)
    for k in kinds:
        axes[2].bar(labels, stacks[k], bottom=bottom, label=k)
        bottom = [a + b for a, b in zip(bottom, stacks[k])]
    axes[2].set(title="artifact bytes by kind", ylabel="MB")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, path, f"{result['model']} stage submodels on {result['machine']['cpu']} "
                f"({result['machine']['cores']} cores, shared: load {result.get('load_average_start')})")


def sweep(n: int, settings: dict[str, Any], envs: Envs, work: Path, variants: list[dict[str, Any]] | None = None,
          repeat: int = 1) -> dict[str, Any]:
    """The onnx backend under each session-option variant after an eager-torch run, `repeat` rounds, one depth."""
    stage = work / f"L{n}"
    stage.mkdir(parents=True, exist_ok=True)
    export_rec = _export(envs, "onnx", n, stage, settings)
    if "error" in export_rec:
        raise SystemExit(f"onnx export failed: {export_rec['error']}")
    runs = []
    for options in [*([None, *(SWEEP if variants is None else variants)] * repeat), None]:
        backend = "torch" if options is None else "onnx"
        print(f"[L{n}] {backend} {options or ''} ...", flush=True)
        load = load_average()
        res = _train(envs, backend, stage, settings, options)
        runs.append({"backend": backend, "options": options or {}, "load_average": load, **res})
        if "error" in res:
            print(f"  failed: {res['error']}", flush=True)
        else:
            print(f"  step {res['step_s']:.3f} s, after load {res['rss_after_load_mb']:.0f} MB, "
                  f"peak {res['peak_rss_mb']:.0f} MB", flush=True)
    return {"model": MODEL, "layers": n, **settings, "machine": machine(), "versions": versions(envs),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "export": export_rec, "runs": runs,
            "repeat": repeat}


def sweep_summary(result: dict[str, Any]) -> str:
    """Medians per variant over the repeated rounds, against the median eager-torch run."""
    ok = [r for r in result["runs"] if "step_s" in r]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault(json.dumps(r["options"], sort_keys=True) if r["backend"] == "onnx" else "torch", []).append(r)
    torch_runs = groups.pop("torch", [])
    if not torch_runs:
        return ""
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    t_wall, t_cpu, t_peak = med(torch_runs, "step_s"), med(torch_runs, "cpu_step_s"), med(torch_runs, "peak_rss_mb")
    lines = [f"Medians over {len(torch_runs)} eager-torch runs (wall {t_wall:.3f} s, CPU {t_cpu:.3f} s/step, peak "
             f"{t_peak:.0f} MiB) and each variant's runs:", "",
             "| session options | runs | speed-up, wall | speed-up, CPU | peak RSS / torch | RSS after load MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for rs in groups.values():
        what = rs[0].get("session", "") + (", eval session at load" if rs[0]["options"].get("eval_at_load") else "")
        lines.append(f"| {what} | {len(rs)} | {t_wall / med(rs, 'step_s'):.2f}x | {t_cpu / med(rs, 'cpu_step_s'):.2f}x "
                     f"| {med(rs, 'peak_rss_mb') / t_peak:.2f}x | {med(rs, 'rss_after_load_mb'):.0f} |")
    return "\n".join(lines)


def sweep_table(result: dict[str, Any]) -> str:
    torch_runs = [r for r in result["runs"] if r["backend"] == "torch" and "step_s" in r]
    t_step = statistics.mean(r["step_s"] for r in torch_runs) if torch_runs else None
    t_cpu = statistics.mean(r["cpu_step_s"] for r in torch_runs) if torch_runs else None
    t_peak = statistics.mean(r["peak_rss_mb"] for r in torch_runs) if torch_runs else None
    lines = ["| run | session options | step s (wall) | CPU s/step | speed-up vs torch (wall / CPU) "
             "| RSS after load MiB | peak RSS MiB | peak / torch | peak with eval session MiB | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(result["runs"], 1):
        if "step_s" not in r:
            lines.append(f"| {i} | {r['backend']} {r['options']} | failed: {r.get('error')} | | | | | | | |")
            continue
        what = "eager torch (token_losses)" if r["backend"] == "torch" else (
            r.get("session", "") + (", eval session at load" if r["options"].get("eval_at_load") else ""))
        speed = ("-" if r["backend"] == "torch" or not t_step else
                 f"{t_step / r['step_s']:.2f}x / {t_cpu / r['cpu_step_s']:.2f}x")
        peak = "-" if r["backend"] == "torch" or not t_peak else f"{r['peak_rss_mb'] / t_peak:.2f}x"
        lines.append(f"| {i} | {what} | {r['step_s']:.3f} | {r['cpu_step_s']:.3f} | {speed} | {r['rss_after_load_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {peak} | {_f(r.get('peak_rss_with_eval_mb'), '.0f')} | "
                     f"{' '.join(map(str, r['load_average']))} |")
    return "\n".join(lines)


def markdown(result: dict[str, Any], command: str) -> str:
    m, v = result["machine"], result["versions"]
    head = [f"Command: `{command}`  ",
            f"Date: {result['date']}; machine: {m['cpu']} ({m['machine']}, {m['cores']} logical CPUs), shared with "
            f"other jobs: load average {result.get('load_average_start')} at the start, per run in the JSON  ",
            f"Workload: batch {result['batch']} x seq {result['seq']}, the first {result['prompt_fraction']:.0%} of "
            f"each row masked as prompt; {result['warmup']} warm-up + {result['steps']} measured steps; "
            f"{result['threads']} thread(s) per process; one child process per measurement.  ",
            "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + "  "]
    return "\n".join(head)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        backend, layers, out, seq, batch, threads = argv[1:7]
        print(json.dumps(child_export(backend, int(layers), Path(out), int(seq), int(batch), int(threads))))
        return 0
    if argv and argv[0] == "train":
        backend, stage_dir, batch, seq, warmup, steps, threads, prompt_fraction, options = argv[1:10]
        print(json.dumps(child_train(backend, Path(stage_dir), int(batch), int(seq), int(warmup), int(steps),
                                     int(threads), float(prompt_fraction), json.loads(options))))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 30])
    p.add_argument("--executorch-layers", type=int, nargs="*", default=[4],
                   help="depths also exported and trained with ExecuTorch (its export takes minutes per 4 layers)")
    p.add_argument("--onnx-sweep", action="store_true",
                   help="instead: the onnx backend's session options (arena, optimisation level, folding, "
                        "prepacking, eval session) against eager torch at the first --layers depth")
    p.add_argument("--variants", type=json.loads,
                   help="with --onnx-sweep: a JSON list of SessionChoices overrides instead of the built-in list")
    p.add_argument("--repeat", type=int, default=1, help="with --onnx-sweep: rounds of torch + every variant")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt-fraction", type=float, default=0.5,
                   help="share of each row masked as prompt; the LM head runs on the rest (default 0.5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--legacy-python", type=Path,
                   default=DEFAULT_LEGACY_PYTHON if DEFAULT_LEGACY_PYTHON.exists() else None,
                   help="interpreter with onnxruntime-training for the ort column (default .venv-legacy/bin/python)")
    p.add_argument("--nice", type=int, default=10, help="niceness of export children (default 10)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--markdown", type=Path, default=RESULTS_MD, help="file whose generated block is replaced")
    p.add_argument("--work", type=Path, default=CACHE, help=f"artifacts and export records (default {CACHE})")
    args = p.parse_args(argv)
    if not 0 <= args.prompt_fraction < 1:
        p.error(f"--prompt-fraction must be in [0, 1), got {args.prompt_fraction}")
    envs = Envs(args.legacy_python)
    settings = {"batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
                "threads": args.threads, "prompt_fraction": args.prompt_fraction, "nice": args.nice}
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.export " + " ".join(argv)
    start_load = load_average()
    if args.onnx_sweep:
        result = {**sweep(args.layers[0], settings, envs, args.work, args.variants, args.repeat),
                  "load_average_start": start_load, "command": command}
        name = "export-onnx-sweep" if args.variants is None else "export-onnx-sweep-repeat"
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        body = markdown(result, command) + "\n\n" + sweep_table(result)
        if args.repeat > 1:
            body += "\n\n" + sweep_summary(result)
        replace_block(name, body, args.markdown)
        print(body)
        return 0
    result = {**run(args.layers, args.executorch_layers, settings, envs, args.work), "load_average_start": start_load,
              "command": command, "legacy": envs.legacy_problem or str(envs.legacy_python)}
    (args.out / "export.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "export.png")
    body = markdown(result, command) + "\n\n" + table(result["rows"])
    replace_block("export", body, args.markdown)
    print(body)
    print(f"wrote {args.out / 'export.json'} and {args.out / 'export.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
