"""Disk: local devices share one blob store safely, finished stages are pruned, `devft clean` frees the rest."""

from __future__ import annotations

import os
import threading

from edge_runtime.fetch import ArtifactCache, sha256_bytes
from export import template_dir
from server_sdk.cli.main import main
from server_sdk.disk import disk_bytes, prune_finished_stages


def test_devices_writing_the_same_blob_at_once_share_one_verified_copy(tmp_path):
    shared = tmp_path / "blobs"
    caches = [ArtifactCache(tmp_path / f"dev{i}", shared=shared) for i in range(6)]
    data = os.urandom(3_000_000)
    sha = sha256_bytes(data)
    start = threading.Barrier(len(caches))
    errors: list[BaseException] = []

    def write(cache: ArtifactCache) -> None:
        try:
            start.wait()
            cache.add_bytes(data)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    inodes = {c.blob_path(sha).stat().st_ino for c in caches}
    assert inodes == {(shared / sha).stat().st_ino}  # one file on disk, linked into every device cache
    assert all(c.path(sha).read_bytes() == data for c in caches)
    assert not list(tmp_path.rglob("*.tmp"))
    assert disk_bytes([tmp_path]) < 1.1 * len(data)


def test_a_corrupt_shared_copy_is_replaced_not_linked(tmp_path):
    shared = tmp_path / "blobs"
    data = b"frozen tensor bytes" * 1000
    sha = sha256_bytes(data)
    shared.mkdir()
    (shared / sha).write_bytes(b"rotten")
    cache = ArtifactCache(tmp_path / "dev0", shared=shared)
    cache.add_bytes(data)
    assert cache.path(sha).read_bytes() == data and (shared / sha).read_bytes() == data


def _fake_run(root, name="r"):
    run = root / "runs" / name
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "report.json").write_text("{}")
    for s in range(3):
        for d in (f"stage{s}", f"stage{s}.tensors"):
            (run / "artifacts" / d).mkdir(parents=True)
            (run / "artifacts" / d / "model.onnx").write_bytes(os.urandom(100_000))
    blob = run / "fleet" / "blobs" / "b"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(os.urandom(200_000))
    for dev in ("dev-000", "dev-001"):
        (run / "fleet" / "devices" / dev / "cache" / "blobs").mkdir(parents=True)
        os.link(blob, run / "fleet" / "devices" / dev / "cache" / "blobs" / "b")
    (run / "fleet" / "credentials").mkdir()
    return run


def test_finished_stages_are_pruned(tmp_path):
    # whether a fleet prunes (FleetSettings.keep_artifacts, --keep-artifacts): tests/test_prefetch.py
    run = _fake_run(tmp_path)
    assert prune_finished_stages(run, 2) >= 4 * 100_000
    assert sorted(p.name for p in (run / "artifacts").iterdir()) == ["stage2", "stage2.tensors"]


def test_clean_lists_then_frees_artifacts_and_device_caches_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    # every folder the exporters cache templates in, named as export_artifacts names it (issue 26: the
    # portable format's onnx-templates, 1.3 GB after a quickstart, was left behind by --all)
    template_dirs = [template_dir(fmt, tmp_path / "cache") for fmt in ("onnx", "ort")]
    for folder in template_dirs:
        (folder / "k").mkdir(parents=True)
        (folder / "k" / "t.onnx").write_bytes(b"x" * 600_000)
    run = _fake_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["clean", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would be freed" in out and "device cache dev-001" in out and "onnx export templates" not in out
    assert "1.2 MB  more under" in out and "`devft clean --all` frees them too" in out  # what --all would add
    assert (run / "artifacts").exists()
    total = float(next(line for line in out.splitlines() if "would be freed" in line).split()[0])
    assert 0.7 < total < 1.0  # 6 x 100 kB artifacts + one 200 kB blob linked three times, counted once

    assert main(["clean", "--all"]) == 0
    out = capsys.readouterr().out
    assert "freed" in out and "onnx export templates" in out and "more under" not in out
    assert not (run / "artifacts").exists() and not (run / "fleet" / "blobs").exists()
    assert not (run / "fleet" / "devices" / "dev-000" / "cache").exists()
    assert not any(folder.exists() for folder in template_dirs)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # --all left no template folder behind
    for kept in ("config.json", "report.json", "data", "fleet/credentials"):
        assert (run / kept).exists()
    assert main(["clean"]) == 0 and "nothing to clean" in capsys.readouterr().out


def test_a_device_prunes_earlier_stages_but_keeps_what_the_new_stage_shares(tmp_path):
    shared = tmp_path / "blobs"
    dev0, dev1 = (ArtifactCache(tmp_path / d, shared=shared) for d in ("dev0", "dev1"))
    embedding, old_layer, new_layer = (os.urandom(50_000) for _ in range(3))
    for cache in (dev0, dev1):
        for data in (embedding, old_layer):
            cache.add_bytes(data)
    keep = {sha256_bytes(embedding), sha256_bytes(new_layer)}
    dev0.add_bytes(new_layer)
    dev0.prune(keep)
    assert sorted(p.name for p in dev0.blobs.iterdir()) == sorted(keep)
    assert (shared / sha256_bytes(old_layer)).exists()  # dev1 still links it
    dev1.add_bytes(new_layer)
    assert dev1.prune(keep) >= 50_000  # the last link to the old layer: the shared copy goes too
    assert sorted(p.name for p in shared.iterdir()) == sorted(keep)
    assert dev1.path(sha256_bytes(embedding)).read_bytes() == embedding
