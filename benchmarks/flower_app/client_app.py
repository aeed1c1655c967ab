"""The Flower ClientApp: one devft client (FedIT, full model) per message, with devft's local_train."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from server_sdk.engine.trainer import local_train
from server_sdk.method.lora import read_lora, write_lora

from . import task

app = ClientApp()


@app.query()
def which_partition(msg: Message, context: Context) -> Message:
    """The server asks every node once which data shard it holds (Flower hides the mapping)."""
    return Message(RecordDict({"partition": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = task.run_config()
    client = int(context.node_config["partition-id"])
    model = task.fedit_model()  # loaded once per Flower worker process
    write_lora(model, task.from_arrays(msg.content["arrays"].to_torch_state_dict()))
    seed = int(msg.content["config"]["seed"])
    result = local_train(model, task.base_model().tokenizer, task.shard(client), steps=cfg.local_steps,
                         batch_size=cfg.batch_size, lr=cfg.lr, seq_len=cfg.seq_len, seed=seed,
                         is_trainable=lambda name: "lora_" in name, client=client, precision=cfg.precision,
                         optimizer=cfg.optimizer)
    trained = read_lora(model)
    metrics = MetricRecord({"num-examples": result.num_samples, "train_loss": result.train_loss})
    return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=trained), "metrics": metrics}), reply_to=msg)
