"""Client data from reasoning-gym's offline generators: chat-formatted, partitioned non-IID,
written as JSONL shards (the format a device reads), plus a held-out evaluation set.

Each record holds the rendered `prompt` (chat template applied, generation prompt added)
and the `completion` (answer + end-of-turn), so a device only needs the `tokenizers`
package to build training inputs: loss falls on completion tokens only.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.batching import join
from server_sdk.tasks import TASKS

if TYPE_CHECKING:
    from server_sdk.config import DataSettings

log = logging.getLogger(__name__)


@dataclass
class Example:
    task: str
    question: str
    answer: str
    prompt: str
    completion: str
    metadata: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, default=str)


def _dataset(task: str, size: int, seed: int):
    import reasoning_gym  # slow import with warnings; keep it local

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **TASKS[task])


def render(tokenizer, question: str, answer: str) -> tuple[str, str]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    end = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else (tokenizer.eos_token or "")
    return prompt, f"{answer}{end}"


def generate(tokenizer, task: str, n: int, seed: int, exclude: set[str] | None = None) -> list[Example]:
    """n examples of a task from a seeded generator, skipping questions in `exclude`."""
    exclude = exclude or set()
    ds = _dataset(task, size=max(4 * n, n + 64), seed=seed)
    out: list[Example] = []
    for entry in ds:
        if entry["question"] in exclude:
            continue
        prompt, completion = render(tokenizer, entry["question"], str(entry["answer"]))
        # metadata goes through JSON now, so a shard read back from disk equals the one generated
        metadata = json.loads(json.dumps(entry.get("metadata", {}), default=str))
        out.append(Example(task, entry["question"], str(entry["answer"]), prompt, completion, metadata))
        if len(out) == n:
            return out
    raise RuntimeError(f"task {task!r}: generator gave fewer than {n} fresh questions; lower the example count")


def client_task_counts(settings: DataSettings, num_clients: int, seed: int) -> np.ndarray:
    """[num_clients, n_tasks] example counts per client, per the partition scheme."""
    tasks, n, per = settings.tasks, len(settings.tasks), settings.examples_per_client
    counts = np.zeros((num_clients, n), dtype=int)
    rng = np.random.default_rng(seed)
    for c in range(num_clients):
        if settings.partition == "task":
            held = [(c + j) % n for j in range(settings.tasks_per_client)]
            probs = np.zeros(n)
            probs[held] = 1.0 / len(held)
        elif settings.partition == "dirichlet":
            probs = rng.dirichlet([settings.dirichlet_alpha] * n)
        else:
            probs = np.full(n, 1.0 / n)
        base = np.floor(probs * per).astype(int)
        rest = per - base.sum()
        order = np.argsort(-(probs * per - base), kind="stable")
        base[order[:rest]] += 1
        counts[c] = base
    assert len(tasks) == counts.shape[1]
    return counts


def build_client_data(tokenizer, settings: DataSettings, num_clients: int, seed: int) -> list[list[Example]]:
    counts = client_task_counts(settings, num_clients, seed)
    clients: list[list[Example]] = [[] for _ in range(num_clients)]
    for t, task in enumerate(settings.tasks):
        need = int(counts[:, t].sum())
        if need == 0:
            continue
        pool = generate(tokenizer, task, need, seed=seed * 7919 + t)
        start = 0
        for c in range(num_clients):
            clients[c].extend(pool[start:start + counts[c, t]])
            start += counts[c, t]
    rng = np.random.default_rng(seed + 1)
    for shard in clients:
        rng.shuffle(shard)
    return clients


def build_eval_data(tokenizer, settings: DataSettings, seed: int, train: list[list[Example]]) -> list[Example]:
    """Held-out examples from other generator seeds, with any question seen in training removed."""
    seen = {ex.question for shard in train for ex in shard}
    out: list[Example] = []
    for t, task in enumerate(settings.tasks):
        out.extend(generate(tokenizer, task, settings.eval_examples_per_task, seed=10_000_019 + seed * 31 + t,
                            exclude=seen))
    return out


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ex.to_json() + "\n" for ex in examples))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[Example]:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            out.append(Example(**raw))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a devft example record ({err}); regenerate the shard") from None
    return out


def encode(tokenizer, ex: Example, seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt masked with -100), truncated to seq_len."""
    p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
    return join(p, c, seq_len)


def score(task: str, prediction: str, ex: Example) -> float:
    """reasoning-gym's own exact scorer for the task (1.0 = correct)."""
    ds = _scorer(task)
    entry = {"question": ex.question, "answer": ex.answer, "metadata": ex.metadata}
    try:
        return float(ds.score_answer(prediction, entry))
    except Exception as err:  # a scorer choking on odd model output counts as wrong, but is logged
        log.debug("scorer for %s failed on %r: %s", task, prediction, err)
        return 0.0


_SCORERS: dict[str, Any] = {}


def _scorer(task: str):
    if task not in _SCORERS:
        _SCORERS[task] = _dataset(task, size=1, seed=0)
    return _SCORERS[task]
