"""Stage serving: each stage's files out to the devices, and the next stage's fetched early.

Per stage the coordinator exports the submodel in every format the run serves, offers the files as MQTT
chunks (artifact_server.py) and, with an HTTPS origin, through nginx (origin.py), and announces them in
the control message; a stage's first round opens once every live device reported the stage's files
ready, or after `stage_ready_timeout_s`. During a stage's last round the coordinator announces its guess
at the next stage's files as a `prefetch` hint (prefetch.py; docs/protocol.md §11, "Prefetch"). A stage's
memory need (export/memory.py, or a measured peak) decides which devices it may be sampled from.

`StageServing` holds the methods; their state lives in `FleetExecutor` (coordinator.py), which mixes this
class in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path

from edge_runtime import protocol as P
from edge_runtime.manifest import WEIGHT_FORMATS
from export import StageInfo, export_artifacts, naming
from export.common import json_config
from export.memory import predicted_peak_mb
from export.options import PLAIN
from server_sdk.disk import prune_finished_stages
from server_sdk.engine.model import cache_root, smollm2_cache_dir
from server_sdk.engine.warm import TemplateWarmer
from server_sdk.fleet.broker import Credentials
from server_sdk.fleet.origin import OriginAuth, OriginPublisher
from server_sdk.fleet.prefetch import Speculate, Speculation
from server_sdk.method.submodel import StagePlan
from server_sdk.progress import note

log = logging.getLogger(__name__)


# the guess at the next stage (prefetch) starts once the round's devices report they started training, or
# after this long: its export would otherwise compete with their start on a machine they share
GUESS_AFTER_START_MAX_S = 1.0


def _served_files(fmt: str, artifact_dir: Path, stage: int, per_tensor_checkpoint: bool) -> dict[str, Path]:
    """{path on the device: local file} of one format's artifact directory, under stage<N>/.

    Legacy ort checkpoints travel as tensor files with `per_tensor_checkpoint` (edge_runtime/
    checkpoint_blobs.py); the onnx format already keeps every frozen tensor in its own file."""
    if fmt == "ort" and per_tensor_checkpoint and (artifact_dir / "checkpoint").is_file():
        from server_sdk.fleet.checkpoint_split import split_checkpoint

        local = split_checkpoint(artifact_dir, artifact_dir.with_name(artifact_dir.name + ".tensors"))
    else:
        local = {p.relative_to(artifact_dir).as_posix(): p for p in sorted(artifact_dir.rglob("*")) if p.is_file()}
    return {f"stage{stage}/{rel}": p for rel, p in local.items()}


def tokenizer_dir_of(base) -> Path:
    """A directory with the base model's tokenizer.json (saved once under the run cache if needed)."""

    src = getattr(base.tokenizer, "name_or_path", "") or ""
    for cand in (Path(src), smollm2_cache_dir()):
        if (cand / "tokenizer.json").is_file():
            return cand
    out = cache_root() / "tokenizers" / base.name
    if not (out / "tokenizer.json").is_file():
        base.tokenizer.save_pretrained(out)
    return out


class StageServing:
    """Stage files out, next-stage prefetch, stage readiness (mixed into FleetExecutor)."""

    def _start_origin(self, creds: Credentials) -> None:
        """Publish stage files to the HTTPS origin as well, and answer its per-download access checks: a device may
        download while it is one of the run's devices and its fleet login holds (server_sdk/fleet/origin.py)."""
        s = self.settings
        passwd = Path(s.artifact_passwd) if s.artifact_passwd else Path(creds.ca_file or ".").parent / "passwd"
        if not passwd.is_file():
            raise ValueError(f"the artifact origin checks device logins against the fleet's password file; {passwd} "
                             "does not exist (set artifact_passwd to FLEET_DIR/passwd)")
        enrolled = frozenset(self.device_of(c) for c in range(self.cfg.num_clients))
        self.origin = OriginPublisher(s.artifact_dir, s.artifact_origin, self.run_id)
        self.origin_auth = OriginAuth(s.artifact_dir, self.run_id, passwd, lambda: enrolled).start()

    def _offer(self, files: Mapping[str, Path]) -> P.ArtifactDescriptor:
        """Register files with the MQTT chunk server and, with an origin, publish them there; the descriptor."""
        descriptor = self.artifacts.add_files(files)
        return self.origin.publish(descriptor, dict(files)) if self.origin is not None else descriptor

    def stage_formats(self) -> list[str]:
        """The formats to export each stage: those the coordinator was started with (`formats`), never what
        devices declare (a hello declaring only `ort` once made it export a format it could not build)."""
        return list(self.settings.formats)

    def begin_stage(self, stage: int, plan: StagePlan, sub_model) -> int:
        """Export the stage's submodel in every format the fleet needs, serve it, and wait (at most
        `stage_ready_timeout_s`) until the devices hold it."""
        self._finish_speculation()
        dirs, seconds = self._export(stage, plan, sub_model, "")
        config = json_config(sub_model)
        total = self.serve_stage(stage, dirs, self.stage_need(config, int(config["num_hidden_layers"])),
                                 export_s=seconds)
        self._draw_key = plan.draw_key  # rounds.py's key of the stage's client draws and seeds
        self._check_update_burst(stage, sub_model)
        self._await_ready(stage, plan.draw_key)
        if not self.settings.keep_artifacts:
            prune_finished_stages(self.run_dir, stage)  # devices moved on
        return total

    def _check_update_burst(self, stage: int, sub_model) -> None:
        """Warn (log and event) when a round of this stage can send the coordinator more update bytes at once than
        the broker queues for one client (`broker_queue_bytes`): what does not fit is dropped, and the round then
        waits out its deadline (issue #27; RESULTS.md section 11 measured it with SmolLM2's full-model updates)."""
        bound = self.settings.broker_queue_bytes
        if not bound:
            return
        update = sum(p.numel() * 4 for n, p in sub_model.named_parameters() if naming.is_lora(n))  # float32 on the wire
        burst = update * self.cfg.clients_per_round
        if burst > bound:
            log.warning("stage %d: %d clients per round x %.1f MB updates = %.0f MB can arrive at once, more than the "
                        "broker queues for the coordinator (max_queued_bytes %.0f MB): updates may be dropped; raise "
                        "max_queued_bytes in the fleet's fleet.json above that (docs/protocol.md section 8)",
                        stage + 1, self.cfg.clients_per_round, update / 1e6, burst / 1e6, bound / 1e6)
            self._event("update_burst_over_broker_queue", stage=stage, update_bytes=update,
                        clients_per_round=self.cfg.clients_per_round, max_queued_bytes=bound)

    def expect_stages(self, config: dict, stage_sizes: list[int]) -> None:
        """Trace the graphs of the stages after the first in a background process (server_sdk/engine/warm.py): on a
        machine's first run that is most of each stage start, and the first stage's rounds hide it."""
        self._run_needs = {n: self.stage_need(config, n) for n in stage_sizes}
        for device in list(self._caps):  # hellos that came before the needs were known
            self._check_memory(device)
        if self.settings.trace_ahead and "onnx" in self.stage_formats() and len(stage_sizes) > 1:
            self._warmer = TemplateWarmer(config, stage_sizes[1:], self.cfg.lora, self.cfg.seq_len,
                                          self.settings.export_template_dir or cache_root(),
                                          self.cfg.graph_options()).start()

    def _export(self, stage: int, plan: StagePlan, sub_model, prefix: str) -> tuple[dict[str, Path], dict]:
        """The stage's artifacts per format under artifacts/stage<N>/<prefix><format>; seconds each took."""
        dirs, seconds = {}, {}
        for fmt in self.stage_formats():
            t0 = time.perf_counter()
            dirs[fmt] = export_artifacts(
                fmt, sub_model, self.run_dir / "artifacts" / f"stage{stage}" / f"{prefix}{fmt}",
                StageInfo(run_id=self.run_id, stage=stage, groups=plan.groups, anchors=plan.anchors,
                          tokenizer_dir=self.tokenizer_dir),
                seq_len=self.cfg.seq_len, template_root=self.settings.export_template_dir or cache_root(),
                graph=self.cfg.graph_options().for_format(fmt))  # others: the dequantized values, as fp32
            seconds[fmt] = round(time.perf_counter() - t0, 2)
        return dirs, seconds

    def prefetch_stage(self, stage: int, speculate: Speculate) -> None:
        """The next train_round (a stage's last) also guesses stage `stage` and announces its files as a hint."""
        if self.settings.prefetch_next_stage:
            self._next_guess = (stage, speculate)

    def _devices_started(self, devices: Collection[str], wr: int, timeout_s: float = GUESS_AFTER_START_MAX_S) -> None:
        """Return once every one of `devices` has reported a status of wire round `wr` (`busy` when it starts
        training) or gone offline, or after timeout_s. The guess at the next stage waits here: its export takes
        the CPU for a second or more, and on a machine it shares with devices (a local fleet) it would delay
        their start. A device's status only times this background work; a device that never reports delays
        the guess by timeout_s at most."""
        def started() -> bool:
            return all(self.device_status.get(d, {}).get("round") == wr or d in self._offline or d in self._silent
                       for d in devices)

        with self._status_changed:
            self._status_changed.wait_for(started, timeout=timeout_s)

    def _start_speculation(self, wait: Callable[[], object] | None = None) -> None:
        if self._next_guess is None:
            return
        stage, speculate = self._next_guess
        self._next_guess = None

        def announce(plan: StagePlan, sub_model) -> None:
            t0 = time.perf_counter()
            dirs, _ = self._export(stage, plan, sub_model, "prefetch-")
            hint = {fmt: self._offer(_served_files(fmt, d, stage, False)) for fmt, d in dirs.items()}
            self._event("prefetch", stage=stage, groups=plan.groups, seconds=round(time.perf_counter() - t0, 2),
                        artifacts={f: {"artifact_id": d.artifact_id, "bytes": d.total_bytes} for f, d in hint.items()})
            self._update_control(lambda c: replace(c, prefetch=hint))

        self._speculation = Speculation(stage, speculate, announce, wait=wait).start()

    def _finish_speculation(self) -> None:
        """Wait until the guess at the next stage is announced, then let the round's train control go.

        A round's updates do not wait for its guess: the guess may still be exporting while the round loop
        aggregates and evaluates (which draw no random numbers and only read the frozen weights the guess
        shares), and `evaluate` calls this before the loop goes on to plan the next stage, so the run's
        numbers are those of a run without prefetch. `begin_stage`, `train_round` and `close` call it too."""
        if self._speculation is not None:
            self._speculation.join(1.0)
            if self._speculation.running():  # say why the run does not go on although the round's devices answered
                note(f"preparing stage {self._speculation.stage + 1}'s files so devices can fetch "
                     "them early (a machine's first trace of a new graph shape can take minutes; later runs reuse it)")
                self._speculation.join()
            self._speculation = None
        with self._control_lock:
            self._control = None  # the round is over: nothing republishes its train control any more

    def _await_ready(self, stage: int, draw_key: int) -> None:
        """Wait until the live devices and those the stage's first round samples reported this stage's files
        ready (`info.ready` in a status), at most `stage_ready_timeout_s`, so the stage's first round does not
        start while devices still download."""
        timeout = self.settings.stage_ready_timeout_s
        if not timeout:
            return
        from server_sdk.method.strategies.base import sample_clients

        first = {self.device_of(c) for c in sample_clients(self.cfg, draw_key, 0, self._pool())}
        t0 = time.time()
        while True:
            seen = self._status_seq  # read before looking: a status arriving meanwhile wakes the wait below
            waiting = self._not_ready(first)
            if self._mark_silent_at_stage_start(stage, waiting):
                waiting = self._not_ready(first)
            left = timeout - (time.time() - t0)
            if not waiting or left <= 0:
                break
            # a device's `ready` status wakes this at once; a device seen offline counts only OFFLINE_CONFIRM_S
            # after its will arrived, which no message announces: look again at least every 0.25 s
            with self._status_changed:
                self._status_changed.wait_for(lambda seen=seen: self._status_seq != seen, timeout=min(left, 0.25))
        self._event("stage_ready", stage=stage, waited_s=round(time.time() - t0, 3), not_ready=sorted(waiting))
        if waiting:
            log.warning("stage %d: %s did not report its files ready within %.0f s; opening the round anyway", stage,
                        sorted(waiting), timeout)

    def _mark_silent_at_stage_start(self, stage: int, waiting: Collection[str]) -> bool:
        """Mark unresponsive the devices the stage start waits for that said something before the stage's idle
        control and nothing in the `start_timeout_s` since (devft-edge answers an idle control for files it lacks
        at once with a `hello` naming them in `info.fetching`). Devices never heard from are still waited for."""
        limit = self.settings.start_timeout_s
        since = self._heard_since()
        if limit is None or since is None or time.time() - max(self._idle_at, since) < limit:
            return False
        with self._status_lock:
            late = sorted(d for d in waiting if d in self._heard and self._heard[d] < self._idle_at)
            for d in late:
                self._silent[d] = time.time()
        for d in late:
            self._limited(("unresponsive", d), "stage %d: %s sent nothing within %.0f s of the stage's start "
                          "(start_timeout_s); not waiting for its files, nor in rounds until it sends a status",
                          (stage, d, limit), "unresponsive", device=d, stage=stage, start_timeout_s=limit)
        return bool(late)

    def _not_ready(self, expected: set[str]) -> set[str]:
        """Devices that said hello or are `expected`, are not offline or unresponsive, run a served format (as far
        as their hello says), and have not reported the stage's files ready."""
        offline = self._offline_now()
        with self._status_lock:
            statuses = {d: {} for d in expected} | dict(self.device_status)
            offline |= set(self._silent)
        return {device for device, st in statuses.items() if st.get("state") != "offline" and device not in offline
                and self._runs_served(st) and self._fits(device) and not self._holds_stage(st)}

    def _holds_stage(self, status: dict) -> bool:
        """Whether a device's status reports one of this stage's artifacts ready (`info.ready`, device-sent)."""
        ready = status.get("ready")
        return isinstance(ready, str) and ready in {d.artifact_id for d in self._artifacts.values()}

    def _runs_served(self, status: dict) -> bool:
        """Whether a device runs a format served this stage, as far as its hello says (none said: assume so);
        the portable format counts only if the device also runs the run's weight scheme (`runs_weights`)."""
        formats = status.get("formats")
        return not isinstance(formats, list) or any(f in self._artifacts and (f != "onnx" or self.runs_weights(status))
                                                    for f in formats if isinstance(f, str))

    def runs_weights(self, status: dict) -> bool:
        """Whether a device's hello declares the run's frozen-weight scheme (`weights`: comma-separated, device-sent).
        fp32 needs no declaration; a device that declares none (an older runtime) runs fp32 only."""
        declared = status.get("weights")  # byte-format names (WEIGHT_FORMATS): a runtime of an older int4 format lacks int4-asym
        return self.cfg.weights == "fp32" or (isinstance(declared, str)
                                              and WEIGHT_FORMATS[self.cfg.weights] in declared.split(","))

    def serve_stage(self, stage: int, artifact_dirs: Mapping[str, Path], memory: dict | None = None, **info) -> int:
        """Register a stage's artifact files (per format) with the chunk server and announce them (state idle).
        `memory` is the stage's memory need (`stage_need`; None: every device fits).

        Returns the bytes of the portable (or first) format: what one device downloads at most.
        Files travel as `_served_files` lays them out, so tensors unchanged since the last stage
        (the embedding) are not downloaded again."""
        self._finish_speculation()  # its late announce must not come after this stage's control
        self._artifacts = {fmt: self._offer(_served_files(fmt, Path(d), stage, self.settings.per_tensor_checkpoint))
                           for fmt, d in artifact_dirs.items()}
        if self.origin is not None:  # an earlier stage's files (and a wrong guess's) leave the origin
            self.origin.prune({f.sha256 for d in self._artifacts.values() for f in d.files})
        self._stage = stage
        self._need = memory
        self._draw_key = stage  # begin_stage then sets the plan's (serve_stage alone: tests)
        self._idle_at = time.time()  # devices that said hello before it must say something after it
        self._event("stage", stage=stage, artifacts={f: {"artifact_id": d.artifact_id, "bytes": d.total_bytes}
                                                     for f, d in self._artifacts.items()},
                    **({"memory": memory} if memory else {}), **info)
        # devices may start downloading while the first round is prepared
        self._publish_control(P.ControlMessage(self.run_id, stage, self.wire_round(stage, 0), "idle",
                                               artifacts=self._artifacts))
        return next(iter(self._artifacts.values())).total_bytes

    def stage_need(self, config: dict, layers: int) -> dict:
        """The memory a device must declare (`ram_mb`) to train an `layers`-layer stage: the measured peak the
        operator gave (`stage_peak_mb`), else the peak predicted from the model's shapes, the run's batch size,
        sequence length, LoRA rank and weight scheme (export/memory.py, with its margin)."""
        measured = self.settings.stage_peak_mb.get(str(layers))
        if measured:
            return {"layers": layers, "need_mb": int(measured), "source": "measured: --stage-peak-mb"}
        onnx_only = self.stage_formats() == ["onnx"]  # the others carry fp32 and keep their activations
        graph = self.cfg.graph_options() if onnx_only else PLAIN
        return {"layers": layers, **predicted_peak_mb(config, layers, batch=self.cfg.batch_size,
                                                      seq=self.cfg.seq_len, rank=self.cfg.lora.r, graph=graph,
                                                      micro_batch=self.cfg.micro_batch)}
