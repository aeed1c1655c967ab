"""The Flower ServerApp: Flower's FedAvg over devft's client schedule, with central evaluation.

Only the node sampling is devft's (round r trains `sample_clients(cfg, 0, r)` with
`client_seed` seeds), so both engines train the same clients on the same batches;
aggregation is Flower's FedAvg (weighted by each client's example count) and the
global model is evaluated on devft's held-out set after every round."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from server_sdk.config import RunConfig
from server_sdk.engine.trainer import evaluate
from server_sdk.method.lora import write_lora
from server_sdk.method.strategies.base import client_seed, sample_clients

from . import task

app = ServerApp()


class ScheduledFedAvg(FedAvg):
    """Flower's FedAvg, training the clients devft samples in each round (one stage: FedIT)."""

    def __init__(self, cfg: RunConfig, node_of: dict[int, int]):
        super().__init__(fraction_evaluate=0.0)  # the global model is evaluated centrally instead
        self.cfg, self.node_of = cfg, node_of

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        rnd = server_round - 1
        messages = []
        for c in sample_clients(self.cfg, 0, rnd):
            record = ConfigRecord({**config, "server-round": server_round, "seed": client_seed(self.cfg.seed, 0, rnd, c)})
            messages.append(Message(RecordDict({"arrays": arrays, "config": record}), message_type=MessageType.TRAIN,
                                    dst_node_id=self.node_of[c]))
        return messages


def partitions(grid: Grid, expected: int) -> dict[int, int]:
    """partition id -> node id, asked once of every node (once all `expected` nodes have registered)."""
    deadline = time.time() + 300
    while len(nodes := list(grid.get_node_ids())) < expected and time.time() < deadline:
        time.sleep(0.5)
    asks = [Message(RecordDict({"ask": ConfigRecord({"what": "partition-id"})}), message_type=MessageType.QUERY,
                    dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(asks, timeout=600))
    errors = [r.error for r in replies if r.has_error()]
    if errors or len(replies) != len(nodes):
        raise RuntimeError(f"{len(nodes)} nodes, {len(replies)} replies to the partition query; errors: {errors[:2]}")
    return {int(r.content["partition"]["partition-id"]): r.metadata.src_node_id for r in replies}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = task.run_config()
    node_of = partitions(grid, cfg.num_clients)
    if sorted(node_of) != list(range(cfg.num_clients)):
        raise RuntimeError(f"expected partitions 0..{cfg.num_clients - 1}, nodes answered {sorted(node_of)}")
    model, tok, held_out = task.fedit_model(), task.base_model().tokenizer, task.held_out()
    out = Path(task.settings()["log"])
    rows: list[dict] = []
    last = [time.perf_counter()]

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        write_lora(model, task.from_arrays(arrays.to_torch_state_dict()))
        m = evaluate(model, tok, held_out, seq_len=cfg.seq_len, generate=False, precision=cfg.precision)
        now = time.perf_counter()
        rows.append({"round": server_round, "eval_loss": m["eval_loss"], "seconds": now - last[0]})
        last[0] = now
        out.write_text(json.dumps(rows, indent=1))
        return MetricRecord({"eval_loss": m["eval_loss"]})

    ScheduledFedAvg(cfg, node_of).start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=task.initial_lora()),
                                        num_rounds=cfg.resolve_rounds_per_stage(1)[0], evaluate_fn=central_eval)
