"""``python -m launch node``: argument handling and the torchrun command it builds (``--print``).

Real multi-machine runs are in tests/test_multi_machine.py (network namespaces).
"""

from __future__ import annotations

import shlex
import socket

import psutil
import pytest

from ddp.cluster.environment import available_cpus
from launch.node import split_program
from tests.harness import run_cli

BASE = ["--nnodes", "1", "--node-rank", "0", "--master-addr", "127.0.0.1", "--nproc", "2"]


def _node(tmp_path, *args, **env):
    return run_cli(["-m", "launch", "node", *args], cwd=tmp_path, timeout=60, **env)


def _own_address() -> str | None:
    for name, addresses in psutil.net_if_addrs().items():
        for entry in addresses:
            if entry.family == socket.AF_INET and not entry.address.startswith("127."):
                return entry.address
    return None


@pytest.mark.parametrize("argv, options, program", [
    (["--nproc", "2", "train.epochs=3"], ["--nproc", "2", "train.epochs=3"], []),
    (["--nproc", "2", "train.py", "--epochs", "3"], ["--nproc", "2"], ["train.py", "--epochs", "3"]),
    (["--nproc", "2", "-m", "pkg.train", "--lr", "0.1", "-m", "x"], ["--nproc", "2"],
     ["-m", "pkg.train", "--lr", "0.1", "-m", "x"]),
    (["--recipe", "a.py", "k=v"], ["--recipe", "a.py", "k=v"], []),
])
def test_the_program_starts_at_the_first_script_or_module(argv, options, program):
    assert split_program(argv) == (options, program)


def test_print_shows_the_torchrun_command_and_variables_and_runs_nothing(tmp_path):
    done = _node(tmp_path, *BASE, "--print", "train.epochs=2", "optim.lr=0.1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    threads = max(1, available_cpus() // 2)
    assert f"export OMP_NUM_THREADS={threads}" in lines
    command = shlex.split(lines[-1])
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=1", "--nproc-per-node=2", "--node-rank=0", "--master-addr=127.0.0.1", "--master-port=29500",
            "--max-restarts=0"} <= set(command)
    assert command[-4:] == ["-m", "ddp.train", "train.epochs=2", "optim.lr=0.1"]
    assert not (tmp_path / "runs").exists()


def test_print_keeps_variables_the_user_set_and_says_so(tmp_path):
    done = _node(tmp_path, *BASE, "--print", OMP_NUM_THREADS="7")
    assert done.returncode == 0, done.stderr
    assert "kept OMP_NUM_THREADS=7 (set by you" in done.stdout and "export OMP_NUM_THREADS" not in done.stdout


def test_a_script_or_module_and_its_arguments_pass_through_untouched(tmp_path):
    done = _node(tmp_path, *BASE, "--print", "-m", "mypkg.train", "--lr", "0.1", "--nproc", "9")
    assert shlex.split(done.stdout.strip().splitlines()[-1])[-6:] == ["-m", "mypkg.train", "--lr", "0.1", "--nproc", "9"]
    done = _node(tmp_path, *BASE, "--print", "my train.py", "--epochs", "3")
    assert shlex.split(done.stdout.strip().splitlines()[-1])[-3:] == ["my train.py", "--epochs", "3"]


def test_c10d_rendezvous_with_a_run_id(tmp_path):
    done = _node(tmp_path, *BASE, "--run-id", "job7", "--max-restarts", "3", "--print")
    command = shlex.split(done.stdout.strip().splitlines()[-1])
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29500", "--rdzv-id=job7", "--max-restarts=3",
            "--rdzv-conf=is_host=1"} <= set(command)
    assert not any(arg.startswith("--node-rank") for arg in command)
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in done.stdout  # a restarted node can rejoin a later round


def test_an_elastic_node_range_and_rendezvous_settings_reach_torchrun(tmp_path):
    done = _node(tmp_path, "--nnodes", "1:1", "--node-rank", "0", "--master-addr", "127.0.0.1", "--run-id", "j",
                 "--rdzv-conf", "last_call_timeout=5", "--print")
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout.strip().splitlines()[-1])
    assert {"--nnodes=1", "--rdzv-conf=is_host=1,last_call_timeout=5"} <= set(command)


def test_two_nodes_export_the_interface_that_routes_to_the_master(tmp_path):
    address = _own_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    done = _node(tmp_path, "--nnodes", "2", "--node-rank", "0", "--master-addr", address, "--print")
    assert done.returncode == 0, done.stderr
    interface = next(name for name, entries in psutil.net_if_addrs().items()
                     if any(entry.address == address for entry in entries))
    assert f"export GLOO_SOCKET_IFNAME={interface}" in done.stdout
    assert "NCCL_SOCKET_IFNAME=" not in done.stdout.replace(f"export NCCL_SOCKET_IFNAME={interface} to force", "")
    assert "NCCL chooses its interfaces itself" in done.stdout  # NCCL's own choice is kept, and said


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1"], "a loopback address, but --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], "--node-rank 2 is outside --nnodes 2"),
    ([*BASE, "--recipe", "r.yaml", "train.py"], "a program was given: train.py"),
    (["--nnodes", "1", "--node-rank", "0", "--master-addr", "bad..host"], "does not resolve"),
    ([*BASE, "--master-port", "70000"], "--master-port 70000 is not a TCP port"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1"], "the following arguments are required: --node-rank"),
    (["--nnodes", "1:2", "--node-rank", "0", "--master-addr", "10.0.0.1"], "--nnodes 1:2 needs torchrun's c10d"),
    (["--nnodes", "2:1", "--node-rank", "0", "--master-addr", "10.0.0.1"], "'2:1': need 1 <= MIN <= MAX"),
    (["--nnodes", "two", "--node-rank", "0", "--master-addr", "10.0.0.1"], "not a count or a MIN:MAX range"),
    ([*BASE, "--run-id", "j", "--rdzv-conf", "garbage"], "'garbage' is not a KEY=VALUE setting"),
    ([*BASE, "--run-id", "j", "--rdzv-conf", "is_host=0"], "'is_host=0' is not a KEY=VALUE setting"),
    ([*BASE, "--rdzv-conf", "last_call_timeout=5"], "--rdzv-conf needs torchrun's c10d rendezvous"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    done = _node(tmp_path, *args, "--print")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("error:") == 1 and message in done.stderr and "Traceback" not in done.stderr
