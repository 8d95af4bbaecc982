"""Checkpoint files: integrity, torn writes, unsafe pickles, retention, auto-resume choice."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from ddp.checkpoint import files
from ddp.checkpoint.files import CheckpointError
from ddp.checkpoint.checkpointer import Checkpointer
from ddp.config import CheckpointConfig, load_recipe
from ddp.lifecycle.decision import newest_valid
from tests.harness import REPO, python_env


def _payload(value: float = 1.0) -> dict:
    return {"format": 1, "model": {"w": torch.full((4, 4), value)}, "state": {"global_step": 3}}


def test_save_verify_load_round_trip(tmp_path):
    manifest = files.save(tmp_path, _payload(2.0), step=7, epoch=1, metric=0.5)
    path = tmp_path / "step-00000007.pt"
    assert files.verify(path) == manifest and manifest.bytes == path.stat().st_size
    assert torch.equal(files.load(path)["model"]["w"], torch.full((4, 4), 2.0))
    assert files.read_pointer(tmp_path, "latest") == "step-00000007.pt"
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncated_and_corrupted_files_are_detected(tmp_path):
    files.save(tmp_path, _payload(), step=1, epoch=0, metric=None)
    path = tmp_path / "step-00000001.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        files.verify(path)
    path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(CheckpointError, match="CRC-32 does not match"):
        files.verify(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="no manifest"):
        files.verify(path)


class _Payload:
    """Unpickling this would run code: a checkpoint must never be able to do that."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    bad = {"format": 1, "model": {"w": torch.zeros(2)}, "extra": _Payload(str(marker))}
    files.save(tmp_path, bad, step=1, epoch=0, metric=None)  # integrity is fine: the file is what was saved
    path = tmp_path / "step-00000001.pt"
    files.verify(path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely: it holds a pickled") as info:
        files.load(path)
    assert not marker.exists()
    assert "\n" not in str(info.value)


def test_prune_keeps_newest_and_best(tmp_path):
    for step in range(1, 7):
        files.save(tmp_path, _payload(step), step=step, epoch=step, metric=None)
    (tmp_path / ".step-00000009.pt.x.tmp").write_bytes(b"partial")
    removed = files.prune(tmp_path, keep=2, protect={"step-00000002.pt"})
    assert sorted(removed) == ["step-00000001.pt", "step-00000003.pt", "step-00000004.pt"]
    assert [p.name for p in files.candidates(tmp_path)] == ["step-00000006.pt", "step-00000005.pt",
                                                            "step-00000002.pt"]
    assert not (tmp_path / "step-00000001.json").exists() and not list(tmp_path.glob(".*.tmp"))


def test_best_pointer_follows_the_metric(tmp_path):
    keeper = Checkpointer(CheckpointConfig(keep=2), tmp_path, load_recipe(None, []))
    for step, metric in ((1, 0.5), (2, 0.9), (3, 0.7), (4, 0.8)):
        keeper._after_save(files.save(tmp_path, _payload(), step=step, epoch=step, metric=metric))
    assert files.read_pointer(tmp_path, "best") == "step-00000002.pt"
    assert [p.name for p in files.candidates(tmp_path)] == ["step-00000004.pt", "step-00000003.pt",
                                                            "step-00000002.pt"]


def test_auto_resume_skips_a_truncated_newest_checkpoint_with_a_warning(tmp_path, caplog):
    from ddp.config import load_recipe
    from ddp.lifecycle.decision import decide

    directory = tmp_path / "version_0" / "checkpoints"
    for step in (1, 2):
        files.save(directory, _payload(step), step=step, epoch=step, metric=None)
    newest = directory / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    recipe = load_recipe(None, [f"run.dir={tmp_path}"])
    with caplog.at_level(logging.WARNING):
        assert decide(recipe).checkpoint == directory / "step-00000001.pt"
    assert f"skipping checkpoint {newest}" in caplog.text and "truncated" in caplog.text
    named = load_recipe(None, [f"run.dir={tmp_path}", f"train.resume={newest}"])
    with pytest.raises(CheckpointError, match="truncated"):
        decide(named)  # named explicitly: refused, not skipped
    fresh = load_recipe(None, [f"run.dir={tmp_path}", "train.resume=never"])
    decision = decide(fresh)
    assert decision.checkpoint is None and decision.run_dir == tmp_path / "version_1"


SLOW_SAVER = textwrap.dedent("""
    import sys, time, torch
    from ddp.checkpoint import files
    directory = sys.argv[1]
    files.save(__import__("pathlib").Path(directory), {"format": 1, "model": {"w": torch.ones(8)}}, 1, 0, None)
    real_write = files._CrcWriter.write
    def slow_write(self, data):  # a slow disk: 4 MiB pieces, 20 ms each (256 MiB takes > 1 s)
        if self.size == 0:
            print("saving", flush=True)
        view = memoryview(data)
        for start in range(0, len(view), 1 << 22):
            time.sleep(0.02)
            real_write(self, view[start:start + (1 << 22)])
        return len(data)
    files._CrcWriter.write = slow_write
    big = {"format": 1, "model": {"w": torch.randn(64, 1 << 20)}}  # 256 MiB: many slow chunks
    files.save(__import__("pathlib").Path(directory), big, 2, 1, None)
    print("finished", flush=True)
""")

TORN_WRITER = textwrap.dedent("""
    import builtins, io, os, sys, time, torch
    from pathlib import Path
    from ddp.checkpoint import files
    directory, target = Path(sys.argv[1]), sys.argv[2]
    files.save(directory, {"format": 1, "model": {"w": torch.ones(8)}}, 1, 0, None)
    real_open = io.open

    class Torn:  # writes half of its first write, says so, then waits for the kill
        def __init__(self, handle):
            self.handle = handle
        def write(self, data):
            self.handle.write(data[: max(1, len(data) // 2)])
            self.handle.flush()
            os.fsync(self.handle.fileno())
            print("saving", flush=True)
            time.sleep(120)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)
        def __getattr__(self, name):
            return getattr(self.handle, name)

    def watched_open(file, mode="r", *args, **kwargs):  # every open, os.fdopen and Path.write_text
        handle = real_open(file, mode, *args, **kwargs)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file))
        if any(m in mode for m in "wax") and (name == target or name.startswith(f".{target}.")):
            return Torn(handle)
        return handle

    io.open = builtins.open = watched_open
    files.save(directory, {"format": 1, "model": {"w": torch.full((8,), 2.0)}}, 2, 1, None)
    print("finished", flush=True)
""")


def _killed_while_saving(tmp_path, script: str, *args: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), *args], env=python_env(), cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == "saving", f"the save never wrote {args or 'the .pt'} through the hook: {line!r}"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the torn-write hook reads /proc/self/fd")
@pytest.mark.parametrize("moment", [".pt", "manifest", "latest"])
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_in_charge(tmp_path, moment):
    """kill -9 while the .pt streams, while its manifest is half written, while ``latest`` is half
    written: never a torn file under a real name; ``latest`` still names the previous checkpoint;
    auto-resume takes the previous one, or the new one only where it is complete (pt and manifest)."""
    if moment == ".pt":
        _killed_while_saving(tmp_path, SLOW_SAVER)
    else:
        _killed_while_saving(tmp_path, TORN_WRITER, "step-00000002.json" if moment == "manifest" else "latest")
    assert files.read_pointer(tmp_path, "latest") == "step-00000001.pt"
    torn = {".pt": ".step-00000002.pt.*.tmp", "manifest": ".step-00000002.json.*.tmp", "latest": ".latest.*.tmp"}
    assert list(tmp_path.glob(torn[moment]))  # the torn write is only a temporary file
    chosen = newest_valid(tmp_path)  # what train.resume=auto resumes from
    if moment == "latest":  # the .pt and its manifest were complete: the new checkpoint is whole
        assert chosen == tmp_path / "step-00000002.pt" and files.verify(chosen).step == 2
        assert torch.equal(files.load(chosen)["model"]["w"], torch.full((8,), 2.0))
        return
    assert (tmp_path / "step-00000002.pt").exists() == (moment == "manifest")  # renamed only once complete
    assert not (tmp_path / "step-00000002.json").exists()
    assert chosen == tmp_path / "step-00000001.pt"
    assert torch.equal(files.load(chosen)["model"]["w"], torch.ones(8))


def _draws() -> tuple:
    """What this process's python, numpy and torch generators give next."""
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _linear() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _save_on_each_rank(env, directory: str) -> tuple:
    """Each rank with its own generators and its own running sums of the epoch; then its next draws."""
    import random

    import numpy as np

    from ddp.checkpoint.checkpointer import TrainState

    seed = 100 + env.rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    model, optimizer = _linear()
    sums = [1.5 * (env.rank + 1), 10.0 * (env.rank + 1), 100.0 * (env.rank + 1)]  # loss·n, correct, n
    keeper = Checkpointer(CheckpointConfig(), Path(directory), load_recipe(None, []))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    keeper.save(model, optimizer, schedule, TrainState(epoch=0, global_step=3, sample_index=600, partial_sums=sums))
    return _draws()


def _resume_on_each_rank(env, directory: str) -> tuple:
    import random

    import numpy as np

    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # the same on every rank: the file must set them
    model, optimizer = _linear()
    keeper = Checkpointer(CheckpointConfig(), Path(directory), load_recipe(None, []))
    state = keeper.resume(Path(directory) / "step-00000003.pt", model, optimizer)
    return state.partial_sums, _draws(), (state.global_step, state.sample_index)


def test_resuming_at_another_world_size_deals_rng_states_round_robin_and_the_sums_to_rank_0(tmp_path):
    """docs/checkpoints.md "Another world size": rank r takes saved rank r mod old world's RNG states
    (python, numpy, torch); the epoch's running sums go to rank 0 (totals), the others start at 0."""
    from ddp.engine.rng import capture_rng, restore_rng
    from tests.harness import spawn_ranks

    saved = spawn_ranks(_save_on_each_rank, 2, str(tmp_path))  # real Gloo ranks: rank 1's states gathered to 0
    assert saved[0] != saved[1]
    totals = [1.5 + 3.0, 10.0 + 20.0, 100.0 + 200.0]
    three = spawn_ranks(_resume_on_each_rank, 3, str(tmp_path))
    assert [draws for _, draws, _ in three] == [saved[0], saved[1], saved[0]]  # rank 2 takes saved rank 0
    assert [sums for sums, _, _ in three] == [totals, [0.0] * 3, [0.0] * 3]
    assert {where for _, _, where in three} == {(3, 600)}  # the same step and sample position on every rank
    before = capture_rng()
    try:  # one rank, no group: this process
        sums, draws, where = _resume_on_each_rank(types.SimpleNamespace(rank=0), str(tmp_path))
    finally:
        restore_rng(before)
    assert (sums, draws, where) == (totals, saved[0], (3, 600))
