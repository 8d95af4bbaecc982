import os
import socket

import psutil
import pytest

from ddp.cluster.environment import (ClusterEnv, ManualEnv, SingleProcessEnv, SlurmEnv, TorchrunEnv,
                             detect_environment)
from ddp.errors import ClusterEnvError
from tests.harness import run_cli

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29600", "TORCHELASTIC_RUN_ID": "x"}
SLURM = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "1",
         "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_ID": "123456"}


def test_torchrun_env():
    env = detect_environment(TORCHRUN)
    assert isinstance(env, TorchrunEnv)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == (3, 1, 8, 2, 1)
    assert env.init_method == "tcp://10.0.0.5:29600" and env.store_prefix == "ddp/attempt"
    assert env.distributed


def test_torchrun_wins_inside_slurm():
    assert isinstance(detect_environment({**SLURM, **TORCHRUN}), TorchrunEnv)


def test_slurm_env_nodelist_and_port():
    env = detect_environment(SLURM)
    assert isinstance(env, SlurmEnv)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == (5, 1, 8, 4, 1)
    assert env.master_addr == "node01"
    assert env.master_port == 15000 + 3456
    assert env.init_method == "tcp://node01:18456"


@pytest.mark.parametrize("nodelist, first", [("gpu-a[07-09,12],gpu-b3", "gpu-a07"), ("login", "login"),
                                             ("r[2-3]n[5-6]", "r2n5")])
def test_slurm_first_host_of_compressed_nodelists(nodelist, first):
    assert detect_environment({**SLURM, "SLURM_JOB_NODELIST": nodelist}).master_addr == first


def test_slurm_respects_explicit_master():
    env = detect_environment({**SLURM, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "40000"})
    assert (env.master_addr, env.master_port) == ("10.1.1.1", 40000)


def test_slurm_ntasks_per_node_wins():
    env = detect_environment({**SLURM, "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "garbage"})
    assert env.local_world_size == 4


def test_manual_env_master_ip():
    env = detect_environment({"MASTER_IP": "192.168.1.10", "RANK": "1", "WORLD_SIZE": "2"})
    assert isinstance(env, ManualEnv)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (1, 0, 2, 1)
    assert env.init_method == "tcp://192.168.1.10:29500"


def test_manual_env_ipv6_bracketed():
    env = detect_environment({"MASTER_ADDR": "::1", "MASTER_PORT": "1234", "RANK": "0", "WORLD_SIZE": "2"})
    assert env.init_method == "tcp://[::1]:1234"


def test_manual_env_conflicting_masters():
    with pytest.raises(ClusterEnvError, match="MASTER_IP.*MASTER_ADDR.*disagree"):
        detect_environment({"MASTER_IP": "a", "MASTER_ADDR": "b", "RANK": "0", "WORLD_SIZE": "2"})


def test_single_process_default():
    env = detect_environment({})
    assert isinstance(env, SingleProcessEnv)
    assert not env.distributed and env.world_size == 1


@pytest.mark.parametrize("environ, message", [
    ({**TORCHRUN, "RANK": "8"}, "rank 8 is outside world size 8"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, "local rank 2 is outside local world size 2"),
    ({**TORCHRUN, "WORLD_SIZE": "eight"}, "WORLD_SIZE='eight' is not an integer"),
    ({**SLURM, "SLURM_PROCID": "9"}, "rank 9 is outside world size 8"),
    ({"MASTER_IP": "x", "RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world size 2"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "master port 70000"),
    ({**SLURM, "SLURM_NODEID": "5"}, "SLURM_NODEID=5"),
])
def test_inconsistent_values_name_the_problem(environ, message):
    with pytest.raises(ClusterEnvError, match=message) as info:
        detect_environment(environ)
    assert "\n" not in str(info.value) and "HINT:" in str(info.value)


def test_explicit_env_is_distributed():
    env = ClusterEnv(rank=0, world_size=2, local_world_size=2, master_port=1234)
    assert env.distributed and env.init_method == "tcp://127.0.0.1:1234"


def test_torchrun_restart_gets_its_own_store_namespace():
    env = detect_environment({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert env.agent_store and env.restart_count == 2
    assert env.store_prefix == "ddp/attempt_2"
    assert "restart 2" in env.describe()


def test_a_store_fresh_for_each_attempt_gets_a_prefix_every_node_agrees_on():
    """launch node --run-id: each round's rank 0 serves a new store; the agents' restart counts
    differ (a node started again counts from 0), so they must not name the keys."""
    counts = [detect_environment({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": n, "TORCHELASTIC_USE_AGENT_STORE": "False"})
              for n in ("0", "3")]
    assert counts[0].store_prefix == counts[1].store_prefix == "ddp/attempt"


# --- item 6: every combination that says "world > 1" joins with the stated ranks or refuses ---------
OLD_LAUNCH = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}


@pytest.mark.parametrize("environ, kind, ranks", [
    # older torch.distributed.launch / hand-written launchers: no LOCAL_WORLD_SIZE
    (OLD_LAUNCH, ManualEnv, (1, 1, 2, 2)),
    ({**OLD_LAUNCH, "MASTER_ADDR": "10.0.0.1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "NODE_RANK": "1"},
     ManualEnv, (3, 1, 4, 4)),
    ({**OLD_LAUNCH, "LOCAL_WORLD_SIZE": "2"}, TorchrunEnv, (1, 1, 2, 2)),
    # the seed style: one rank per machine
    ({"MASTER_IP": "10.0.0.1", "RANK": "1", "WORLD_SIZE": "2"}, ManualEnv, (1, 0, 2, 1)),
    ({"MASTER_ADDR": "10.0.0.1", "RANK": "0", "WORLD_SIZE": "1"}, ManualEnv, (0, 0, 1, 1)),
    # nothing, or variables that say "alone"
    ({}, SingleProcessEnv, (0, 0, 1, 1)),
    ({"RANK": "0", "WORLD_SIZE": "1"}, SingleProcessEnv, (0, 0, 1, 1)),
    ({"LOCAL_RANK": "0"}, SingleProcessEnv, (0, 0, 1, 1)),
    ({"WORLD_SIZE": "1"}, SingleProcessEnv, (0, 0, 1, 1)),
    # torchrun on one node needs no MASTER_ADDR
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"} | {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                                                  "RANK": "1"}, TorchrunEnv, (1, 1, 2, 2)),
])
def test_launcher_variables_join_with_the_stated_ranks(environ, kind, ranks):
    env = detect_environment(environ)
    assert type(env) is kind
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == ranks
    assert env.distributed == (kind is not SingleProcessEnv)


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, "RANK=1 and WORLD_SIZE=2 are set but neither MASTER_ADDR nor MASTER_IP"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "neither MASTER_ADDR nor MASTER_IP"),
    ({"RANK": "1"}, "RANK=1 say this is one rank of several, but WORLD_SIZE is not set"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 say this is one rank of several, but RANK is not set"),
    ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 say this is one rank of several, but RANK and WORLD_SIZE are not set"),
    ({"LOCAL_WORLD_SIZE": "4"}, "LOCAL_WORLD_SIZE=4 say"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "rank 1 is outside world size 1"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "RANK='x' is not an integer"),
    ({**OLD_LAUNCH, "LOCAL_RANK": "2"}, "local rank 2 is outside local world size 2"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "ranks run on other machines, and MASTER_ADDR"),
])
def test_incomplete_launcher_variables_are_refused_never_trained_alone(environ, message):
    with pytest.raises(ClusterEnvError, match=message) as info:
        detect_environment(environ)
    assert "\n" not in str(info.value) and "HINT:" in str(info.value)
    assert info.value.exit_code == 2


# --- a GLOO_SOCKET_IFNAME the user set is kept, and said (docs/multi-machine.md) ----------------------

TWO_MACHINES = ClusterEnv(rank=1, local_rank=0, world_size=2, local_world_size=1, master_addr="127.0.0.1")


def test_the_trainer_keeps_a_gloo_interface_the_user_set_and_says_so(monkeypatch):
    from ddp.cluster.rendezvous import choose_interface

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "placeholder")  # recorded, so the value choose_interface sets
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")                 # is undone too (delenv of an absent name is not)
    assert choose_interface(TWO_MACHINES) == ["set GLOO_SOCKET_IFNAME=lo (the route to the master 127.0.0.1 via lo "
                                              "(this machine))"]
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")
    assert choose_interface(TWO_MACHINES) == ["kept GLOO_SOCKET_IFNAME=eth9 (set by you; ours would be lo: the route to "
                                              "the master 127.0.0.1 via lo (this machine))"]
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth9"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert choose_interface(TWO_MACHINES) == ["kept GLOO_SOCKET_IFNAME=lo (already set, same as ours)"]


def test_launch_node_keeps_a_gloo_interface_the_user_set_and_says_so(tmp_path):
    address = next((entry.address for entries in psutil.net_if_addrs().values() for entry in entries
                    if entry.family == socket.AF_INET and not entry.address.startswith("127.")), None)
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine: two nodes need one")
    interface = next(name for name, entries in psutil.net_if_addrs().items()
                     if any(entry.address == address for entry in entries))
    done = run_cli(["-m", "launch", "node", "--nnodes", "2", "--node-rank", "0", "--master-addr", address, "--print"],
                   cwd=tmp_path, timeout=60, GLOO_SOCKET_IFNAME="eth9")
    assert done.returncode == 0, done.stderr
    assert f"# kept GLOO_SOCKET_IFNAME=eth9 (set by you; ours would be {interface}: the route to the master " \
           f"{address} via {interface}" in done.stdout, done.stdout
    assert "export GLOO_SOCKET_IFNAME" not in done.stdout, done.stdout
