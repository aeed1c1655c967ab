"""`devft report RUN_DIR`: what local training cost each device, per stage, from a run's telemetry.

A run over a fleet stores, in every round record of report.json, ``telemetry: {device name:
TelemetryRecorder report}`` (edge_runtime/telemetry; runs before device names were keys used
the client index, and every report names its device in its own ``device`` field). This command folds those per-round
reports into one row per (device, stage): peak memory, step latency p50/p95, energy with its
source label and carbon, prints the table and writes three plots into the run directory:

    telemetry_energy.png    energy per step, per stage and device
    telemetry_memory.png    peak memory per stage and device, against each device profile's RAM
    telemetry_latency.png   step latency distribution per stage

Simulation runs train clients in-process and carry no telemetry; the command says so and
writes no plots. Torch-free: it reads JSON and draws with matplotlib.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.telemetry import DEVICE_PROFILES
from server_sdk.fleet.telemetry_intake import clean_telemetry

PLOTS = ("telemetry_energy.png", "telemetry_memory.png", "telemetry_latency.png")
MIB = 2**20


@dataclass
class DeviceStage:
    """One device's local training in one stage, over every round it took part in."""

    device: str
    stage: int
    layers: int
    rounds: int = 0
    steps: int = 0
    peak_rss_bytes: int = 0
    p50_s: list[float] = field(default_factory=list)  # one per round
    p95_s: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)  # every step, when the device sent them
    energy_j: float = 0.0
    energy_sources: list[str] = field(default_factory=list)
    carbon_g: float = 0.0
    device_profiles: list[str] = field(default_factory=list)
    fits: bool | None = None

    @property
    def energy_j_per_step(self) -> float | None:
        return self.energy_j / self.steps if self.steps else None

    def latency_p50_p95(self) -> tuple[float | None, float | None]:
        """Over all steps when the device sent every latency; else the median p50 and the worst p95 of its rounds."""
        if self.latencies_s:
            return float(np.percentile(self.latencies_s, 50)), float(np.percentile(self.latencies_s, 95))
        if not self.p50_s:
            return None, None
        return float(np.median(self.p50_s)), float(max(self.p95_s))

    def to_dict(self) -> dict[str, Any]:
        p50, p95 = self.latency_p50_p95()
        d = asdict(self)
        d.update(p50_s=p50, p95_s=p95, energy_j_per_step=self.energy_j_per_step, round_p50_s=self.p50_s)
        d.pop("latencies_s")
        return d


def device_stages(report: dict[str, Any]) -> list[DeviceStage]:
    """Fold each round's per-client telemetry into rows keyed by (device, stage)."""
    rows: dict[tuple[str, int], DeviceStage] = {}
    for rec in report.get("records", []):
        for key_name, raw in (rec.get("telemetry") or {}).items():
            # the coordinator's `device` (older runs keyed telemetry by client index), else the key
            device = str(raw.get("device") if isinstance(raw, dict) and isinstance(raw.get("device"), str) else key_name)
            tel, _ = clean_telemetry(raw)  # device-sent: reports written before the coordinator checked it
            key = (device, int(rec["stage"]))
            row = rows.setdefault(key, DeviceStage(str(device), int(rec["stage"]), int(rec.get("layers") or 0)))
            row.rounds += 1
            row.steps += int(tel.get("steps") or 0)
            row.peak_rss_bytes = max(row.peak_rss_bytes, int(tel.get("peak_rss_bytes") or 0))
            lat = tel.get("step_latency_s") or {}
            if lat.get("p50") is not None:
                row.p50_s.append(float(lat["p50"]))
                row.p95_s.append(float(lat["p95"]))
            row.latencies_s += [float(x) for x in lat.get("all") or []]
            row.energy_j += float(tel.get("energy_j") or 0.0)
            row.carbon_g += float(tel.get("carbon_g") or 0.0)
            for attr, value in (("energy_sources", tel.get("energy_source")), ("device_profiles", tel.get("device_profile"))):
                if value and value not in getattr(row, attr):
                    getattr(row, attr).append(value)
            if tel.get("fits_device_profile") is not None:
                row.fits = bool(tel["fits_device_profile"]) and row.fits is not False
    return sorted(rows.values(), key=lambda r: (r.stage, r.device))


def table(rows: list[DeviceStage]) -> str:
    head = (f"{'device':<12}{'profile':<22}{'stage':>6}{'layers':>7}{'rounds':>7}{'peak MiB':>10}{'p50 s':>9}"
            f"{'p95 s':>9}{'J/step':>9}{'J total':>10}  {'energy source':<26}{'CO2 g':>9}  fits")
    lines = [head, "-" * len(head)]
    for r in rows:
        p50, p95 = r.latency_p50_p95()
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        lines.append(
            f"{r.device:<12}{', '.join(r.device_profiles) or '-':<22}{r.stage + 1:>6}{r.layers:>7}{r.rounds:>7}"
            f"{r.peak_rss_bytes / MIB:>10.0f}{fmt(p50, '.4g'):>9}{fmt(p95, '.4g'):>9}{fmt(r.energy_j_per_step, '.3g'):>9}"
            f"{r.energy_j:>10.4g}  {', '.join(r.energy_sources) or 'n/a':<26}{r.carbon_g:>9.3g}  "
            f"{'n/a' if r.fits is None else ('yes' if r.fits else 'NO')}"
        )
    if any(not r.device_profiles for r in rows):
        lines.append('profile "-": the device declared no board (start it with DEVFT_DEVICE_PROFILE=<name>, see '
                     '`devft report --help`); fits "n/a": no board RAM to judge its peak memory against')
    labels = {s for r in rows for s in r.energy_sources}
    if any(s.startswith("estimated:") for s in labels):
        lines.append("energy labelled estimated:<model> is CPU time x a power model, not a measurement")
    return "\n".join(lines)


def fleet_table(fleet: dict[str, Any]) -> str:
    """One line per device of a fleet run: what it declared in its hello (platform, runtime, ram_mb: the memory it
    offers training) and which stages it trained, or why the coordinator refused it; then each stage's memory need."""
    head = f"{'device':<12}{'platform':<22}{'runtime':<34}{'RAM MiB':>8}  stages trained"
    lines = [head, "-" * len(head)]
    for name, d in sorted((fleet.get("devices") or {}).items()):
        stages = ", ".join(str(int(s) + 1) for s in d.get("stages") or []) or "none"
        ram = d.get("ram_mb")
        lines.append(f"{name:<12}{str(d.get('platform') or '-'):<22}{str(d.get('runtime') or '-'):<34}"
                     f"{'-' if ram is None else ram:>8}  {stages}"
                     + (f" (refused: {d['refused'][:160]})" if d.get("refused") else ""))
    needs = fleet.get("stages") or {}
    if needs:
        lines.append("memory need per stage (a device is sampled for a stage only if its RAM MiB is at least this): "
                     + "; ".join(f"stage {int(s) + 1} ({m.get('layers')} layers) {m.get('need_mb')} MiB, "
                                 f"{m.get('source')}{', ' + m['margin'] if m.get('margin') else ''}"
                                 for s, m in sorted(needs.items(), key=lambda kv: int(kv[0]))))
    lines.append('"-": the device declared none (an older runtime); it is sampled for every stage')
    return "\n".join(lines)


def plot(rows: list[DeviceStage], run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({(r.stage, r.layers) for r in rows})
    labels = [f"stage {s + 1}\n{n} layers" for s, n in stages]
    paths = [run_dir / name for name in PLOTS]
    _bar_plot(plt, rows, stages, labels, paths[0], "energy per local step (J)", lambda r: r.energy_j_per_step,
              "Energy per local training step, by stage and device", energy=True)
    _bar_plot(plt, rows, stages, labels, paths[1], "peak memory (GiB)", lambda r: r.peak_rss_bytes / 2**30,
              "Peak memory of local training, by stage and device", energy=False)
    _latency_plot(plt, rows, stages, labels, paths[2])
    return paths


def _bar_plot(plt: Any, rows: list[DeviceStage], stages: list[tuple[int, int]], labels: list[str], path: Path,
              ylabel: str, value: Any, title: str, *, energy: bool) -> None:
    """One bar per device and stage; the energy plot names each device's energy source, the memory plot
    draws the device profiles' usable RAM."""
    devices = sorted({r.device for r in rows})
    x = np.arange(len(stages))
    width = 0.8 / max(len(devices), 1)
    by = {(r.device, r.stage): r for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, d in enumerate(devices):
        vals = [value(by[(d, s)]) if (d, s) in by else np.nan for s, _ in stages]
        vals = [np.nan if v is None else v for v in vals]
        src = ", ".join(sorted({e for r in rows if r.device == d for e in r.energy_sources}))
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=f"{d} ({src})" if energy else d)
    if not energy:
        _profile_lines(ax)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    handles, names = ax.get_legend_handles_labels()
    if not energy:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls=":", lw=1, color="grey"))
        names.append("usable RAM of a\ndevice profile")
    ax.legend(handles, names, fontsize=8, title="device (energy source)" if energy else "device")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latency_plot(plt: Any, rows: list[DeviceStage], stages: list[tuple[int, int]], labels: list[str],
                  path: Path) -> None:
    """A box per stage of the step latencies pooled over all devices."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    data = []
    for s, _ in stages:
        pooled = [v for r in rows if r.stage == s for v in (r.latencies_s or r.p50_s)]
        data.append(pooled or [np.nan])
    ax.boxplot(data, tick_labels=labels)
    ax.set_ylabel("step latency (s)")
    ax.set_title("Local training step latency, by stage (all devices)")
    ax.text(0.0, 1.01, "every step where devices sent each latency, else per-round medians", transform=ax.transAxes,
            fontsize=7, color="grey", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile_label_positions(values: list[float], min_gap: float) -> list[float]:
    """Label heights for lines at `values` (ascending), pushed up so no two are closer than min_gap."""
    out: list[float] = []
    for v in values:
        out.append(max(v, out[-1] + min_gap) if out else v)
    return out


def _profile_lines(ax: Any) -> None:
    """A dotted line per device profile's usable RAM, labelled at the right edge without overlaps.

    Profiles with the same usable RAM share a label; labels of close values are spread apart."""
    by_ram: dict[float, list[str]] = {}
    for name, prof in DEVICE_PROFILES.items():
        by_ram.setdefault(prof.usable_ram_bytes / 2**30, []).append(name)
    rams = sorted(by_ram)
    for ram in rams:
        ax.axhline(ram, ls=":", lw=1, color="grey")
    lo, hi = ax.get_ylim()
    hi = max(hi, rams[-1] * 1.08)
    gap = 0.06 * (hi - lo)  # a 7-pt label and some air on a 4.5-inch axis
    heights = profile_label_positions(rams, gap)
    for ram, y in zip(rams, heights):  # outside the axes on the right, joined to their line when moved
        ax.annotate(", ".join(by_ram[ram]), xy=(1.0, ram), xycoords=("axes fraction", "data"), xytext=(1.02, y),
                    textcoords=("axes fraction", "data"), fontsize=7, color="grey", ha="left", va="center",
                    arrowprops=dict(arrowstyle="-", color="grey", lw=0.5), annotation_clip=False)
    ax.set_ylim(lo, max(hi, heights[-1] + gap))


def load_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    if not path.is_file():
        hint = " (the run is unfinished: report.json is written at the end)" if (run_dir / "checkpoint").exists() else ""
        raise FileNotFoundError(f"no report.json in {run_dir}{hint}; pass a finished run directory, e.g. runs/<name>")
    return json.loads(path.read_text())


def rig_lines(rig: Any) -> list[str]:
    """`devft rig`'s devices: which were emulated phones (and what that means) and which measured a real battery."""
    if not isinstance(rig, dict) or not isinstance(rig.get("devices"), dict):
        return []
    lines = ["devices of `devft rig` (rig.json):"]
    for name, d in sorted(rig["devices"].items()):
        if not isinstance(d, dict):
            continue
        if d.get("kind") == "emulated":
            peak = d.get("renderer_peak_rss_bytes")
            lines.append(f"  {name}: EMULATED phone ({d.get('profile')}, CPU {d.get('cpu_throttle')}x throttled, "
                         f"{d.get('chromium')}), renderer peak RSS "
                         f"{f'{peak / MIB:.0f} MiB' if isinstance(peak, (int, float)) and peak else '-'}; "
                         "a desktop CPU slowed down: no phone's memory, thermals or energy")
        else:
            energy = (d.get("battery") or {}).get("energy_j")
            lines.append(f"  {name}: phone {d.get('serial')} over adb, battery energy MEASURED: "
                         f"{f'{energy:.1f} J' if isinstance(energy, (int, float)) else 'not exposed by this phone'} "
                         "(net of USB charging)")
    return lines


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    report = load_report(run_dir)
    rows = device_stages(report)
    if not rows:
        print(f"{run_dir}: no device telemetry in any round record. This was a simulation run (clients train "
              "in-process, nothing measures memory or energy); run the same config over a fleet to get per-device "
              "memory, latency, energy and carbon. No plots written.")
        return 0
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        print(f"run {run_dir}: device telemetry, {len(rows)} device x stage rows")
        print(table(rows))
        print("\n".join(rig_lines(report.get("rig"))))
        if (report.get("fleet") or {}).get("devices"):
            print()
            print(fleet_table(report["fleet"]))
    if not args.no_plots:
        paths = plot(rows, run_dir)
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0


REPORT_DESCRIPTION = """\
Per device and stage of a fleet run: what local training cost, from the telemetry each device
sent with its updates (report.json). Columns:
  device         the device's name (dev-000 trains data shard 000)
  profile        the board the device declared (DEVFT_DEVICE_PROFILE=<name> in the device's
                 environment when it starts `devft-edge run`; the devices of a local fleet
                 inherit it from `devft run --fleet local:N`); "-" = it declared none
  stage, layers  the DEVFT stage (1-based) and its submodel's decoder layers
  rounds         rounds of that stage the device trained
  peak MiB       peak resident memory of the device process while training
  p50 s, p95 s   local step latency, median and 95th percentile
  J/step, J total, energy source
                 energy, labelled measured:<sensor> or estimated:<power model> (CPU time x watts)
  CO2 g          carbon from the energy and the grid's intensity
  fits           whether peak memory fits the declared profile's usable RAM; "n/a" = no profile
Then one line per device: the platform, runtime and RAM (MiB it offers training) its hello
declared, the stages it trained (or why the coordinator refused it), and each stage's memory
need (a device is sampled for a stage only when its RAM covers the need).
Profiles: {profiles}.
Writes telemetry_energy.png, telemetry_memory.png and telemetry_latency.png into the run
directory."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="per-device, per-stage memory, latency, energy and carbon of a run",
                              description=REPORT_DESCRIPTION.format(profiles=", ".join(sorted(DEVICE_PROFILES))),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, e.g. runs/default")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--no-plots", action="store_true", help="do not write the telemetry_*.png plots")
    p.set_defaults(func=cmd_report)
