"""Backend and device choice: the one place that decides nccl or gloo, CUDA or CPU.

``probe_devices()`` is the boundary to the hardware; everything else is a pure function of its
result so tests can fake any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddp.config import Backend, Parallel
from ddp.environment import ClusterEnv
from ddp.errors import BackendError


@dataclass(frozen=True)
class Devices:
    """What accelerators this process can see (after CUDA_VISIBLE_DEVICES)."""

    cuda_available: bool
    cuda_count: int


def probe_devices() -> Devices:
    available = torch.cuda.is_available()
    return Devices(cuda_available=available, cuda_count=torch.cuda.device_count() if available else 0)


def choose_backend(requested: Backend, env: ClusterEnv, devices: Devices) -> str:
    """``auto`` → nccl when CUDA is up and every local rank has its own GPU, else gloo."""
    gpu_per_rank = devices.cuda_available and devices.cuda_count >= env.local_world_size
    if requested == Backend.auto:
        return "nccl" if gpu_per_rank else "gloo"
    if requested == Backend.nccl:
        if not devices.cuda_available:
            raise BackendError("dist.backend=nccl but CUDA is not available on this machine.",
                               "use dist.backend=gloo (or auto) to train on CPU")
        if env.local_rank >= devices.cuda_count:
            raise BackendError(
                f"dist.backend=nccl: local rank {env.local_rank} has no GPU "
                f"({devices.cuda_count} visible, {env.local_world_size} ranks on this node).",
                f"launch at most {devices.cuda_count} processes per node "
                f"(--nproc_per_node={devices.cuda_count}) or check CUDA_VISIBLE_DEVICES",
            )
    return requested.value


def choose_device(backend: str, parallel: Parallel, env: ClusterEnv, devices: Devices) -> torch.device:
    """nccl → this rank's GPU; one process with CUDA → cuda:0; otherwise the CPU."""
    if backend == "nccl":
        return torch.device("cuda", env.local_rank)
    if not env.distributed and devices.cuda_available:
        return torch.device("cuda", 0)
    if parallel == Parallel.dp and devices.cuda_available:
        return torch.device("cuda", 0)
    return torch.device("cpu")


def check_parallel(parallel: Parallel, env: ClusterEnv) -> None:
    """dp and none run in one process; refuse them under a multi-rank launcher."""
    if parallel != Parallel.ddp and env.world_size > 1:
        raise BackendError(
            f"dist.parallel={parallel.value} runs in one process, but {env.source} started "
            f"{env.world_size} ranks.",
            "use dist.parallel=ddp with torchrun/srun, or start one process: python -m ddp.train",
        )
