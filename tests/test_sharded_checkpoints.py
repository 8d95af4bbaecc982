"""Sharded checkpoints (``checkpoint.format=sharded``, FSDP's default) in one process: published
whole or not at all, checked file by file, pruned as directories, refused in one line when the disk
says no. Resume at other world sizes, on real ranks: tests/test_fsdp.py."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

from ddp.checkpoint import files, sharded
from ddp.checkpoint.checkpointer import Checkpointer, TrainState
from ddp.checkpoint.export import export
from ddp.checkpoint.files import CheckpointError
from ddp.config import CheckpointConfig, load_recipe
from ddp.errors import StorageError
from ddp.lifecycle.decision import newest_valid


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()  # momentum buffers now exist
    return model, optimizer


def _keeper(directory: Path, keep: int = 3, fmt: str = "sharded") -> Checkpointer:
    return Checkpointer(CheckpointConfig(format=fmt, keep=keep), directory, load_recipe(None, []))


def _save(keeper: Checkpointer, step: int, seed: int | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = _trained(step if seed is None else seed)
    keeper.save(model, optimizer, None, TrainState(epoch=0, global_step=step, sample_index=step * 10,
                                                   partial_sums=[1.0, 2.0, float(step)]))
    return model, optimizer


def test_a_sharded_save_is_listed_file_by_file_and_resumes_bit_for_bit_with_the_recipes_lr(tmp_path):
    keeper = _keeper(tmp_path)
    _save(keeper, 3)
    model, optimizer = _save(keeper, 4)
    assert files.read_pointer(tmp_path, "latest") == "step-00000004.dcp"
    manifest = json.loads((tmp_path / "step-00000004.json").read_text())
    on_disk = sorted(p.name for p in (tmp_path / "step-00000004.dcp").iterdir())
    assert sorted(manifest["files"]) == on_disk == [".metadata", "__0_0.distcp", "train_state.pt"]
    assert manifest["bytes"] == sum(size for size, _ in manifest["files"].values()) and manifest["step"] == 4
    assert not list(tmp_path.glob(".*"))  # no temporary left

    fresh, fresh_optimizer = _trained(99)
    fresh_optimizer.param_groups[0]["lr"] = 0.5  # the recipe's new lr: kept, not the checkpoint's 0.1
    state = keeper.resume(tmp_path / "step-00000004.dcp", fresh, fresh_optimizer)
    assert state.global_step == 4 and state.sample_index == 40 and state.partial_sums == [1.0, 2.0, 4.0]
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    for mine, theirs in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(fresh_optimizer.state[mine]["momentum_buffer"], optimizer.state[theirs]["momentum_buffer"])
    assert fresh_optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("fmt", ["sharded", "file"])
def test_background_saves_reuse_their_host_buffers_and_each_checkpoint_holds_its_own_step(tmp_path, fmt):
    """checkpoint.async_save keeps the host copy of the state between saves: the second save must
    overwrite it with the second state, and the first checkpoint must still hold the first."""
    keeper = Checkpointer(CheckpointConfig(format=fmt, keep=3, async_save=True), tmp_path, load_recipe(None, []))
    model, optimizer = _trained(0)
    saved = {}
    for step in (1, 2):
        keeper.save(model, optimizer, None, TrainState(epoch=0, global_step=step))
        saved[step] = {name: value.clone() for name, value in model.state_dict().items()}
        model(torch.randn(5, 3)).sum().backward()  # training goes on while the save is written
        optimizer.step()
    keeper.finish()
    assert keeper._stager is not None
    assert not torch.equal(saved[1]["0.weight"], saved[2]["0.weight"])
    for step in (1, 2):
        fresh, fresh_optimizer = _trained(99)
        keeper.resume(tmp_path / files.checkpoint_name(step, sharded=fmt == "sharded"), fresh, fresh_optimizer)
        for name, value in saved[step].items():
            assert torch.equal(fresh.state_dict()[name], value), (step, name)


@pytest.mark.parametrize("fmt", ["sharded", "file"])
def test_background_saves_copy_into_fresh_memory_on_a_torch_without_dcps_stager(tmp_path, monkeypatch, fmt):
    import ddp.checkpoint.checkpointer as checkpointer

    monkeypatch.setattr(checkpointer, "background_host_stager", lambda: None)  # an older torch
    keeper = Checkpointer(CheckpointConfig(format=fmt, keep=3, async_save=True), tmp_path, load_recipe(None, []))
    model, optimizer = _trained(0)
    keeper.save(model, optimizer, None, TrainState(epoch=0, global_step=1))
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    keeper.finish()
    fresh, fresh_optimizer = _trained(99)
    keeper.resume(tmp_path / files.checkpoint_name(1, sharded=fmt == "sharded"), fresh, fresh_optimizer)
    assert all(torch.equal(fresh.state_dict()[name], value) for name, value in saved.items())


def test_a_background_shard_writer_reads_host_memory_only(tmp_path, monkeypatch):
    """With our stager, DCP's writer must be told the state is in host memory already
    (per_thread_copy_ahead=0); left at its default it would use its CUDA-overlapping loader on any
    machine with a GPU, from its writer thread, on GPU 0 in every rank."""
    import torch.distributed.checkpoint as dcp

    seen = []
    real = dcp.async_save
    monkeypatch.setattr(dcp, "async_save", lambda *a, **k: seen.append(k) or real(*a, **k))
    keeper = Checkpointer(CheckpointConfig(format="sharded", async_save=True), tmp_path, load_recipe(None, []))
    model, optimizer = _trained(0)
    keeper.save(model, optimizer, None, TrainState(epoch=0, global_step=1))
    keeper.finish()
    assert len(seen) == 1 and seen[0]["storage_writer"].per_thread_copy_ahead == 0
    assert seen[0]["async_stager"] is keeper._stager is not None


def test_a_file_checkpoint_keeps_the_recipes_hyperparameters_too(tmp_path):
    keeper = _keeper(tmp_path, fmt="file")
    _save(keeper, 3)
    fresh, fresh_optimizer = _trained(99)
    fresh_optimizer.param_groups[0].update(lr=0.5, momentum=0.5)  # loading the optimizer replaces its groups
    keeper.resume(tmp_path / "step-00000003.pt", fresh, fresh_optimizer)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.5 and fresh_optimizer.param_groups[0]["momentum"] == 0.5


def test_a_torn_shard_is_skipped_by_auto_resume_refused_by_name_and_not_exported(tmp_path, caplog):
    keeper = _keeper(tmp_path)
    _save(keeper, 3)
    _save(keeper, 4)
    shard = tmp_path / "step-00000004.dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-00000004.dcp is corrupt: the CRC-32 of __0_0.distcp does not"):
        files.verify(tmp_path / "step-00000004.dcp")
    with caplog.at_level(logging.WARNING):
        assert newest_valid(tmp_path) == tmp_path / "step-00000003.dcp"  # what train.resume=auto takes
    assert "skipping checkpoint" in caplog.text
    with pytest.raises(CheckpointError) as refused:
        export(tmp_path / "step-00000004.dcp", tmp_path / "model.pt")
    assert refused.value.hint == f"export an intact one, e.g. {tmp_path / 'step-00000003.dcp'}"
    assert not (tmp_path / "model.pt").exists()
    (tmp_path / "step-00000003.dcp" / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000003.dcp is incomplete: train_state.pt is missing"):
        files.verify(tmp_path / "step-00000003.dcp")


def test_a_save_killed_midway_counts_for_nothing_and_the_next_save_clears_it(tmp_path):
    keeper = _keeper(tmp_path, keep=2)
    _save(keeper, 3)
    killed_writing = sharded.partial_dir(tmp_path / "step-00000005.dcp")  # killed while the ranks wrote
    killed_writing.mkdir()
    (killed_writing / "__0_0.distcp").write_bytes(b"half")
    killed_publishing = tmp_path / "step-00000006.dcp"  # renamed into place, killed before its manifest
    killed_publishing.mkdir()
    (killed_publishing / ".metadata").write_bytes(b"whole")
    assert newest_valid(tmp_path) == tmp_path / "step-00000003.dcp"
    assert files.read_pointer(tmp_path, "latest") == "step-00000003.dcp"
    _save(keeper, 7)
    _save(keeper, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000007.dcp", "step-00000007.json",
                                                          "step-00000008.dcp", "step-00000008.json"]


def test_a_disk_that_refuses_a_shard_is_a_storage_error_and_leaves_no_part_of_the_save(tmp_path, monkeypatch):
    keeper = _keeper(tmp_path)
    _save(keeper, 3)
    real = sharded.write_shards

    def full_disk(directory, *args, **kwargs):
        real(directory, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sharded, "write_shards", full_disk)
    with pytest.raises(StorageError) as refused:
        _save(keeper, 4)
    assert refused.value.exit_code == 74
    assert refused.value.problem.startswith(f"checkpoint step-00000004.dcp not saved: no space left on device in "
                                            f"{tmp_path}: it needs about ")
    assert "it resumes from step-00000003.dcp" in refused.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003.dcp", "step-00000003.json"]
    assert files.read_pointer(tmp_path, "latest") == "step-00000003.dcp"


def test_a_background_save_that_fails_stops_the_run_at_the_next_poll_with_the_disks_error(tmp_path, monkeypatch):
    from ddp.runner import execute
    from ddp.cluster.environment import SingleProcessEnv

    real = files.save

    def full_from_step_3(directory, payload, step, *args, **kwargs):
        if step >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, payload, step, *args, **kwargs)

    monkeypatch.setattr(files, "save", full_from_step_3)
    recipe = load_recipe(None, [f"run.dir={tmp_path}", "checkpoint.async_save=true", "checkpoint.every_steps=1",
                                "train.max_steps=8", "log.every_steps=1", "log.tensorboard=false", "log.progress=false"])
    with pytest.raises(StorageError) as refused:
        execute(recipe, SingleProcessEnv())
    assert refused.value.problem.startswith("checkpoint step-00000003.pt not saved: no space left on device in ")
    checkpoints = tmp_path / "version_0" / "checkpoints"
    assert files.read_pointer(checkpoints, "latest") == "step-00000002.pt"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000001.json", "step-00000001.pt",
                                                                  "step-00000002.json", "step-00000002.pt"]
    steps = (tmp_path / "version_0" / "metrics.jsonl").read_text().count('"kind": "step"')
    assert 3 <= steps < 8  # stopped at the poll after the failure, not at the end


def test_the_same_step_saved_again_in_the_other_format_replaces_it(tmp_path):
    _save(_keeper(tmp_path, fmt="file"), 3)
    _save(_keeper(tmp_path), 3)  # checkpoint.format changed, the same step saved again (a stop right after a resume)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003.dcp", "step-00000003.json"]
    assert files.verify(tmp_path / "step-00000003.dcp").step == 3


def test_an_optimizer_saved_before_its_first_step_starts_fresh_again(tmp_path):
    """DCP makes an optimizer's state with a zero step: an Adam saved before any step would resume
    at step 2. It is saved without state, and resumed without one."""
    keeper = _keeper(tmp_path)
    model = torch.nn.Linear(3, 2)
    keeper.save(model, torch.optim.Adam(model.parameters()), None, TrainState(global_step=0))
    assert not sharded.has_optimizer(tmp_path / "step-00000000.dcp")
    fresh = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(fresh.parameters())
    keeper.resume(tmp_path / "step-00000000.dcp", fresh, optimizer)
    assert not optimizer.state and torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize("override, problem, hint", [
    ("checkpoint.format=zip", "bad value for 'checkpoint.format'", "checkpoint.format takes one of: auto, file, sharded"),
    ("checkpoint.async_save=maybe", "bad value for 'checkpoint.async_save'", "checkpoint.async_save takes bool"),
    ("checkpoint.async=true", "unknown key 'checkpoint.async'", "did you mean 'checkpoint.async_save'?"),
])
def test_bad_checkpoint_keys_are_refused_in_one_line(override, problem, hint):
    from ddp.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        load_recipe(None, [override])
    assert refused.value.exit_code == 2 and problem in refused.value.problem and hint in refused.value.hint
