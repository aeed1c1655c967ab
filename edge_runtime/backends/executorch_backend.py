"""Train LoRA on a device over an ExecuTorch training program (export/executorch.py).

Same interface as OrtTrainer. ExecuTorch's Python training bindings link libtorch and
hand out torch tensors, so torch is imported when a trainer is built, never when this
module is imported: a device that trains with ORT does not pay for it.

The program computes loss and LoRA gradients; the update is ExecuTorch's SGD (the only
optimizer its training API exposes), applied in place to the program's own LoRA tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_runtime.backends.checks import check_batch_shape, check_lora_set, open_artifacts
from edge_runtime.batching import IGNORE_INDEX
from edge_runtime.manifest import TensorSpec

PROGRAM = "model.pte"  # names written by export/executorch.py; the manifest's versions repeat them
TRAINABLE_DATA = "lora.ptd"
TRAIN_METHOD = "forward"
EVAL_METHOD = "evaluate"


class ExecuTorchTrainer:
    """A plain LoRA training loop over one ExecuTorch artifact directory.

    Batches are input_ids and labels, int64 [batch, seq], with batch <= the exported
    max_batch and min_seq_len <= seq <= seq_len; the program shifts labels itself and
    ignores -100. Pad on the right and label the padding -100.

    ExecuTorch only hands out its parameter tensors after a first forward/backward, so the
    constructor runs one on a tiny dummy batch (its gradients are discarded).
    """

    def __init__(
        self,
        artifact_dir: str | os.PathLike[str],
        lr: float = 1e-4,
        threads: int | None = None,
        expected_trainable: list[TensorSpec] | Mapping[str, Any] | None = None,
        momentum: float = 0.0,
    ):
        self.dir, self.manifest = open_artifacts(artifact_dir, "executorch", expected_trainable)
        versions = self.manifest.versions
        self._max_batch = int(versions.get("max_batch", 1))
        self._min_seq = int(versions.get("min_seq_len", 3))
        import torch  # lazily: the ExecuTorch bindings need it anyway
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule

        if threads:
            torch.set_num_threads(threads)  # the portable kernels are single-threaded; this bounds torch's own pools
        self._torch = torch
        program = self.dir / versions.get("program", PROGRAM)
        data = self.dir / versions.get("trainable_data", TRAINABLE_DATA)
        self._module = TrainingModule(_load_for_executorch(str(program), str(data)))
        self._specs = {t.peft_name: t for t in self.manifest.trainable}
        self._order = [t.name for t in self.manifest.trainable]  # the evaluate method's LoRA input order
        dummy = np.zeros((1, self._min_seq), dtype=np.int64)
        self._module.forward_backward(TRAIN_METHOD, (torch.from_numpy(dummy), torch.from_numpy(dummy)))
        self._params = self._module.named_parameters()  # live: share memory with the program
        if set(self._params) != set(self._order):
            raise ValueError(
                f"the program's trainable tensors differ from its manifest: program has {sorted(self._params)[:3]}..., "
                f"manifest {self._order[:3]}...; re-export the stage with `devft export`"
            )
        self._momentum = float(momentum)
        self._lr = float(lr)
        self._optimizer = self._make_optimizer()

    def _make_optimizer(self) -> Any:
        from executorch.extension.training import get_sgd_optimizer

        return get_sgd_optimizer(self._params, self._lr, self._momentum, 0.0, 0.0, False)

    # --- LoRA tensors, keyed by PEFT state_dict name ---

    def get_lora(self) -> dict[str, np.ndarray]:
        return {peft: self._params[t.name].detach().numpy().copy() for peft, t in self._specs.items()}

    def set_lora(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Replace every LoRA tensor; a partial or foreign set is refused before anything is written."""
        check_lora_set(tensors, self._specs, self.manifest)
        with self._torch.no_grad():
            for name, value in tensors.items():
                self._params[self._specs[name].name].copy_(self._torch.from_numpy(np.ascontiguousarray(value)))
        self._optimizer = self._make_optimizer()  # momentum belongs to the old tensors

    # --- steps ---

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        """One SGD step on one batch; labels == -100 are left out of the loss."""
        loss = self._forward_backward(input_ids, labels)
        self._optimizer.step(self._module.named_gradients())
        return loss

    def loss_and_grads(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Forward and backward without an optimizer step (for checks and gradient-based methods)."""
        loss = self._forward_backward(input_ids, labels)
        grads = self._module.named_gradients()
        return loss, {peft: grads[t.name].numpy().copy() for peft, t in self._specs.items()}

    def eval_loss(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        return self.evaluate(input_ids, labels)[0]

    def evaluate(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and next-token logits [batch, seq - 1, vocab] (position t predicts token t + 1)."""
        self._check_batch(input_ids, labels, training=False)
        args = (self._torch.from_numpy(input_ids), self._torch.from_numpy(labels), *(self._params[n] for n in self._order))
        loss, logits = self._module.model.run_method(EVAL_METHOD, args)
        return float(loss), logits.numpy()

    def set_lr(self, lr: float) -> None:
        """ExecuTorch's SGD takes its rate at construction: a new optimizer (momentum restarts)."""
        self._lr = float(lr)
        self._optimizer = self._make_optimizer()

    @property
    def lr(self) -> float:
        return self._lr

    def _forward_backward(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        self._check_batch(input_ids, labels, training=True)
        torch = self._torch
        (loss,) = self._module.forward_backward(TRAIN_METHOD, (torch.from_numpy(input_ids), torch.from_numpy(labels)))
        return float(loss)

    def _check_batch(self, input_ids: np.ndarray, labels: np.ndarray, *, training: bool) -> None:
        check_batch_shape(input_ids, labels, self._min_seq, self.manifest.seq_len)
        batch = input_ids.shape[0]
        if not 1 <= batch <= self._max_batch:
            raise ValueError(f"batch size {batch} outside [1, {self._max_batch}] these artifacts were planned for")
        if training and not (labels[:, 1:] != IGNORE_INDEX).any():
            raise ValueError("every target label is -100: nothing to learn from this batch; skip it")
