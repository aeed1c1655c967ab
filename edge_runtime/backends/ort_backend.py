"""Train LoRA on a device over ONNX Runtime Training artifacts, without torch.

The artifacts come from export/ort.py. `onnxruntime.training/__init__.py` imports
torch (for ORTModule and amp), and so does `import onnxruntime` itself when torch
happens to be installed (it probes for ORTModule). A device has no torch, and a
device process that has it installed must not pay for it; `training_api` loads
only `onnxruntime.training.api`, which needs numpy and the C bindings.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_runtime.backends.checks import check_batch_shape, check_lora_set, open_artifacts
from edge_runtime.batching import IGNORE_INDEX, MIN_SEQ_LEN
from edge_runtime.manifest import TensorSpec

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"


def training_api() -> types.ModuleType:
    """Import onnxruntime.training.api without running onnxruntime.training/__init__.py.

    A stand-in package with the real __path__ lets the submodule import, and a None
    entry for ortmodule turns onnxruntime's import-time ORTModule probe into a quick
    ImportError, which it tolerates. Both entries are removed afterwards so a later
    real `import onnxruntime.training` (server side, torch present) still works.
    """
    if "onnxruntime.training.api" in sys.modules:
        return sys.modules["onnxruntime.training.api"]
    if "onnxruntime.training" in sys.modules:  # the real package is already loaded, torch with it
        return importlib.import_module("onnxruntime.training.api")
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("onnxruntime-training is not installed: pip install onnxruntime-training==1.19.2")
    stand_in = types.ModuleType("onnxruntime.training")
    stand_in.__path__ = [os.path.join(spec.submodule_search_locations[0], "training")]
    sys.modules["onnxruntime.training"] = stand_in
    sys.modules["onnxruntime.training.ortmodule"] = None  # type: ignore[assignment]
    try:
        importlib.import_module("onnxruntime")
        return importlib.import_module("onnxruntime.training.api")
    finally:
        sys.modules.pop("onnxruntime.training", None)
        sys.modules.pop("onnxruntime.training.ortmodule", None)


class OrtTrainer:
    """A plain LoRA training loop over one artifact directory.

    One trainer per round: AdamW moments live as long as the trainer, so a new
    round (new global LoRA from the server) should build a new OrtTrainer.

    Batches are input_ids and labels, int64 [batch, seq]; the graph shifts labels
    itself and ignores -100. There is no attention mask input: pad on the right
    and label the padding -100, which is exact under causal attention.
    """

    def __init__(
        self,
        artifact_dir: str | os.PathLike[str],
        lr: float = 1e-4,
        threads: int | None = None,
        expected_trainable: list[TensorSpec] | Mapping[str, Any] | None = None,
    ):
        self.dir, self.manifest = open_artifacts(artifact_dir, "ort", expected_trainable)
        api = training_api()
        from onnxruntime import SessionOptions  # already loaded by training_api

        options = SessionOptions()
        options.log_severity_level = 1 if os.environ.get("DEVFT_VERBOSE", "") not in ("", "0") else 3  # INFO / ERROR
        if threads:
            options.intra_op_num_threads = threads
        self._state = api.CheckpointState.load_checkpoint(str(self.dir / CHECKPOINT))
        self._module = api.Module(
            str(self.dir / TRAINING_MODEL), self._state, str(self.dir / EVAL_MODEL), session_options=options
        )
        self._optimizer = api.Optimizer(str(self.dir / OPTIMIZER_MODEL), self._module)
        self._optimizer.set_learning_rate(lr)
        self._specs = {t.peft_name: t for t in self.manifest.trainable}

    # --- LoRA tensors, keyed by PEFT state_dict name ---

    def get_lora(self) -> dict[str, np.ndarray]:
        params = self._state.parameters
        return {peft: np.array(params[t.name].data, copy=True) for peft, t in self._specs.items()}

    def set_lora(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Replace every LoRA tensor; a partial or foreign set is refused before anything is written."""
        check_lora_set(tensors, self._specs, self.manifest)
        for name, value in tensors.items():
            self._state.parameters[self._specs[name].name] = np.ascontiguousarray(value)

    def get_grads(self) -> dict[str, np.ndarray]:
        """Gradients accumulated since the last reset (by `loss_and_grads`), keyed by PEFT name."""
        params = self._state.parameters
        return {peft: np.array(params[t.name].grad, copy=True) for peft, t in self._specs.items()}

    # --- steps ---

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        """One optimizer step on one batch; labels == -100 are left out of the loss."""
        self._check_batch(input_ids, labels)
        self._module.train()
        loss = self._module(input_ids, labels)
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return float(loss)

    def loss_and_grads(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Forward and backward without an optimizer step (for checks and gradient-based methods)."""
        self._check_batch(input_ids, labels)
        self._module.train()
        self._module.lazy_reset_grad()
        loss = float(self._module(input_ids, labels))
        grads = self.get_grads()
        self._module.lazy_reset_grad()  # the next train_step must not add these in
        return loss, grads

    def eval_loss(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        return self.evaluate(input_ids, labels)[0]

    def evaluate(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and next-token logits [batch, seq - 1, vocab] (position t predicts token t + 1)."""
        self._check_batch(input_ids, labels)
        self._module.eval()
        loss, logits = self._module(input_ids, labels)
        batch, seq = input_ids.shape
        return float(loss), logits.reshape(batch, seq - 1, -1)

    @property
    def state(self) -> Any:
        """The live onnxruntime CheckpointState (all parameters, frozen ones included), for inspection."""
        return self._state

    def set_lr(self, lr: float) -> None:
        self._optimizer.set_learning_rate(float(lr))

    @property
    def lr(self) -> float:
        return float(self._optimizer.get_learning_rate())

    def _check_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> None:
        check_batch_shape(input_ids, labels, MIN_SEQ_LEN, self.manifest.seq_len)
        if not (labels[:, 1:] != IGNORE_INDEX).any():
            # the mean over zero tokens is NaN, and one NaN step ruins the AdamW moments for the round
            raise ValueError("every target label is -100: nothing to learn from this batch; skip it")
