import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_sdk.cli.main import build_parser, main
from server_sdk.config import ConfigError

TINY = ["--model", "tiny-random-L4", "-o", "stages=[2, 4]", "-o", "rounds_per_stage=1", "-o", "num_clients=2",
        "-o", "local_steps=1", "-o", "batch_size=2", "-o", "seq_len=64", "-o", "lora.r=2",
        "-o", "data.examples_per_client=4", "-o", "data.eval_examples_per_task=1", "-o", "accuracy_every=never"]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("plan", "run", "eval"):
        assert cmd in out


def test_every_command_is_wired_explicitly():
    # subcommands are imported, not discovered: a broken import fails here instead of a command vanishing
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"plan", "run", "eval", "serve", "fleet", "export", "report", "clean", "conformance", "rig",
                               "configs"}
    run = sub.choices["run"].parse_args(["--fleet", "local:2", "--quorum", "0.5", "--round-timeout", "9"])
    assert (run.fleet, run.quorum, run.round_timeout, run.max_update_norm) == ("local:2", 0.5, 9.0, None)
    serve = sub.choices["serve"].parse_args(["--broker-url", "mqtts://b:8883", "--fleet-dir", "f", "--quorum", "1"])
    assert serve.quorum == 1.0 and serve.fleet_dir == "f"


HEAVY = ("torch", "transformers", "peft", "onnxruntime", "ray", "scipy", "matplotlib")
HELP_CODE = """
import sys
from server_sdk.cli.main import build_parser
for argv in sys.argv[1:]:
    try:
        build_parser().parse_args(argv.split())
    except SystemExit:
        pass
print(" ".join(sorted(m for m in {heavy} if m in sys.modules)))
"""


def test_help_imports_no_heavy_library():
    """`devft --help` took 6.6 s on a loaded machine (issue 26): the command line imported torch and transformers
    before parsing its arguments. Every command's help is built without them; commands import what they use."""
    helps = ["--help", *(f"{cmd} --help" for cmd in ("plan", "run", "serve", "eval", "export", "fleet", "report",
                                                    "clean"))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", HELP_CODE.format(heavy=HEAVY), *helps], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "", f"imported by --help: {done.stdout.splitlines()[-1]}"
    assert "usage: devft clean" in done.stdout and "usage: devft run" in done.stdout


def test_unknown_strategy_names_the_registered_ones(capsys):
    assert main(["plan", "--strategy", "fedprox"]) == 2
    assert "strategy='fedprox' is not valid; choose one of ['devft', 'fedit', 'ffa-lora']" in capsys.readouterr().err


def test_plan_says_what_the_schedule_does_with_the_rounds(capsys):
    """issue 26: `rounds per stage: [3, 3, 3, 3]` under the default auto schedule, which may roll them back."""
    stages = ["--model", "tiny-random-L8", "-o", "stages=[2, 4, 8]"]
    assert main(["plan", *stages]) == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "rounds per stage: [3, 3, 3] schedule=auto (the default): these are at most" in out
    assert "2 layers 1.25%, 4 layers 2.50%" in out and "every remaining round goes to the full model (rounds [1, 0, 8]" in out
    assert "-o schedule=fixed runs exactly [3, 3, 3]" in out
    assert main(["plan", *stages, "-o", "schedule=fixed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"].startswith("schedule=fixed: exactly these rounds")


def test_plan_run_eval_on_a_tiny_model(tmp_path, capsys):
    assert main(["plan", *TINY, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"] == [2, 4] and len(plan["stage_1"]["groups"]) == 2
    assert main(["run", *TINY, "--name", "t", "--runs-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "base model" in out and "fine-tuned" in out
    assert (tmp_path / "t" / "adapter" / "adapter_model.safetensors").exists()
    assert main(["eval", "--run", str(tmp_path / "t"), "--no-generate", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"base model", "fine-tuned"} and rows["base model"]["eval_loss"] != rows["fine-tuned"]["eval_loss"]
    # the same name again is refused with the fix named
    assert main(["run", *TINY, "--name", "t", "--runs-dir", str(tmp_path), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(capsys):
    assert main(["plan", "-o", "beta=2"]) == 2
    assert "beta=2 must lie in [0, 1]" in capsys.readouterr().err
    assert main(["plan", "-o", "nonsense"]) == 2
    assert "FIELD=VALUE" in capsys.readouterr().err


def test_named_config_is_the_quickstarts_flags(tmp_path, capsys):
    """scripts/quickstart.sh ran `-o schedule=fixed -o eval_every=3 -o accuracy_every=end`; now `--config
    quickstart`: the same RunConfig. A file path still works, an unknown name lists the named configs."""
    from server_sdk.cli.main import _load_config

    def load(*argv):
        return _load_config(build_parser().parse_args(["run", *argv]))

    flags = load("-o", "schedule=fixed", "-o", "eval_every=3", "-o", "accuracy_every=end")
    assert load("--config", "quickstart") == flags and flags != load()
    script = (Path(__file__).parents[1] / "scripts" / "quickstart.sh").read_text()
    assert script.count("--config quickstart") == 2 and "-o schedule=fixed" not in script  # both of its runs
    assert load("--config", "quickstart", "-o", "rounds_per_stage=2").rounds_per_stage == 2  # -o still wins
    (tmp_path / "quickstart").write_text('{"beta": 0.5}')  # an existing file wins over a name
    assert load("--config", str(tmp_path / "quickstart")).beta == 0.5
    assert main(["plan", "--config", "quickstrat"]) == 2
    err = capsys.readouterr().err
    assert "no named config 'quickstrat'" in err and "'quickstart'" in err and "'fedit'" in err
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("convergence") and "\nquickstart " in out and "scripts/quickstart.sh" in out
    assert main(["configs", "fedit"]) == 0 and "strategy: fedit" in capsys.readouterr().out


def test_fleet_flags_become_settings(tmp_path):
    """Every round policy and artifact flag lands in FleetSettings (0 turns --start-timeout and --norm-bound-k off),
    on top of a resumed run's fleet.json; --keep-artifacts travels as a setting, not through the environment."""
    from server_sdk.cli import fleet as fleet_cli

    def settings(*flags):
        return fleet_cli._fleet_settings(build_parser().parse_args(["run", "--fleet", "local:2", *flags]), tmp_path)

    s = settings("--round-timeout", "9", "--quorum", "0.5", "--replacements", "2", "--start-timeout", "0",
                 "--max-update-norm", "50", "--norm-bound-k", "0", "--formats", "onnx, ort", "--stage-peak-mb", "4=524",
                 "--keep-artifacts")
    assert (s.round_timeout_s, s.quorum, s.replacements, s.start_timeout_s, s.max_update_norm, s.norm_bound_k,
            s.formats, s.stage_peak_mb, s.keep_artifacts) == (9.0, 0.5, 2, None, 50.0, None, ["onnx", "ort"],
                                                              {"4": 524}, True)
    assert "DEVFT_KEEP_ARTIFACTS" not in os.environ
    (tmp_path / "fleet.json").write_text(json.dumps({"quorum": 0.8, "replacements": 1}))
    s = settings("--quorum", "0.5")
    assert (s.quorum, s.replacements, s.keep_artifacts, s.start_timeout_s) == (0.5, 1, False, 10.0)
    with pytest.raises(ConfigError, match="replacements=-1 must be a whole number >= 0"):
        settings("--replacements", "-1")
    with pytest.raises(ConfigError, match="--stage-peak-mb '4:524': give LAYERS=MIB pairs"):
        settings("--stage-peak-mb", "4:524")
