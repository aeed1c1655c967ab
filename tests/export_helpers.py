"""Small random PEFT-LoRA Llamas, batches and a word-level tokenizer shared by the export tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from export import naming

REPO = Path(__file__).resolve().parents[1]
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_model(seed: int = 0, targets=("q_proj", "v_proj", "o_proj", "down_proj"), **shape) -> torch.nn.Module:
    """A random Llama with LoRA; lora_B is made nonzero so gradients w.r.t. lora_A are too."""
    torch.manual_seed(seed)
    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        intermediate_size=128,
        tie_word_embeddings=True,
        use_cache=False,
    )
    kw.update(shape)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return peft_model


def make_batch(vocab: int, batch: int = 2, seq: int = 16, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    labels = ids.copy()
    labels[0, :5] = -100  # prompt tokens: assistant-only loss
    labels[-1, -2] = -100
    return ids, labels


def lora_shapes(peft_model) -> dict[str, tuple[int, ...]]:
    state = peft_model.state_dict()
    return {k: tuple(state[k].shape) for k in naming.lora_peft_names(state)}


def torch_loss_and_grads(peft_model, ids, labels) -> tuple[float, dict[str, np.ndarray]]:
    peft_model.zero_grad()
    loss = peft_model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
    loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in peft_model.named_parameters() if naming.is_lora(n)}
    return loss.item(), grads


def save_tiny_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer.json plus a chat template, laid out as save_pretrained() does."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)} | {"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return directory


