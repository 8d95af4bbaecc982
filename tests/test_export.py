"""``python -m ddp.export``: a checkpoint → one plain ``state_dict`` file.

A real 2-rank FSDP run (Gloo, CPU) is exported with the command line; ``torch.load(weights_only=True)``
into a plain model built from the recipe gives the run's own recorded test accuracy and the
sharded checkpoint's weights bit for bit. A one-process DDP run starts from the FSDP run's export
(``model.weights``), and an FSDP run from a DDP run's export. Every bad input is one line, exit 2
(74 for a destination the disk or its permissions refuse), and leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddp.checkpoint import atomic, files
from ddp.checkpoint.export import export, locate
from ddp.cluster.environment import SingleProcessEnv
from ddp.config import load_recipe
from ddp.data.datasets import build_datasets
from ddp.export import main
from ddp.model.registry import Given, build_components, build_model
from tests.harness import free_port, run_cli, spawn_ranks

COMMON = ["model.name=mnist_mlp", "log.tensorboard=false", "log.progress=false", "optim.schedule=none",
          "data.batch_size=32", "data.eval_batch_size=179"]  # 359 test digits: 2 batches on rank 0, 1 on rank 1
GLOBAL_BATCH = 32
FROM_DDP = ["train.max_steps=3"]  # the FSDP run, and one process for reference
FROZEN = ["optim.lr=1e-30", "train.max_steps=1"]  # one step that leaves the weights as they start: evaluates them
VERSION = Path("version_0")


def _recipe(run_dir, *extra: str):
    return load_recipe(None, [f"run.dir={run_dir}", "train.max_steps=4", *COMMON, *extra])


def _fsdp_job(env, tmp: str, port: int, ddp_export: str) -> dict:
    """A 2-rank FSDP run that starts from a DDP run's export: its last epoch record and weights."""
    from ddp.runner import execute

    result = execute(_recipe(f"{tmp}/fsdp", *FROM_DDP, f"model.weights={ddp_export}", "dist.parallel=fsdp",
                             f"data.batch_size={GLOBAL_BATCH // env.world_size}"), replace(env, master_port=port))
    return {"metrics": result.metrics, "weights": _numpy(result.state_dict)}


def _numpy(state_dict: dict) -> dict:
    return {name: value.numpy() for name, value in state_dict.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A one-process DDP run, exported; from its export, a 2-rank FSDP run and, for reference, one
    process with the FSDP run's global batch."""
    from ddp.runner import execute

    tmp = tmp_path_factory.mktemp("export")
    ddp = execute(_recipe(tmp / "ddp", "dist.parallel=ddp"), SingleProcessEnv())
    export(tmp / "ddp" / VERSION, tmp / "ddp.pt")
    one = execute(_recipe(tmp / "one", *FROM_DDP, f"model.weights={tmp / 'ddp.pt'}"), SingleProcessEnv())
    fsdp = spawn_ranks(_fsdp_job, 2, str(tmp), free_port(), str(tmp / "ddp.pt"), init_group=False, timeout=180)[0]
    return {"tmp": tmp, "ddp": ddp.metrics, "one": {"metrics": one.metrics, "weights": _numpy(one.state_dict)},
            "fsdp": fsdp}


def _last_record(version: Path) -> dict:
    lines = (version / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("kind") == "epoch"][-1]


def _plain_model(state_dict: dict) -> torch.nn.Module:
    """The recipe's model, built without any wrapper, with ``state_dict`` loaded (every key must match)."""
    recipe = _recipe("unused")
    model = build_model(recipe.model, build_datasets(recipe.data))
    model.load_state_dict(state_dict)
    return model


@torch.no_grad()
def _accuracy(model: torch.nn.Module) -> float:
    test = build_datasets(_recipe("unused").data).test
    loader = torch.utils.data.DataLoader(test, batch_size=512)
    model.eval()
    correct = sum(int((model(inputs).argmax(dim=1) == targets).sum()) for inputs, targets in loader)
    return correct / len(test)


# --- what an export holds ---------------------------------------------------------------------

def test_an_fsdp_export_is_a_plain_state_dict_with_the_runs_weights_and_test_accuracy(runs):
    tmp = runs["tmp"]
    done = run_cli(["-m", "ddp.export", str(tmp / "fsdp" / VERSION), "model.pt"], cwd=tmp)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    print(line)  # shown with pytest -s
    checkpoint = tmp / "fsdp" / VERSION / "checkpoints" / "step-00000003.dcp"  # FSDP's default: sharded
    assert re.fullmatch(rf"wrote model\.pt: 4 tensors, [\d.]+ KB, the weights of {re.escape(str(checkpoint))} "
                        r"\(step 3, epoch 0\)\. Load it into the recipe's model \(model\.name=mnist_mlp\) with "
                        r"model\.load_state_dict\(torch\.load\('model\.pt', weights_only=True\)\), "
                        r"or start a run from it with model\.weights=model\.pt", line), line
    exported = torch.load(tmp / "model.pt", weights_only=True)
    saved = runs["fsdp"]["weights"]  # the run's final weights, gathered by its ranks
    assert list(exported) == list(saved) and not any(key.startswith(("module.", "_orig_mod.")) for key in exported)
    assert all(torch.equal(exported[key], torch.from_numpy(saved[key])) for key in saved)
    recorded = _last_record(tmp / "fsdp" / VERSION)
    assert recorded["step"] == 3 and recorded["test_count"] == 359
    assert _accuracy(_plain_model(exported)) == pytest.approx(recorded["test_acc"], abs=1e-12)


def test_an_fsdp_run_trains_from_a_ddp_export_as_one_process_does(runs):
    fsdp, one = runs["fsdp"], runs["one"]
    worst = max(float(abs(fsdp["weights"][key] - one["weights"][key]).max()) for key in one["weights"])
    assert worst < 1e-5, f"FSDP from a DDP export vs one process from it: max abs difference {worst}"
    assert fsdp["metrics"]["test_acc"] == pytest.approx(one["metrics"]["test_acc"], abs=1e-12)
    assert fsdp["metrics"]["test_loss"] == pytest.approx(one["metrics"]["test_loss"], abs=1e-5)


def test_a_ddp_run_starts_from_an_fsdp_export(runs):
    from ddp.runner import execute

    tmp = runs["tmp"]
    export(tmp / "fsdp" / VERSION, tmp / "fsdp.pt")
    recipe = _recipe(tmp / "ddp_from_fsdp", "dist.parallel=ddp", f"model.weights={tmp / 'fsdp.pt'}", *FROZEN)
    _, model = build_components(recipe, Given(), build_datasets)  # what model.weights loads, before any step
    exported = torch.load(tmp / "fsdp.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[key], exported[key]) for key in exported)
    started = execute(recipe, SingleProcessEnv()).metrics
    assert started["test_acc"] == pytest.approx(runs["fsdp"]["metrics"]["test_acc"], abs=1e-12)
    assert started["test_loss"] == pytest.approx(runs["fsdp"]["metrics"]["test_loss"], abs=1e-6)


def test_best_and_a_checkpoint_file_and_the_checkpoints_directory_are_sources_too(runs, tmp_path):
    version = runs["tmp"] / "ddp" / VERSION
    checkpoints = version / "checkpoints"
    newest = checkpoints / files.read_pointer(checkpoints, "latest")
    assert locate(version) == locate(checkpoints) == locate(newest) == newest
    shutil.copytree(version, tmp_path / "v", ignore=shutil.ignore_patterns("*.lock"))
    (tmp_path / "v" / "checkpoints" / "best").write_text(newest.name + "\n")
    assert main([str(tmp_path / "v"), str(tmp_path / "best.pt"), "--which", "best"]) == 0
    assert main([str(newest), str(tmp_path / "file.pt")]) == 0
    assert torch.load(tmp_path / "best.pt").keys() == torch.load(tmp_path / "file.pt").keys()


def test_wrapper_prefixes_are_stripped(tmp_path):
    weights = {"module._orig_mod.weight": torch.ones(2, 2), "module.bias": torch.zeros(2)}
    files.save(tmp_path, {"format": 1, "model": weights, "recipe": "model:\n  name: own\n"}, step=3, epoch=1,
               metric=0.5, metric_name="test_acc")
    assert main([str(tmp_path), str(tmp_path / "plain.pt")]) == 0
    assert list(torch.load(tmp_path / "plain.pt", weights_only=True)) == ["weight", "bias"]


# --- bad input: one line, the exit code, nothing written ----------------------------------------

@pytest.fixture()
def run_copy(runs, tmp_path) -> Path:
    """A copy of the DDP run's version directory, to break."""
    shutil.copytree(runs["tmp"] / "ddp" / VERSION, tmp_path / "version_0", ignore=shutil.ignore_patterns("*.lock"))
    (tmp_path / "out").mkdir()
    return tmp_path / "version_0"


def _refused(capsys, args: list[str], code: int, pattern: str) -> str:
    assert main(args) == code
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"error: {pattern} HINT: .+\n", err), err
    return err


def _latest(version: Path) -> Path:
    return version / "checkpoints" / files.read_pointer(version / "checkpoints", "latest")


def _corrupt(pt: Path) -> None:
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))


def _truncate(pt: Path) -> None:
    pt.write_bytes(pt.read_bytes()[:-100])


@pytest.mark.parametrize("damage, pattern", [
    (_corrupt, r"checkpoint .*step-00000004\.pt is corrupt: CRC-32 does not match its manifest\."),
    (_truncate, r"checkpoint .*step-00000004\.pt is truncated or altered: \d+ bytes, manifest says \d+\."),
    (lambda pt: pt.with_suffix(".json").unlink(), r".*step-00000004\.pt has no manifest step-00000004\.json .*"),
])
def test_a_corrupt_or_torn_checkpoint_is_refused(capsys, run_copy, damage, pattern):
    damage(_latest(run_copy))
    err = _refused(capsys, [str(run_copy), str(run_copy.parent / "out" / "model.pt")], 2, pattern)
    assert "no intact checkpoint is left beside it" in err
    assert list((run_copy.parent / "out").iterdir()) == []


def test_a_broken_latest_names_the_intact_checkpoint_to_export_instead(capsys, run_copy):
    checkpoints = run_copy / "checkpoints"
    intact = _latest(run_copy)
    shutil.copy(intact, checkpoints / "step-00000009.pt")
    shutil.copy(intact.with_suffix(".json"), checkpoints / "step-00000009.json")
    (checkpoints / "latest").write_text("step-00000009.pt\n")
    _corrupt(checkpoints / "step-00000009.pt")
    err = _refused(capsys, [str(run_copy), str(run_copy.parent / "out" / "model.pt")], 2, r".* is corrupt: .*")
    assert f"HINT: export an intact one, e.g. {intact}" in err


@pytest.mark.parametrize("setup, source, pattern", [
    (lambda tmp: None, "nowhere", r"\S*nowhere does not exist\."),
    (lambda tmp: (tmp / "v" / "checkpoints").mkdir(parents=True), "v", r"\S*v has no checkpoint \(no .*latest\)\."),
    (lambda tmp: (tmp / "g" / "version_0" / "checkpoints").mkdir(parents=True), "g",
     r"\S*g holds 1 run version, not one run's checkpoints\."),
    (lambda tmp: (tmp / "notes.txt").write_text("hello"), "notes.txt", r"\S*notes\.txt is not a checkpoint\."),
])
def test_a_source_without_a_checkpoint_is_refused(capsys, tmp_path, setup, source, pattern):
    setup(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    _refused(capsys, [str(tmp_path / source), str(tmp_path / "model.pt")], 2, pattern)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_pointer_to_a_missing_checkpoint_is_refused(capsys, run_copy):
    (run_copy / "checkpoints" / "latest").write_text("step-00000099.pt\n")
    err = _refused(capsys, [str(run_copy), str(run_copy.parent / "out" / "m.pt")], 2,
                   r".*latest names step-00000099\.pt, which does not exist\.")
    assert "HINT: export an intact one, e.g. " in err and err.strip().endswith("step-00000004.pt")


def test_no_best_checkpoint_is_refused_naming_latest(capsys, run_copy):
    (run_copy / "checkpoints" / "best").unlink(missing_ok=True)
    err = _refused(capsys, [str(run_copy), str(run_copy.parent / "out" / "m.pt"), "--which", "best"], 2,
                   r".* has no best checkpoint .*")
    assert "--which latest" in err


def test_an_existing_destination_is_kept_unless_forced(capsys, run_copy):
    dest = run_copy.parent / "out" / "model.pt"
    dest.write_bytes(b"keep me")
    _refused(capsys, [str(run_copy), str(dest)], 2, rf"{re.escape(str(dest))} exists already\.")
    assert dest.read_bytes() == b"keep me"
    assert main([str(run_copy), str(dest), "--force"]) == 0
    assert len(torch.load(dest, weights_only=True)) == 4
    capsys.readouterr()
    _refused(capsys, [str(run_copy), str(run_copy.parent / "out")], 2, r".*out is a directory\.")
    _refused(capsys, [str(run_copy), str(run_copy.parent / "missing" / "m.pt")], 2,
             r"the directory .*missing does not exist\.")
    assert not (run_copy.parent / "missing").exists()
    assert sorted(p.name for p in (run_copy.parent / "out").iterdir()) == ["model.pt"]


def _unwritable_dir() -> Path | None:
    """A directory this process may not create files in (even as root: sysfs), if there is one."""
    for candidate in ("/sys", "/proc/sys"):
        try:
            fd, name = tempfile.mkstemp(dir=candidate)
        except OSError:
            return Path(candidate)
        os.close(fd)
        os.unlink(name)
    return None


def test_a_destination_directory_that_cannot_be_written_exits_74(capsys, run_copy):
    directory = _unwritable_dir()
    if directory is None:
        pytest.skip("no unwritable directory here")
    _refused(capsys, [str(run_copy), str(directory / "model.pt")], 74,
             rf"cannot write {directory}/model\.pt: permission denied in {directory}\.")
    assert not (directory / "model.pt").exists()


def test_a_full_disk_exits_74_and_leaves_no_temporary_file(capsys, run_copy, monkeypatch):
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    out = run_copy.parent / "out"
    _refused(capsys, [str(run_copy), str(out / "model.pt")], 74,
             rf"cannot write {re.escape(str(out))}/model\.pt: no space left on device in {re.escape(str(out))}: "
             r"it needs about [\d.]+ KB; .* free there\.")
    assert list(out.iterdir()) == []


def test_which_with_one_file_and_the_checkpoint_itself_as_destination_are_refused(capsys, run_copy):
    checkpoint = _latest(run_copy)
    _refused(capsys, [str(checkpoint), str(run_copy.parent / "out" / "m.pt"), "--which", "best"], 2,
             r"--which best picks a checkpoint of a directory, but .* is one checkpoint already\.")
    before = checkpoint.read_bytes()
    _refused(capsys, [str(run_copy), str(checkpoint), "--force"], 2, r".*step-00000004\.pt is the checkpoint itself\.")
    assert checkpoint.read_bytes() == before and list((run_copy.parent / "out").iterdir()) == []
