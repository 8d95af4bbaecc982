"""Checkpoint files and atomic writes, rule by rule: what a save writes and syncs, what verify,
load and the pointers say about a broken or missing file, which files count and which are pruned.

``test_checkpoint_files.py`` covers the round trip, torn writes and retention; the tests here pin
the remaining branches of ``ddp.checkpoint.files`` and ``ddp.checkpoint.atomic`` (mutation testing
found them unchecked).
"""

from __future__ import annotations

import json
import os
import re
import stat
import zlib
from pathlib import Path

import pytest
import torch

from ddp.checkpoint import atomic, files
from ddp.checkpoint.files import CheckpointError


def _save(directory: Path, step: int = 1, **kwargs) -> Path:
    files.save(directory, {"format": 1, "w": torch.arange(6.0), **kwargs.pop("extra", {})}, step=step,
               epoch=kwargs.pop("epoch", 0), metric=kwargs.pop("metric", None), recipe=kwargs.pop("recipe", None))
    return directory / files.checkpoint_name(step)


# --- save -------------------------------------------------------------------------------------

def test_a_save_into_a_missing_directory_writes_the_checkpoint_its_manifest_and_latest(tmp_path):
    directory = tmp_path / "version_0" / "checkpoints"
    manifest = files.save(directory, {"format": 1}, step=12, epoch=3, metric=0.75, recipe="a: 1\n")
    path = directory / "step-00000012.pt"
    on_disk = json.loads((directory / "step-00000012.json").read_text())
    expected = {"file": "step-00000012.pt", "bytes": path.stat().st_size, "crc32": zlib.crc32(path.read_bytes()),
                "step": 12, "epoch": 3, "metric": 0.75, "recipe": "a: 1\n", "save_s": manifest.save_s}
    assert {key: on_disk.get(key) for key in expected} == expected
    assert isinstance(manifest.save_s, float) and 0 <= manifest.save_s < 60
    assert (directory / "latest").read_text() == "step-00000012.pt\n"
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-00000012.json", "step-00000012.pt"]


@pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"), reason="torch < 2.5")
@pytest.mark.parametrize("setting", [True, False])
def test_a_save_leaves_torchs_own_crc_setting_as_it_found_it(tmp_path, setting):
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(setting)
    try:
        _save(tmp_path)
        assert torch.serialization.get_crc32_options() is setting
    finally:
        torch.serialization.set_crc32_options(previous)
    assert torch.equal(files.load(tmp_path / "step-00000001.pt")["w"], torch.arange(6.0))


@pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"), reason="torch < 2.5")
def test_torch_skips_its_per_record_crc_during_our_save_which_checksums_the_whole_file(tmp_path, monkeypatch):
    during = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (during.append(torch.serialization.get_crc32_options()),
                                                        real_save(*a, **k))[1])
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        path = _save(tmp_path)
        assert during == [False] and torch.serialization.get_crc32_options() is True
    finally:
        torch.serialization.set_crc32_options(previous)
    files.verify(path)


def test_the_three_files_of_a_save_are_fsynced_and_the_directory_once_after_the_last_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", re.sub(r"^\.(.*)\.[^.]+\.tmp$", r"\1", name)))  # .latest.k2j_x.tmp → latest
        real_fsync(fd)

    def replace(source, target):
        events.append(("rename", os.path.basename(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _save(tmp_path, step=5)
    assert events == [("fsync", "step-00000005.pt"), ("rename", "step-00000005.pt"),
                      ("fsync", "step-00000005.json"), ("rename", "step-00000005.json"),
                      ("fsync", "latest"), ("rename", "latest"), ("fsync", tmp_path.name)]


# --- atomic writes ----------------------------------------------------------------------------

def test_an_atomic_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "recipe.yaml"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_open(target) as handle:
            handle.write(b"new, half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_write_in_progress_is_a_hidden_temporary_that_prune_would_clear(tmp_path):
    with atomic.atomic_open(tmp_path / "step-00000001.pt") as handle:
        handle.write(b"partial")
        (temporary,) = tmp_path.iterdir()
        assert temporary.name.startswith(".step-00000001.pt.") and temporary.name.endswith(".tmp")
        assert list(tmp_path.glob(".*.tmp")) == [temporary]
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]


def test_an_atomic_write_makes_missing_parents_and_writes_utf8(tmp_path):
    target = tmp_path / "a" / "b" / "history.jsonl"
    atomic.write_text_atomic(target, "optim.lr 0.05 → 0.01\n")
    assert target.read_bytes() == "optim.lr 0.05 → 0.01\n".encode("utf-8")


def test_the_directory_is_synced_unless_the_caller_syncs_it_later(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(atomic, "fsync_dir", synced.append)
    atomic.write_text_atomic(tmp_path / "a", "x")
    atomic.write_text_atomic(tmp_path / "b", "x", sync_dir=False)
    with atomic.atomic_open(tmp_path / "c") as handle:
        handle.write(b"x")
    assert synced == [tmp_path, tmp_path]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_an_atomic_write_gets_the_mode_open_would_give_it(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert atomic.current_umask() == umask
        atomic.write_text_atomic(tmp_path / "f", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode


def test_the_umask_is_read_without_proc_too(monkeypatch):
    real_read_text = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self) == "/proc/self/status":
            raise OSError("no /proc here")
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    previous = os.umask(0o027)
    try:
        assert atomic.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # and it was left as it was
    finally:
        os.umask(previous)


# --- verify, load, manifests ------------------------------------------------------------------

def test_a_missing_checkpoint_and_an_unreadable_manifest_are_said_as_such(tmp_path):
    with pytest.raises(CheckpointError) as info:
        files.verify(tmp_path / "step-00000009.pt")
    assert info.value.problem == f"checkpoint {tmp_path / 'step-00000009.pt'} does not exist."
    assert info.value.hint == "check train.resume"
    path = _save(tmp_path)
    manifest = path.with_suffix(".json")
    manifest.write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        files.verify(path)
    assert info.value.problem.startswith(f"manifest {manifest} is unreadable (") and info.value.problem.endswith(").")
    assert info.value.hint == "use another checkpoint" and info.value.exit_code == 2  # a refusal: exit 2
    manifest.write_text(json.dumps({"file": path.name, "unexpected": 1}))
    with pytest.raises(CheckpointError, match="is unreadable"):
        files.read_manifest(path)
    manifest.unlink()
    with pytest.raises(CheckpointError) as info:
        files.read_manifest(path)
    assert info.value.problem == f"{path} has no manifest step-00000001.json (its save was interrupted)."


def test_a_flipped_byte_is_found_at_any_chunk_size(tmp_path):
    path = _save(tmp_path, extra={"big": torch.arange(5000.0)})
    data = path.read_bytes()
    assert files.crc32(path) == files.crc32(path, chunk=1000) == zlib.crc32(data)
    assert len(data) > 1000


def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_short_line(tmp_path):
    path = tmp_path / "step-00000001.pt"
    path.write_bytes(b"this is not a zip file\n" * 100)
    with pytest.raises(CheckpointError) as info:
        files.load(path)
    problem = info.value.problem
    assert problem.startswith(f"checkpoint {path} cannot be loaded safely: ") and problem.endswith(".")
    assert "\n" not in problem and len(problem) <= len(str(path)) + 250
    assert info.value.hint == "only checkpoints written by ddp.train (plain tensors and data) are accepted"


def test_the_recipe_comes_from_the_manifest_or_else_from_the_file(tmp_path):
    assert files.saved_recipe(_save(tmp_path / "a", recipe="from: manifest\n")) == "from: manifest\n"
    assert files.saved_recipe(_save(tmp_path / "b", extra={"recipe": "from: file\n"})) == "from: file\n"
    assert files.saved_recipe(_save(tmp_path / "c")) == ""
    old = _save(tmp_path / "d", extra={"recipe": "from: file\n"})  # a manifest from before it carried these keys
    manifest = json.loads(old.with_suffix(".json").read_text())
    del manifest["recipe"], manifest["save_s"]
    old.with_suffix(".json").write_text(json.dumps(manifest))
    assert files.read_manifest(old).recipe is None and files.read_manifest(old).save_s is None
    assert files.saved_recipe(old) == "from: file\n"


# --- which files count, pointers, pruning -----------------------------------------------------

def test_only_step_files_count_newest_by_number_first(tmp_path):
    assert files.candidates(tmp_path / "missing") == []
    for name in ("step-00000002.pt", "step-100000000.pt", "step-99999999.pt", "step-1.pt", "step-00000003.json",
                 "step-00000004.pt.tmp", "best", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in files.candidates(tmp_path)] == ["step-100000000.pt", "step-99999999.pt",
                                                           "step-00000002.pt"]


def test_a_pointer_is_its_first_line_and_an_empty_or_missing_one_is_none(tmp_path):
    assert files.read_pointer(tmp_path, "latest") is None
    (tmp_path / "latest").write_text("step-00000003.pt\n")
    assert files.read_pointer(tmp_path, "latest") == "step-00000003.pt"
    (tmp_path / "best").write_text(" \n")
    assert files.read_pointer(tmp_path, "best") is None


def test_prune_removes_each_old_checkpoint_with_its_manifest_and_keeps_enough(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step=step)
    assert files.prune(tmp_path, keep=3, protect=set()) == []
    assert files.prune(tmp_path, keep=1, protect=set()) == ["step-00000002.pt", "step-00000001.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003.json", "step-00000003.pt"]


def test_prune_removes_a_checkpoint_whose_save_died_before_its_manifest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step=step)
    (tmp_path / "step-00000001.json").unlink()  # killed between the .pt rename and the manifest
    assert files.prune(tmp_path, keep=2, protect=set()) == ["step-00000001.pt"]
    assert not (tmp_path / "step-00000001.pt").exists()
