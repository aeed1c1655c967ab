"""Train LoRA on a device with the ordinary `onnxruntime` package (the portable format).

The artifacts come from export/onnx.py: `train.onnx` maps (input_ids, labels, LoRA tensors)
to (loss, LoRA gradients), `eval.onnx` to the loss alone. The LoRA tensors live here, in
numpy, and so does the optimiser (edge_runtime/optim.py): onnxruntime only evaluates
graphs, which it does on x86_64 and aarch64 Linux, Jetson, Android, iOS and the web.
Torch-free: numpy, safetensors and onnxruntime.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends.checks import check_batch_shape, check_lora_set, open_artifacts
from edge_runtime.batching import IGNORE_INDEX, MIN_SEQ_LEN, check_micro_batch, micro_batches
from edge_runtime.manifest import TensorSpec, check_one_of
from edge_runtime.optim import make_optimizer

FORMAT = "onnx"
TRAIN_GRAPH = "train.onnx"  # names written by export/onnx.py; the manifest's versions repeat them
EVAL_GRAPH = "eval.onnx"
INITIAL_LORA = "lora.safetensors"
LOSS = "loss"
GRAD_PREFIX = "grad."
# The oldest onnxruntime that runs the exported graphs (opset 20 arrived in 1.17); export/onnx.py records it
# in the manifest and a device below it refuses at startup, naming the version it needs.
MIN_ONNXRUNTIME = "1.17.0"
# Graphs with quantized frozen weights dequantize with opset 21's blockwise DequantizeLinear (onnxruntime 1.20)
QUANTIZED_MIN_ONNXRUNTIME = "1.20.0"


@dataclass(frozen=True)
class SessionChoices:
    """How onnxruntime runs the graphs: the levers that trade step time against peak memory.

    arena        "off": every buffer from malloc; "on": onnxruntime's CPU arena, which keeps freed buffers for reuse
                 and grows by powers of two (its high-water mark stays); "exact": one process-wide arena that
                 grows by exactly what is asked (kSameAsRequested), shared by the train and eval sessions
    optimization graph optimisation level: "all", "extended", "basic" or "disabled"
    folding      constant folding (part of every level but "disabled"); it folds Transpose(W) of frozen
                 weights into new initializers, a transposed copy of each weight the backward uses
    prepacking   MLAS prepacks constant MatMul weights into its own layout (one more copy of them)
    order        node execution order: "default" (topological) or "priority" (onnxruntime's priority-based
                 order, which here frees the LM head's vocabulary-sized activations sooner)
    release_memory  on glibc, a fixed 128 KiB mmap threshold (mallopt), so every big buffer is its own mapping,
                 returned to the system when freed: with the arena off, glibc's adaptive threshold otherwise
                 moves up to 32 MiB and keeps freed step buffers in the heap (SmolLM2 4-layer stage: peak 560 ->
                 523 MiB fp32, 791 -> 565 MiB int8, same step time; benchmarks/RESULTS.md section 3)
    The defaults come from benchmarks/export.py's sweep (`--onnx-sweep`, RESULTS.md section 2; SmolLM2's
    4-layer stage, batch 4 x 128, one thread). Folding and prepacking each make a second, private copy of the
    frozen weights (folded transposes, packed MatMul operands) beside the weights onnxruntime maps from the
    external-data files; without them the weights stay file-backed pages that the train and eval sessions
    share, and the optimiser still fuses the transposes into FusedMatMul(transB): peak RSS 544 instead of
    ~830 MiB (eager torch: 926) at the same CPU time per step, medians of three rounds; the priority-based
    order takes another 40-50 MiB off. The arena would cut 25-45% of the step's CPU time (without it every
    big buffer is fresh, zero-filled pages each step) but keeps its high-water mark: peak 826 MiB.
    """

    arena: str = "off"
    optimization: str = "all"
    folding: bool = False
    prepacking: bool = False
    order: str = "priority"  # quantized weights, recomputed activations: "default" unless chosen (see QUANTIZED_ORDER)
    release_memory: bool = True

    def __post_init__(self) -> None:
        check_one_of("arena", self.arena, ARENAS)
        check_one_of("order", self.order, sorted(ORDERS))
        check_one_of("optimization", self.optimization, sorted(OPTIMIZATION_LEVELS))

    def label(self) -> str:
        return (f"arena {self.arena}, opt {self.optimization}, fold {'on' if self.folding else 'off'}, "
                f"prepack {'on' if self.prepacking else 'off'}, order {self.order}"
                + ("" if self.release_memory else ", glibc threshold adaptive"))


ARENAS = ("off", "on", "exact")
ORDERS = {"default": "DEFAULT", "priority": "PRIORITY_BASED"}
OPTIMIZATION_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
                       "disabled": "ORT_DISABLE_ALL"}
DEFAULT_SESSION = SessionChoices()
# Graphs with quantized weights (export/quant.py) run in the default order: the priority-based one started the
# dequantizations (inputs: initializers only, so ready at once) ahead of their use and held their float
# results (SmolLM2 4-layer int8: peak 433 MiB default vs 565 MiB priority-based). Since export.quant_graph.
# defer_dequantization makes each wait for its use, the two orders are within a few MiB (default lower).
# Graphs that recompute activations (Manifest.activations) too: the priority-based order ran the copies of the
# layers' forwards so that it held most of what they free (SmolLM2 30 layers fp32, one row: 827 MiB against 739).
QUANTIZED_ORDER = "default"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MEMORY_RELEASED = False


def release_freed_memory() -> None:
    """glibc only (once per process): buffers over 128 KiB become their own mappings, unmapped when freed."""
    global _MEMORY_RELEASED
    if _MEMORY_RELEASED:
        return
    _MEMORY_RELEASED = True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


class RuntimeTooOld(RuntimeError):
    """This device's onnxruntime cannot run the graphs; the message names the version needed."""


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, or None if it does not import."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def check_runtime(required: str) -> None:
    """Refuse early, with the version needed, when the installed onnxruntime is too old for the graph's opset."""
    have = onnxruntime_version()
    if have is None:
        raise RuntimeTooOld(f"onnxruntime is not installed; install onnxruntime>={required} (pip install 'devft[edge]')")
    if version_tuple(have) < version_tuple(required):
        raise RuntimeTooOld(f"onnxruntime {have} is too old for these graphs: they need onnxruntime>={required} "
                            f"(pip install -U 'onnxruntime>={required}')")


def session_options(threads: int | None, choices: SessionChoices = DEFAULT_SESSION, verbose: bool | None = None) -> Any:
    """onnxruntime SessionOptions for `choices`; `threads` intra-op threads (None: the runtime's choice);
    `verbose` defaults to DEVFT_VERBOSE (set by `--verbose`)."""
    import onnxruntime as ort

    if verbose is None:
        verbose = os.environ.get("DEVFT_VERBOSE", "") not in ("", "0")

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = choices.arena != "off"
    if choices.arena == "exact":
        _register_exact_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[choices.optimization])
    if not choices.prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.execution_order = getattr(ort.ExecutionOrder, ORDERS[choices.order])
    options.log_severity_level = 1 if verbose else 3  # INFO with --verbose, else errors only
    return options


_EXACT_ARENA_REGISTERED = False


def _register_exact_arena() -> None:
    """Register (once per process) a CPU arena that extends by exactly the requested size."""
    global _EXACT_ARENA_REGISTERED
    if _EXACT_ARENA_REGISTERED:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
    _EXACT_ARENA_REGISTERED = True


def open_session(graph: Path, threads: int | None, choices: SessionChoices = DEFAULT_SESSION) -> Any:
    """An InferenceSession on the CPU for one of the graphs, with `choices` applied."""
    import onnxruntime as ort

    disabled = [] if choices.folding else ["ConstantFolding"]
    return ort.InferenceSession(str(graph), session_options(threads, choices), providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


class OnnxTrainer:
    """A plain LoRA training loop over one portable artifact directory.

    Batches are input_ids and labels, int64 [batch, seq] with seq >= 3; the graph shifts labels
    itself and ignores -100. Pad on the right and label the padding -100. A batch whose labels
    are all -100 is refused (its mean loss would be NaN and would poison the AdamW moments).

    `trainable` names the LoRA tensors (PEFT names) the optimiser updates; the others keep
    their values (FFA-LoRA trains B against a fixed A). Default: all of them.

    `micro_batch` (the round's `hyperparams.micro_batch`; None: whole batches) runs the graph on
    that many rows at a time and combines their losses and gradients into the batch's before the
    one optimiser step (docs/protocol.md, "Micro-batches"): the same loss and gradient up to float32
    rounding, with the activations of `micro_batch` rows instead of the whole batch's.
    """

    def __init__(
        self,
        artifact_dir: str | os.PathLike[str],
        lr: float = 1e-4,
        threads: int | None = None,
        expected_trainable: list[TensorSpec] | Mapping[str, Any] | None = None,
        *,
        optimizer: str | None = None,
        trainable: Iterable[str] | None = None,
        session: SessionChoices = DEFAULT_SESSION,
        micro_batch: int | None = None,
    ) -> None:
        if micro_batch is not None:
            check_micro_batch(micro_batch)  # a bad value is refused before anything loads
        self.micro_batch = micro_batch
        self.dir, self.manifest = open_artifacts(artifact_dir, FORMAT, expected_trainable)
        versions = self.manifest.versions
        check_runtime(str(versions.get("min_onnxruntime", MIN_ONNXRUNTIME)))
        if session is DEFAULT_SESSION and (self.manifest.weights != "fp32" or self.manifest.activations != "keep"):
            session = dataclasses.replace(session, order=QUANTIZED_ORDER)
        if session.release_memory:
            release_freed_memory()
        self._threads, self.session_choices = threads, session
        self._train = open_session(self.dir / versions.get("train_graph", TRAIN_GRAPH), threads, session)
        self._eval: Any = None  # built on first use: a second session holds a second copy of the weights
        self._specs = {t.peft_name: t for t in self.manifest.trainable}
        self._check_graph()
        self._lora = self._initial_lora(versions.get("initial_lora", INITIAL_LORA))
        names = set(self._specs) if trainable is None else set(trainable)
        unknown = sorted(names - set(self._specs))
        if unknown:
            raise ValueError(f"trainable names tensors these artifacts lack: {unknown[:3]}")
        self._trainable = sorted(names)
        self._optimizer_name = optimizer or self.manifest.optimizer
        self._lr = float(lr)
        self._optimizer = make_optimizer(self._optimizer_name, self._lr)

    # --- checks ---

    def _check_graph(self) -> None:
        """The graph's inputs and outputs must be exactly what the manifest describes (else: re-export)."""
        inputs = [i.name for i in self._train.get_inputs()]
        outputs = [o.name for o in self._train.get_outputs()]
        lora = [t.name for t in self.manifest.trainable]
        want_in = [i.name for i in self.manifest.inputs] + lora
        want_out = [LOSS] + [GRAD_PREFIX + n for n in lora]
        if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
            raise ValueError(
                f"{self.dir / TRAIN_GRAPH} does not match its manifest: graph inputs {inputs[:4]}..., outputs "
                f"{outputs[:3]}...; manifest expects {want_in[:4]}... and {want_out[:3]}...; re-export the stage")

    def _initial_lora(self, file_name: str) -> dict[str, np.ndarray]:
        path = self.dir / file_name
        if path.is_file():
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            check_lora_set(tensors, self._specs, self.manifest)
            return {k: np.array(v, dtype=np.float32, copy=True) for k, v in tensors.items()}
        return {k: np.zeros(t.shape, np.float32) for k, t in self._specs.items()}

    # --- LoRA tensors, keyed by PEFT state_dict name ---

    def get_lora(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._lora.items()}

    def set_lora(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Replace every LoRA tensor; a partial or foreign set is refused before anything is written.

        Optimiser state restarts: its moments belonged to the old tensors."""
        check_lora_set(tensors, self._specs, self.manifest)
        self._lora = {k: np.array(v, dtype=np.float32, copy=True) for k, v in tensors.items()}
        self._optimizer = make_optimizer(self._optimizer_name, self._lr)

    # --- steps ---

    def _feeds(self, input_ids: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids, "labels": labels}
        feeds.update({self._specs[k].name: v for k, v in self._lora.items()})
        return feeds

    def loss_and_grads(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Forward and backward without an optimizer step (for checks and gradient-based methods); in
        micro-batches of `self.micro_batch` rows when the batch has more rows than that."""
        self._check_batch(input_ids, labels)
        if self.micro_batch is None or self.micro_batch >= input_ids.shape[0]:
            loss, grads = self._run(input_ids, labels)
            return float(loss), grads
        return self._accumulate(input_ids, labels)

    def _run(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[np.float32, dict[str, np.ndarray]]:
        names = [LOSS] + [GRAD_PREFIX + self._specs[k].name for k in self._specs]
        loss, *grads = self._train.run(names, self._feeds(input_ids, labels))
        return np.float32(loss), dict(zip(self._specs, grads))

    def _accumulate(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """The batch's loss and gradients from its micro-batches, in float32 and in this order (docs/protocol.md,
        "Micro-batches"; the JS device does the same): w_i = float32(n_i) / float32(N), rounded to float32;
        the first micro-batch gives w_1 * g_1, each later one adds w_i * g_i (product rounded, then the sum)."""
        parts = micro_batches(labels, self.micro_batch)
        total = np.float32(sum(n for _, n in parts))
        loss: np.float32 | None = None
        grads: dict[str, np.ndarray] = {}
        for rows, n in parts:
            w = np.float32(n) / total
            part_loss, part_grads = self._run(input_ids[rows], labels[rows])
            if loss is None:
                loss, grads = w * part_loss, {k: w * g for k, g in part_grads.items()}
                continue
            loss = loss + w * part_loss
            for k, g in part_grads.items():
                grads[k] += w * g
        return float(loss), grads

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        """One optimiser step on one batch; labels == -100 are left out of the loss."""
        loss, grads = self.loss_and_grads(input_ids, labels)
        self._optimizer.step(self._lora, {k: grads[k] for k in self._trainable})
        return loss

    def eval_loss(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        """The loss without gradients, from the forward-only graph."""
        self._check_batch(input_ids, labels)
        if self._eval is None:
            graph = self.dir / self.manifest.versions.get("eval_graph", EVAL_GRAPH)
            self._eval = open_session(graph, self._threads, self.session_choices)
        (loss,) = self._eval.run([LOSS], self._feeds(input_ids, labels))
        return float(loss)

    def set_lr(self, lr: float) -> None:
        self._lr = float(lr)
        self._optimizer.lr = self._lr

    @property
    def lr(self) -> float:
        return self._lr

    def _check_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> None:
        check_batch_shape(input_ids, labels, MIN_SEQ_LEN, self.manifest.seq_len)
        if not (labels[:, 1:] != IGNORE_INDEX).any():
            raise ValueError("every target label is -100: nothing to learn from this batch; skip it")
