"""A real all_reduce over N local ranks: proves the backend and local networking work."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60.0


def all_reduce_selftest(backend: str, nproc: int, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Spawn ``nproc`` ranks on 127.0.0.1; each all_reduces rank+1 and checks the sum."""
    start = time.monotonic()
    result: dict[str, Any] = {"backend": backend, "nproc": nproc, "ok": False, "error": None, "seconds": None}
    context = mp.start_processes(_rank, args=(nproc, _free_port(), backend, timeout_s), nprocs=nproc, join=False,
                                 start_method="spawn")
    try:
        while not context.join(timeout=max(0.1, timeout_s - (time.monotonic() - start))):
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"ranks did not finish within {timeout_s:.0f} s")
        result["ok"] = True
    except Exception as err:  # noqa: BLE001 - reported as a failed check
        result["error"] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def _rank(rank: int, world: int, port: int, backend: str, timeout_s: float) -> None:
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        value = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(value)
        expected = world * (world + 1) / 2
        if value.item() != expected:
            raise RuntimeError(f"all_reduce gave {value.item()}, expected {expected}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
