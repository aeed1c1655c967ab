"""How devft messages are encoded: tensors as safetensors, JSON within bounds (size, depth, integer digits,
protocol version) with typed field checks, and the length-prefixed frame of tensor-carrying messages.
Part of edge_runtime/protocol.py, which re-exports it."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from edge_runtime.protocol_base import MAX_HEADER_BYTES, MAX_UPDATE_BYTES, PROTOCOL_VERSION, ProtocolError

_HEADER_LEN = struct.Struct(">I")


# --------------------------------------------------------------------------- tensors


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Tensors as safetensors bytes: a JSON header plus raw little-endian data."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiub":
            raise ProtocolError(f"tensor {name!r} has dtype {arr.dtype}; only numeric tensors travel")
        arrays[name] = np.ascontiguousarray(arr)
    return _st_save(arrays)


def decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    try:
        return dict(_st_load(bytes(data)))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise ProtocolError(f"tensor payload is not valid safetensors ({len(data)} bytes): {exc}") from exc


# --------------------------------------------------------------------------- JSON helpers


def json_safe(value: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN and Kotlin parsers refuse it."""
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dump_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(json_safe(obj), separators=(",", ":"), allow_nan=False).encode()


MAX_JSON_DEPTH = 16  # objects and arrays nested deeper than this are refused (a control message needs 6)
MAX_INT_DIGITS = 40  # a JSON integer with more digits is refused (seeds and sizes need at most 20)


def _bounded_int(text: str) -> int:
    """json.loads's integer parser, refusing integers no field of the protocol needs (a 5,000-digit one costs
    quadratic time and trips Python's own limit)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} characters is over the {MAX_INT_DIGITS}-digit limit")
    return int(text)


def _check_depth(obj: Any, what: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (walked level by level, without recursion): later code that
    walks a message (logging, re-encoding, reports) must never meet a structure deep enough to exhaust its stack."""
    level, depth = [obj], 1  # the containers `depth` levels down
    while level:
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(f"{what} nests objects or arrays deeper than {MAX_JSON_DEPTH} levels; no message of "
                                "this protocol needs that")
        level = [v for o in level for v in (o.values() if isinstance(o, dict) else o) if isinstance(v, dict | list)]
        depth += 1


def load_json(data: bytes | str, what: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise ProtocolError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    try:
        obj = json.loads(data, parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid UTF-8 JSON: {exc}") from exc
    except (RecursionError, ValueError) as exc:  # nesting past the interpreter's stack, a huge integer
        raise ProtocolError(f"{what} is not JSON this protocol accepts: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(obj).__name__}")
    _check_depth(obj, what)
    version = obj.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{what} has protocol version {version!r}; this side speaks version "
            f"{PROTOCOL_VERSION} - upgrade the older side"
        )
    return obj


_JSON_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}


def require_field(obj: Mapping[str, Any], what: str, key: str, types: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise ProtocolError(f"{what} is missing required field {key!r}")
    value = obj[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(_JSON_TYPE_NAMES.get(t, t.__name__) for t in allowed)
        shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
        raise ProtocolError(f"{what} field {key!r} must be {names}, got {shown}")
    return value


def as_float(value: int | float, what: str, key: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ProtocolError(f"{what} field {key!r} is too large for a float") from None


def optional_field(obj: Mapping[str, Any], what: str, key: str, types: type | tuple[type, ...], default: Any) -> Any:
    if obj.get(key) is None:
        return default
    return require_field(obj, what, key, types)


# --------------------------------------------------------------------------- framing


def frame(header: Mapping[str, Any], body: bytes) -> bytes:
    """`u32 BE header length | JSON header | body`; the header records `body_size`."""
    head = dump_json({**header, "body_size": len(body)})
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header is {len(head)} bytes, over {MAX_HEADER_BYTES}")
    return _HEADER_LEN.pack(len(head)) + head + body


def unframe(data: bytes, what: str, limit: int = MAX_UPDATE_BYTES) -> tuple[dict[str, Any], bytes]:
    if len(data) > limit:
        raise ProtocolError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    if len(data) < _HEADER_LEN.size:
        raise ProtocolError(f"{what} is {len(data)} bytes, too short to hold a frame header length")
    (n,) = _HEADER_LEN.unpack_from(data)
    if n > MAX_HEADER_BYTES or _HEADER_LEN.size + n > len(data):
        raise ProtocolError(f"{what} declares a {n}-byte header but holds {len(data) - 4} bytes after the length")
    header = load_json(data[4 : 4 + n], f"{what} header", MAX_HEADER_BYTES)
    body = data[4 + n :]
    declared = require_field(header, f"{what} header", "body_size", int)
    if declared != len(body):
        raise ProtocolError(f"{what} body is {len(body)} bytes but the header declares {declared} (truncated?)")
    return header, body

def load_stateful(data: bytes, what: str, limit: int, states: tuple[str, ...]) -> tuple[dict, str]:
    """A message's JSON object and its `state`, which must be one of `states`."""
    obj = load_json(data, what, limit)
    state = require_field(obj, what, "state", str)
    if state not in states:
        raise ProtocolError(f"{what} state {state!r} is not one of {states}")
    return obj, state
