"""How the portable training graph holds the frozen model: one value for the export, its template cache, the
memory estimate, the template warmer and the run, where two loose arguments used to travel side by side.

    weights    how the frozen weights are stored: "fp32", or "int8" / "int4" quantized blockwise and dequantized
               in the graph where each is used (export/quant.py; the manifest names the byte format)
    recompute  each decoder layer's backward recomputes its forward's activations instead of keeping them from
               the forward (export/recompute.py; the manifest's `activations`)

The default (fp32 weights, activations kept) is what every artifact format exports; the others are the onnx
format's alone (`for_format`). No torch here: the run config and the memory estimate import it.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMES = ("fp32", "int8", "int4")  # the frozen weights' storage (export/quant.py)


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"weights must be one of {SCHEMES}, got {scheme!r}")
    return scheme


@dataclass(frozen=True)
class GraphOptions:
    weights: str = "fp32"
    recompute: bool = False

    def __post_init__(self) -> None:
        check_scheme(self.weights)
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be true or false, got {self.recompute!r}")

    def for_format(self, fmt: str) -> GraphOptions:
        """What format `fmt`'s artifacts carry: these options for onnx; plain for the others, which get the
        dequantized values as fp32 (a quantized run's server-side model) and keep their activations."""
        return self if fmt == "onnx" else PLAIN

    def check_format(self, fmt: str) -> None:
        """Refuse options that format `fmt` does not export (all but plain are the onnx format's)."""
        if fmt == "onnx":
            return
        if self.weights != "fp32":
            raise ValueError(f"quantized frozen weights ({self.weights}) are exported for the onnx format only, "
                             f"not {fmt!r}")
        if self.recompute:
            raise ValueError(f"activation recomputation is exported for the onnx format only, not {fmt!r}")


PLAIN = GraphOptions()
