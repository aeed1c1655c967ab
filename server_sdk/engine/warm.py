"""Trace a run's stage graphs ahead of need, in a background process (issue #15).

A device format's graph depends only on the submodel's shape (layers, model config, LoRA
config, sequence length), and the run's stage sizes are known when it starts. Tracing the
portable training graph is the slow part of a stage start the first time a machine sees a
shape (SmolLM2-135M: about 30 s of CPU for 4 layers, 166 s for 30), so the fleet coordinator
starts one process that traces the shapes of the later stages while the base model is
evaluated and the first stages train. The shapes are built from the base model's config
with zero weights (a template's weights are restamped for every stage), and the template
cache's per-shape lock (export.onnx.ensure_template) makes the coordinator wait for a graph
this process is tracing instead of tracing it twice. Nothing here changes what a run trains:
a template is the same graph whoever traces it.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from pathlib import Path

from export.options import PLAIN, GraphOptions
from server_sdk.config import LoraSettings


def shaped_submodel(config: dict, n_layers: int, lora: LoraSettings):
    """A stage submodel's shape: the base config with n_layers decoder layers, zero weights and
    LoRA attached as the strategies attach it (its template key equals the real submodel's)."""
    import torch

    from server_sdk.method.lora import attach_lora
    from server_sdk.method.submodel import empty_model

    model = empty_model(config, n_layers)  # parameters on the meta device, buffers (rotary frequencies) real
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model = model.to_empty(device="cpu")  # uninitialised storage for everything, buffers included
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, b in model.named_buffers():  # the graph bakes buffers in as constants: keep their values
            b.copy_(buffers[name])
    model.tie_weights()
    return attach_lora(model, lora, seed=0)


def trace_templates(config: dict, stage_sizes: list[int], lora: LoraSettings, seq_len: int,
                    template_root: str, graph: GraphOptions = PLAIN) -> None:
    """Make sure the portable graph of every stage size is cached (the background process's work), as the run
    exports it (`graph`: RunConfig.graph_options())."""
    import torch

    from export import template_dir
    from export.onnx import ensure_template
    from server_sdk.quiet import install

    torch.set_num_threads(1)  # one core: the coordinator and the devices share the rest
    install()
    # stop() terminates: unwind, so a graph half-written in its staging directory is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    for n in stage_sizes:
        ensure_template(shaped_submodel(config, n, lora), template_dir("onnx", template_root), seq_len=seq_len,
                        graph=graph)


class TemplateWarmer:
    """One daemon process tracing the given stage sizes' graphs; `stop()` ends it (a graph it was
    tracing is simply traced again by whoever needs it: templates are published atomically)."""

    def __init__(self, config: dict, stage_sizes: list[int], lora: LoraSettings, seq_len: int,
                 template_root: str | Path, graph: GraphOptions = PLAIN):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or MQTT sockets inherited
        self.process = ctx.Process(target=trace_templates, name="devft-trace-templates", daemon=True,
                                   args=(config, list(stage_sizes), lora, seq_len, str(template_root), graph))

    def start(self) -> TemplateWarmer:
        self.process.start()
        return self

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(10)
