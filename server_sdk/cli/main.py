"""`devft` command line: plan, run and evaluate federated fine-tuning."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import yaml

from server_sdk import disk
from server_sdk.cli import export as export_cli
from server_sdk.cli import fleet as fleet_cli
from server_sdk.cli import report as report_cli
from server_sdk.config import ConfigError, RunConfig, config_file
from server_sdk.fleet import conformance, rig

EPILOG = "Config fields are documented in README.md; any of them can be overridden with -o FIELD=VALUE."


def _load_config(args: argparse.Namespace) -> RunConfig:
    """The config of --config and -o overrides (and --model/--strategy), validated."""
    cfg = RunConfig.load(args.config) if getattr(args, "config", None) else RunConfig()
    overrides = {}
    for item in getattr(args, "override", None) or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like FIELD=VALUE, e.g. -o lora.r=4")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)  # "3" -> 3, "[4, 8, 30]" -> list, "1e-3" -> str? handled below
        if isinstance(overrides[key], str):
            try:
                overrides[key] = float(overrides[key])
            except ValueError:
                pass
    for flag in ("model", "strategy"):
        if getattr(args, flag, None):
            overrides[flag] = getattr(args, flag)
    cfg = cfg.with_overrides(overrides) if overrides else cfg
    return cfg.validate()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="NAME|FILE", help="a named run config (e.g. quickstart; `devft configs` "
                   "lists them) or a YAML/JSON file (default: built-in defaults)")
    p.add_argument("--model", help="smollm2-135m (default), a local HF model directory, or tiny-random-L<n>")
    p.add_argument("--strategy", help="federated method (default devft); an unknown name lists the choices")
    p.add_argument("-o", "--override", action="append", metavar="FIELD=VALUE",
                   help="override a config field, e.g. -o rounds_per_stage=2 -o lora.r=4 (repeatable)")


def _add_run_dir_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", help="where runs are written (default: runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_plan(args: argparse.Namespace) -> int:
    from server_sdk.engine.model import load_base_model
    from server_sdk.engine.rounds import stages_and_rounds_per_stage
    from server_sdk.method.lora import attach_lora, read_lora
    from server_sdk.method.strategies import make_strategy
    from server_sdk.method.submodel import share_model

    cfg = _load_config(args)
    strategy = make_strategy(cfg)
    base = load_base_model(cfg.model)
    stages, rounds_per_stage = stages_and_rounds_per_stage(cfg, strategy, base.n_layers)
    lora = read_lora(attach_lora(share_model(base.model), cfg.lora, seed=cfg.seed))
    plan, _ = strategy.configure_stage(0, base.model, lora, stages[0])
    out = {"model": base.name, "n_layers": base.n_layers, "strategy": cfg.strategy, "stages": stages,
           "rounds_per_stage": rounds_per_stage, "schedule": _schedule_note(cfg, stages, rounds_per_stage),
           "stage_1": plan.to_dict()}
    print(json.dumps(out, indent=1) if args.json else _plan_text(out))
    return 0


def _schedule_note(cfg: RunConfig, stages: list[int], rounds: list[int]) -> str | None:
    """What the schedule does with `rounds` at runtime (issue 26: `rounds per stage: [3, 3, 3, 3]` read as
    what a default run trains, while the default `auto` schedule usually moves the small stages' rounds on)."""
    if cfg.strategy != "devft" or len(stages) < 2:
        return None
    if cfg.schedule == "fixed":
        return f"schedule=fixed: exactly these rounds, stage after stage (the paper's method; {sum(rounds)} in all)"
    bars = ", ".join(f"{n} layers {100 * cfg.schedule_expected_gain * n / stages[-1]:.2f}%" for n in stages[:-1])
    when = "evaluated round" if cfg.eval_every == 1 else f"evaluated round (every {cfg.eval_every} rounds)"
    moved = [1] + [0] * (len(stages) - 2) + [sum(rounds) - 1]
    return (f"schedule=auto (the default): these are at most the small stages' rounds. After each {when} a small "
            f"stage must lower the full model's eval loss by its cost's share of what a full-model round is "
            f"expected to buy (schedule_expected_gain {cfg.schedule_expected_gain:g} x layers/{stages[-1]}: {bars}). "
            f"Short of that after its first round, the stage ends and every remaining round goes to the full model "
            f"(rounds {moved}; on SmolLM2-135M this is what usually happens); after a later round, its unused rounds "
            f"go to the next stage. A small stage that did not pay for itself is rolled back. Always {sum(rounds)} "
            f"rounds in all; -o schedule=fixed runs exactly {rounds} (the paper's method, what the quickstart runs).")


def _plan_text(out: dict) -> str:
    lines = [f"model {out['model']} ({out['n_layers']} layers), strategy {out['strategy']}",
             f"stages (submodel layers): {' -> '.join(map(str, out['stages']))}",
             f"rounds per stage: {out['rounds_per_stage']}"]
    if out.get("schedule"):
        lines += textwrap.wrap(out["schedule"], 100, initial_indent="  ", subsequent_indent="  ")
    lines.append("stage 1 groups (anchor first):")
    for g, a in zip(out["stage_1"]["groups"], out["stage_1"]["anchors"]):
        lines.append(f"  anchor {a:>2}: {g}")
    return "\n".join(lines)


def _run_dir_and_config(args: argparse.Namespace) -> tuple[Path, RunConfig]:
    """--resume RUN_DIR continues with the config saved there; otherwise RUNS_DIR/NAME and a new config."""
    run_dir = Path(args.resume) if args.resume else Path(args.runs_dir) / args.name
    cfg = RunConfig.of_run(run_dir) if args.resume else _load_config(args)
    return run_dir, cfg


def cmd_run(args: argparse.Namespace) -> int:
    run_dir, cfg = _run_dir_and_config(args)
    if args.fleet:
        if args.executor != "in-process":
            raise ConfigError("--fleet trains on devices; --executor applies to simulated clients only")
        return fleet_cli.run_local_fleet(args, run_dir, cfg)
    from server_sdk.engine.report import summary_text
    from server_sdk.engine.rounds import run

    result = run(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet,
                 executor_factory=_executor_factory(args))
    if result.interrupted:
        return 0
    print(summary_text(result.report, run_dir))
    return 0


def _executor_factory(args: argparse.Namespace):
    """--executor ray: clients train in parallel Ray workers; in-process (None) otherwise."""
    if args.executor != "ray":
        if args.workers is not None or args.ray_address:
            raise ConfigError("--workers and --ray-address need --executor ray")
        return None
    try:
        from server_sdk.engine.ray_executor import RaySettings, ray_executor_factory
    except ImportError as exc:
        raise ConfigError(f"--executor ray needs Ray: pip install -e '.[sim]' ({exc})") from None
    workers = 2 if args.workers is None else args.workers
    settings = RaySettings(workers=workers, address=args.ray_address, round_timeout_s=args.round_timeout)
    if args.quorum is not None:
        settings.quorum = args.quorum
    try:
        return ray_executor_factory(settings.validate())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    return fleet_cli.serve(args, *_run_dir_and_config(args))


def cmd_eval(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from server_sdk.data import read_jsonl
    from server_sdk.engine.eval_cache import base_evaluation
    from server_sdk.engine.model import load_base_model
    from server_sdk.engine.trainer import evaluate
    from server_sdk.method.submodel import share_model

    run_dir = Path(args.run)
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not a devft run directory (no config.json); pass --run runs/<name>")
    cfg = RunConfig.of_run(run_dir)
    base = load_base_model(cfg.model)
    held_out = read_jsonl(run_dir / "data" / "eval.jsonl")
    kw = dict(seq_len=cfg.seq_len, generate=not args.no_generate, max_new_tokens=cfg.gen_max_new_tokens,
              precision=cfg.precision)
    rows = {"base model": base_evaluation(base.model, base, held_out, progress=True, **kw)}  # cached per machine
    adapter = run_dir / "adapter"
    if adapter.exists():
        tuned = PeftModel.from_pretrained(share_model(base.model), adapter)
        rows["fine-tuned"] = evaluate(tuned, base.tokenizer, held_out, progress="evaluating the adapter", **kw)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'':14}{'eval loss':>10}{'accuracy':>10}")
    for name, m in rows.items():
        acc = "n/a" if m.get("accuracy") is None else f"{100 * m['accuracy']:.1f}%"
        print(f"{name:14}{m['eval_loss']:>10.4f}{acc:>10}")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    """The named run configs shipped with devft, each with what it is for (`--config NAME` loads one)."""
    from server_sdk.config import CONFIG_DIR, named_configs

    names = named_configs()
    if args.name:
        print(config_file(args.name).read_text(), end="")
        return 0
    width = max(map(len, names))
    for name, about in names.items():
        print(f"{name:<{width}}  {about}")
    print(f"\n(files in {CONFIG_DIR}; `devft configs NAME` prints one, `devft run --config NAME -o FIELD=VALUE` runs it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devft", description="Federated fine-tuning of LLMs in developmental "
                                     "stages (DEVFT) on fleets of small devices.", epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="show the stage schedule and the first stage's layer groups", epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a federated fine-tuning: simulated clients in this process, or devices "
                       "with --fleet local:N", description="Run a federated fine-tuning of the base model's LoRA "
                       "(DEVFT stages by default) and write runs/NAME/: report.json, curves.png, groups.png, the "
                       "PEFT adapter. Clients train in this process (eager torch) unless --fleet local:N starts a "
                       "secured Mosquitto and N torch-free device processes here (plain onnxruntime); `devft serve` "
                       "coordinates real devices.", epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--name", default="default", help="run name; output goes to RUNS_DIR/NAME (default: default)")
    _add_run_dir_args(p)
    p.add_argument("--fleet", metavar="local:N", help=fleet_cli.FLEET_HELP)
    fleet_cli.add_fleet_settings(p)
    p.add_argument("--executor", choices=("in-process", "ray"), default="in-process",
                   help="where simulated clients train: one after another in this process (default), or in "
                   "parallel Ray workers (needs the [sim] extra); --quorum and --round-timeout apply to Ray rounds")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (one CPU each; default 2)")
    p.add_argument("--ray-address", metavar="ADDR", help="join an existing Ray cluster (e.g. auto or HEAD:6379) "
                   "instead of starting Ray here; see README")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="coordinate a real fleet over an existing broker (no local devices)")
    _add_config_args(p)
    p.add_argument("--broker-url", required=True, help="mqtts://HOST:PORT of the fleet's mosquitto")
    p.add_argument("--fleet-dir", required=True, help="fleet directory from `devft fleet init` (server credentials)")
    p.add_argument("--name", default="default", help="run name; output goes to RUNS_DIR/NAME and is the run id")
    _add_run_dir_args(p)
    fleet_cli.add_fleet_settings(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("configs", help="list the named run configs (`--config NAME`), or print one")
    p.add_argument("name", nargs="?", help="print this config's file")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("eval", help="evaluate a run's adapter against the base model on its held-out set")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/default")
    p.add_argument("--no-generate", action="store_true", help="loss only, skip exact-match generation")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    export_cli.register(sub)
    fleet_cli.register(sub)
    rig.register(sub)
    report_cli.register(sub)
    disk.register(sub)
    conformance.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from server_sdk.quiet import configure

    configure(args.verbose)  # known library noise off unless --verbose (server_sdk/quiet.py)
    try:
        return args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        print(f"devft: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from server_sdk.engine.model import ModelError

        if isinstance(err, ModelError):
            print(f"devft: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
