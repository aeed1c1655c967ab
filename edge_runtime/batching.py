"""Training inputs from a chat-formatted example, written once for the server and the device.

A record holds the rendered `prompt` (chat template applied) and the `completion`; the loss
falls on completion tokens only. Batches are right-padded with pads labelled -100, which is
exact under causal attention, so device graphs need no attention mask. Torch-free.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
# The one sequence length of a run (tokens per example after truncation): the run config's `seq_len`
# default, what exporters trace for and write into the manifest, and what devices truncate to.
DEFAULT_SEQ_LEN = 128
# the shortest sequence any stage graph accepts: torch.export specialises a sequence of 2 (one shifted position)
# away, and one input and one target token is no training example anyway
MIN_SEQ_LEN = 3


def join(prompt_ids: list[int], completion_ids: list[int], seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt masked with -100), truncated to seq_len."""
    ids = (prompt_ids + completion_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:seq_len]
    return ids, labels


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [B, T] int64 arrays of ids and labels."""
    width = max(len(ids) for ids, _ in encoded)
    ids = np.full((len(encoded), width), pad_id, dtype=np.int64)
    labels = np.full((len(encoded), width), IGNORE_INDEX, dtype=np.int64)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)] = x
        labels[i, : len(y)] = y
    return ids, labels


def target_count(labels: np.ndarray) -> int:
    """Supervised positions of a batch: labels after the first position that are not -100 (the graph shifts
    labels by one, so position t's label is what position t - 1 predicts). The loss is their mean."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def check_micro_batch(micro_batch: object) -> int:
    """`micro_batch` if it is a whole number >= 1; ValueError naming it otherwise."""
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a whole number >= 1, got {micro_batch!r}")
    return micro_batch


def micro_batches(labels: np.ndarray, micro_batch: int) -> list[tuple[slice, int]]:
    """The rows of each micro-batch of a batch (`micro_batch` consecutive rows, the last one shorter), each with
    its supervised positions; micro-batches without any are left out (they add nothing to the gradient).

    docs/protocol.md, "Micro-batches": the batch's gradient is sum_i (n_i / N) g_i, so each weight is n_i / N
    with N = sum n_i, the batch's supervised positions."""
    check_micro_batch(micro_batch)
    parts = []
    for start in range(0, labels.shape[0], micro_batch):
        rows = slice(start, min(start + micro_batch, labels.shape[0]))
        n = target_count(labels[rows])
        if n:
            parts.append((rows, n))
    return parts
