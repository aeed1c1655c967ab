"""Turn a stage submodel into device training artifacts (ONNX Runtime Training, ExecuTorch).

A library below the server: it takes a submodel and writes artifacts (with edge_runtime's
manifest) and never imports server_sdk; `devft export` lives in server_sdk/export_cli.py."""
