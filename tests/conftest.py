import os

import pytest
import torch

from tests.heartbeat import (  # noqa: F401 - a line every 30 s while a long test runs (serial or -n 2)
    pytest_runtest_logfinish,
    pytest_runtest_logstart,
    pytest_runtest_protocol,
    pytest_sessionstart,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is faster than two spinning OpenMP threads on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base():
    """A random 6-layer LLaMA with the real SmolLM2 tokenizer (session-wide; do not mutate)."""
    from server_sdk.engine.model import tiny_random_model

    return tiny_random_model(n_layers=6, hidden=32, seed=0)


@pytest.fixture(scope="session")
def tiny_cfg():
    from server_sdk.config import DataSettings, LoraSettings, RunConfig

    def make(**kw):
        # schedule fixed: these tests exercise the stage mechanics (the default `auto` may skip stages)
        base = dict(model="tiny-random-L6", stages=[2, 4, 6], rounds_per_stage=1, schedule="fixed", num_clients=3,
                    clients_per_round=2, local_steps=2, batch_size=2, seq_len=64, lr=5e-3, accuracy_every="never",
                    lora=LoraSettings(r=2, alpha=4), data=DataSettings(examples_per_client=6, eval_examples_per_task=2))
        base.update(kw)
        return RunConfig(**base)

    return make


@pytest.fixture(scope="session")
def tiny_base_from_file(tiny_base, tmp_path_factory):
    """tiny_base saved as a Hugging Face model directory and loaded back, as SmolLM2 is loaded: the
    weights mapped from its model.safetensors (BaseModel.weights_file). Session-wide; do not mutate."""
    from server_sdk.engine.model import load_base_model

    path = tmp_path_factory.mktemp("hf-dir") / "tiny-from-file"
    tiny_base.model.save_pretrained(path)
    tiny_base.tokenizer.save_pretrained(path)
    return load_base_model(str(path))
