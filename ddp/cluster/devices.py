"""Backend and device choice: the one place that decides nccl or gloo, CUDA or CPU.

The device rule (docs/devices.md):

* a rank uses ``cuda:(local_rank % visible GPUs)``, so a rank that sees exactly one GPU (per-task
  binding: ``srun --gpus-per-task=1``, ``--gpu-bind``, a pod per rank) uses ``cuda:0``;
* ``dist.backend=auto`` picks NCCL whenever a GPU is visible, except under a launcher whose ranks
  all see the same GPUs (torchrun) with more ranks on the machine than GPUs: then every rank would
  share one, which NCCL cannot do, so auto trains on the CPU with Gloo and says why;
* ``dist.backend=nccl`` with ranks that would share a GPU is refused in one line. Where the
  launcher may bind GPUs per rank, sharing can only be seen across ranks: every rank publishes its
  GPU's UUID at the rendezvous (``ddp.cluster.rendezvous.check_gpus``) and a duplicate on one host is
  refused there, before the process group forms;
* whenever GPUs are visible but a rank trains on the CPU, the reason is logged.

``detect_devices()`` is the boundary to the hardware; everything else is a pure function of its
result so tests can fake any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddp.config import Backend, Parallel
from ddp.cluster.environment import ClusterEnv, cuda_visible_devices
from ddp.errors import BackendError


@dataclass(frozen=True)
class Devices:
    """What accelerators this process can see (after CUDA_VISIBLE_DEVICES)."""

    cuda_available: bool
    cuda_count: int
    uuids: tuple[str, ...] = ()  # each visible GPU's identity, by CUDA index ("GPU-<uuid>")
    visible: tuple[str, ...] | None = None  # CUDA_VISIBLE_DEVICES's entries as CUDA reads them; None: unset

    def physical(self, index: int) -> str:
        """How the user knows GPU ``index``: its CUDA_VISIBLE_DEVICES entry, else the index itself."""
        if self.visible is not None and index < len(self.visible):
            return f"{self.visible[index]} (CUDA_VISIBLE_DEVICES={','.join(self.visible)})"
        return str(index)

    def identity(self, index: int) -> str:
        """A name that is the same in every process seeing this GPU (its UUID where CUDA gives one)."""
        if index < len(self.uuids) and self.uuids[index]:
            return self.uuids[index]
        if self.visible is not None and index < len(self.visible):
            return self.visible[index]
        return str(index)


@dataclass(frozen=True)
class Placement:
    """Where a rank trains: the backend, its device and the reason, for the log."""

    backend: str
    device: torch.device
    reason: str
    warn: bool = False  # GPUs are visible but this rank trains on the CPU: said as a warning

    @property
    def gpu(self) -> int | None:
        return self.device.index if self.device.type == "cuda" else None


def detect_devices() -> Devices:
    """The hardware boundary: CUDA's count and each GPU's UUID, and CUDA_VISIBLE_DEVICES."""
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    visible = cuda_visible_devices()
    return Devices(available, count, tuple(_uuid(i) for i in range(count)),
                   None if visible is None else tuple(visible))


def _uuid(index: int) -> str:
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else ""


def gpu_index(env: ClusterEnv, devices: Devices) -> int:
    """The device rule: this rank's GPU among the ones it sees."""
    return env.local_rank % devices.cuda_count


def ranks_share_gpus(env: ClusterEnv, devices: Devices) -> bool:
    """True when ranks on this machine certainly share GPUs: more of them than GPUs, under a launcher
    that gives every local rank the same CUDA_VISIBLE_DEVICES."""
    return devices.cuda_count < env.local_world_size and not env.binds_devices


def choose_backend(requested: Backend, env: ClusterEnv, devices: Devices) -> str:
    """``auto`` → nccl when a GPU is visible and no two ranks on this machine must share one, else
    gloo. ``nccl`` is refused without CUDA or when the ranks would share GPUs."""
    if requested == Backend.auto:
        return "nccl" if devices.cuda_available and not ranks_share_gpus(env, devices) else "gloo"
    if requested == Backend.nccl:
        if not devices.cuda_available:
            raise BackendError("dist.backend=nccl but CUDA is not available on this machine.",
                               "use dist.backend=gloo (or auto) to train on CPU")
        if ranks_share_gpus(env, devices):
            raise BackendError(
                f"dist.backend=nccl: {env.local_world_size} ranks on this machine would share "
                f"{_gpus(devices)}, and NCCL cannot run two ranks on one GPU.",
                f"start at most {devices.cuda_count} rank(s) per machine (--nproc_per_node={devices.cuda_count}), "
                "or use dist.backend=gloo to train on the CPU",
            )
    return requested.value


def choose_device(backend: str, parallel: Parallel, env: ClusterEnv, devices: Devices) -> torch.device:
    """nccl → ``cuda:(local_rank % visible)``; one process with CUDA → cuda:0; otherwise the CPU."""
    return place(backend, parallel, env, devices).device


def place(backend: str, parallel: Parallel, env: ClusterEnv, devices: Devices) -> Placement:
    """This rank's device under ``backend``, with the reason (logged by every rank)."""
    if backend == "nccl":
        index = gpu_index(env, devices)
        return Placement(backend, torch.device("cuda", index),
                         f"NCCL, local rank {env.local_rank} of {env.local_world_size} → GPU {devices.physical(index)}"
                         f" ({_gpus(devices)} visible)")
    if not devices.cuda_available:
        return Placement(backend, torch.device("cpu"), "no GPU visible to this process")
    if not env.distributed or parallel == Parallel.dp:
        mode = "DataParallel over every visible GPU" if parallel == Parallel.dp else "one process"
        return Placement(backend, torch.device("cuda", 0), f"{mode}: GPU {devices.physical(0)}")
    if ranks_share_gpus(env, devices):
        why = (f"{env.source} started {env.local_world_size} ranks on this machine but {_gpus(devices)} "
               f"visible: NCCL cannot share a GPU between ranks, so every rank trains on the CPU with Gloo "
               f"(start --nproc_per_node={devices.cuda_count} to train on the GPUs)")
    else:
        why = f"dist.backend={backend} trains on the CPU although {_gpus(devices)} visible (use dist.backend=auto or nccl)"
    return Placement(backend, torch.device("cpu"), why, warn=True)


def _gpus(devices: Devices) -> str:
    return f"{devices.cuda_count} GPU{'' if devices.cuda_count == 1 else 's'}"


def check_parallel(parallel: Parallel, env: ClusterEnv) -> None:
    """dp and none run in one process; refuse them under a multi-rank launcher."""
    if parallel in (Parallel.dp, Parallel.none) and env.world_size > 1:
        raise BackendError(
            f"dist.parallel={parallel.value} runs in one process, but {env.source} started "
            f"{env.world_size} ranks.",
            "use dist.parallel=ddp or fsdp with torchrun/srun, or start one process: python -m ddp.train",
        )
