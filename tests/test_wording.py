"""Console wording a user noticed: counts agree with their nouns, doctor names what it lacks."""

from __future__ import annotations

import pytest

from ddp.reporting.text import count
from launch import doctor
from tests.harness import run_cli


@pytest.mark.parametrize(("n", "expected"), [(0, "0 steps"), (1, "1 step"), (2, "2 steps")])
def test_a_count_agrees_with_its_noun(n, expected):
    assert count(n, "step") == expected


def test_doctor_says_what_nccl_is_here_instead_of_none():
    assert doctor._nccl(None, built=True) == "built in, no GPU to run it"
    assert doctor._nccl(None, built=False) == "no"
    assert doctor._nccl("2.21.5", built=True) == "2.21.5"


def test_one_rank_one_step_and_no_workers_read_as_english(tmp_path):
    done = run_cli(["-m", "ddp.train", "train.max_steps=1", "train.epochs=1", "data.batch_size=2000",
                    "data.loader=dataloader", "data.num_workers=1", "log.progress=false", "log.tensorboard=false"],
                   tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 step per epoch" in done.stderr and "× 1 rank," in done.stderr and "DataLoader with 1 worker" in done.stderr
    assert "after 1 step;" in done.stderr
    assert "None" not in done.stderr
