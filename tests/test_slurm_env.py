"""Slurm environment bugs found with Lightning's, submitit's and python-hostlist's cases (issue 9)."""

import subprocess
import sys
import tracemalloc

import pytest

from ddp.cluster.environment import ManualEnv, SlurmEnv, TorchrunEnv, detect_environment
from ddp.errors import ClusterEnvError
from ddp.cluster.hostlist import expand_hostlist, first_host
from tests.harness import REPO, python_env

STEP = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": "1(x4)", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": "train", "SLURM_JOB_NODELIST": "node[01-04]", "SLURM_STEP_NODELIST": "node[03-04]"}
SHELL = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_NODEID": "0",
         "SLURM_TASKS_PER_NODE": "1", "SLURM_JOB_ID": "78", "SLURM_JOB_NODELIST": "node01"}
HAND = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29511"}


@pytest.mark.parametrize("name", ["bash", "interactive"])
def test_interactive_allocation_leaves_hand_set_ranks_alone(name):
    env = detect_environment({**SHELL, "SLURM_JOB_NAME": name, **HAND})
    assert isinstance(env, ManualEnv)
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (1, 2, "10.0.0.5", 29511)


def test_interactive_allocation_with_torchrun_is_torchrun():
    env = detect_environment({**SHELL, "SLURM_JOB_NAME": "bash", **HAND, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert isinstance(env, TorchrunEnv) and env.rank == 1


def test_interactive_shell_without_hand_set_ranks_is_its_slurm_task():
    assert isinstance(detect_environment({**SHELL, "SLURM_JOB_NAME": "bash"}), SlurmEnv)


def test_batch_job_still_reads_slurm_even_with_a_master_set():
    env = detect_environment({**SHELL, "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2",
                              "MASTER_ADDR": "10.0.0.5"})
    assert isinstance(env, SlurmEnv) and env.world_size == 2 and env.master_addr == "10.0.0.5"


def test_master_is_the_first_node_of_the_step_not_of_the_job():
    env = detect_environment(STEP)
    assert env.master_addr == "node03" and env.local_world_size == 1


def test_job_nodelist_is_used_without_a_step_nodelist():
    environ = {k: v for k, v in STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert detect_environment(environ).master_addr == "node01"


@pytest.mark.parametrize("variable", ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"])
@pytest.mark.parametrize("bad", ["n[1-]", "n[5-3]", "n[1-2", "n]1[", "n[]", "n[1-2]x]"])
def test_malformed_node_list_is_one_error_naming_the_variable(variable, bad):
    environ = {**STEP, variable: bad}
    if variable == "SLURM_JOB_NODELIST":
        del environ["SLURM_STEP_NODELIST"]
    with pytest.raises(ClusterEnvError) as info:
        detect_environment(environ)
    assert f"{variable}={bad!r}" in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("bad", ["n[1-]", "n[-3]", "a1,b[2-]"])
def test_open_ranges_are_refused(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)
    with pytest.raises(ValueError):
        first_host(bad)


@pytest.mark.parametrize("text, first", [("node[01-04,07]", "node01"), ("a1,b[1-2]", "a1"),
                                         ("r[2-3]n[05-06]", "r2n05"), ("gpu[009-011]", "gpu009")])
def test_first_host_matches_the_expansion(text, first):
    assert first_host(text) == first == expand_hostlist(text)[0]


HUGE = "r[1-99999999999999999999]n[01-99999999999999999999],m[1-10000000]"  # 10^40 names in the first item


def test_first_host_of_a_huge_range_expands_nothing():
    """Expanding even n[1-10000000] took 6 s and 1.5 GB; this list has 10^40 names, so anything that
    expands or walks it never returns. Run in a child with 256 MB of address space: a bound that only
    means "did not expand", whatever the machine's load."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20)); "
            "from ddp.cluster.hostlist import first_host; print(first_host(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, HUGE], cwd=REPO, env=python_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "r1n01\n", done.stderr[-2000:]
    tracemalloc.start()
    assert first_host("n[1-10000000],m[1-99999999999999999999]") == "n1"
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_doctor_says_hand_set_ranks_win_in_an_interactive_shell(monkeypatch):
    from launch.doctor import collect, human, parse

    for name, value in {**SHELL, "SLURM_JOB_NAME": "interactive", **HAND}.items():
        monkeypatch.setenv(name, value)
    lines = "\n".join(human(collect(parse(["--no-selftest"]))))
    assert "environment: manual: rank 1/2" in lines
    assert "hand-set RANK/WORLD_SIZE/MASTER_ADDR win over Slurm's variables" in lines
