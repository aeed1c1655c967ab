"""Run configuration: one validated dataclass, YAML/JSON in, JSON out.

Every value is checked once, before any model is loaded, so a typo costs a
second instead of a 20-second model load (or a half-finished run). The named options
(`grouping`, `anchor`, `fusion`, `transfer`: the fold-back rule) are checked against the registries of
the modules that implement them (grouping.py, fusion.py), `strategy` against the strategies'
registry when the strategy is made (strategies/__init__.py), and a strategy checks its own
stage schedule against the model (`Strategy.stage_sizes`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.batching import DEFAULT_SEQ_LEN
from export.options import SCHEMES, GraphOptions
from server_sdk.tasks import TASK_NAMES

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTITIONS = ("task", "dirichlet", "iid")
ACCURACY_EVERY = ("round", "stage", "end", "never")
DEFAULT_TASKS = ("chain_sum", "basic_arithmetic", "spell_backward", "word_sequence_reversal")


# The one quorum of every executor that can lose clients (a fleet's devices, Ray workers): a round needs the answers
# of ceil(quorum x sampled) of the clients it sampled, else it fails with QuorumNotReached
DEFAULT_QUORUM = 0.6


def check_quorum(quorum: float) -> None:
    if isinstance(quorum, bool) or not isinstance(quorum, (int, float)) or not 0 < quorum <= 1:
        raise ConfigError(f"quorum={quorum!r} must lie in (0, 1], e.g. {DEFAULT_QUORUM}")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self) -> None:
        _positive_int("lora.r", self.r)
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"lora.dropout={self.dropout!r} must lie in [0, 1)")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha!r} must be positive")
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty; name at least one of " + ", ".join(LORA_TARGETS))
        for t in self.target_modules:
            if t not in LORA_TARGETS:
                raise ConfigError(f"lora.target_modules: unknown target module {t!r}; choose from {list(LORA_TARGETS)}")


@dataclass
class DataSettings:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    examples_per_client: int = 64
    partition: str = "task"  # task | dirichlet | iid
    tasks_per_client: int = 2  # for partition=task
    dirichlet_alpha: float = 0.5
    eval_examples_per_task: int = 16

    def validate(self) -> None:
        check_choice("data.partition", self.partition, PARTITIONS)
        _positive_int("data.examples_per_client", self.examples_per_client)
        _positive_int("data.eval_examples_per_task", self.eval_examples_per_task)
        _positive_int("data.tasks_per_client", self.tasks_per_client)
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"data.dirichlet_alpha={self.dirichlet_alpha!r} must be > 0")
        if not self.tasks:
            raise ConfigError("data.tasks is empty; name at least one reasoning-gym task, e.g. chain_sum")
        for t in self.tasks:
            if t not in TASK_NAMES:
                raise ConfigError(f"data.tasks: unknown task {t!r}; supported tasks are {sorted(TASK_NAMES)}")
        if self.partition == "task" and self.tasks_per_client > len(self.tasks):
            raise ConfigError(f"data.tasks_per_client={self.tasks_per_client} exceeds the {len(self.tasks)} tasks")


@dataclass
class RunConfig:
    """Everything that defines a run. `stages=None` picks the default schedule for the model."""

    model: str = "smollm2-135m"
    strategy: str = "devft"
    stages: list[int] | None = None
    rounds_per_stage: list[int] | int = 3
    num_clients: int = 8
    clients_per_round: int = 2
    local_steps: int = 5
    batch_size: int = 4
    # rows per run of a device's training graph (None: the whole batch); gradients combine into the batch's
    # (docs/protocol.md, hyperparams.micro_batch): same update to float32 rounding, activations of this many rows
    micro_batch: int | None = None
    seq_len: int = DEFAULT_SEQ_LEN  # tokens per example; exported into every stage manifest
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd: every client's local optimiser (a fresh one each round)
    lora: LoraSettings = field(default_factory=LoraSettings)
    beta: float = 0.1
    grouping: str = "deconfliction"
    fusion: str = "differential"
    anchor: str = "medoid"
    transfer: str = "copy"  # the fold-back rule (fusion.FOLD_BACKS): how a stage's trained LoRA returns to the layers
    # issue #12: the paper's method is schedule="fixed", heal="none". The default is "auto" because on
    # SmolLM2-135M the fused early stages buy the full model nothing (benchmarks/RESULTS.md, early stages)
    schedule: str = "auto"  # auto: end a stage that stops paying | fixed: rounds_per_stage as given
    schedule_expected_gain: float = 0.05  # auto: relative loss drop a full-model round is expected to buy
    heal: str = "none"  # none | hidden | logits: distil the fused submodel toward the full model before a stage
    heal_steps: int = 60  # server optimisation steps of the heal, per stage
    heal_lr: float = 3e-4
    heal_examples: int = 64  # generic task prompts (no client data) the heal distils on
    data: DataSettings = field(default_factory=DataSettings)
    eval_every: int = 1  # held-out loss every N rounds (and at every stage end)
    accuracy_every: str = "stage"  # exact-match generation: every eval "round", at "stage" ends, at the "end", "never"
    gen_max_new_tokens: int = 16
    aggregation: str = "fedavg"  # fedavg | median | trimmed-mean (robust to outlier clients)
    seed: int = 0
    torch_threads: int = 0  # 0 = leave torch's default
    precision: str = "fp32"  # fp32 | bf16: simulated training and server evaluation (server_sdk/engine/precision.py)
    # frozen weights as devices store them: fp32, or int8 / int4 with a scale and minimum per 32 inputs (export/quant.py);
    # simulated clients and evaluation then use the same dequantized values (server_sdk/engine/quantized.py)
    weights: str = "fp32"
    # devices' graphs recompute each decoder layer's activations in its backward (export/recompute.py): the same
    # numbers, the step holds the layers' inputs instead of their insides (less memory, about a forward more time)
    recompute: bool = False

    # ---- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def graph_options(self) -> GraphOptions:
        """How the devices' portable graphs hold the frozen model (`weights`, `recompute`)."""
        return GraphOptions(self.weights, self.recompute)

    def identity(self) -> dict[str, Any]:
        """to_dict() without the fields added after runs were first cached by config hash, where they
        hold their defaults, plus the batch sampler's name (protocol version 3 changed the draws, so runs
        cached before it have other keys): benchmarks' cache keys."""
        from edge_runtime.sampler import NAME

        return {**{k: v for k, v in self.to_dict().items() if k not in ADDED_LATER or v != ADDED_LATER[k]},
                "batch_draws": NAME}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields are {sorted(known)}")
        lora = raw.pop("lora", None) or {}
        data = raw.pop("data", None) or {}
        try:
            lora_obj = lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)
        except TypeError as err:
            raise ConfigError(f"lora: {err}; valid fields are {[f.name for f in dataclasses.fields(LoraSettings)]}") from None
        try:
            data_obj = data if isinstance(data, DataSettings) else DataSettings(**data)
        except TypeError as err:
            raise ConfigError(f"data: {err}; valid fields are {[f.name for f in dataclasses.fields(DataSettings)]}") from None
        return cls(lora=lora_obj, data=data_obj, **raw)

    @classmethod
    def of_run(cls, run_dir: str | Path) -> RunConfig:
        """A run's saved config.json. A field the file lacks was added to devft after the run began,
        so the run ran with that field's original value (ADDED_LATER), not today's default."""
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise ConfigError(f"{run_dir} has no config.json; is it a run directory (runs/NAME)?")
        return cls.from_dict({**ADDED_LATER, **_read_mapping(path)})

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return cls.from_dict(_read_mapping(path))

    @classmethod
    def load(cls, name_or_path: str | Path) -> RunConfig:
        """A named run config shipped with devft (`quickstart`, `fedit`, a benchmark's: `devft configs` lists
        them), or a YAML/JSON file."""
        return cls.from_file(config_file(name_or_path))

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """Apply dotted overrides such as {"lora.r": 4, "lr": 1e-4}."""
        raw = self.to_dict()
        for key, value in overrides.items():
            node = raw
            parts = key.split(".")
            for part in parts[:-1]:
                if part not in node or not isinstance(node[part], dict):
                    raise ConfigError(f"override {key!r}: {part!r} is not a config section")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"override {key!r}: unknown field {parts[-1]!r}")
            node[parts[-1]] = value
        return RunConfig.from_dict(raw)

    # ---- validation --------------------------------------------------------
    def resolve_rounds_per_stage(self, n_stages: int) -> list[int]:
        """rounds_per_stage (an int, or a list) as one count for each of the strategy's n_stages stages. The round
        loop resolves it once per run (engine.rounds.stages_and_rounds_per_stage); everything after, the executors
        included, works on that list."""
        if isinstance(self.rounds_per_stage, int):
            return [self.rounds_per_stage] * n_stages
        if len(self.rounds_per_stage) != n_stages:
            raise ConfigError(f"rounds_per_stage has {len(self.rounds_per_stage)} entries but there are {n_stages} "
                              "stages; give one per stage or a single int")
        return list(self.rounds_per_stage)

    def validate(self) -> RunConfig:
        """Raise ConfigError naming the first bad field: the named rules, each section, the numbers, the schedule."""
        self._check_rules()
        self.lora.validate()
        self.data.validate()
        self._check_numbers()
        self._check_schedule()
        return self

    def _check_rules(self) -> None:
        """Each named rule against the registry of the module that implements it."""
        # imported on use: the rule modules need torch, which `devft --help` should not load
        from edge_runtime.optim import OPTIMIZERS
        from server_sdk.engine.precision import PRECISIONS
        from server_sdk.method.aggregation import AGGREGATIONS
        from server_sdk.method.fusion import ANCHORS, FOLD_BACKS, FUSIONS
        from server_sdk.method.grouping import GROUPINGS
        from server_sdk.method.heal import HEALS
        from server_sdk.method.schedule import SCHEDULES

        for name, options in (("grouping", GROUPINGS), ("fusion", FUSIONS), ("anchor", ANCHORS),
                              ("transfer", FOLD_BACKS), ("accuracy_every", ACCURACY_EVERY),
                              ("aggregation", AGGREGATIONS), ("optimizer", OPTIMIZERS), ("precision", PRECISIONS),
                              ("weights", SCHEMES), ("schedule", SCHEDULES), ("heal", HEALS)):
            check_choice(name, getattr(self, name), options)

    def _check_numbers(self) -> None:
        if not isinstance(self.recompute, bool):
            raise ConfigError(f"recompute={self.recompute!r} must be true or false, e.g. -o recompute=true")
        if not isinstance(self.schedule_expected_gain, (int, float)) or not 0 < self.schedule_expected_gain < 1:
            raise ConfigError(f"schedule_expected_gain={self.schedule_expected_gain!r} must lie in (0, 1), e.g. 0.05")
        if not isinstance(self.heal_lr, (int, float)) or not 0 < self.heal_lr < 1:
            raise ConfigError(f"heal_lr={self.heal_lr!r} must be a number in (0, 1), e.g. 3e-4")
        for name in ("heal_steps", "heal_examples", "num_clients", "clients_per_round", "local_steps", "batch_size",
                     "eval_every", "gen_max_new_tokens"):
            _positive_int(name, getattr(self, name))
        _positive_int("seq_len", self.seq_len, minimum=8)
        if self.micro_batch is not None:
            _positive_int("micro_batch", self.micro_batch)
            if self.micro_batch > self.batch_size:
                raise ConfigError(f"micro_batch={self.micro_batch} exceeds batch_size={self.batch_size}: a micro-batch "
                                  "is part of a batch; set micro_batch between 1 and batch_size, or leave it unset")
        if self.clients_per_round > self.num_clients:
            raise ConfigError(f"clients_per_round={self.clients_per_round} exceeds num_clients={self.num_clients}; "
                              "lower clients_per_round or add clients")
        if not isinstance(self.lr, (int, float)) or not (0 < self.lr < 1):
            raise ConfigError(f"lr={self.lr!r} must be a number in (0, 1), e.g. 1e-3")
        if not isinstance(self.beta, (int, float)) or not (0.0 <= self.beta <= 1.0):
            raise ConfigError(f"beta={self.beta!r} must lie in [0, 1] (0 = anchor only, 1/m = group mean)")

    def _check_schedule(self) -> None:
        if self.stages is not None:
            if not self.stages or any(not isinstance(s, int) or s < 1 for s in self.stages):
                raise ConfigError(f"stages={self.stages!r} must be a non-empty list of positive layer counts, "
                                  "e.g. [4, 8, 16, 30]")
            if any(b <= a for a, b in zip(self.stages, self.stages[1:])):
                raise ConfigError(f"stages={self.stages!r} must be strictly increasing (each stage grows the submodel)")
        rounds = self.rounds_per_stage
        if isinstance(rounds, bool) or not isinstance(rounds, (int, list)):
            raise ConfigError(f"rounds_per_stage={rounds!r} must be an int or a list with one int per stage")
        for r in [rounds] if isinstance(rounds, int) else rounds:
            if not isinstance(r, int) or r < 1:
                raise ConfigError(f"rounds_per_stage={rounds!r}: every stage needs at least 1 round")


# fields added after the first runs were saved and benchmark runs cached, with the value runs had before
# the field existed (RunConfig.identity, RunConfig.of_run); a default may have changed since (schedule)
ADDED_LATER: dict[str, Any] = {"aggregation": "fedavg", "schedule": "fixed", "schedule_expected_gain": 0.05,
                               "heal": "none", "heal_steps": 60, "heal_lr": 3e-4, "heal_examples": 64,
                               "precision": "fp32", "optimizer": "adamw", "weights": "fp32", "micro_batch": None,
                               "recompute": False}


# the named run configs (package data: pyproject.toml); `devft run --config NAME` and the benchmarks load them
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def named_configs() -> dict[str, str]:
    """Every shipped config's name -> its first comment line (what it is for)."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def config_file(name_or_path: str | Path) -> Path:
    """The file `--config` means: an existing file, else the shipped config of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix or len(path.parts) > 1:
        raise ConfigError(f"config file {path} does not exist")
    shipped = CONFIG_DIR / f"{path.name}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"no config file {path} and no named config {path.name!r}; the named configs are "
                          f"{sorted(named_configs())} (`devft configs` says what each is for)")
    return shipped


def _read_mapping(path: Path) -> dict[str, Any]:
    """A config file's field: value mapping (YAML by suffix, else JSON)."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return raw


def check_choice(name: str, value: Any, options: Iterable[str]) -> None:
    """ConfigError naming the field, the value and the choices unless value is one of options."""
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(options)}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
