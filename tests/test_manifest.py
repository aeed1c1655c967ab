"""The artifact manifest and the one name mapping, without any export."""

from __future__ import annotations

import pytest

from edge_runtime.manifest import MANIFEST_NAME, InputSpec, Manifest, ManifestError, TensorSpec, load_manifest, write_manifest
from export import naming


def test_naming_round_trip_and_tied_embedding():
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert naming.to_peft_name(naming.to_artifact_name(key)) == key and naming.is_lora(key)
    assert naming.tied_alias("base_model.model.lm_head.weight") == "base_model.model.model.embed_tokens.weight"
    assert naming.tied_alias("base_model.model.model.embed_tokens.weight") == "base_model.model.lm_head.weight"
    assert naming.tied_alias(key) is None
    with pytest.raises(ValueError, match="devft export"):
        naming.to_peft_name("onnx::MatMul_123")


def test_state_key_finds_a_tensor_or_its_tied_twin_and_names_what_is_missing():
    head, emb = "base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"
    assert naming.state_key({head: 1}, naming.to_artifact_name(head), "graph weight") == head
    assert naming.state_key({emb: 1}, naming.to_artifact_name(head), "graph weight") == emb  # tied: stored once
    with pytest.raises(KeyError, match=r"template tensor 'model\.x' has no counterpart 'x' in the submodel; delete"):
        naming.state_key({head: 1}, "model.x", "template tensor")


def test_manifest_round_trip_covers_nested_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    spec = TensorSpec("model.x.lora_A.default.weight", "x.lora_A.default.weight", (4, 8))
    m = Manifest(
        run_id="r",
        stage=2,
        backend="executorch",
        model_config={"hidden_size": 8},
        trainable=[spec],
        inputs=[InputSpec("input_ids", ("batch", "seq"))],
        seq_len=32,
    )
    write_manifest(tmp_path, m)
    loaded = load_manifest(tmp_path, expected_trainable=[spec])
    assert loaded == m and set(loaded.files) == {"a.bin", "sub/b.bin"}
    with pytest.raises(ManifestError, match="backend"):
        Manifest(run_id="r", stage=0, backend="tflite", model_config={}, trainable=[], inputs=[], seq_len=8)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path)


