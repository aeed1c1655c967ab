"""Device telemetry: memory, latency, energy meters on fake sysfs trees, carbon, codecarbon CSV."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import types
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.telemetry import (
    CODECARBON_COLUMNS,
    DEVICE_PROFILES,
    POWER_MODELS,
    CombinedMeter,
    EstimatedMeter,
    ExternalCommandMeter,
    JetsonIna3221Meter,
    MeterUnavailable,
    NvmlMeter,
    PeakRssSampler,
    PowerIntegrator,
    RaplMeter,
    RaspberryPiPmicMeter,
    TelemetryRecorder,
    append_codecarbon_csv,
    carbon_grams,
    codecarbon_row,
    detect_meter,
    fits,
    parse_pmic_adc,
    resolve_carbon_intensity,
)
from edge_runtime.telemetry.memory import current_rss_bytes
from edge_runtime.telemetry.meters import find_ina3221_rails, process_cpu_time

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
GIB = 2**30


class FakeClock:
    """A clock that only moves when told to, or by ``tick`` per call."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def estimate() -> EstimatedMeter:
    return EstimatedMeter("x86-laptop")


# --------------------------------------------------------------------------- memory


def test_peak_rss_includes_a_large_allocation_made_inside_the_region():
    size = 256 * MIB
    before = current_rss_bytes()
    with TelemetryRecorder(meter=estimate()) as rec:
        block = np.ones(size, dtype=np.uint8)  # np.ones writes every page: all resident
        assert rec.rss.wait_for_samples(2), "RSS sampler thread took no samples"
        del block
    report = rec.report()
    assert report["peak_rss_bytes"] >= before + 0.9 * size
    assert report["peak_rss_bytes"] < before + 1.5 * size
    assert report["peak_rss_sampled_bytes"] >= before + 0.9 * size
    assert report["rss_source"] in ("ru_maxrss", "sampled@20Hz")


def test_earlier_lifetime_peak_does_not_leak_into_a_later_region():
    # ru_maxrss remembers this 600 MiB peak forever; the region below must not report it.
    big = np.ones(600 * MIB, dtype=np.uint8)
    del big
    before = current_rss_bytes()
    sampler = PeakRssSampler(hz=50)
    sampler.start()
    small = np.ones(64 * MIB, dtype=np.uint8)
    assert sampler.wait_for_samples(2)
    del small
    peak = sampler.stop()
    assert peak.source == "sampled@50Hz"
    assert peak.ru_maxrss_bytes is not None and peak.ru_maxrss_bytes >= 600 * MIB
    assert before + 0.9 * 64 * MIB <= peak.peak_bytes < before + 300 * MIB


# --------------------------------------------------------------------------- latency


def test_step_latency_percentiles_and_throughput_from_an_injected_clock():
    clock = FakeClock()
    with TelemetryRecorder(meter=estimate(), clock=clock, include_all_latencies=True) as rec:
        for hundredths in range(1, 101):  # latencies 0.01 s .. 1.00 s
            with rec.step(tokens=10):
                clock.now += hundredths / 100
        with pytest.raises(ZeroDivisionError), rec.step(tokens=10_000):
            clock.now += 50.0
            _ = 1 / 0  # a failed step must not be counted
    report = rec.report()
    latency = report["step_latency_s"]
    assert report["steps"] == 100
    assert latency["p50"] == pytest.approx(0.505)
    assert latency["p95"] == pytest.approx(0.9505)  # linear interpolation between ranks
    assert latency["mean"] == pytest.approx(0.505)
    assert len(latency["all"]) == 100
    assert report["tokens"] == 1000
    assert report["tokens_per_s"] == pytest.approx(1000 / 50.5)
    assert report["duration_s"] == pytest.approx(50.5 + 50.0)


def test_step_outside_the_with_block_is_an_error():
    rec = TelemetryRecorder(meter=estimate())
    with pytest.raises(RuntimeError, match="inside"), rec.step():
        pass
    with pytest.raises(RuntimeError, match="after"):
        rec.report()


# --------------------------------------------------------------------------- RAPL


def make_rapl_zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int) -> Path:
    write(root / zone / "name", name + "\n")
    write(root / zone / "energy_uj", f"{energy_uj}\n")
    write(root / zone / "max_energy_range_uj", f"{max_uj}\n")
    return root / zone / "energy_uj"


def test_rapl_sums_package_domains_and_undoes_wraparound(tmp_path):
    max_uj = 262_143_328_850
    pkg0 = make_rapl_zone(tmp_path, "intel-rapl:0", "package-0", max_uj - 1_000, max_uj)
    pkg1 = make_rapl_zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000, max_uj)
    core = make_rapl_zone(tmp_path, "intel-rapl:0:0", "core", 0, max_uj)
    psys = make_rapl_zone(tmp_path, "intel-rapl:2", "psys", 0, max_uj)

    meter = RaplMeter(root=tmp_path, poll_interval_s=3600)
    assert [d.name for d in meter.domains] == ["package-0", "package-1"]
    meter.start()
    pkg0.write_text("500\n")  # wrapped: 1_000 uJ to the top, then 500 uJ
    pkg1.write_text("7500000\n")
    core.write_text("99999999\n")  # sub-domain of package-0: not counted again
    psys.write_text("99999999\n")  # whole-SoC domain: not counted
    joules = meter.stop()
    assert joules == pytest.approx((1_500 + 2_500_000) / 1e6)
    assert meter.label == "measured:rapl"


def test_rapl_polling_catches_two_wraps_in_one_run(tmp_path):
    max_uj = 1_000_000
    pkg = make_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 0, max_uj)
    meter = RaplMeter(root=tmp_path, poll_interval_s=3600)
    meter.start()
    pkg.write_text(f"{max_uj - 10}\n")
    meter.poll()
    pkg.write_text("100\n")  # first wrap
    meter.poll()
    pkg.write_text("50\n")  # second wrap: 100 -> top -> 50
    assert meter.stop() == pytest.approx((max_uj - 10 + 110 + max_uj - 50) / 1e6)


def test_rapl_without_package_domains_is_unavailable(tmp_path):
    make_rapl_zone(tmp_path, "intel-rapl:0", "psys", 0, 10)
    with pytest.raises(MeterUnavailable, match="no RAPL package"):
        RaplMeter(root=tmp_path)
    with pytest.raises(MeterUnavailable, match="does not exist"):
        RaplMeter(root=tmp_path / "missing")


# --------------------------------------------------------------------------- Jetson INA3221


def make_jetson_hwmon(root: Path) -> None:
    write(root / "hwmon0" / "name", "coretemp\n")
    write(root / "hwmon0" / "temp1_input", "45000\n")
    ina = root / "hwmon1"
    write(ina / "name", "ina3221\n")
    for n, (label, mv, ma) in enumerate(
        [
            ("VDD_IN", 5_000, 1_200),
            ("VDD_CPU_GPU_CV", 5_000, 400),
            ("VDD_SOC", 5_000, 300),
        ],
        start=1,
    ):
        write(ina / f"in{n}_label", label + "\n")
        write(ina / f"in{n}_input", f"{mv}\n")
        write(ina / f"curr{n}_input", f"{ma}\n")
        write(ina / f"in{n + 3}_input", "12\n")  # shunt voltages, not rails


def test_ina3221_rails_are_parsed_from_hwmon_and_module_input_is_used(tmp_path):
    make_jetson_hwmon(tmp_path)
    rails = find_ina3221_rails(tmp_path)
    assert [r.label for r in rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]

    meter = JetsonIna3221Meter(root=tmp_path)
    assert meter.read_watts() == pytest.approx(6.0)  # VDD_IN only: 5 V x 1.2 A
    parts = JetsonIna3221Meter(root=tmp_path, rails=["VDD_CPU_GPU_CV", "VDD_SOC"])
    assert parts.read_watts() == pytest.approx(2.0 + 1.5)
    with pytest.raises(MeterUnavailable, match="VDD_GPU"):
        JetsonIna3221Meter(root=tmp_path, rails=["VDD_GPU"])


def test_ina3221_power_files_in_microwatts(tmp_path):
    ina = tmp_path / "hwmon3"
    write(ina / "name", "ina3221\n")
    write(ina / "in1_label", "VDD_IN\n")
    write(ina / "power1_input", "2500000\n")
    assert JetsonIna3221Meter(root=tmp_path).read_watts() == pytest.approx(2.5)


def test_ina3221_energy_integrates_sampled_power(tmp_path):
    make_jetson_hwmon(tmp_path)
    meter = JetsonIna3221Meter(root=tmp_path, interval_s=3600, clock=FakeClock(tick=0.25))
    meter.start()
    joules = meter.stop()
    assert meter.elapsed_s == pytest.approx(0.25)
    assert joules == pytest.approx(6.0 * 0.25)
    assert meter.label == "measured:jetson-ina3221"


def test_power_integrator_is_trapezoidal():
    integrator = PowerIntegrator()
    for t, watts in [(0.0, 2.0), (1.0, 4.0), (3.0, 4.0)]:
        integrator.add(t, watts)
    assert integrator.joules == pytest.approx(3.0 + 8.0)
    assert integrator.elapsed_s == pytest.approx(3.0)


# --------------------------------------------------------------------------- Pi 5 PMIC

PI5_PMIC_OUTPUT = """\
     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)=0.10000000A
       1V8_SYS_A current(2)=0.20000000A
      VDD_CORE_A current(7)=0.50000000A
     3V7_WL_SW_V volt(8)=3.73974600V
       3V3_SYS_V volt(9)=3.30000000V
       1V8_SYS_V volt(10)=1.80000000V
      VDD_CORE_V volt(15)=0.90000000V
         EXT5V_V volt(24)=5.14600000V
          BATT_V volt(25)=0.00000000V
"""
PI5_WATTS = 0.1 * 3.3 + 0.2 * 1.8 + 0.5 * 0.9


def fake_vcgencmd(bin_dir: Path, output: str, exit_code: int = 0) -> None:
    (bin_dir / "pmic.txt").parent.mkdir(parents=True, exist_ok=True)
    (bin_dir / "pmic.txt").write_text(output)
    script = bin_dir / "vcgencmd"
    script.write_text(f'#!/bin/sh\n[ "$1" = pmic_read_adc ] || exit 2\ncat "{bin_dir}/pmic.txt"\nexit {exit_code}\n')
    script.chmod(0o755)


def test_pmic_output_is_parsed_into_rail_watts():
    rails = parse_pmic_adc(PI5_PMIC_OUTPUT)
    # EXT5V and BATT have a voltage but no current line
    assert set(rails) == {"3V7_WL_SW", "3V3_SYS", "1V8_SYS", "VDD_CORE"}
    assert sum(rails.values()) == pytest.approx(PI5_WATTS)


def test_pmic_meter_runs_vcgencmd_from_path_and_integrates(tmp_path, monkeypatch):
    fake_vcgencmd(tmp_path / "bin", PI5_PMIC_OUTPUT)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    meter = RaspberryPiPmicMeter(interval_s=3600, clock=FakeClock(tick=2.0))
    assert meter.read_watts() == pytest.approx(PI5_WATTS)
    meter.start()
    assert meter.stop() == pytest.approx(PI5_WATTS * 2.0)
    assert meter.label == "measured:rpi5-pmic"


def test_pmic_meter_is_unavailable_on_a_pi_without_pmic_adc(tmp_path, monkeypatch):
    fake_vcgencmd(tmp_path / "bin", 'error=1 error_msg="Command not registered"\n', exit_code=255)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(MeterUnavailable, match="pmic_read_adc"):
        RaspberryPiPmicMeter()


# --------------------------------------------------------------------------- NVML


def fake_pynvml(energies_mj: list[list[int]], supported: bool = True) -> types.ModuleType:
    """A stand-in for nvidia-ml-py: counters advance one row per read of all GPUs."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    reads = iter(energies_mj)
    row: list[int] = []

    def energy(handle: int) -> int:
        nonlocal row
        if not supported:
            raise NVMLError("Not Supported")
        if handle == 0:
            row = next(reads)
        return row[handle]

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    return nvml


def test_nvml_meter_sums_gpu_energy_counters_in_millijoules(monkeypatch):
    counters = [[0, 0], [1_000, 2_000], [4_000, 9_000]]  # probe, start, stop
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counters))
    meter = NvmlMeter()
    meter.start()
    assert meter.stop() == pytest.approx((3_000 + 7_000) / 1e3)
    assert meter.label == "measured:nvml"


def test_nvml_without_energy_counter_or_library_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], supported=False))
    with pytest.raises(MeterUnavailable, match="Not Supported"):
        NvmlMeter()
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(MeterUnavailable, match="nvidia-ml-py"):
        NvmlMeter()


# --------------------------------------------------------------------------- external, estimate


def test_external_command_meter_differences_cumulative_joules(tmp_path):
    counter = tmp_path / "joules"
    counter.write_text("100.5\n")
    meter = ExternalCommandMeter(f"cat {counter}")
    meter.start()
    counter.write_text("130.25\n")
    assert meter.stop() == pytest.approx(29.75)
    assert meter.label == "measured:external"


def test_external_command_errors_name_the_command(tmp_path):
    with pytest.raises(ValueError, match="one number"):
        ExternalCommandMeter("echo about 12 J").read_joules()
    with pytest.raises(RuntimeError, match="exited with 3"):
        ExternalCommandMeter("echo broken >&2; exit 3").read_joules()
    counter = tmp_path / "joules"
    counter.write_text("50\n")
    meter = ExternalCommandMeter(f"cat {counter}")
    meter.start()
    counter.write_text("10\n")
    with pytest.raises(ValueError, match="backwards"):
        meter.stop()


def test_estimate_is_labelled_and_proportional_to_cpu_time():
    cpu = FakeClock()
    meter = EstimatedMeter("raspberry-pi-5", cpu_time=cpu)
    assert meter.label == "estimated:raspberry-pi-5"
    assert not meter.measured
    watts = POWER_MODELS["raspberry-pi-5"].watts_per_busy_cpu
    results = []
    for cpu_seconds in (10.0, 20.0):
        meter.start()
        cpu.now += cpu_seconds
        results.append(meter.stop())
    assert results == pytest.approx([10.0 * watts, 20.0 * watts])


def test_estimate_with_the_real_process_cpu_clock():
    meter = EstimatedMeter("android-phone")
    before = process_cpu_time()
    meter.start()
    total = 0
    for i in range(2_000_000):  # burn some CPU
        total += i * i
    joules = meter.stop()
    cpu_seconds = process_cpu_time() - before
    assert 0 < joules <= cpu_seconds * POWER_MODELS["android-phone"].watts_per_busy_cpu


# --------------------------------------------------------------------------- detect_meter


@pytest.fixture
def bare_device(tmp_path, monkeypatch):
    """No powercap, no hwmon, no vcgencmd, no pynvml."""
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    return {"powercap_root": tmp_path / "powercap", "hwmon_root": tmp_path / "hwmon"}


def test_detect_meter_falls_back_to_a_labelled_estimate(bare_device):
    meter = detect_meter(power_model="raspberry-pi-4", **bare_device)
    assert isinstance(meter, EstimatedMeter)
    assert meter.label == "estimated:raspberry-pi-4"
    assert not meter.measured
    # and says why nothing was measured
    assert "rapl" in meter.detail and "nvml" in meter.detail


def test_detect_meter_prefers_board_sensors_then_rapl(bare_device, tmp_path):
    make_rapl_zone(bare_device["powercap_root"], "intel-rapl:0", "package-0", 0, 10**9)
    rapl = detect_meter(**bare_device)
    assert isinstance(rapl, RaplMeter) and rapl.label == "measured:rapl"

    make_jetson_hwmon(bare_device["hwmon_root"])
    jetson = detect_meter(**bare_device)
    assert isinstance(jetson, JetsonIna3221Meter)

    forced = detect_meter(preferred="estimate", power_model="jetson-orin-nano", **bare_device)
    assert forced.label == "estimated:jetson-orin-nano"


def test_detect_meter_sums_rapl_and_nvml_when_both_exist(bare_device, monkeypatch):
    pkg = make_rapl_zone(bare_device["powercap_root"], "intel-rapl:0", "package-0", 0, 10**9)
    counters = [[0, 0], [0, 0], [1_000, 2_000]]  # probe, start, stop (mJ)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counters))
    meter = detect_meter(**bare_device)
    assert isinstance(meter, CombinedMeter)
    assert meter.label == "measured:rapl+nvml"
    meter.start()
    pkg.write_text("4000000\n")  # 4 J on the CPU package
    assert meter.stop() == pytest.approx(4.0 + 3.0)
    with pytest.raises(ValueError, match="only sums measured"):
        CombinedMeter([meter, estimate()])


def test_detect_meter_forced_or_external_never_silently_falls_back(bare_device, tmp_path):
    with pytest.raises(MeterUnavailable, match="'rapl' was requested"):
        detect_meter(preferred="rapl", **bare_device)
    with pytest.raises(MeterUnavailable, match="requested"):
        detect_meter(preferred="rpi5-pmic", **bare_device)
    with pytest.raises(RuntimeError, match="exited with 3"):
        detect_meter(external_cmd="exit 3", **bare_device)
    with pytest.raises(ValueError, match="unknown energy meter"):
        detect_meter(preferred="wattmeter", **bare_device)
    with pytest.raises(ValueError, match="unknown power model"):
        detect_meter(power_model="toaster", **bare_device)
    external = detect_meter(external_cmd="echo 42", **bare_device)
    assert isinstance(external, ExternalCommandMeter)
    assert external.label == "measured:external"


# --------------------------------------------------------------------------- carbon


def test_carbon_math_and_intensity_sources():
    assert carbon_grams(3.6e6, 400.0) == pytest.approx(400.0)  # 1 kWh at 400 g/kWh
    assert carbon_grams(36.0, 500.0) == pytest.approx(0.005)

    configured = resolve_carbon_intensity(123.0)
    assert (configured.g_per_kwh, configured.source) == (123.0, "configured")

    france = resolve_carbon_intensity("fra", use_codecarbon=False)
    assert france.g_per_kwh == pytest.approx(56.0)
    assert "Our World in Data" in france.source and "2023" in france.source

    world = resolve_carbon_intensity(None)
    assert world.g_per_kwh == pytest.approx(475.0)
    assert "world average" in world.source

    with pytest.raises(ValueError, match="XYZ"):
        resolve_carbon_intensity("XYZ", use_codecarbon=False)
    with pytest.raises(ValueError, match="ISO 3166"):
        resolve_carbon_intensity("France")
    with pytest.raises(ValueError, match=">= 0"):
        resolve_carbon_intensity(-1)


def test_our_carbon_table_names_its_source_and_years():
    table = json.loads((REPO / "edge_runtime" / "data" / "carbon_intensity.json").read_text())
    assert table["unit"] == "gCO2e/kWh"
    assert "Our World in Data" in table["source"]
    assert len(table["countries"]) >= 30
    for code, entry in table["countries"].items():
        assert len(code) == 3 and code.isupper()
        assert 0 < entry["g_per_kwh"] < 1200 and entry["year"] >= 2019


def test_codecarbon_table_is_used_when_codecarbon_is_installed(tmp_path, monkeypatch):
    package = tmp_path / "site" / "codecarbon"
    write(package / "__init__.py", "raise ImportError('must not be imported')\n")
    write(
        package / "data" / "private_infra" / "global_energy_mix.json",
        json.dumps({"FRA": {"carbon_intensity": 99.9, "country_name": "France", "year": 2024}}),
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    france = resolve_carbon_intensity("FRA")
    assert france.g_per_kwh == pytest.approx(99.9)
    assert france.source.startswith("codecarbon") and "2024" in france.source
    assert resolve_carbon_intensity("DEU").source.startswith("carbon_intensity.json")


def test_recorder_turns_measured_energy_into_carbon(tmp_path):
    counter = tmp_path / "joules"
    counter.write_text("0\n")
    meter = ExternalCommandMeter(f"cat {counter}")
    with TelemetryRecorder(meter=meter, carbon_intensity=300.0) as rec:
        counter.write_text(f"{2 * 3.6e6}\n")  # 2 kWh
    report = rec.report()
    assert report["energy_j"] == pytest.approx(7.2e6)
    assert report["energy_source"] == "measured:external"
    assert report["carbon_g"] == pytest.approx(600.0)
    assert report["carbon_intensity_source"] == "configured"


# --------------------------------------------------------------------------- codecarbon CSV

# The header codecarbon 3.3.2's FileOutput writes (the field order of its EmissionsData,
# output_methods/emissions_data.py): 38 columns, pinned by digest so that a change to
# CODECARBON_COLUMNS fails here unless it is checked against codecarbon again.
CODECARBON_3_3_2_HEADER_SHA256 = "b2dae23b653f7cda9d7c024df9529550f5baec9061427d92f682a044e373ddb9"


def test_codecarbon_columns_are_codecarbon_3_3_2s():
    header = ",".join(CODECARBON_COLUMNS)
    assert len(CODECARBON_COLUMNS) == len(set(CODECARBON_COLUMNS)) == 38
    assert hashlib.sha256(header.encode()).hexdigest() == CODECARBON_3_3_2_HEADER_SHA256


def test_codecarbon_columns_match_codecarbon_when_it_is_installed():
    emissions_data = pytest.importorskip("codecarbon.output_methods.emissions_data")
    if version("codecarbon") != "3.3.2":
        pytest.skip(f"codecarbon {version('codecarbon')} installed; the columns are 3.3.2's")
    assert [f.name for f in dataclasses.fields(emissions_data.EmissionsData)] == list(CODECARBON_COLUMNS)


def test_codecarbon_csv_has_codecarbon_columns_and_appends_rows(tmp_path):
    clock = FakeClock()
    cpu = FakeClock()
    meter = EstimatedMeter("raspberry-pi-4", cpu_time=cpu)
    rec = TelemetryRecorder(meter=meter, carbon_intensity="DEU", clock=clock)
    with rec, rec.step(tokens=512):
        clock.now += 10.0
        cpu.now += 36.0
    report = rec.report()
    path = tmp_path / "emissions.csv"
    for run_id in ("run-1", "run-2"):
        row = codecarbon_row(report, run_id=run_id)
        append_codecarbon_csv(path, row)

    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(CODECARBON_COLUMNS)
    assert sum(line.startswith("timestamp,") for line in lines) == 1
    rows = list(csv.DictReader(path.open()))
    assert [r["run_id"] for r in rows] == ["run-1", "run-2"]
    energy_j = 36.0 * POWER_MODELS["raspberry-pi-4"].watts_per_busy_cpu
    assert float(rows[0]["energy_consumed"]) == pytest.approx(energy_j / 3.6e6)  # kWh
    assert float(rows[0]["cpu_energy"]) == pytest.approx(energy_j / 3.6e6)
    assert float(rows[0]["emissions"]) == pytest.approx(report["carbon_g"] / 1000)  # kg
    assert float(rows[0]["duration"]) == pytest.approx(10.0)
    assert rows[0]["tracking_mode"] == "estimated:raspberry-pi-4"
    assert (rows[1]["country_iso_code"], rows[1]["country_name"]) == ("DEU", "Germany")


def test_codecarbon_csv_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    report = {
        "duration_s": 1.0, "energy_j": 1.0, "carbon_g": 0.0, "energy_source": "measured:rapl",
        "cpu_time_s": 1.0, "peak_rss_bytes": 1,
    }  # fmt: skip
    with pytest.raises(ValueError, match="header"):
        append_codecarbon_csv(path, codecarbon_row(report))
    assert path.read_text() == "a,b\n1,2\n"


# --------------------------------------------------------------------------- profiles, report


def test_device_profiles_and_fits():
    expected = {
        "raspberry-pi-4-4gb",
        "raspberry-pi-5-8gb",
        "jetson-orin-nano-8gb",
        "android-6gb",
    }
    assert expected <= set(DEVICE_PROFILES)
    for profile in DEVICE_PROFILES.values():
        assert 0 < profile.usable_ram_bytes < profile.total_ram_bytes
        assert profile.power_model in POWER_MODELS
    assert fits(3 * GIB, "raspberry-pi-4-4gb")
    assert not fits(int(3.5 * GIB), "raspberry-pi-4-4gb")
    assert fits(int(3.5 * GIB), DEVICE_PROFILES["raspberry-pi-5-8gb"])
    with pytest.raises(ValueError, match="unknown device profile"):
        fits(1, "pi-zero")


def test_report_is_json_serialisable_and_complete():
    with TelemetryRecorder(carbon_intensity="SWE", device_profile="android-6gb") as rec:
        for _ in range(3):
            with rec.step(tokens=8):
                sum(range(10_000))
    report = rec.report()
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    for key in (
        "peak_rss_bytes", "rss_source", "steps", "step_latency_s", "tokens_per_s", "energy_j",
        "energy_source", "duration_s", "cpu_time_s", "carbon_g", "carbon_intensity_g_per_kwh",
        "carbon_intensity_source",
    ):  # fmt: skip
        assert key in report
    # the default meter is detected; without one, the profile's power model is the estimate
    source = report["energy_source"]
    assert source == "estimated:android-phone" or source.startswith("measured:")
    assert report["fits_device_profile"] is True
    assert set(report["step_latency_s"]) == {"p50", "p95", "mean"}


def test_telemetry_imports_no_torch_transformers_or_peft():
    code = (
        "import sys, edge_runtime.telemetry\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
