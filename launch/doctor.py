"""``python -m launch doctor``: what a rank started here would detect, choose and use.

It prints the detected cluster environment, the backend and device ``dist.backend=auto`` would
pick, the GPUs (through NVML when available) and the CPU share per rank, without creating a
process group. Any inconsistency in the launcher's variables is reported as the training
command would report it.
"""

from __future__ import annotations

import platform

import torch
import torch.distributed as dist

from ddp.backend import probe_devices, choose_backend, choose_device
from ddp.config import Backend, Parallel
from ddp.environment import ClusterEnv, SlurmEnv
from ddp.environment import available_cpus, detect_environment, hostname, slurm_interactive


def gpu_lines() -> list[str]:
    """One line per GPU from NVML (name, total and used memory); empty without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPUs to describe
        return []
    try:
        lines = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            lines.append(f"gpu {index}: {name}, {memory.used / 2**30:.1f}/{memory.total / 2**30:.1f} GiB used")
        return lines
    finally:
        pynvml.nvmlShutdown()


def interactive_lines(env: ClusterEnv) -> list[str]:
    """In ``srun --pty bash`` (job name bash/interactive), say which variables win and why."""
    if not slurm_interactive():
        return []
    if isinstance(env, SlurmEnv):
        return ["slurm: interactive allocation (SLURM_JOB_NAME bash/interactive); no RANK/WORLD_SIZE/MASTER_ADDR "
                "set by hand, so this shell's own Slurm task (rank 0 of 1) is used"]
    return ["slurm: interactive allocation (SLURM_JOB_NAME bash/interactive): the hand-set RANK/WORLD_SIZE/"
            "MASTER_ADDR win over Slurm's variables, as in Lightning; start ranks with srun for a Slurm launch"]


def report() -> list[str]:
    env = detect_environment()
    devices = probe_devices()
    backend = choose_backend(Backend.auto, env, devices)
    device = choose_device(backend, Parallel.ddp, env, devices)
    return [
        f"host: {hostname()} ({platform.platform()})",
        f"environment: {env.describe()}",
        *interactive_lines(env),
        f"backend (auto): {backend}; device: {device}",
        f"cuda: {'available' if devices.cuda_available else 'not available'}, {devices.cuda_count} device(s)",
        *gpu_lines(),
        f"cpus: {available_cpus()} usable, {max(1, available_cpus() // env.local_world_size)} threads per rank",
        f"torch {torch.__version__}: gloo {'yes' if dist.is_gloo_available() else 'no'}, "
        f"nccl {'yes' if dist.is_nccl_available() else 'no'}",
    ]
