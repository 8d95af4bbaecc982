"""Sweeps: ``python -m slurm.submit --sweep KEY=V1,V2,... [--parallel P]`` is one job array of one run per
element, each in ``<run dir>/<key=value,...>``; ``python -m ddp.report`` on the sweep's directory is one
table and one plot. Without Slurm: faked sinfo/sbatch, ``--dry-run``, and ``--cluster local`` for real."""

import json
import re

import pytest
from submitit.core.utils import DelayedSubmission

from ddp.config import from_yaml
from ddp.lifecycle import lock
from ddp.lifecycle.sweep_dirs import element_name, parse_name
from ddp.reporting import report
from slurm import submit
from slurm.request import SubmitError
from slurm.sweep import grid, parse_axis
from tests.test_slurm_submit import _fake_slurm

GRID = ["--sweep", "optim.lr=0.1,0.05,0.01", "--sweep", "train.seed=0,1"]
DIRS = ["optim.lr=0.1,train.seed=0", "optim.lr=0.1,train.seed=1", "optim.lr=0.05,train.seed=0",
        "optim.lr=0.05,train.seed=1", "optim.lr=0.01,train.seed=0", "optim.lr=0.01,train.seed=1"]


def _grid(*specs, overrides=()):
    return grid([parse_axis(spec) for spec in specs], list(overrides))


def test_the_grid_is_the_product_in_flag_order_and_names_sort_the_keys():
    elements = _grid("optim.lr=0.1,0.05,0.01", "train.seed=0,1")
    assert [e.index for e in elements] == list(range(6))
    assert [e.overrides for e in elements][:3] == [["optim.lr=0.1", "train.seed=0"], ["optim.lr=0.1", "train.seed=1"],
                                                   ["optim.lr=0.05", "train.seed=0"]]
    assert [e.name for e in elements] == DIRS
    swapped = _grid("train.seed=0,1", "optim.lr=0.1,0.05,0.01")  # other flag order: other array order, same dirs
    assert [e.name for e in swapped][:2] == ["optim.lr=0.1,train.seed=0", "optim.lr=0.05,train.seed=0"]
    assert {e.name for e in swapped} == set(DIRS)


def test_values_with_slashes_spaces_or_commas_are_one_path_component_that_reads_back():
    [path, spaced] = _grid("data.root=/data/a b,x y")
    assert path.name == "data.root=%2Fdata%2Fa%20b" and spaced.name == "data.root=x%20y"
    [shape, other] = _grid("data.synthetic_shape=[1,28,28],[3,32,32]")  # commas inside brackets: one value
    assert shape.overrides == ["data.synthetic_shape=[1,28,28]"] and "/" not in shape.name and "," not in shape.name
    values = (("train.seed", "1"), ("data.root", "/d,x=y"), ("optim.lr", "1e-3"))
    assert parse_name(element_name(values)) == dict(values)
    assert element_name(values) == "data.root=%2Fd%2Cx%3Dy,optim.lr=1e-3,train.seed=1"
    assert parse_name("version_0") is None and parse_name("a/b=1") is None


@pytest.mark.parametrize("specs, overrides, message", [
    (["optim.lr"], [], "--sweep 'optim.lr' is not a key with values. HINT: write --sweep KEY=V1,V2,..."),
    (["optim.lr=0.1,,0.2"], [], "--sweep 'optim.lr=0.1,,0.2': value 2 is empty."),
    (["optim.lr=0.1,0.1"], [], "the value '0.1' is given twice"),
    (["optim.lr=0.1", "optim.lr=0.2"], [], "--sweep optim.lr is given twice."),
    (["optim.lr=0.1,0.2"], ["optim.lr=0.3"], "optim.lr is both swept (--sweep) and set by the override"),
    (["run.name=a,b"], [], "they cannot be swept"),
    (["data.root=" + "x" * 300], [], "a name holds at most 255"),
])
def test_grids_that_cannot_be_runs_are_refused(specs, overrides, message):
    with pytest.raises(SubmitError) as info:
        _grid(*specs, overrides=overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("args, message", [
    (["--sweep", "optim.lrr=0.1,0.2"], "error: run 0 of the sweep (optim.lrr=0.1): unknown key 'optim.lrr' (from "
                                       "overrides). HINT: did you mean 'optim.lr'?"),
    ([*GRID[:2], "--sweep", "train.seed=0,x"], "error: run 1 of the sweep (optim.lr=0.1, train.seed=x): bad value for "
                                               "'train.seed'"),
    (["--sweep", "optim.lr=0.1,0.05,0.01,0.001,0,0.2"], "error: run 4 of the sweep (optim.lr=0): optim.lr=0.0 is "
                                                         "invalid: it must be > 0.0. HINT: set optim.lr to a value > 0.0"),
    (["--parallel", "2"], "error: --parallel 2 without --sweep"),
    ([*GRID, "--parallel", "0"], "error: --parallel 0 is invalid: it must be ≥ 1."),
    ([*GRID, "my_script.py"], "error: --sweep sets recipe keys; a program takes its own arguments."),
])
def test_a_bad_sweep_is_one_line_exit_2_and_nothing_reaches_slurm(in_tmp, monkeypatch, capsys, args, message):
    submitted = _fake_slurm(in_tmp, monkeypatch)
    assert submit.main(["--tasks-per-node", "2", "--partition", "cpu", "--time", "5", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not submitted.exists() and not (in_tmp / "runs").exists()  # no sbatch, no folder


def test_dry_run_lists_every_element_of_the_array(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(in_tmp))  # no Slurm here
    assert submit.main(["--tasks-per-node", "2", "--time", "30", *GRID, "--parallel", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-5%2\n" in out and "#SBATCH --ntasks-per-node=2\n" in out
    assert "/runs/digits/slurm/%A_%a/%A_%a_0_log.out" in out
    assert f"# job array of 6 runs, at most 2 at a time; array task i trains run i in its own directory; " \
           f"each task of it runs, in {in_tmp}:\n" in out
    listed = re.findall(r"^#   (\d)  (\S+)\n#        (.+)$", out, re.MULTILINE)
    assert [(int(i), d) for i, d, _ in listed] == [(i, f"runs/digits/{name}") for i, name in enumerate(DIRS)]
    assert listed[2][2] == "python -m ddp.train optim.lr=0.05 train.seed=0 run.dir=runs/digits/optim.lr=0.05,train.seed=0"
    assert "# resolved recipe of run 0 (the others differ in optim.lr, train.seed and run.dir)\n" in out
    assert not (in_tmp / "runs").exists()


def test_the_array_is_one_sbatch_and_task_i_trains_element_i_also_when_requeued(in_tmp, monkeypatch, capsys):
    script = _fake_slurm(in_tmp, monkeypatch)
    assert submit.main(["--tasks-per-node", "2", "--partition", "cpu", "--time", "30", *GRID, "--parallel", "2",
                        "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-5%2\n" in script.read_text()
    assert out.startswith("submitted job array 4242 (6 runs, at most 2 at a time) to partition 'cpu'\n")
    assert f"  4242_4  runs/digits/{DIRS[4]}\n" in out and "python -m ddp.report runs/digits" in out
    for index, name in enumerate(DIRS):
        task = DelayedSubmission.load(in_tmp / f"runs/digits/slurm/4242_{index}/4242_{index}_submitted.pkl")
        recipe = from_yaml(task.function.recipe_yaml)
        assert recipe.run_dir.as_posix() == f"runs/digits/{name}" and recipe.train.resume == "auto"
        assert (f"optim.lr={recipe.optim.lr},train.seed={recipe.train.seed}", recipe.train.epochs) == (name, 3)
        again = task.function.checkpoint()  # what submitit pickles for the requeued array task
        assert again.function.recipe_yaml == task.function.recipe_yaml


# --- the same sweep on this machine, for real -----------------------------------------------------------

TINY = ["train.epochs=1", "data.batch_size=256", "log.tensorboard=false", "log.progress=false",
        "dist.threads_per_rank=1"]


@pytest.mark.timeout(300)
def test_cluster_local_runs_each_element_in_its_own_directory_and_resumes_it(tmp_path, capsys):
    from tests.harness import run_cli

    command = ["-m", "slurm.submit", "--tasks-per-node", "1", "--time", "5", "--cluster", "local",
               "--sweep", "optim.lr=0.1,0.05", "--parallel", "1"]
    done = run_cli([*command, *TINY], cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "sweep of 2 runs on this machine, at most 1 at a time"
    assert [re.sub(r"\(job \d+\)", "(job N)", line) for line in lines[1:5]] == [
        "run 0 started (job N): runs/digits/optim.lr=0.1", "run 0 FINISHED (job N): runs/digits/optim.lr=0.1",
        "run 1 started (job N): runs/digits/optim.lr=0.05", "run 1 FINISHED (job N): runs/digits/optim.lr=0.05"]
    assert lines[5] == "sweep: 2 of 2 runs FINISHED; results: python -m ddp.report runs/digits"
    group = tmp_path / "runs" / "digits"
    for lr in ("0.1", "0.05"):
        recipe = (group / f"optim.lr={lr}" / "version_0" / "recipe.yaml").read_text()
        assert f"  lr: {lr}\n" in recipe
    # one element again, two epochs: it continues its own version_0; the other is left as it was
    done = run_cli([*command[:-4], "--sweep", "optim.lr=0.05", *TINY, "train.epochs=2"], cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    for lr, events in (("0.1", ["start"]), ("0.05", ["start", "resume"])):
        run = group / f"optim.lr={lr}"
        assert [p.name for p in run.glob("version_*")] == ["version_0"]
        history = [json.loads(line) for line in (run / "version_0" / "history.jsonl").read_text().splitlines()]
        assert [h["event"] for h in history] == events
    capsys.readouterr()
    assert report.main([str(group)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:3]]
    assert [(row[0], row[3], row[5]) for row in rows] in ([("0.1", "1", "finished"), ("0.05", "2", "finished")],
                                                          [("0.05", "2", "finished"), ("0.1", "1", "finished")])


# --- python -m ddp.report on a sweep's directory --------------------------------------------------------

def _fake_run(version, accuracies, epochs, checkpoint_epoch=None):
    """A version directory as a run writes it: metrics.jsonl, recipe.yaml and (optionally) a checkpoint."""
    version.mkdir(parents=True)
    records = [{"kind": "step", "epoch": 1, "step": 5, "loss": 2.0, "lr": 0.1, "time": 0.0}]
    records += [{"kind": "epoch", "epoch": e, "step": 10 * e, "train_loss": 1.0, "train_acc": acc, "test_loss": 1.0,
                 "test_acc": acc, "test_count": 360, "lr": 0.1, "samples_per_s": 500.0, "epoch_time_s": 2.0}
                for e, acc in enumerate(accuracies, 1)]
    (version / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = f"train:\n  epochs: {epochs}\n  max_steps: -1\n"
    (version / "recipe.yaml").write_text("# The recipe ...\n" + recipe)
    if checkpoint_epoch is not None:
        checkpoints = version / "checkpoints"
        checkpoints.mkdir()
        name = f"step-{10 * checkpoint_epoch:08d}"
        (checkpoints / f"{name}.pt").write_bytes(b"x")
        (checkpoints / f"{name}.json").write_text(json.dumps({
            "file": f"{name}.pt", "bytes": 1, "crc32": 0, "step": 10 * checkpoint_epoch, "epoch": checkpoint_epoch,
            "metric": None, "recipe": recipe}))


def test_report_on_a_sweep_is_one_row_per_run_best_first_with_its_state_and_one_plot(tmp_path, capsys):
    group = tmp_path / "runs" / "digits"
    _fake_run(group / "optim.lr=0.1" / "version_0", [0.5], epochs=3, checkpoint_epoch=1)  # older: not shown
    _fake_run(group / "optim.lr=0.1" / "version_1", [0.6, 0.9, 0.8], epochs=3, checkpoint_epoch=3)
    _fake_run(group / "optim.lr=0.05" / "version_0", [0.7, 0.95], epochs=3, checkpoint_epoch=2)  # stopped early
    _fake_run(group / "optim.lr=0.01" / "version_0", [0.4], epochs=3)  # still training
    (group / "slurm" / "4242_0").mkdir(parents=True)  # submitit's files are not a run
    lock.acquire(group / "optim.lr=0.01" / "version_0")
    try:
        assert report.main([str(group)]) == 0
    finally:
        lock.release(group / "optim.lr=0.01" / "version_0")
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["optim.lr", "best", "acc", "final", "acc", "epochs", "time", "s", "state", "version"]
    assert [line.split() for line in out[1:4]] == [
        ["0.05", "0.9500", "0.9500", "2", "4.0", "failed", "version_0"],
        ["0.1", "0.9000", "0.8000", "3", "6.0", "finished", "version_1"],
        ["0.01", "0.4000", "0.4000", "1", "2.0", "running", "version_0"]]
    assert out[4] == f"3 runs under {group}: 1 finished, 1 running, 1 failed"
    png = group / "report.png"
    assert out[5] == f"plot: {png}" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = report_figure(group)
    assert sorted(line.get_label() for line in fig.axes[0].get_lines()) == [
        "optim.lr=0.01 (failed)", "optim.lr=0.05 (failed)", "optim.lr=0.1 (finished)"]  # lock released by now


def test_report_calls_a_run_stopped_on_a_signal_stopped_until_it_resumes(tmp_path, capsys):
    """A preempted run waiting for its requeue (or one stopped by Ctrl-C) is ``stopped``, not ``failed``: its
    history ends with the stop. Once resumed and ended without finishing, it is ``failed`` again."""
    group = tmp_path / "runs" / "digits"
    version = group / "optim.lr=0.1" / "version_0"
    _fake_run(version, [0.6], epochs=3, checkpoint_epoch=1)
    start = {"event": "start", "step": 0, "epoch": 0, "world_size": 2, "checkpoint": None, "changes": {}}
    stop = {"event": "stop", "signal": "SIGUSR2", "step": 14, "exit_code": 75}
    resume = {**start, "event": "resume", "step": 14}
    for events, state in (([start], "failed"), ([start, stop], "stopped"), ([start, stop, resume], "failed")):
        (version / "history.jsonl").write_text("".join(json.dumps({"time": "t", **e}) + "\n" for e in events))
        assert report.main([str(group)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1].split()[5] == state and out[2] == f"1 run under {group}: 1 {state}", out


def report_figure(group):
    from ddp.reporting import compare

    return compare.figure(group, compare.rows(group, compare.groups_under(group)))


def test_report_above_several_groups_names_each_run_by_its_path(tmp_path, capsys):
    _fake_run(tmp_path / "runs" / "a" / "version_0", [0.5], epochs=1, checkpoint_epoch=1)
    _fake_run(tmp_path / "runs" / "b" / "lr=1" / "version_0", [0.6], epochs=1, checkpoint_epoch=1)
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "all.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("run     best acc") and out[1].startswith("b/lr=1  ") and out[2].startswith("a       ")
    assert (tmp_path / "all.png").stat().st_size > 1000
