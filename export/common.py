"""What every exporter shares: tracing mode, the manifest's model config, the tokenizer, and the
key under which traced graphs are cached (they depend on the submodel's shape, never its weights)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def eager_attention(peft_model: Any) -> Iterator[None]:
    """Trace with eager attention (SDPA's decomposition has no ORT gradient and its backward is not in the
    core ATen opset), in eval mode: dropout off; LoRA dropout must be 0 for parity anyway."""
    base = peft_model.get_base_model()
    previous, was_training = base.config._attn_implementation, peft_model.training
    base.set_attn_implementation("eager")
    peft_model.eval()
    try:
        yield
    finally:
        base.set_attn_implementation(previous)
        peft_model.train(was_training)


def json_config(peft_model: Any) -> dict[str, Any]:
    """The base model's config as plain JSON, as manifests record it."""
    return json.loads(json.dumps(peft_model.get_base_model().config.to_dict(), default=str))


def copy_tokenizer(tokenizer_dir: str | os.PathLike[str], out_dir: Path) -> str | None:
    """Copy tokenizer.json; return the chat template saved beside it, if any."""
    src = Path(tokenizer_dir)
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {src}; save the tokenizer with save_pretrained() first")
    shutil.copyfile(src / "tokenizer.json", out_dir / "tokenizer.json")
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text()
    if (src / "tokenizer_config.json").is_file():
        return json.loads((src / "tokenizer_config.json").read_text()).get("chat_template")
    return None


def stable(value: Any) -> Any:
    """JSON-able and independent of hash order (PEFT keeps target_modules as a set)."""
    if isinstance(value, dict):
        return {str(k): stable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(stable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [stable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def model_tensors(peft_model: Any) -> dict[str, Any]:
    """Every tensor of the submodel by PEFT name: the state dict plus buffers (rotary inv_freq)."""
    return {**dict(peft_model.named_buffers()), **peft_model.state_dict()}


def check_weight_bytes(peft_model: Any, limit: int, what: str) -> None:
    """Refuse a submodel whose parameters (tied ones counted once) exceed `limit` bytes, before the slow export;
    `what` names the limit and says what to do."""
    nbytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in peft_model.parameters()}.values())
    if nbytes > limit:
        raise ValueError(f"the submodel has {nbytes / 2**30:.2f} GiB of weights, above the {limit / 2**30:.2f} GiB {what}")


def shape_key(peft_model: Any, tools: tuple[str, ...], **extra: Any) -> str:
    """Hash of everything a traced graph depends on: model config, LoRA config (rank, alpha, targets:
    the scaling is a constant in the graph), tensor shapes, the versions of `tools`, and `extra`."""

    peft_cfg = {k: {f: x for f, x in stable(v.to_dict()).items() if f not in ("base_model_name_or_path", "revision")}
                for k, v in peft_model.peft_config.items()}
    tensors = model_tensors(peft_model)
    config = {k: v for k, v in json_config(peft_model).items() if k != "_name_or_path"}  # a path, not a shape
    blob = json.dumps({"config": config, "lora_config": peft_cfg, "shapes": {k: list(v.shape) for k, v in tensors.items()},
                       "versions": {t: version(t) for t in tools}, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def upstream(nodes: list[Any], producer: dict[str, int], tensors: list[str]) -> set[int]:
    """Indices in `nodes` (an ONNX graph's, `producer`: tensor name -> index of the node writing it) of every node
    that `tensors` depend on."""
    found: set[int] = set()
    stack = [t for t in tensors if t]
    while stack:
        k = producer.get(stack.pop())
        if k is not None and k not in found:
            found.add(k)
            stack += [x for x in nodes[k].input if x]
    return found


def reads_only(node: Any, names: set[str]) -> bool:
    """Whether every input of ONNX `node` is in `names` (e.g. the tensors computed from initializers only)."""
    return all(not i or i in names for i in node.input)


def wait_for(after: str, tag: str, zero: str) -> list[Any]:
    """Nodes computing `tag`_zero = 0 x Size(`after`) (`zero`: an int64 0 initializer): a data dependency on
    `after` that changes no value, so whatever reads it waits until `after` exists."""
    from onnx.helper import make_node

    return [make_node("Size", [after], [tag + "_size"], name=tag + "_size"),
            make_node("Mul", [tag + "_size", zero], [tag + "_zero"], name=tag + "_zero")]


def view_after(name: str, shape: str, wait: str, out: str) -> list[Any]:
    """Nodes computing `out`, `name` reshaped to `shape` + `wait` (wait_for's zero): an alias of `name` (a Reshape
    to its own shape, no copy) that exists only once the waited-for tensor does."""
    from onnx.helper import make_node

    return [make_node("Add", [shape, wait], [out + "_shape"], name=out + "_shape"),
            make_node("Reshape", [name, out + "_shape"], [out], name=out)]
