"""devft server SDK: plans developmental stages, groups and fuses layers, builds stage
submodels, aggregates client LoRA deltas and folds them back into the full model."""

__version__ = "0.1.0"

from server_sdk import quiet as _quiet

# before any submodule imports transformers (whose quantizer registry imports torchao, which logs
# CUDA kernels it cannot load on a CPU machine): known library noise stays off unless --verbose
_quiet.install()
