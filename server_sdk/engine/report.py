"""A run's report.json for people: the summary `devft run` prints, learning curves with stage
boundaries, and the layer groups per stage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

N_GROUP_COLOURS = 40  # tab20 + tab20b: distinct colours for up to 40 groups in a stage


def group_colours() -> ListedColormap:
    """One colour per group index, so no two groups of a stage look alike (tab20's colours, then
    tab20b's). Used with vmin=-0.5, vmax=N_GROUP_COLOURS-0.5: group i gets colour i exactly;
    without vmin/vmax imshow rescales each figure's range and neighbouring groups share colours."""
    return ListedColormap(list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("tab20b").colors))


def _compute_text(recs: list[dict]) -> str:
    """Client compute summed over clients and rounds, wall and CPU labelled (a bare `573 s` read as either);
    both are timings, which vary from run to run where the losses of a seeded run do not."""
    wall = sum(sum(r["client_seconds"]) for r in recs)
    cpus = [c for r in recs for c in (r.get("client_cpu_seconds") or [None] * len(r["client_seconds"]))]
    cpu = f", {sum(cpus):.0f} s CPU" if cpus and None not in cpus else ""
    return f"client compute {wall:.0f} s wall{cpu} (summed over clients; timings vary from run to run)"


def summary_text(report: dict, run_dir: Path) -> str:
    """What `devft run` and `devft serve` print at the end: before/after, per-task accuracy, traffic."""
    b, a = report["before"], report["after"]
    acc = lambda r: "n/a" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}%"  # noqa: E731
    recs = [r for r in report["records"] if r["stage"] >= 0]
    up = sum(r["bytes_up"] for r in recs)
    down = sum(r["bytes_down"] for r in recs)
    lines = [f"run {run_dir} ({report['strategy']}, stages {report['stages']})",
             f"{'':14}{'eval loss':>10}{'accuracy':>10}",
             f"{'base model':14}{b['eval_loss']:>10.4f}{acc(b):>10}",
             f"{'fine-tuned':14}{a['eval_loss']:>10.4f}{acc(a):>10}",
             "per task accuracy (before -> after): " + ", ".join(
                 f"{t} {100 * b['per_task'][t].get('accuracy', 0):.0f}->{100 * v.get('accuracy', 0):.0f}%"
                 for t, v in (a["per_task"] or {}).items()),
             f"LoRA traffic: {down / 1e6:.1f} MB down, {up / 1e6:.1f} MB up; {_compute_text(recs)}",
             f"report: {run_dir / 'report.json'}, plots: curves.png, groups.png, adapter: {run_dir / 'adapter'}"]
    moved = [e for e in report.get("stage_transfer", [])[:-1] if e["loss_change"] is not None]
    if moved:  # what the small stages taught the full model (issue #12's metric)
        lines.insert(-1, "full-model eval loss change per small stage: " + ", ".join(
            f"{e['layers']} layers {e['loss_change']:+.3f} for {e['client_cpu_seconds']:.0f} client CPU s" for e in moved))
    return "\n".join(lines)


def plot_curves(report: dict, path: Path) -> None:
    recs = [r for r in report["records"] if r["eval_loss"] is not None]
    rounds = [r["round"] for r in recs]
    cum_bytes, total = {}, 0
    for r in report["records"]:
        total += r["bytes_down"] + r["bytes_up"]
        cum_bytes[r["round"]] = total
    mb = [cum_bytes[r["round"]] / 1e6 for r in recs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    has_acc = [i for i, r in enumerate(recs) if r.get("accuracy") is not None]
    for col, (x, label) in enumerate([(rounds, "round"), (mb, "LoRA traffic so far (MB, up + down)")]):
        axes[0, col].plot(x, [r["eval_loss"] for r in recs], marker="o")
        axes[0, col].set_ylabel("held-out eval loss")
        if has_acc:
            axes[1, col].plot([x[i] for i in has_acc], [100 * recs[i]["accuracy"] for i in has_acc], marker="o",
                              color="tab:green")
        axes[1, col].set_ylabel("exact-match accuracy (%)")
        axes[1, col].set_xlabel(label)
    boundaries = [r["round"] for r in report["records"] if r["stage"] >= 0 and r["stage_round"] == 0]
    for ax in axes[:, 0]:
        for b in boundaries:
            ax.axvline(b - 0.5, color="grey", ls=":", lw=1)
    stages = report.get("stages", [])
    fig.suptitle(f"{report['strategy']} on {report['model']['name']}: stages {stages} (dotted = stage start)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_groups(report: dict, path: Path) -> None:
    plans = report["stage_plans"]
    n = report["model"]["n_layers"]
    sim = next((p["similarity"] for p in plans if p.get("similarity") is not None), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    if sim is not None:
        s = np.array(sim)
        off = s[~np.eye(len(s), dtype=bool)]
        im = axes[0].imshow(s, cmap="viridis", vmin=float(off.min()), vmax=float(off.max()))
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        axes[0].set_title("layer cosine similarity (stage 1 input, diagonal clipped)")
        axes[0].set_xlabel("layer")
        axes[0].set_ylabel("layer")
    grid = np.full((len(plans), n), np.nan)
    for si, p in enumerate(plans):
        for gi, group in enumerate(p["groups"]):
            grid[si, group] = gi % N_GROUP_COLOURS
    axes[1].imshow(grid, aspect="auto", cmap=group_colours(), vmin=-0.5, vmax=N_GROUP_COLOURS - 0.5,
                   interpolation="nearest")
    for si, p in enumerate(plans):
        for a in p["anchors"]:
            axes[1].plot(a, si, "k*", ms=6)
    axes[1].set_yticks(range(len(plans)), [f"stage {p['stage'] + 1}: {p['n_layers']} layers" for p in plans])
    axes[1].set_xlabel("full-model layer (colour = group, * = anchor)")
    axes[1].set_title("layer groups per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
