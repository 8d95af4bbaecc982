import pytest
import torch

from ddp.backend import Devices, check_parallel, choose_backend, choose_device
from ddp.config import Backend, Parallel
from ddp.environment import ClusterEnv, SingleProcessEnv
from ddp.errors import BackendError

CPU = Devices(cuda_available=False, cuda_count=0)
ONE_GPU = Devices(cuda_available=True, cuda_count=1)
FOUR_GPUS = Devices(cuda_available=True, cuda_count=4)


def env(local_rank=0, local_world=4, world=4):
    return ClusterEnv(rank=local_rank, local_rank=local_rank, world_size=world, local_world_size=local_world)


@pytest.mark.parametrize("requested, devices, local_world, expected", [
    (Backend.auto, CPU, 4, "gloo"),
    (Backend.auto, FOUR_GPUS, 4, "nccl"),
    (Backend.auto, FOUR_GPUS, 2, "nccl"),
    (Backend.auto, ONE_GPU, 4, "gloo"),  # ranks would share a GPU: NCCL refuses that
    (Backend.gloo, FOUR_GPUS, 4, "gloo"),
    (Backend.nccl, FOUR_GPUS, 4, "nccl"),
])
def test_backend_matrix(requested, devices, local_world, expected):
    assert choose_backend(requested, env(local_world=local_world), devices) == expected


def test_nccl_without_cuda_is_refused():
    with pytest.raises(BackendError, match="CUDA is not available.*HINT: use dist.backend=gloo"):
        choose_backend(Backend.nccl, env(), CPU)


def test_nccl_local_rank_without_gpu_is_refused():
    with pytest.raises(BackendError, match=r"local rank 3 has no GPU.*--nproc_per_node=2"):
        choose_backend(Backend.nccl, env(local_rank=3), Devices(True, 2))


@pytest.mark.parametrize("backend, parallel, cluster, devices, expected", [
    ("nccl", Parallel.ddp, env(local_rank=2), FOUR_GPUS, "cuda:2"),
    ("gloo", Parallel.ddp, env(local_rank=2), FOUR_GPUS, "cpu"),
    ("gloo", Parallel.ddp, SingleProcessEnv(), ONE_GPU, "cuda:0"),
    ("gloo", Parallel.dp, SingleProcessEnv(), FOUR_GPUS, "cuda:0"),
    ("gloo", Parallel.ddp, SingleProcessEnv(), CPU, "cpu"),
])
def test_device_choice(backend, parallel, cluster, devices, expected):
    assert choose_device(backend, parallel, cluster, devices) == torch.device(expected)


@pytest.mark.parametrize("parallel", [Parallel.dp, Parallel.none])
def test_single_process_modes_refuse_many_ranks(parallel):
    with pytest.raises(BackendError, match=f"dist.parallel={parallel.value} runs in one process"):
        check_parallel(parallel, env())
    check_parallel(parallel, SingleProcessEnv())
