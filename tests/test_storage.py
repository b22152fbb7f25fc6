"""Run directories on any storage: every write through one path layer (nestlearn.engine._storage), atomic
locally, one object per write on an object store. The object store here is ``gs://`` itself, served by an
in-memory fsspec filesystem registered for the ``gs``/``gcs`` protocols, so ``etils.epath`` takes the
very code path it takes for Google Cloud Storage (through fsspec) without a network. Orbax's array writes
go through TensorStore's own GCS driver, which this cannot serve: checkpoints are tested locally (and
their manifests, written through the layer, on the fake store)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import fsspec
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry

from nestlearn.engine import _checkpoint, _storage
from nestlearn.experiment import RunDir, run_study


class _FakeGCS(MemoryFileSystem):
    """An in-memory object store answering for ``gs://`` (what gcsfs would reach on the network)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
        for scheme in ("gs://", "gcs://"):
            path = path.removeprefix(scheme)
        return path.rstrip("/")


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """A fresh, empty in-memory ``gs://`` store; the working directory is an empty temporary one.

    (etils caches the filesystem instance per protocol, so the class and its store are the module's;
    the registry entries are restored afterwards.)"""
    before = {name: _registry.get(name) for name in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, _FakeGCS, clobber=True)
    _FakeGCS.store.clear()
    _FakeGCS.pseudo_dirs[:] = [""]
    monkeypatch.chdir(tmp_path)
    yield _FakeGCS.store
    _FakeGCS.store.clear()
    for name, cls in before.items():
        if cls is None:
            _registry.pop(name, None)
        else:
            _registry[name] = cls


@dataclasses.dataclass(frozen=True)
class Study:
    lrs: tuple[float, ...] = (0.1, 0.3)


def _study(config, rundir):
    rundir.write_table("final", pd.DataFrame({"lr": config.lrs, "loss": [1.0, 0.5]}))
    rundir.write_arrays("curves", {"loss": np.arange(6, dtype=np.float32).reshape(2, 3)})
    rundir.mark_done("final")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    rundir.save_figure(fig, "loss")
    plt.close(fig)


def test_a_study_writes_its_run_directory_to_gs(gcs, tmp_path):
    rd = run_study(_study, Study(), "gs://bucket/runs/sweep", experiment="sweep")
    assert str(rd.path) == "gs://bucket/runs/sweep"
    keys = sorted(gcs)
    assert keys == [
        "bucket/runs/sweep/config.json",
        "bucket/runs/sweep/figures/loss.pdf",
        "bucket/runs/sweep/figures/loss.png",
        "bucket/runs/sweep/results/curves.npz",
        "bucket/runs/sweep/results/final.csv",
        "bucket/runs/sweep/status.json",
    ], keys
    assert list(tmp_path.iterdir()) == []  # nothing landed on the local disk (no "gs:" folder)
    assert gcs["bucket/runs/sweep/figures/loss.pdf"].getvalue()[:5] == b"%PDF-"
    assert gcs["bucket/runs/sweep/figures/loss.png"].getvalue()[1:4] == b"PNG"
    stored = json.loads(gcs["bucket/runs/sweep/config.json"].getvalue())
    assert stored["experiment"] == "sweep" and stored["config"] == {"lrs": [0.1, 0.3]}
    # Read back through the same layer, by a fresh RunDir.
    again = RunDir("gs://bucket/runs/sweep")
    assert again.complete and again.done("final") and not again.quick
    assert again.read_table("final")["loss"].tolist() == [1.0, 0.5]
    np.testing.assert_array_equal(again.read_arrays("curves")["loss"], np.arange(6).reshape(2, 3))
    # Resuming checks the stored config there too, and names the difference.
    from nestlearn import ConfigError

    with pytest.raises(ConfigError, match=r"lrs \(\[0.1, 0.3\] stored, \[0.2\] now\)"):
        RunDir.create("gs://bucket/runs/sweep", Study(lrs=(0.2,)), experiment="sweep", resume=True)
    with pytest.raises(ConfigError, match="already exists"):
        RunDir.create("gs://bucket/runs/sweep", Study(), experiment="sweep")
    RunDir.create("gs://bucket/runs/sweep", Study(lrs=(0.2,)), experiment="sweep", force=True)
    assert sorted(gcs) == ["bucket/runs/sweep/config.json"]  # --force replaced the whole run


def test_a_failed_write_leaves_the_previous_version(gcs, tmp_path):
    def broken(f):
        f.write("half")
        raise RuntimeError("disk on fire")

    for target in ("gs://bucket/x/status.json", str(tmp_path / "x" / "status.json")):
        _storage.write(target, "v1")
        with pytest.raises(RuntimeError, match="disk on fire"):
            _storage.write(target, broken)
        assert _storage.path(target).read_text() == "v1", target
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["status.json"]  # no temporary file left
    assert sorted(gcs) == ["bucket/x/status.json"]


def test_local_writes_go_through_a_temporary_file_and_keep_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        target = _storage.write(tmp_path / "a" / "t.bin", b"\x00\x01", mode="wb")
    finally:
        os.umask(old)
    assert isinstance(target, Path) and target.read_bytes() == b"\x00\x01"
    assert target.stat().st_mode & 0o777 == 0o640


def test_paths_keep_their_scheme():
    assert str(_storage.path("gs://b/run") / "results" / "x.csv") == "gs://b/run/results/x.csv"
    assert _storage.is_uri("gs://b/run") and not _storage.is_uri("runs/gs:/x")
    assert isinstance(_storage.path("runs/x"), Path)
    from nestlearn.experiment._cli import _parser

    args = _parser().parse_args(["run", "x", "--out", "gs://bucket/run"])
    assert str(_storage.path(args.out)) == "gs://bucket/run"  # argparse's Path would make it gs:/bucket


def _fake_step(root):
    step = _storage.path(root) / "3"
    _storage.write(step / "state" / "data", b"\x01" * 100, mode="wb")
    _storage.write(step / "_CHECKPOINT_METADATA", "{}")
    return step


def test_checkpoint_manifests_through_the_layer_on_gs(gcs):
    root = "gs://bucket/run/checkpoints"
    step = _fake_step(root)
    _checkpoint.write_manifest(step)
    manifest = json.loads(gcs["bucket/run/checkpoints/3/nestlearn-manifest.json"].getvalue())
    assert manifest["files"]["state/data"] == {
        "bytes": 100,
        "sha256": hashlib.sha256(b"\x01" * 100).hexdigest(),
    }
    assert _checkpoint.verify(step) is None
    _storage.path(step / "state" / "data").write_bytes(b"\x01" * 99 + b"\x00")  # a flipped byte
    assert _checkpoint.verify(step) == "checksum mismatch in state/data"
    reports: list[str] = []
    from nestlearn import CheckpointError

    with pytest.raises(CheckpointError, match="all 1 are damaged"):
        _checkpoint.select_good(root, report=reports.append)
    _fake_step(root.replace("checkpoints", "ok"))  # a second directory: one good step under a damaged one
    ok = _storage.path("gs://bucket/run/ok")
    _checkpoint.write_manifest(ok / "3")
    _storage.write(ok / "4" / "state" / "data", b"\x02", mode="wb")  # no manifest: an unfinished write
    assert _checkpoint.select_good(ok, report=reports.append) == 3
    assert "checkpoint 4 in gs://bucket/run/ok is damaged (no manifest" in reports[-1]
    assert "bucket/run/ok/damaged/4/state/data" in gcs and "bucket/run/ok/4/state/data" not in gcs


def test_npz_round_trip_on_gs(gcs):
    from nestlearn.experiment._rundir import _load_npz, _npz

    _storage.write("gs://b/a.npz", _npz({"x": np.eye(2, dtype=np.float32)}), mode="wb")
    with _load_npz("gs://b/a.npz") as z:
        np.testing.assert_array_equal(z["x"], np.eye(2))
    assert np.load(io.BytesIO(gcs["b/a.npz"].getvalue()))["x"].dtype == np.float32


def test_a_script_experiments_figures_reach_gs(gcs, tmp_path):
    """Script experiments save figures through the path layer too (split CIFAR-100's, from two results)."""
    from test_image_experiments import _result, cifar

    R = np.array([[[0.9, 0.1], [0.5, 0.8]], [[0.7, 0.2], [0.4, 0.6]]])
    cifar.figures(RunDir("gs://bucket/run").path, {"naive": _result(R)}, "synthetic")
    assert sorted(gcs) == [f"bucket/run/figures/split_cifar100_{n}.{ext}" for n in ("acc", "matrix_naive")
                           for ext in ("pdf", "png")]  # fmt: skip
    assert gcs["bucket/run/figures/split_cifar100_acc.pdf"].getvalue()[:5] == b"%PDF-"
    assert list(tmp_path.iterdir()) == []  # nothing on the local disk
