"""``python -m launch local``: N ranks on this machine without addresses, our thread counts, and a
script or module that does not exist refused before torchrun starts."""

from __future__ import annotations

import os

import pytest

from ddp.cluster.environment import available_cpus
from tests.harness import REPO, run_cli


def test_launch_local_trains_the_recipe_on_two_ranks_with_each_ranks_share_of_the_cores(tmp_path):
    done = run_cli(["-m", "launch", "local", "--nproc", "2", "train.epochs=1", "train.max_steps=5",
                    "log.progress=false", "log.tensorboard=false"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = max(1, available_cpus() // 2)
    assert f"set OMP_NUM_THREADS={threads}" in done.stderr
    assert "Setting OMP_NUM_THREADS environment variable for each process to be 1" not in done.stderr
    assert f"2 ranks" in done.stderr and f"{threads} CPU threads per rank" in done.stderr
    assert (tmp_path / "runs" / "digits" / "version_0" / "logs" / "rank1.log").is_file()


def test_launch_local_runs_your_script_with_its_arguments(tmp_path):
    done = run_cli(["-m", "launch", "local", "--nproc", "2", str(REPO / "examples" / "multinode.py"), "1", "1",
                    "--batch_size", "64"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch size 64 per rank" in done.stdout and "2 ranks on cpu" in done.stdout


@pytest.mark.parametrize("launcher", [["local", "--nproc", "2"],
                                      ["node", "--nnodes", "1", "--node-rank", "0", "--master-addr", "127.0.0.1"]])
@pytest.mark.parametrize(("program", "words"), [(["trian.py", "--lr", "1"], ["script 'trian.py' not found"]),
                                                (["-m", "mypkg.nope"], ["no module named 'mypkg.nope'"])])
def test_a_missing_script_or_module_is_one_line_before_torchrun_starts(tmp_path, launcher, program, words):
    done = run_cli(["-m", "launch", *launcher, *program], tmp_path, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert "torch.distributed.run" not in done.stderr


def test_launch_local_print_shows_the_command_and_keeps_a_users_thread_count(tmp_path):
    done = run_cli(["-m", "launch", "local", "--nproc", "2", "--print", "train.epochs=3"], tmp_path,
                   OMP_NUM_THREADS="7")
    assert done.returncode == 0, done.stderr
    assert "kept OMP_NUM_THREADS=7 (set by you" in done.stdout and "export OMP_NUM_THREADS" not in done.stdout
    assert "--standalone --nproc-per-node=2" in done.stdout and done.stdout.rstrip().endswith("train.epochs=3")
