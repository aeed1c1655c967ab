"""The manifest that travels with every exported artifact directory.

A device receives a directory of files (graphs, checkpoint, tokenizer) produced
offline by `export/`. Before it spends minutes training on them it must know
they are complete, unmodified and the ones the server meant: `manifest.json`
records what was exported (run, stage, layer groups, model config, trainable
tensors, inputs) and the sha256 and size of every other file in the directory.

Torch-free on purpose (stdlib + numpy): the device imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # 2: "onnx" backend; `max_seq_len` renamed `seq_len` (the run's one sequence length)
MANIFEST_NAME = "manifest.json"
BACKENDS = ("onnx", "ort", "executorch")
# frozen weights as stored (Manifest.weights, and what a device's hello declares), by RunConfig.weights: the
# name of the byte format, so a runtime that reads another format (the symmetric int8 and int4 before int8-asym
# and int4-asym) refuses
WEIGHT_FORMATS = {"fp32": "fp32", "int8": "int8-asym", "int4": "int4-asym"}
WEIGHT_SCHEMES = tuple(WEIGHT_FORMATS.values())
QUANT_BLOCK = 32  # inputs per scale of a quantized weight

_REEXPORT = "re-export the stage with `devft export`"
_REFETCH = "delete the cached artifact dir and fetch it again"


class ManifestError(ValueError):
    """An artifact directory that must not be trained on; the message says why and what to do."""


def check_one_of(name: str, value: Any, choices: Sequence[Any], error: type[Exception] = ValueError, *,
                 hint: str = "") -> None:
    """Refuse a setting outside its choices, naming them: `<name> must be one of <choices>, got <value>[; hint]`."""
    if value not in choices:
        raise error(f"{name} must be one of {choices}, got {value!r}" + (f"; {hint}" if hint else ""))


@dataclass(frozen=True)
class TensorSpec:
    """One trainable tensor: its name inside the artifacts and its PEFT state_dict key."""

    name: str
    peft_name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["peft_name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "peft_name": self.peft_name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class InputSpec:
    """A graph input; symbolic dimensions are strings such as "batch" or "seq"."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "int64"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        return cls(str(d["name"]), tuple(d["shape"]), str(d["dtype"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


ACTIVATIONS = ("keep", "recompute")  # Manifest.activations: what the training graph holds from forward to backward


@dataclass
class Manifest:
    """Everything a device needs to know about an artifact directory, serialised as JSON."""

    run_id: str
    stage: int
    backend: str
    model_config: dict[str, Any]
    trainable: list[TensorSpec]
    inputs: list[InputSpec]
    seq_len: int
    groups: list[list[int]] = field(default_factory=list)
    anchors: list[int] = field(default_factory=list)
    versions: dict[str, Any] = field(default_factory=dict)  # opset, ir_version, runtime, exporter...
    optimizer: str = "adamw"  # baked into the optimizer graph; recorded so a reader knows which
    # how the frozen weights are stored: "fp32", "int8-asym" or "int4-asym" (a float16 scale and minimum per block
    # of 32 inputs; export/quant.py); a device whose runtime cannot run a format refuses it
    weights: str = "fp32"
    # "recompute": each decoder layer's backward recomputes the layer's forward from its input (export/recompute.py):
    # the same inputs, outputs and values, less memory, more time; a runtime may pick its execution order by it
    activations: str = "keep"
    tokenizer_file: str | None = None
    chat_template: str | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)  # filled by write_manifest
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_one_of("backend", self.backend, BACKENDS, ManifestError)
        check_one_of("weights", self.weights, WEIGHT_SCHEMES, ManifestError, hint=_REEXPORT)
        check_one_of("activations", self.activations, ACTIVATIONS, ManifestError, hint=_REEXPORT)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trainable"] = [t.to_dict() for t in self.trainable]
        d["inputs"] = [i.to_dict() for i in self.inputs]
        if d["weights"] == "fp32":  # absent means fp32: an fp32 manifest stays readable by runtimes before the field
            del d["weights"]
        if d["activations"] == "keep":  # likewise: absent means kept
            del d["activations"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        d = dict(d)
        d["trainable"] = [TensorSpec.from_dict(t) for t in d["trainable"]]
        d["inputs"] = [InputSpec.from_dict(i) for i in d["inputs"]]
        d["files"] = {k: FileEntry(str(v["sha256"]), int(v["size"])) for k, v in d.get("files", {}).items()}
        d["groups"] = [[int(i) for i in g] for g in d.get("groups", [])]
        return cls(**d)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _artifact_files(directory: Path) -> list[str]:
    """Every file under `directory` except the manifest itself, as sorted posix paths."""
    names = []
    for root, _, files in os.walk(directory):
        for f in files:
            rel = (Path(root) / f).relative_to(directory).as_posix()
            if rel != MANIFEST_NAME:
                names.append(rel)
    return sorted(names)


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Hash every file now in `directory` into `manifest.files` and write manifest.json.

    Call it last, after every artifact file is in place: files added later are
    not covered and a device will not know about them.
    """
    directory = Path(directory)
    manifest.files = {}
    for rel in _artifact_files(directory):
        p = directory / rel
        manifest.files[rel] = FileEntry(sha256_file(p), p.stat().st_size)
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_manifest(
    directory: str | os.PathLike[str],
    expected_trainable: Sequence[TensorSpec] | Mapping[str, Sequence[int]] | None = None,
    *,
    verify_hashes: bool = True,
) -> Manifest:
    """Read and verify manifest.json; raise ManifestError if the directory must not be used.

    `expected_trainable` is what the caller (server or device) believes the LoRA
    tensors are: TensorSpecs, or a mapping of PEFT name to shape.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {directory}: not an artifact dir; {_REEXPORT}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); {_REFETCH}") from e
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {version!r}, this runtime reads only {FORMAT_VERSION}; "
            f"{_REEXPORT} (or update the device runtime)"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path} is malformed ({e!r}); {_REEXPORT}") from e
    verify_files(directory, manifest, verify_hashes=verify_hashes)
    check_weight_files(manifest)
    if expected_trainable is not None:
        check_trainable(manifest, expected_trainable)
    return manifest


def verify_files(directory: Path, manifest: Manifest, *, verify_hashes: bool = True) -> None:
    for rel, entry in manifest.files.items():
        p = directory / rel
        if not p.is_file():
            raise ManifestError(f"{p} is listed in the manifest but missing; {_REFETCH}")
        size = p.stat().st_size
        if size != entry.size:
            raise ManifestError(f"{p} has {size} bytes, the manifest says {entry.size}; {_REFETCH}")
        if verify_hashes and (digest := sha256_file(p)) != entry.sha256:
            raise ManifestError(f"{p} has sha256 {digest}, the manifest says {entry.sha256}; {_REFETCH}")


def check_weight_files(manifest: Manifest) -> None:
    """The weight files must be what `manifest.weights` says: quantized sets (`<w>.qweight.bin` with
    `<w>.qscale.bin`) exactly when the scheme is not fp32. The decoder's weights (int8-asym one byte a value,
    int4-asym half a byte) with a float16 scale and a float16 minimum (`<w>.qmin.bin`) per 32; the tied embedding
    (no minimum file) symmetric int8 under both: one byte a value, a float32 scale per 32."""
    files = {rel: entry.size for rel, entry in manifest.files.items() if rel.startswith("weights/")}
    quantized = {rel[: -len(".qweight.bin")]: size for rel, size in files.items() if rel.endswith(".qweight.bin")}
    if manifest.weights == "fp32":
        if quantized:
            raise ManifestError(f"the manifest says weights fp32 but {len(quantized)} weight files are quantized "
                                f"(e.g. {next(iter(quantized))}.qweight.bin); {_REEXPORT}")
        return
    if not quantized:
        raise ManifestError(f"the manifest says weights {manifest.weights} but no weight file is quantized; {_REEXPORT}")
    for stem, size in quantized.items():
        if not _quantized_set_fits(manifest.weights, stem, size, files.get(stem + ".qscale.bin"),
                                   files.get(stem + ".qmin.bin")):
            raise ManifestError(f"{stem}.qweight.bin ({size} bytes) does not hold {manifest.weights} values for its "
                                f"scales ({files.get(stem + '.qscale.bin')} bytes) and minimums "
                                f"({files.get(stem + '.qmin.bin')} bytes); the files do not match the manifest's "
                                f"scheme: {_REEXPORT}")


def _quantized_set_fits(scheme: str, stem: str, size: int, scale: int | None, minimum: int | None) -> bool:
    if scale is None:
        return False
    if minimum is None:  # the tied embedding table's symmetric int8: 1 byte a value, float32 scales
        return size == scale // 4 * QUANT_BLOCK and stem.endswith((".table", "lm_head"))
    values = scale // 2 * QUANT_BLOCK  # float16 scales (and minimums), one per 32 values
    return minimum == scale and size * {"int8-asym": 1, "int4-asym": 2}[scheme] == values


def check_trainable(manifest: Manifest, expected: Sequence[TensorSpec] | Mapping[str, Sequence[int]]) -> None:
    """Compare the manifest's trainable tensors with what the caller expects, by PEFT name."""
    if isinstance(expected, Mapping):
        want = {name: (tuple(int(s) for s in shape), None) for name, shape in expected.items()}
    else:
        want = {t.peft_name: (tuple(t.shape), t.dtype) for t in expected}
    have = {t.peft_name: (tuple(t.shape), t.dtype) for t in manifest.trainable}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    wrong = [
        f"{n}: expected {want[n][0]} {want[n][1] or ''}, artifacts have {have[n][0]} {have[n][1]}"
        for n in sorted(want.keys() & have.keys())
        if want[n][0] != have[n][0] or (want[n][1] is not None and want[n][1] != have[n][1])
    ]
    if missing or extra or wrong:
        raise ManifestError(
            f"trainable tensors do not match the expected LoRA set (run {manifest.run_id!r}, stage "
            f"{manifest.stage}): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}, mismatched {wrong[:5]}; "
            f"the artifacts belong to another model or LoRA config: {_REEXPORT}"
        )
