import pytest
import torch

from ddp.cluster.devices import Devices, check_parallel, choose_backend, choose_device, place
from ddp.config import Backend, Parallel
from ddp.cluster.environment import SingleProcessEnv, SlurmEnv, TorchrunEnv, cuda_visible_devices
from ddp.errors import BackendError

CPU = Devices(cuda_available=False, cuda_count=0)
ONE_GPU = Devices(cuda_available=True, cuda_count=1)
FOUR_GPUS = Devices(cuda_available=True, cuda_count=4)


def env(local_rank=0, local_world=4, world=4, kind=TorchrunEnv):
    return kind(rank=local_rank, local_rank=local_rank, world_size=world, local_world_size=local_world)


@pytest.mark.parametrize("requested, devices, local_world, expected", [
    (Backend.auto, CPU, 4, "gloo"),
    (Backend.auto, FOUR_GPUS, 4, "nccl"),
    (Backend.auto, FOUR_GPUS, 2, "nccl"),
    (Backend.auto, ONE_GPU, 4, "gloo"),  # torchrun: all 4 ranks see the one GPU and would share it
    (Backend.gloo, FOUR_GPUS, 4, "gloo"),
    (Backend.nccl, FOUR_GPUS, 4, "nccl"),
])
def test_backend_matrix(requested, devices, local_world, expected):
    assert choose_backend(requested, env(local_world=local_world), devices) == expected


def test_nccl_without_cuda_is_refused():
    with pytest.raises(BackendError, match="CUDA is not available.*HINT: use dist.backend=gloo"):
        choose_backend(Backend.nccl, env(), CPU)


def test_nccl_with_more_torchrun_ranks_than_gpus_is_refused_naming_the_sharing():
    with pytest.raises(BackendError, match=r"4 ranks on this machine would share 2 GPUs.*--nproc_per_node=2"):
        choose_backend(Backend.nccl, env(local_rank=3), Devices(True, 2))


@pytest.mark.parametrize("requested", [Backend.auto, Backend.nccl])
def test_per_task_binding_one_gpu_per_slurm_task_is_nccl_on_cuda_0(requested):
    """srun --gpus-per-task=1: each of the 4 tasks on a node sees exactly its own GPU as cuda:0."""
    for local_rank in range(4):
        cluster = env(local_rank=local_rank, kind=SlurmEnv)
        backend = choose_backend(requested, cluster, ONE_GPU)
        assert backend == "nccl"
        assert choose_device(backend, Parallel.ddp, cluster, ONE_GPU) == torch.device("cuda", 0)


def test_device_rule_is_local_rank_modulo_visible_gpus():
    two = Devices(True, 2)
    picked = [choose_device("nccl", Parallel.ddp, env(local_rank=r, kind=SlurmEnv), two) for r in range(4)]
    assert picked == [torch.device("cuda", i) for i in (0, 1, 0, 1)]


def test_gpus_visible_but_cpu_chosen_says_why_as_a_warning():
    placement = place(choose_backend(Backend.auto, env(), ONE_GPU), Parallel.ddp, env(), ONE_GPU)
    assert placement.device == torch.device("cpu") and placement.warn
    assert "torchrun started 4 ranks on this machine but 1 GPU visible" in placement.reason
    assert "--nproc_per_node=1" in placement.reason
    asked = place("gloo", Parallel.ddp, env(local_world=1, world=1), ONE_GPU)
    assert asked.warn and "dist.backend=gloo trains on the CPU although 1 GPU visible" in asked.reason
    assert not place("gloo", Parallel.ddp, env(), CPU).warn  # no GPU: nothing to warn about


def test_the_log_names_the_physical_gpu_behind_a_remap():
    devices = Devices(True, 2, ("GPU-aaa", "GPU-bbb"), tuple(cuda_visible_devices({"CUDA_VISIBLE_DEVICES": "5,3"})))
    placement = place("nccl", Parallel.ddp, env(local_rank=1, local_world=2, world=2), devices)
    assert placement.device == torch.device("cuda", 1)
    assert "GPU 3 (CUDA_VISIBLE_DEVICES=5,3)" in placement.reason
    assert devices.identity(1) == "GPU-bbb"


@pytest.mark.parametrize("raw, entries", [
    (None, None), ("", []), ("-1", []), ("0,1", ["0", "1"]), ("2, 3", ["2", "3"]), ("2,-1,3", ["2"]),
    ("GPU-8f0d2c1e-aaaa,1", ["GPU-8f0d2c1e-aaaa", "1"]), ("MIG-1234", ["MIG-1234"]), ("nvidia0", []),
])
def test_cuda_visible_devices_is_read_as_cuda_reads_it(raw, entries):
    assert cuda_visible_devices({} if raw is None else {"CUDA_VISIBLE_DEVICES": raw}) == entries


@pytest.mark.parametrize("backend, parallel, cluster, devices, expected", [
    ("nccl", Parallel.ddp, env(local_rank=2), FOUR_GPUS, "cuda:2"),
    ("gloo", Parallel.ddp, env(local_rank=2), FOUR_GPUS, "cpu"),
    ("gloo", Parallel.ddp, SingleProcessEnv(), ONE_GPU, "cuda:0"),
    ("gloo", Parallel.dp, SingleProcessEnv(), FOUR_GPUS, "cuda:0"),
    ("gloo", Parallel.ddp, SingleProcessEnv(), CPU, "cpu"),
    ("nccl", Parallel.ddp, env(local_rank=5, local_world=8, world=8, kind=SlurmEnv), FOUR_GPUS, "cuda:1"),
])
def test_device_choice(backend, parallel, cluster, devices, expected):
    assert choose_device(backend, parallel, cluster, devices) == torch.device(expected)


@pytest.mark.parametrize("parallel", [Parallel.dp, Parallel.none])
def test_single_process_modes_refuse_many_ranks(parallel):
    with pytest.raises(BackendError, match=f"dist.parallel={parallel.value} runs in one process"):
        check_parallel(parallel, env())
    check_parallel(parallel, SingleProcessEnv())
