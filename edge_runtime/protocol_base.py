"""The devft wire protocol's names and limits: its version, the topics, size limits, message states, the
errors, and the checks of ids, digests and origins. Part of edge_runtime/protocol.py, which re-exports it."""

from __future__ import annotations

import re

# Seeds stay below 2^53 so that a JSON number holds them exactly in every language (JavaScript's
# numbers are doubles); the coordinator's seeds are 32-bit (strategies.base.client_seed).
MAX_SEED = 2**53 - 1
# 2: per-format artifacts and typed hyperparams in the control message
# 3: batches drawn with edge_runtime.sampler (SplitMix64, partial Fisher-Yates) instead of numpy's Generator.choice
PROTOCOL_VERSION = 3
TOPIC_ROOT = "devft"
QOS = 1

# Size limits. The broker is configured with a max packet size just above
# MAX_UPDATE_BYTES so oversized publishes are dropped before reaching us.
MAX_CONTROL_BYTES = 4 * 1024 * 1024  # control messages may embed an artifact descriptor
MAX_STATUS_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 256 * 1024
MAX_HEADER_BYTES = 256 * 1024  # JSON header inside a framed message
MAX_UPDATE_BYTES = 64 * 1024 * 1024  # whole framed update / global message
MAX_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 512 * 1024
MAX_CHUNKS_PER_REQUEST = 64

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

CONTROL_STATES = ("idle", "train", "done")
ARTIFACT_FORMATS = ("onnx", "ort", "executorch")  # edge_runtime/backends: what a device can train
OPTIMIZERS = ("adamw", "sgd")
STATUS_STATES = ("hello", "heartbeat", "busy", "offline")


class ProtocolError(ValueError):
    """A message does not follow the devft wire protocol."""


class UpdateRejected(ProtocolError):
    """A well-formed update that the server must not aggregate.

    `reason` is a short stable code (see `REJECT_REASONS`) for counters and logs;
    the message says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"update rejected ({reason}): {detail}")
        self.reason = reason


REJECT_REASONS = (
    "device_mismatch",
    "wrong_run",
    "wrong_stage",
    "stale_round",
    "future_round",
    "replayed_nonce",
    "bad_num_samples",
    "missing_tensors",
    "unexpected_tensors",
    "wrong_shape",
    "wrong_dtype",
    "non_finite",
    "norm_exceeded",
)


# --------------------------------------------------------------------------- topics


def check_name(kind: str, value: str) -> str:
    """Run and device ids become topic levels, so they must be plain words."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ProtocolError(f"{kind} {value!r} is not a valid id: use 1-64 characters from [A-Za-z0-9_.-]")
    return value


def check_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA_RE.match(value):
        raise ProtocolError(f"{value!r} is not a lowercase hex sha256 digest")
    return value


MAX_ORIGIN_CHARS = 1024


def check_origin(url: str) -> str:
    """An artifact origin: an https:// base URL ending in `/` (files are at URL + sha256), without credentials,
    query or fragment (the device adds its own login as a header, never in the URL)."""
    if (len(url) > MAX_ORIGIN_CHARS or not url.startswith("https://") or not url.endswith("/") or "?" in url
            or "#" in url or "@" in url.split("/", 3)[2] or any(c.isspace() or ord(c) < 32 for c in url)):
        raise ProtocolError(f"artifact origin {url[:80]!r} must be an https:// base URL ending in '/' with no "
                            f"credentials, query or fragment, at most {MAX_ORIGIN_CHARS} characters")
    return url


def control_topic(run_id: str) -> str:
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/control"


def global_topic(run_id: str, round_: int | str) -> str:
    """`round_` may be "+" to subscribe to every round."""
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/global/{round_}"


def chunk_topic(run_id: str, sha256: str, index: int | str) -> str:
    """`index` may be "+" to subscribe to every chunk of one blob."""
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/artifacts/{check_sha256(sha256)}/{index}"


def fetch_topic(run_id: str, device_id: str) -> str:
    """`device_id` may be "+" on the server side."""
    dev = device_id if device_id == "+" else check_name("device_id", device_id)
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/fetch/{dev}"


def update_topic(run_id: str, device_id: str) -> str:
    dev = device_id if device_id == "+" else check_name("device_id", device_id)
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/update/{dev}"


def status_topic(run_id: str, device_id: str) -> str:
    dev = device_id if device_id == "+" else check_name("device_id", device_id)
    return f"{TOPIC_ROOT}/{check_name('run_id', run_id)}/status/{dev}"


def parse_topic(topic: str) -> tuple[str, str, tuple[str, ...]]:
    """Split `devft/<run>/<kind>/...` into (run_id, kind, rest)."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != TOPIC_ROOT:
        raise ProtocolError(f"topic {topic!r} is not under {TOPIC_ROOT}/<run_id>/")
    return parts[1], parts[2], tuple(parts[3:])
