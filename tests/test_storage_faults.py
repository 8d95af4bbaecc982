"""A disk that refuses a write: full (ENOSPC), over quota (EDQUOT), failing (EIO), read-only.

In process, the OS boundary is faked: the file handle an atomic write gets fails like a full disk
on the file chosen (the .pt, its manifest or ``latest``). ``/dev/full`` is a real full disk for the
rank log and ``metrics.jsonl``. With ``DDP_TEST_SYSTEM=1`` as root, a real run on a small tmpfs
fills up after its first checkpoint (tests/workers/fill_disk.py), and a read-only tmpfs is a run
directory the run cannot write.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ddp.checkpoint import atomic, files, storage
from ddp.checkpoint.checkpointer import Checkpointer, TrainState
from ddp.checkpoint.files import CheckpointError
from ddp.config import CheckpointConfig, load_recipe
from ddp.errors import StorageError
from ddp.lifecycle.history import read_history
from ddp.reporting.logs import rank_logging
from ddp.reporting.metrics import MetricsWriter
from tests.harness import REPO, python_env, require_system

LINE = re.compile(r"checkpoint (step-\d+\.pt) not saved: .* in (\S+): it needs about ([\d.,]+ \w+); "
                  r"([\d.,]+ \w+) free there\. HINT: .* run the same command again: it resumes from (step-\d+\.pt)")


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 256)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 128)).sum().backward()
    optimizer.step()  # momentum buffers: the optimizer state is as big as the weights
    return model, optimizer


def _save(keeper: Checkpointer, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    keeper.save(model, optimizer, None, TrainState(epoch=step, global_step=step), metric=float(step))


class _Refusing:
    """The handle ``atomic_open`` writes through, on a disk that fails with ``code`` once it holds
    ``room`` more bytes (a part of the data is written first, as a real full disk does)."""

    def __init__(self, real, code: int, room: int) -> None:
        self.real, self.code, self.room = real, code, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.real.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.real.close()


def _disk_refuses(monkeypatch, target: str, code: int) -> None:
    """Writes of the atomic file whose name starts with ``target`` fail with ``code``."""
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # .<final name>.<random>.tmp
        return _Refusing(handle, code, room=8) if name.startswith(f".{target}") else handle

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


def _bytes(size: str) -> float:
    """``"1.2 MB"`` → bytes."""
    number, unit = size.split()
    return float(number.replace(",", "")) * {"bytes": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit]


def _left_behind(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or "00000002" in p.name)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
@pytest.mark.parametrize("target", ["step-00000002.pt", "step-00000002.json", "latest"])
def test_a_disk_refusing_a_save_says_the_directory_the_size_needed_and_the_room_left(tmp_path, monkeypatch,
                                                                                     target, code):
    """Whichever of the three files the disk refuses, nothing of the failed save stays under a
    final name, the previous checkpoint still verifies and is what a rerun resumes, and the error
    is a StorageError (exit 74): one line naming the directory, the size needed and what is free."""
    keeper = Checkpointer(CheckpointConfig(), tmp_path, load_recipe(None, []))
    model, optimizer = _model()
    _save(keeper, model, optimizer, step=1)
    first = tmp_path / "step-00000001.pt"
    _disk_refuses(monkeypatch, target, code)
    with pytest.raises(StorageError) as refused:
        _save(keeper, model, optimizer, step=2)
    message = str(refused.value)
    assert "\n" not in message and refused.value.exit_code == 74
    found = LINE.fullmatch(message)
    assert found, message
    name, where, needed, free, resumes = found.groups()
    assert (name, where, resumes) == ("step-00000002.pt", str(tmp_path), first.name)
    assert 0.9 < _bytes(needed) / first.stat().st_size < 1.1, message  # about the size the save writes
    assert free == storage.human_size(shutil.disk_usage(tmp_path).free), message
    assert {errno.ENOSPC: "no space left", errno.EDQUOT: "quota", errno.EIO: "I/O error"}[code] in message
    assert _left_behind(tmp_path) == []
    assert files.verify(first).step == 1
    assert files.read_pointer(tmp_path, "latest") == first.name
    assert storage.newest_valid(tmp_path) == first.name


def test_a_disk_refusing_the_best_pointer_keeps_the_complete_checkpoint_latest_names(tmp_path, monkeypatch):
    """``best`` is written after the checkpoint is complete and ``latest`` names it: that checkpoint
    stays, and the line says a rerun resumes from it; ``best`` still names the previous one."""
    keeper = Checkpointer(CheckpointConfig(), tmp_path, load_recipe(None, []))
    model, optimizer = _model()
    _save(keeper, model, optimizer, step=1)
    _disk_refuses(monkeypatch, "best", errno.ENOSPC)
    with pytest.raises(StorageError) as refused:
        _save(keeper, model, optimizer, step=2)
    found = LINE.fullmatch(str(refused.value))
    assert found and found.group(5) == "step-00000002.pt", str(refused.value)
    assert files.verify(tmp_path / "step-00000002.pt").step == 2
    assert files.read_pointer(tmp_path, "best") == "step-00000001.pt"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failing_fsync_is_the_disk_too_and_a_first_save_says_a_rerun_starts_over(tmp_path, monkeypatch):
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    keeper = Checkpointer(CheckpointConfig(), tmp_path / "checkpoints", load_recipe(None, []))
    with pytest.raises(StorageError, match=r"I/O error in .*checkpoints: it needs about .* free there\. "
                                           r"HINT: .*there is no checkpoint to resume from, so it starts over"):
        _save(keeper, *_model(), step=1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_save_failing_for_another_reason_is_still_a_checkpoint_error_exit_2(tmp_path, monkeypatch):
    def fdopen(fd, *args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))  # not the disk's room or health

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    keeper = Checkpointer(CheckpointConfig(), tmp_path, load_recipe(None, []))
    with pytest.raises(CheckpointError, match="Permission denied") as refused:
        _save(keeper, *_model(), step=1)
    assert refused.value.exit_code == 2 and not isinstance(refused.value, StorageError)


def test_the_size_needed_counts_the_tensors_in_nested_dicts_and_lists():
    payload = {"model": {"w": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.float64)},
               "optimizer": {"state": {0: {"momentum": torch.zeros(1000)}}, "groups": [{"lr": 0.1}]},
               "ranks": [{"rng": torch.zeros(100, dtype=torch.uint8)}, ("ab", b"cd")], "step": 3}
    assert storage.payload_bytes(payload) == 4000 + 80 + 4000 + 100 + 4
    assert [storage.human_size(n) for n in (512, 2048, 1_250_000, 25 * 2**20, 3 * 2**30)] == \
        ["512 bytes", "2.0 KB", "1.2 MB", "25 MB", "3.0 GB"]


# --- the rank log and metrics.jsonl on a full disk ---------------------------------------------

needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")


@needs_dev_full
def test_a_rank_log_on_a_full_disk_is_said_once_in_one_line_and_the_run_goes_on(capfd):
    """/dev/full refuses every write with ENOSPC, as a full disk does."""
    log = logging.getLogger("ddp.test_storage")
    with rank_logging(0, 1, "host", "INFO") as logs:
        log.info("before the file")
        logs.attach(Path("/dev/full"))
        for n in range(5):
            log.info("record %d", n)
        log.warning("still said on the console")
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err
    said = [line for line in err.splitlines() if "cannot write" in line]
    assert said == ["warning: cannot write /dev/full: No space left on device; this rank's log goes on on the "
                    "console only"], err
    assert "still said on the console" in err


@needs_dev_full
def test_metrics_on_a_full_disk_are_said_once_in_one_line_and_training_goes_on(tmp_path, capfd):
    with MetricsWriter(tmp_path / "metrics.jsonl", None, enabled=True) as metrics:
        metrics.write({"kind": "step", "step": 1})
        metrics._file.close()
        metrics._file = open("/dev/full", "w", encoding="utf-8")  # noqa: SIM115 - the disk fills up here
        for step in range(2, 6):
            metrics.write({"kind": "step", "step": step})
    err = capfd.readouterr().err
    assert err.splitlines() == ["warning: cannot write " + str(tmp_path / "metrics.jsonl") +
                                ": No space left on device; no more records go there in this run"], err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "step", "step": 1}\n'


# --- a real disk: small tmpfs mounts (root, DDP_TEST_SYSTEM=1) ---------------------------------

WORKER = REPO / "tests" / "workers" / "fill_disk.py"
RECIPE = ("train.epochs=2", "checkpoint.every_epochs=1", "log.tensorboard=false", "log.progress=false")


def _mount_unavailable() -> str | None:
    return None if shutil.which("mount") and shutil.which("umount") else "mount/umount are not installed"


@contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A ``size`` tmpfs at ``path`` for the test's duration; unmounted (lazily if busy) after."""
    require_system("tmpfs mounts (mount -t tmpfs)", _mount_unavailable())
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _torchrun_filling(cwd: Path, run_dir: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Two ranks of ``python -m ddp.train`` (through the fill_disk shim); (result, each rank's exit status)."""
    for old in cwd.glob("exit-rank*.txt"):
        old.unlink()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), *RECIPE, f"run.dir={run_dir}"], cwd=cwd, env=python_env(**env),
                          capture_output=True, text=True, timeout=150)
    codes = [(cwd / f"exit-rank{rank}.txt").read_text().strip() if (cwd / f"exit-rank{rank}.txt").exists()
             else "none (killed?)" for rank in (0, 1)]
    return done, codes


def test_a_disk_filling_up_stops_every_rank_with_one_line_exit_74_and_freeing_it_resumes(tmp_path):
    """The disk fills right after the first checkpoint: the next save fails; every rank exits 74
    with the one line (per rank) naming the directory, the size needed and what is free, no
    traceback of ours and no logging errors; the first checkpoint is intact and nothing partial is
    left. With the space freed, the same command resumes from that checkpoint and finishes."""
    with _tmpfs(tmp_path / "disk", "16m") as disk:
        run_dir, filler = disk / "run", disk / "filler"
        checkpoints = run_dir / "version_0" / "checkpoints"
        began = time.monotonic()
        full, codes = _torchrun_filling(tmp_path, run_dir, FILL_DISK=str(filler))
        out = full.stdout + full.stderr
        assert codes == ["74", "74"], out[-4000:]
        assert full.returncode != 0 and re.search(r"exitcode\s*: 74", out), out[-4000:]  # torchrun's summary
        said = [line for line in out.splitlines() if "not saved" in line]
        assert 1 <= len(said) <= 2, out[-4000:]
        for line in said:
            found = LINE.search(line)
            assert found and found.group(2) == str(checkpoints) and "no space left on device" in line, line
            assert _bytes(found.group(3)) > 100 * 2**10 and _bytes(found.group(4)) < 64 * 2**10, line
        assert "Logging error" not in out and "OSError" not in out, out[-4000:]
        frames = re.findall(r'File "([^"]+)"', out)
        ours = [frame for frame in frames if "/torch/distributed/" not in frame and frame != "<frozen runpy>"]
        assert ours == [], out[-4000:]  # the only traceback is torchrun's own ChildFailedError
        first = found.group(5)
        assert files.verify(checkpoints / first).epoch == 1
        assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
            [first, first.replace(".pt", ".json"), "latest", "best"])
        assert files.read_pointer(checkpoints, "latest") == first
        first_run_s = time.monotonic() - began

        step = files.read_manifest(checkpoints / first).step

        filler.unlink()  # the user frees the space, then runs the same command again
        again, codes = _torchrun_filling(tmp_path, run_dir)
        assert codes == ["0", "0"] and again.returncode == 0, (again.stdout + again.stderr)[-4000:]
        history = read_history(run_dir / "version_0" / "history.jsonl")
    assert f"resumed from {checkpoints / first}" in again.stderr
    assert [(entry["event"], entry["step"], entry["checkpoint"]) for entry in history] == \
        [("start", 0, None), ("resume", step, str(checkpoints / first))]
    print(f"full disk run {first_run_s:.1f} s, rerun {time.monotonic() - began - first_run_s:.1f} s")


def test_a_read_only_run_directory_is_refused_before_training_in_one_line_exit_74(tmp_path, monkeypatch, capsys):
    from ddp.train import main

    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        monkeypatch.chdir(tmp_path)
        code = main([*RECIPE, f"run.dir={read_only / 'run'}"])  # in-process: python -m ddp.train, one rank
        err = capsys.readouterr().err
    assert code == 74, err
    said = [line for line in err.splitlines() if " ERROR " in line or line.startswith(("error", "warning"))]
    assert len(said) == 1, err
    assert f"cannot write the run directory {read_only / 'run'}: Read-only file system" in said[0], err
    assert "Traceback" not in err and "training failed" not in err, err
    assert not (tmp_path / "runs").exists()
