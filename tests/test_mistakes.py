"""Mistakes a new user makes, caught before the run starts: one line naming the problem and the
fix, exit 2, no run directory, said once even on several ranks."""

from __future__ import annotations

import subprocess

import pytest

from tests.harness import run_cli, run_torchrun

W = "tests.workers.mistakes"
QUIET = ["log.progress=false", "log.tensorboard=false", "train.epochs=1"]


def _refused(done, *words):
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("W1")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("args", "words"), [
    ([f"data.name={W}:tensors", f"model.name={W}:TwoClasses"], ["gave a 2-item tuple", "Datasets"]),
    ([f"data.name={W}:datasets", f"model.name={W}:TwoClasses"], ["out of bounds", "fewer outputs than", "10"]),
    ([f"data.name={W}:datasets", f"model.name={W}:WrongInput"], ["cannot be multiplied", "[1, 8, 8]"]),
    (["model=pkg:Net"], ["'model' is a section", "model.name=pkg:Net"]),
    (["train=3"], ["'train' is a section", "train.epochs=3"]),
])
def test_a_model_or_data_mistake_is_one_line_before_anything_is_written(in_tmp, capsys, args, words):
    from ddp.train import main

    code = main([*args, *QUIET])  # in-process: the same entry point as python -m ddp.train, one process
    _refused(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), *words)
    assert not (in_tmp / "runs").exists()


def test_a_class_count_mismatch_on_two_ranks_is_said_once(tmp_path):
    done = run_torchrun(2, ["-m", "ddp.train", f"data.name={W}:datasets", f"model.name={W}:TwoClasses", *QUIET],
                        tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("error: ") == 1 and "fewer outputs than" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


FIT = """
import ddp
from tests.workers.mistakes import WrongInput, datasets
ddp.fit(None, model=WrongInput, data=datasets, model__args={{"width": 3}}, log__progress=False, train__epochs=1)
"""


def test_ddp_fit_checks_model_args_like_the_command_line(tmp_path):
    done = run_cli(["-c", FIT.format()], tmp_path)
    _refused(done, "model.args={'width': 3}", "hidden")
    assert not (tmp_path / "runs").exists()


def test_ddp_fit_takes_a_recipe_as_a_dict(tmp_path):
    code = ("import ddp\nfrom tests.workers.mistakes import TwoClasses, datasets\n"
            "r = ddp.fit({'train': {'epochs': 1, 'max_steps': 2}, 'log': {'progress': False}}, "
            "model=lambda: __import__('torch').nn.Sequential(__import__('torch').nn.Flatten(), "
            "__import__('torch').nn.Linear(64, 10)), data=datasets)\nprint('steps', r.metrics['step'])")
    done = run_cli(["-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "steps 2" in done.stdout
