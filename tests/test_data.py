import numpy as np

from edge_runtime.batching import IGNORE_INDEX, collate
from server_sdk.config import DataSettings
from server_sdk.data import build_client_data, build_eval_data, client_task_counts, encode, read_jsonl, score, write_jsonl


def test_partitions_have_the_promised_shape():
    s = DataSettings(examples_per_client=10, tasks_per_client=2)
    by_task = client_task_counts(s, 6, seed=0)
    assert (by_task.sum(1) == 10).all()
    assert ((by_task > 0).sum(1) == 2).all()  # each client holds exactly two tasks
    iid = client_task_counts(DataSettings(examples_per_client=8, partition="iid"), 3, seed=0)
    assert (iid == 2).all()
    d1 = client_task_counts(DataSettings(examples_per_client=40, partition="dirichlet", dirichlet_alpha=0.1), 8, 0)
    d2 = client_task_counts(DataSettings(examples_per_client=40, partition="dirichlet", dirichlet_alpha=100.0), 8, 0)
    assert (d1.sum(1) == 40).all() and (d2.sum(1) == 40).all()
    assert d1.max(1).mean() > d2.max(1).mean() + 5  # small alpha = skewed clients


def test_shards_roundtrip_and_encode_masks_the_prompt(tiny_base, tmp_path):
    tok = tiny_base.tokenizer
    s = DataSettings(examples_per_client=4, eval_examples_per_task=3)
    clients = build_client_data(tok, s, 2, seed=0)
    held = build_eval_data(tok, s, 0, clients)
    assert len(held) == 3 * len(s.tasks)
    assert not {e.question for e in held} & {e.question for c in clients for e in c}  # held out
    write_jsonl(tmp_path / "c.jsonl", clients[0])
    again = read_jsonl(tmp_path / "c.jsonl")
    assert again == clients[0]
    ex = again[0]
    ids, labels = encode(tok, ex, 512)
    n_prompt = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    assert all(x == IGNORE_INDEX for x in labels[:n_prompt]) and labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == ex.completion
    assert score(ex.task, ex.answer, ex) == 1.0 and score(ex.task, ex.answer + " oops", ex) < 1.0
    batch_ids, batch_labels = collate([encode(tok, e, 512) for e in again[:2]], tok.pad_token_id)
    assert batch_ids.shape == batch_labels.shape and batch_ids.dtype == np.int64
    width = max(len(encode(tok, e, 512)[0]) for e in again[:2])
    assert batch_ids.shape[1] == width


def test_bad_shard_line_names_the_file(tmp_path):
    import pytest

    (tmp_path / "bad.jsonl").write_text('{"task": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(tmp_path / "bad.jsonl")
