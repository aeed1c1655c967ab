"""Turn a stage submodel into device training artifacts (ONNX Runtime Training, ExecuTorch)."""
