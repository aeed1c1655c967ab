"""devft server SDK: plans developmental stages, groups and fuses layers, builds stage
submodels, aggregates client LoRA deltas and transfers them back to the full model."""

__version__ = "0.1.0"
