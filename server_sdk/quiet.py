"""Keep the terminal for progress: known library noise is dropped at its source unless --verbose.

A newcomer's first run used to print hundreds of ONNX Runtime INFO lines (graph transformers
run while the training artifacts are generated), `torchvision is not installed` from torch's
ONNX exporter, a FutureWarning and exporter UserWarnings, and `Failed to load .../_C_mxfp8...so`
from torchao (installed for the ExecuTorch exporter; transformers imports it while resolving
quantizers in `from_pretrained`, and it tries to load CUDA kernels on a CPU machine). None of
them is actionable, and they break up the progress bars.

Libraries' own progress bars are noise of the same kind (issue 26): transformers draws
`Converting and de-quantizing GGUF tensors`, `Loading weights` and `Writing model shards` bars
while the model is converted, loaded and saved, between devft's own phase lines and into
captured test output. Its bars go through `transformers.utils.logging.tqdm` (which asks a hook
we set) except the GGUF one, a plain tqdm the module imported; both are disabled on import
unless verbose, and devft's own progress (server_sdk/progress.py) says what phase is running.

`install()` runs on import of server_sdk.engine.model (so `python -c "...load_base_model()"` in
scripts/test.sh is quiet too); `configure(verbose)` is what `devft` calls from the command
line. `--verbose` (or DEVFT_VERBOSE=1, which child processes such as local fleet devices
inherit) shows everything again: the filters stand aside and ONNX Runtime logs at INFO.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from typing import Any

VERBOSE_ENV = "DEVFT_VERBOSE"
ORT_QUIET_SEVERITY = 3  # ERROR: ONNX Runtime's INFO/WARNING lines are for people debugging ORT itself
ORT_VERBOSE_SEVERITY = 1  # INFO

# logger name -> message fragments that are known, expected and not actionable on a CPU machine
KNOWN_LOG_NOISE: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load",),  # CUDA/SM90 kernels of torchao on a machine without them
    "torchao.kernel.intmm": ("Detected no triton",),  # GPU kernels again
    "torch.utils._pytree": ("is an Enum subclass",),  # torchao registering enums, deprecated in torch 2.13
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
}
# (category, message regex, module regex) for warnings.filterwarnings
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r".*is_gradient_checkpointing.*", ""),  # transformers' own deprecation, from peft
    (FutureWarning, r".*LeafSpec.*", ""),  # torch.export pytree deprecation, raised during ONNX export
    (UserWarning, r"", r"torch\.onnx"),  # the exporter's notes ("The axis name: batch will not be used ...")
    (FutureWarning, r"", r"torch\.onnx"),
)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropKnownNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        if is_verbose():
            return True
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Quiet ONNX Runtime as soon as it (or its training graph builder) is imported.

    Importing onnxruntime eagerly would cost seconds (it probes torch's ORTModule) in every
    `devft` command, most of which never touch it. Its training graph builder
    (onnxblock, run while stage artifacts are generated) makes its own SessionOptions, and
    ORT logs those graph optimisations at INFO unless the options say otherwise: hundreds
    of lines per export, whatever the default logger's severity."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        action = _AFTER_IMPORT.get(name)
        if action is None:
            return None
        sys.meta_path.remove(self)  # find the real spec without finding ourselves again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            real_exec(module)
            action(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _library_bar(factory: Any, args: tuple, kwargs: dict) -> Any:
    """transformers' tqdm hook: its bars are drawn only when verbose (asked per bar, so --verbose
    set after the import still shows them)."""
    if not is_verbose():
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def _quiet_transformers_bars(module: Any) -> None:
    """transformers.utils.logging: route every bar it makes through _library_bar."""
    set_hook = getattr(module, "set_tqdm_hook", None)
    if set_hook is not None:
        set_hook(_library_bar)
    elif not is_verbose():  # a transformers without the hook: the global switch, fixed at this point
        module.disable_progress_bar()


def _quiet_gguf_bar(module: Any) -> None:
    """transformers.modeling_gguf_pytorch_utils: its `tqdm` is tqdm.auto's own; wrap it the same way."""
    real = getattr(module, "tqdm", None)
    if real is None or getattr(real, "_devft_quiet", False):
        return

    def quiet_tqdm(*args: Any, **kwargs: Any) -> Any:
        return _library_bar(real, args, kwargs)

    quiet_tqdm._devft_quiet = True  # type: ignore[attr-defined]
    module.tqdm = quiet_tqdm


def _quiet_graph_builder(module: Any) -> None:
    real = getattr(module, "SessionOptions", None)
    if real is None or getattr(real, "_devft_quiet", False):
        return

    def session_options() -> Any:
        options = real()
        options.log_severity_level = ORT_VERBOSE_SEVERITY if is_verbose() else ORT_QUIET_SEVERITY
        return options

    session_options._devft_quiet = True  # type: ignore[attr-defined]
    module.SessionOptions = session_options


_AFTER_IMPORT: dict[str, Any] = {
    "onnxruntime": lambda module: set_ort_severity(module),
    "onnxruntime.training.onnxblock._training_graph_utils": _quiet_graph_builder,
    "transformers.utils.logging": _quiet_transformers_bars,
    "transformers.modeling_gguf_pytorch_utils": _quiet_gguf_bar,
}


_HOOK = _AfterImport()
_installed = False


def set_ort_severity(ort: Any | None = None) -> None:
    """ERROR and above unless verbose; a no-op where onnxruntime is not loaded yet (the hook does it then)."""
    ort = ort or sys.modules.get("onnxruntime")
    setter = getattr(ort, "set_default_logger_severity", None)
    if setter is not None:
        setter(ORT_VERBOSE_SEVERITY if is_verbose() else ORT_QUIET_SEVERITY)


def install() -> None:
    """Attach the log filters, the warning filters and the ONNX Runtime hook (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, fragments in KNOWN_LOG_NOISE.items():
        logging.getLogger(name).addFilter(_DropKnownNoise(fragments))
    if not is_verbose():
        for category, message, module in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
    for name, action in _AFTER_IMPORT.items():  # modules imported before us get the same treatment
        module = sys.modules.get(name)
        if module is not None:
            action(module)


def configure(verbose: bool) -> None:
    """The command line's choice, for this process and the device processes it starts."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
    install()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if verbose:
        warnings.simplefilter("default")  # every warning, once per place, ahead of the filters above
    set_ort_severity()
