"""The lifecycle's rules in-process, one by one: which version a run writes, when it resumes,
what a refusal leaves behind, the lock, the history and the recipe header.

``test_lifecycle.py`` shows these rules on real CLI runs; the tests here pin each branch of
``ddp.lifecycle`` directly, in a few seconds (mutation testing against the fast in-process tests
left most of its branches unchecked).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import stat
from datetime import datetime
from dataclasses import replace
from pathlib import Path

import pytest

from ddp.checkpoint import files
from ddp.checkpoint.files import CheckpointError
from ddp.cluster.environment import hostname
from ddp.config import Policy, Recipe, flat, load_recipe, to_yaml
from ddp.lifecycle import lock, versions
from ddp.lifecycle.changes import Change, check_resumable, describe, recipe_changes, show_value
from ddp.lifecycle.decision import decide, finished
from ddp.lifecycle.history import read_history, record_start, record_stop
from ddp.lifecycle.run_dir import RunDir


@pytest.fixture(autouse=True)
def _release_every_lock():
    yield
    for held in list(lock._held):
        lock.release(held)


@functools.lru_cache(maxsize=None)
def _base(overrides: tuple[str, ...]) -> Recipe:
    return load_recipe(None, list(overrides))


def _recipe(group: Path, *overrides: str, resume: object = "auto") -> Recipe:
    """The default recipe plus ``overrides``, writing to ``group``, resuming ``resume``
    (the recipe is parsed once per set of overrides: these tests decide, they do not parse)."""
    base = _base(overrides)
    return replace(base, run=replace(base.run, dir=str(group)), train=replace(base.train, resume=str(resume)))


@functools.lru_cache(maxsize=None)
def _saved_yaml(overrides: tuple[str, ...]) -> str:
    return to_yaml(_base(overrides))  # run.dir and train.resume are ignored on resume: left at their defaults


def _checkpoint(directory: Path, step: int, epoch: int, *overrides: str, metric: float | None = None) -> Path:
    """A valid checkpoint trained with the default recipe plus ``overrides``."""
    files.save(directory, {"format": 1}, step=step, epoch=epoch, metric=metric, recipe=_saved_yaml(overrides))
    return directory / files.checkpoint_name(step)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- versions ---------------------------------------------------------------------------------

def test_only_version_directories_count_and_they_sort_by_number(tmp_path):
    assert versions.list_versions(tmp_path / "missing") == []
    for name in ("version_10", "version_2", "version_0", "other", "version_x", "xversion_3", "version_4b"):
        (tmp_path / name).mkdir()
    (tmp_path / "version_7").write_text("a file, not a version")
    assert [p.name for p in versions.list_versions(tmp_path)] == ["version_0", "version_2", "version_10"]
    assert versions.version_number(Path("version_12")) == 12 and versions.version_number(Path("v_1")) is None


def test_claiming_a_version_in_a_missing_group_reports_every_directory_it_made(tmp_path):
    group = tmp_path / "a" / "b"
    path, created = versions.claim_next(group)
    assert path == group / "version_0" and path.is_dir()
    assert created == [tmp_path / "a", group, path]  # outermost first
    path, created = versions.claim_next(group)
    assert path == group / "version_1" and created == [path]  # the group existed: only the version


def test_claiming_after_a_gap_takes_the_number_after_the_highest(tmp_path):
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_5").mkdir()
    assert versions.claim_next(tmp_path)[0] == tmp_path / "version_6"


def test_a_version_claimed_by_another_run_a_moment_ago_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "version_0").mkdir()
    monkeypatch.setattr(versions, "list_versions", lambda group: [])  # listed before the other run's mkdir
    assert versions.claim_next(tmp_path) == (tmp_path / "version_1", [tmp_path / "version_1"])


def test_versions_claimed_by_two_other_runs_are_both_skipped_in_a_few_tries(tmp_path, monkeypatch):
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_1").mkdir()
    monkeypatch.setattr(versions, "list_versions", lambda group: [])
    tries = []
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        tries.append(self.name)
        if len(tries) > 10:
            raise RuntimeError(f"still claiming after {tries}")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert versions.claim_next(tmp_path)[0] == tmp_path / "version_2"
    assert tries == ["version_0", "version_1", "version_2"]


def test_removing_created_directories_stops_at_the_first_that_is_not_empty(tmp_path):
    group = tmp_path / "a" / "b"
    path, created = versions.claim_next(group)
    (group / "someone-elses-file").write_text("x")
    versions.remove_created(created)
    assert not path.exists() and group.is_dir() and (tmp_path / "a").is_dir()
    (group / "someone-elses-file").unlink()
    versions.remove_created(created[:-1])
    assert not (tmp_path / "a").exists()


def test_a_checkpoint_belongs_to_a_version_only_inside_its_checkpoints_directory(tmp_path):
    inside = tmp_path / "version_3" / "checkpoints" / "step-00000001.pt"
    assert versions.owning_version(inside) == tmp_path / "version_3"
    assert versions.owning_version(tmp_path / "version_3" / "step-00000001.pt") is None
    assert versions.owning_version(tmp_path / "other" / "checkpoints" / "step-00000001.pt") is None


# --- the lock ---------------------------------------------------------------------------------

def test_a_locked_version_is_refused_naming_the_holder_until_it_is_released(tmp_path):
    lock.acquire(tmp_path)
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == hostname()
    assert stat.S_IMODE((tmp_path / ".lock").stat().st_mode) == 0o644 & ~_umask()
    with pytest.raises(CheckpointError) as info:
        lock.acquire(tmp_path)  # flock is per open file: a second open conflicts even in this process
    assert re.fullmatch(rf"{re.escape(str(tmp_path))} is in use by another run \(pid {os.getpid()} on "
                        rf"{re.escape(hostname())}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\)\.", info.value.problem)
    assert info.value.hint == ("wait for it to finish or stop it; to train alongside it: train.resume=never "
                               "(a new version) or another run.name")
    lock.release(tmp_path)
    lock.release(tmp_path)  # a second release is a no-op
    lock.acquire(tmp_path)
    assert tmp_path in lock._held


def test_a_holder_that_wrote_nothing_readable_is_named_unknown(tmp_path):
    (tmp_path / ".lock").write_text("not json")
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CheckpointError, match=r"in use by another run \(holder unknown\)"):
            lock.acquire(tmp_path)
        assert tmp_path not in lock._held
    finally:
        os.close(fd)


def test_a_filesystem_without_flock_runs_unlocked(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock.acquire(tmp_path)  # no error
    assert tmp_path not in lock._held


# --- changes ----------------------------------------------------------------------------------

def test_keys_the_saved_recipe_lacks_or_that_resume_at_auto_are_not_changes(tmp_path):
    saved = to_yaml(_recipe(tmp_path)).replace("  lr: 0.05\n", "")
    assert "lr:" not in saved
    now = _recipe(tmp_path, "optim.lr=0.01", "data.batch_size=auto", "train.epochs=20")
    assert [(c.key, c.before, c.after) for c in recipe_changes(saved, now)] == [("train.epochs", 10, 20)]


def test_a_change_reads_as_key_before_arrow_after_and_none_as_null():
    change = Change("model.weights", None, "w.pt", Policy.refused)
    assert str(change) == "model.weights null → w.pt" and show_value(0) == "0"
    honoured = Change("optim.lr", 0.05, 0.01, Policy.honoured)
    assert describe([honoured, change, Change("train.epochs", 2, 4, Policy.honoured)]) == \
        "optim.lr 0.05 → 0.01, train.epochs 2 → 4"


def test_the_first_refused_change_is_named_with_both_values_and_the_others_listed():
    check_resumable([Change("optim.lr", 0.05, 0.01, Policy.honoured)], "ck.pt")  # nothing refused: no error
    refused = [Change("optim.lr", 0.05, 0.01, Policy.honoured),
               Change("model.name", "a", "b", Policy.refused, "its weights belong to another model"),
               Change("train.seed", 0, 1, Policy.refused, "x"), Change("data.name", "c", "d", Policy.refused, "y")]
    with pytest.raises(CheckpointError) as info:
        check_resumable(refused, "ck.pt")
    assert info.value.problem == ("cannot resume ck.pt with model.name=b: it was trained with model.name=a and "
                                  "its weights belong to another model (also: train.seed, data.name).")
    assert info.value.hint == "keep model.name=a to resume, or train.resume=never to start a new version"
    with pytest.raises(CheckpointError) as info:
        check_resumable(refused[:3], "ck.pt")
    assert info.value.problem.endswith("another model (also: train.seed).")
    with pytest.raises(CheckpointError) as info:
        check_resumable(refused[:2], "ck.pt")
    assert info.value.problem.endswith("it was trained with model.name=a and its weights belong to another model.")


# --- decide: never and auto -------------------------------------------------------------------

def test_never_starts_the_next_version_and_says_the_others_are_left_alone(tmp_path):
    first = decide(_recipe(tmp_path, resume="never"))
    assert first.run_dir == tmp_path / "version_0" and first.notice == "" and first.checkpoint is None
    assert first.created == (tmp_path / "version_0",) and first.changes == () and first.done == ""
    second = decide(_recipe(tmp_path, resume="never"))
    assert second.run_dir == tmp_path / "version_1"
    assert second.notice == (f"train.resume=never: starting {tmp_path / 'version_1'} "
                             f"({tmp_path}/version_* are left as they are)")


def test_a_started_run_holds_its_versions_lock(tmp_path):
    decision = decide(_recipe(tmp_path))
    assert decision.run_dir == tmp_path / "version_0" and decision.notice == "" and decision.changes == ()
    with pytest.raises(CheckpointError, match="in use by another run"):
        lock.acquire(decision.run_dir)


def test_auto_resumes_the_newest_versions_newest_valid_checkpoint(tmp_path):
    (tmp_path / "version_0").mkdir()
    ckpts = tmp_path / "version_1" / "checkpoints"
    _checkpoint(ckpts, 4, 1)
    newest = _checkpoint(ckpts, 8, 2)
    decision = decide(_recipe(tmp_path, "optim.lr=0.01"))
    assert decision.run_dir == tmp_path / "version_1" and decision.checkpoint == newest
    assert decision.created == () and decision.done == "" and decision.notice == ""
    assert [(c.key, c.before, c.after) for c in decision.changes] == [("optim.lr", 0.05, 0.01)]
    with pytest.raises(CheckpointError, match="in use"):  # the continued version is locked too
        lock.acquire(decision.run_dir)


def test_auto_starts_a_new_version_when_the_newest_has_no_checkpoint(tmp_path):
    _checkpoint(tmp_path / "version_0" / "checkpoints", 4, 1)
    (tmp_path / "version_1").mkdir()
    decision = decide(_recipe(tmp_path))
    assert decision.run_dir == tmp_path / "version_2" and decision.checkpoint is None
    assert decision.notice == (f"{tmp_path / 'version_1'} has no checkpoint to resume from; "
                               f"starting {tmp_path / 'version_2'}")


def test_auto_never_reopens_a_finished_run(tmp_path):
    _checkpoint(tmp_path / "version_0" / "checkpoints", 40, 3, "train.epochs=3", metric=0.91234)
    decision = decide(_recipe(tmp_path, "train.epochs=3", "checkpoint.best_metric=test_acc"))
    assert decision.run_dir == tmp_path / "version_1" and decision.checkpoint is None
    assert decision.notice == (f"{tmp_path / 'version_0'} finished at epoch 3, step 40, test_acc 0.9123; "
                               f"starting {tmp_path / 'version_1'}. To train version_0 further instead: "
                               f"train.resume={tmp_path / 'version_0'} train.epochs=<more than 3>")


def test_auto_continues_a_run_given_more_epochs(tmp_path):
    ckpt = _checkpoint(tmp_path / "version_0" / "checkpoints", 40, 3, "train.epochs=3")
    decision = decide(_recipe(tmp_path, "train.epochs=4"))
    assert decision.run_dir == tmp_path / "version_0" and decision.checkpoint == ckpt
    assert [str(c) for c in decision.changes] == ["train.epochs 3 → 4"]


def test_a_refused_change_creates_and_locks_nothing(tmp_path):
    _checkpoint(tmp_path / "version_0" / "checkpoints", 4, 1)
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match="cannot resume .* with train.seed=1"):
        decide(_recipe(tmp_path, "train.seed=1"))
    assert _tree(tmp_path) == before
    lock.acquire(tmp_path / "version_0")  # not left locked


@pytest.mark.parametrize(("epoch", "step", "overrides", "done"), [
    (3, 10, ["train.epochs=3"], True), (2, 10, ["train.epochs=3"], False),
    (1, 10, ["train.max_steps=10"], True), (1, 9, ["train.max_steps=10"], False),
    (1, 0, ["train.max_steps=0"], True), (1, 10**6, ["train.max_steps=-1"], False)])
def test_a_run_is_finished_at_its_epochs_or_its_step_cap(tmp_path, epoch, step, overrides, done):
    manifest = files.Manifest("x.pt", 0, 0, step=step, epoch=epoch, metric=None)
    assert finished(manifest, _recipe(tmp_path, *overrides)) is done


# --- decide: an explicit path -----------------------------------------------------------------

def test_naming_a_versions_newest_checkpoint_continues_that_version(tmp_path):
    ckpts = tmp_path / "version_0" / "checkpoints"
    _checkpoint(ckpts, 4, 1)
    newest = _checkpoint(ckpts, 8, 2)
    (tmp_path / "version_1").mkdir()  # not the newest version: named, it still continues
    decision = decide(_recipe(tmp_path, resume=newest))
    assert decision.run_dir == tmp_path / "version_0" and decision.checkpoint == newest and decision.created == ()


@pytest.mark.parametrize("named", ["version", "group", "checkpoints"])
def test_naming_a_directory_resumes_its_newest_valid_checkpoint(tmp_path, named):
    ckpts = tmp_path / "version_2" / "checkpoints"
    _checkpoint(tmp_path / "version_0" / "checkpoints", 12, 3)
    _checkpoint(tmp_path / "version_1" / "checkpoints", 16, 3)
    good = _checkpoint(ckpts, 4, 1)
    broken = _checkpoint(ckpts, 8, 2)
    broken.write_bytes(broken.read_bytes()[:-5])
    path = {"version": tmp_path / "version_2", "group": tmp_path, "checkpoints": ckpts}[named]
    decision = decide(_recipe(tmp_path, resume=path))
    assert decision.checkpoint == good  # a broken newer one does not count
    assert decision.run_dir == tmp_path / "version_2"


def test_naming_a_directory_without_a_valid_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as info:
        decide(_recipe(tmp_path, resume=tmp_path / "empty"))
    assert info.value.problem == f"train.resume={tmp_path / 'empty'}: no valid checkpoint in that directory."
    assert info.value.hint == "point train.resume at a step-*.pt file or step-*.dcp directory, or use auto/never"
    assert _tree(tmp_path) == ["empty"]


def test_naming_an_older_checkpoint_branches_into_a_new_version_with_its_changes(tmp_path):
    ckpts = tmp_path / "version_0" / "checkpoints"
    older = _checkpoint(ckpts, 4, 1)
    _checkpoint(ckpts, 8, 2)
    decision = decide(_recipe(tmp_path, "optim.lr=0.01", resume=older))
    assert decision.run_dir == tmp_path / "version_1" and decision.checkpoint == older
    assert decision.created == (tmp_path / "version_1",)
    assert decision.notice == (f"starting {tmp_path / 'version_1'} from {older} ({tmp_path / 'version_0'} is left "
                               f"as it is: that is not its newest checkpoint)")
    assert [str(c) for c in decision.changes] == ["optim.lr 0.05 → 0.01"]
    with pytest.raises(CheckpointError, match="in use"):
        lock.acquire(decision.run_dir)


def test_a_checkpoint_outside_any_version_starts_a_new_version_from_it(tmp_path):
    outside = _checkpoint(tmp_path / "elsewhere", 4, 1)
    group = tmp_path / "runs"
    decision = decide(_recipe(group, resume=outside))
    assert decision.run_dir == group / "version_0" and decision.checkpoint == outside
    assert decision.notice == f"starting {group / 'version_0'} from {outside}"


def test_an_older_checkpoint_is_the_newest_when_every_newer_one_is_broken(tmp_path):
    ckpts = tmp_path / "version_0" / "checkpoints"
    older = _checkpoint(ckpts, 4, 1)
    broken = _checkpoint(ckpts, 8, 2)
    broken.with_suffix(".json").unlink()
    decision = decide(_recipe(tmp_path, resume=older))
    assert decision.run_dir == tmp_path / "version_0" and decision.created == ()


def test_naming_a_finished_checkpoint_says_so_and_creates_nothing(tmp_path):
    ckpts = tmp_path / "version_0" / "checkpoints"
    older = _checkpoint(ckpts, 10, 2, "train.epochs=2")
    _checkpoint(ckpts, 20, 4)
    before = _tree(tmp_path)
    decision = decide(_recipe(tmp_path, "train.epochs=2", "train.max_steps=50", resume=older))
    assert decision.done == (f"{older} already finished at epoch 2, step 10: nothing to train (train.epochs=2, "
                             f"train.max_steps=50). To train more: raise train.epochs; to start over: "
                             f"train.resume=never")
    assert decision.run_dir == ckpts and decision.checkpoint is None and decision.created == ()
    assert _tree(tmp_path) == before
    lock.acquire(tmp_path / "version_0")  # nothing locked


def test_naming_a_finished_newest_checkpoint_says_so_for_its_version(tmp_path):
    newest = _checkpoint(tmp_path / "version_0" / "checkpoints", 10, 2, "train.epochs=2")
    decision = decide(_recipe(tmp_path, "train.epochs=2", resume=newest))
    assert decision.done.startswith(f"{tmp_path / 'version_0'} already finished at epoch 2, step 10: nothing to "
                                    f"train (train.epochs=2). ")
    assert decision.run_dir == tmp_path / "version_0" and decision.checkpoint is None
    lock.acquire(tmp_path / "version_0")


def test_a_step_cap_of_zero_is_named_in_the_done_line(tmp_path):
    newest = _checkpoint(tmp_path / "version_0" / "checkpoints", 10, 1)
    decision = decide(_recipe(tmp_path, "train.max_steps=0", resume=newest))
    assert "nothing to train (train.epochs=10, train.max_steps=0)." in decision.done


def test_a_renamed_checkpoint_inside_a_version_branches_into_a_new_version(tmp_path):
    ckpts = tmp_path / "version_0" / "checkpoints"
    saved = _checkpoint(ckpts, 4, 1)
    renamed = ckpts / "before-the-change.pt"
    saved.rename(renamed)
    saved.with_suffix(".json").rename(renamed.with_suffix(".json"))
    decision = decide(_recipe(tmp_path, resume=renamed))  # not a step-*.pt: never "the version's newest"
    assert decision.run_dir == tmp_path / "version_1" and decision.checkpoint == renamed


def test_abandoning_a_refused_fresh_run_unlocks_it_and_removes_what_it_made(tmp_path):
    group = tmp_path / "new" / "group"
    decision = decide(_recipe(group))
    assert (decision.run_dir / ".lock").exists()
    decision.abandon()
    assert not (tmp_path / "new").exists()
    assert decision.run_dir not in lock._held


def test_abandoning_a_continued_run_unlocks_it_and_keeps_its_files(tmp_path):
    _checkpoint(tmp_path / "version_0" / "checkpoints", 4, 1)
    decision = decide(_recipe(tmp_path))
    decision.abandon()
    assert (tmp_path / "version_0" / ".lock").exists() and (tmp_path / "version_0" / "checkpoints").is_dir()
    lock.acquire(tmp_path / "version_0")


# --- history and the recipe header ------------------------------------------------------------

def test_every_start_resume_and_stop_is_recorded_and_heads_the_recipe(tmp_path):
    run_dir = RunDir(tmp_path)
    assert read_history(run_dir.history) == []
    recipe = _recipe(tmp_path, "optim.lr=0.01")
    record_start(run_dir, recipe, None, step=0, epoch=0, changes=(), world_size=1)
    record_stop(run_dir, "SIGUSR2", step=8, exit_code=75)
    stopped = run_dir.recipe.read_text()  # the header says so at once, the recipe under it unchanged
    assert stopped.splitlines()[2].endswith(" stopped by SIGUSR2 at step 8") and flat(stopped) == flat(recipe)
    changes = (Change("optim.lr", 0.05, 0.01, Policy.honoured), Change("train.seed", 0, 1, Policy.refused),
               Change("train.epochs", 2, 4, Policy.honoured))
    record_start(run_dir, recipe, tmp_path / "ck.pt", step=8, epoch=2, changes=changes, world_size=2)
    record_start(run_dir, recipe, tmp_path / "ck2.pt", step=9, epoch=3, changes=(), world_size=4)
    history = read_history(run_dir.history)
    assert [{k: v for k, v in e.items() if k != "time"} for e in history] == [
        {"event": "start", "step": 0, "epoch": 0, "world_size": 1, "checkpoint": None, "changes": {}},
        {"event": "stop", "signal": "SIGUSR2", "step": 8, "exit_code": 75},
        {"event": "resume", "step": 8, "epoch": 2, "world_size": 2, "checkpoint": str(tmp_path / "ck.pt"),
         "changes": {"optim.lr": [0.05, 0.01], "train.epochs": [2, 4]}},
        {"event": "resume", "step": 9, "epoch": 3, "world_size": 4, "checkpoint": str(tmp_path / "ck2.pt"),
         "changes": {}}]
    text = run_dir.recipe.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    times = [e["time"] for e in history]
    for stamp in times:  # ISO 8601 with the UTC offset
        assert datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z")
    assert header == [
        f"# The recipe {tmp_path} trains with now (history.jsonl has every start, resume and stop):",
        f"#   {times[0]} started at step 0 (epoch 0) on 1 rank",
        f"#   {times[1]} stopped by SIGUSR2 at step 8",
        f"#   {times[2]} resumed at step 8 (epoch 2) on 2 ranks with changes: optim.lr 0.05 → 0.01, "
        f"train.epochs 2 → 4",
        f"#   {times[3]} resumed at step 9 (epoch 3) on 4 ranks"]
    assert flat(text) == flat(recipe)  # the YAML after the header is the recipe


def test_a_stop_that_cannot_be_recorded_is_a_warning_not_an_error(tmp_path, caplog):
    """The checkpoint is saved by then: a history the disk refuses must not turn exit 75 into a traceback."""
    (tmp_path / "file").write_text("")  # where the run directory should be: nothing can be written below it
    record_stop(RunDir(tmp_path / "file"), "SIGTERM", step=3, exit_code=75)
    assert "could not record the stop in" in caplog.text


def test_blank_lines_in_the_history_are_skipped(tmp_path):
    (tmp_path / "h.jsonl").write_text('{"a": 1}\n\n  \n{"b": 2}\n')
    assert read_history(tmp_path / "h.jsonl") == [{"a": 1}, {"b": 2}]


def test_the_run_directory_layout(tmp_path):
    run_dir = RunDir(tmp_path)
    assert (run_dir.recipe, run_dir.history, run_dir.metrics, run_dir.checkpoints, run_dir.tensorboard,
            run_dir.rank_log(3)) == (tmp_path / "recipe.yaml", tmp_path / "history.jsonl", tmp_path / "metrics.jsonl",
                                     tmp_path / "checkpoints", tmp_path / "tensorboard",
                                     tmp_path / "logs" / "rank3.log")
    run_dir.write_recipe("a: 1\n")
    assert run_dir.recipe.read_text() == "a: 1\n" and not list(tmp_path.glob(".*.tmp"))
