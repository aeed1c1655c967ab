"""A run's rows: one `RoundRecord` per trained round (and one for the base model before any).

The round loop keeps them typed, and so do the readers inside a run (the strategy's re-planning,
the schedules, the stage gains, the progress bar); they become dicts only in report.json and the
checkpoint's meta.json (`to_dict`), and come back from a checkpoint with `from_dict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

OPTIONAL = ("client_cpu_seconds", "stage_new_devices", "telemetry")  # left out of the dict when None


@dataclass
class RoundRecord:
    """One row of report.json's `records`; stage -1 is the base model before any training."""

    stage: int
    round: int  # counted across stages from 1
    stage_round: int
    layers: int
    clients: list[int]
    train_loss: float | None
    bytes_down: int
    bytes_up: int
    stage_download_bytes: int
    client_seconds: list[float]
    wall_seconds: float
    client_samples: list[int]
    eval_loss: float | None = None
    accuracy: float | None = None
    per_task: dict | None = None
    # training rounds only (the base-model row has none of these)
    client_cpu_seconds: list[float] | None = None
    stage_new_devices: int | None = None
    telemetry: dict[str, Any] | None = None  # only when devices reported some
    rolled_back: bool = False  # the stage's last round, when the strategy rolled the stage's transfer back

    @classmethod
    def base_model(cls, n_layers: int, metrics: dict) -> RoundRecord:
        return cls(-1, 0, 0, n_layers, [], None, 0, 0, 0, [], 0.0, []).with_metrics(metrics)

    def with_metrics(self, metrics: dict | None) -> RoundRecord:
        if metrics:
            self.eval_loss = metrics["eval_loss"]
            self.accuracy = metrics.get("accuracy")
            self.per_task = metrics["per_task"]
        return self

    def to_dict(self) -> dict:
        """report.json's row: the optional fields only where set, `rolled_back` only where true."""
        out = asdict(self)
        for key in OPTIONAL:
            if out[key] is None:
                del out[key]
        if not out["rolled_back"]:
            del out["rolled_back"]
        return out

    @classmethod
    def from_dict(cls, row: dict) -> RoundRecord:
        """A row as to_dict wrote it (a checkpoint's, also one written before records were typed)."""
        unknown = set(row) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"a round record with fields {sorted(unknown)} that RoundRecord does not have")
        return cls(**row)
