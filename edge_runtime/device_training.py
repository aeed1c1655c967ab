"""A device's work in a round besides messaging: fetching the stage's files (and the next stage's hint) into its
verified cache, opening a trainer on them and training the round. Part of edge_runtime/client.py's Device.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np

from edge_runtime import protocol as P
from edge_runtime.backends import Trainer, open_trainer
from edge_runtime.batching import IGNORE_INDEX
from edge_runtime.checkpoint_blobs import CHECKPOINT, RECIPE, CheckpointAssemblyError, assemble_checkpoint
from edge_runtime.device_setup import DeviceError, check_artifact_format
from edge_runtime.fetch import FetchCancelled, FetchError
from edge_runtime.manifest import MANIFEST_NAME, ManifestError
from edge_runtime.shard import encode, pad_id, round_batches

log = logging.getLogger("devft.edge")


class RoundWork:
    """Device's stage files and training (edge_runtime/client.py's Device inherits it): the methods use the
    Device's cache, client, formats and counters, and its `_status` and `_global_for`."""

    def _prefetch(self, ctrl: P.ControlMessage) -> None:
        """Fetch the control's prefetch hint (the likely next stage) into the cache while there is nothing else
        to do. A newer control message cancels it at once; the hint is never trained on and every file is
        verified by hash, so a wrong or hostile hint costs bytes, not correctness."""
        chosen = ctrl.prefetch_for(self.formats)
        if chosen is None or chosen[1].artifact_id in self._prefetched or ctrl.run_id != self.run_id:
            return
        desc = chosen[1]
        self._control_arrived.clear()
        if not self._controls.empty() or self._stop.is_set():
            return  # something newer to act on first
        before, t0 = self.cache.bytes_downloaded, time.perf_counter()
        try:
            self.cache.fetch(self.client, ctrl.run_id, self.device_id, desc, cancel=self._control_arrived)
        except FetchCancelled:
            log.debug("%s: prefetch of %s cancelled by a new control message", self.device_id, desc.artifact_id[:12])
            return
        except (FetchError, OSError) as exc:
            log.warning("%s: prefetch of the next stage's files stopped (%s); they will be fetched when the stage "
                        "starts", self.device_id, exc)
            return
        finally:
            self.prefetch_bytes += self.cache.bytes_downloaded - before
            self.prefetch_s += time.perf_counter() - t0
        self._prefetched.add(desc.artifact_id)
        log.debug("%s: prefetched %s", self.device_id, desc.artifact_id[:12])

    def _artifact_dir(self, ctrl: P.ControlMessage) -> tuple[Path, int]:
        """Fetch (or find) the stage's files, verified, laid out as an artifact dir; bytes downloaded now."""
        chosen = ctrl.artifact_for(self.formats)
        assert chosen is not None  # _act checked
        fmt, desc = chosen
        before, t0 = self.cache.bytes_downloaded, time.perf_counter()
        self.cache.fetch(self.client, ctrl.run_id, self.device_id, desc)
        self.stage_fetch_s[desc.artifact_id] = self.stage_fetch_s.get(desc.artifact_id, 0.0) + time.perf_counter() - t0
        stage_root = self.cache.root / "stages" / desc.artifact_id
        if stage_root.exists():
            shutil.rmtree(stage_root)  # relink every time: a blob re-fetched after corruption is a new file
        self.cache.materialize(desc, stage_root)
        got = self.cache.bytes_downloaded - before
        self.stage_downloads[desc.artifact_id] = self.stage_downloads.get(desc.artifact_id, 0) + got
        manifests = [f.path for f in desc.files if f.path.rsplit("/", 1)[-1] == MANIFEST_NAME]
        if len(manifests) != 1:
            raise DeviceError(f"artifact {desc.artifact_id[:12]} has {len(manifests)} manifests; expected one")
        art_dir = stage_root / Path(manifests[0]).parent
        check_artifact_format(fmt, art_dir)
        self._holding = desc.artifact_id
        if fmt == "ort" and not (art_dir / CHECKPOINT).exists() and (art_dir / RECIPE).exists():
            self._rebuild_checkpoint(art_dir)
        # earlier stages' files are dead weight now (what this stage shares with them, and the hint, is kept)
        hint = ctrl.prefetch_for(self.formats)
        keep = {f.sha256 for f in (*desc.files, *(hint[1].files if hint else ()))}
        if (art_dir / RECIPE).exists():
            keep.add(json.loads((art_dir / RECIPE).read_text())["sha256"])
        self.cache.prune(keep, self.cache.root / "stages", desc.artifact_id)
        return art_dir, got

    def _rebuild_checkpoint(self, art_dir: Path) -> None:
        """The checkpoint came as tensor files: rebuild it once (kept as a verified blob), then link it."""
        want = json.loads((art_dir / RECIPE).read_text())["sha256"]
        if not self.cache.has(want):
            tmp = art_dir / ".checkpoint.building"
            try:
                assemble_checkpoint(art_dir, tmp)
            except CheckpointAssemblyError as exc:
                raise DeviceError(str(exc)) from None
            self.cache.add_file(tmp)
            tmp.unlink()
            log.debug("%s: rebuilt checkpoint %s from tensor files", self.device_id, want[:12])
        try:
            os.link(self.cache.blob_path(want), art_dir / CHECKPOINT)
        except OSError:
            shutil.copyfile(self.cache.blob_path(want), art_dir / CHECKPOINT)

    def _open_trainer(self, ctrl: P.ControlMessage, hp: P.TrainSettings) -> tuple[Trainer, Path, int]:
        """A trainer on verified files; a cache whose blob rotted since it was fetched is fetched again once."""
        fmt, desc = ctrl.artifact_for(self.formats) or ("", None)
        assert desc is not None

        def make(art_dir: Path) -> Trainer:
            return open_trainer(fmt, art_dir, lr=hp.lr, threads=self.threads, trainable=hp.trainable,
                                optimizer=hp.optimizer, micro_batch=hp.rows_per_run)

        art_dir, got = self._artifact_dir(ctrl)
        try:
            return make(art_dir), art_dir, got
        except ManifestError as exc:
            log.warning("%s: cached artifact failed verification (%s); fetching it again", self.device_id, exc)
            for f in desc.files:
                self.cache.recheck(f.sha256, f.size)  # a corrupt blob is deleted, so it is fetched again
            art_dir, got2 = self._artifact_dir(ctrl)
            return make(art_dir), art_dir, got + got2

    # -- training --------------------------------------------------------------------------

    def train_round(self, ctrl: P.ControlMessage) -> P.UpdateMessage:
        from edge_runtime.telemetry import TelemetryRecorder

        hp = ctrl.hyperparams
        if hp is None or self.device_id not in hp.seeds:
            raise DeviceError(f"the train control for round {ctrl.round} carries no seed for {self.device_id}")
        trainable = list(hp.trainable)
        key = (ctrl.run_id, ctrl.stage, ctrl.round, hp.session)
        if key not in self._acked:  # a device following the first active run learns its run id from this control
            self._acked.add(key)
            self._status("busy", stage=ctrl.stage, round=ctrl.round)
        started_unix, t0 = time.time(), time.perf_counter()
        fmt, desc = ctrl.artifact_for(self.formats) or ("", None)
        aid = desc.artifact_id if desc else ""
        fetched_before_s = self.stage_fetch_s.get(aid, 0.0)
        trainer, art_dir, downloaded = self._open_trainer(ctrl, hp)
        self._trainer = trainer  # kept alive until _act has sent the update
        glob = self._global_for(ctrl)
        trainer.set_lora({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in glob.tensors.items()})
        received = trainer.get_lora()
        unknown = sorted(set(trainable) - set(received))
        if unknown:
            raise DeviceError(f"control names trainable tensors the artifacts lack: {unknown[:3]}")
        # the onnx trainer leaves non-trainable tensors alone; the legacy ones update all, so restore those
        frozen = {k: v for k, v in received.items() if k not in set(trainable)} if fmt != "onnx" else {}
        seq_len = trainer.manifest.seq_len  # the run's one sequence length, carried in the manifest
        encoded = self._encoded_shard(art_dir, trainer, seq_len)
        pad = pad_id(trainer.manifest.model_config)
        losses: list[float] = []
        setup_s = time.perf_counter() - t0
        with TelemetryRecorder() as rec:
            for ids, labels, tokens in round_batches(encoded, hp, self.device_id, pad):
                if not (labels[:, 1:] != IGNORE_INDEX).any():
                    log.warning("%s: a batch has no completion tokens within seq_len %d; skipped", self.device_id,
                                seq_len)
                    continue
                with rec.step(tokens=tokens):
                    losses.append(trainer.train_step(ids, labels))
                    if frozen:  # e.g. FFA-LoRA: A stays at the received value, B trains against it
                        trainer.set_lora({**trainer.get_lora(), **frozen})
        trained = trainer.get_lora()
        delta = {k: (trained[k] - received[k]).astype(np.float32) for k in trainable}
        # started_unix and fetch_s let the coordinator split a round into transport and training
        telemetry = {**rec.report(), "train_s": time.perf_counter() - t0, "setup_s": setup_s,
                     "started_unix": started_unix, "fetch_s": self.stage_fetch_s.get(aid, 0.0) - fetched_before_s,
                     "stage_fetch_s": self.stage_fetch_s.get(aid, 0.0),
                     "backend": trainer.manifest.backend, "threads": self.threads, "process": os.getpid(),
                     "artifact_id": aid, "download_bytes": downloaded,
                     "stage_download_bytes": self.stage_downloads.get(aid, 0),
                     "prefetch_bytes": self.prefetch_bytes, "prefetch_s": self.prefetch_s,
                     "cache_bytes_downloaded_total": self.cache.bytes_downloaded,
                     "mqtt_payload_bytes_received": self.client.payload_bytes_received if self.client else None}
        loss = float(np.mean(losses)) if losses else float("nan")
        return P.UpdateMessage(ctrl.run_id, ctrl.stage, ctrl.round, self.device_id, secrets.token_hex(16),
                               len(self.shard), delta, {"train_loss": loss}, telemetry)

    def _encoded_shard(self, art_dir: Path, trainer: Trainer, seq_len: int) -> list:
        from tokenizers import Tokenizer

        name = trainer.manifest.tokenizer_file
        if name is None:
            raise DeviceError(f"artifacts in {art_dir} carry no tokenizer.json; the server must export with one")
        tok_sha = trainer.manifest.files[name].sha256
        key = (tok_sha, seq_len)
        if key not in self._encoded:
            self._encoded = {key: encode(Tokenizer.from_file(str(art_dir / name)), self.shard, seq_len)}
        return self._encoded[key]
