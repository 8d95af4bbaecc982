"""``python -m launch doctor [--master-addr A] [--nproc N] [--json]``: what a rank started here would
detect, choose and use, and whether local collectives work.

Reports versions (torch, CUDA, NCCL, Gloo), GPUs through NVML (name, memory, other processes),
CPU cores and RAM (psutil), network interfaces and which one routes to ``--master-addr``, the
detected cluster environment, the backend ``dist.backend=auto`` would pick, and runs a real
all_reduce over ``--nproc`` local ranks (gloo; nccl too with a GPU per rank). Exit 0 when every
check passes, 1 when one fails, 2 when the launcher's variables are inconsistent.
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import psutil
import torch
import torch.distributed as dist

from ddp.cluster.devices import choose_backend, choose_device, detect_devices
from ddp.config import Backend, Parallel
from ddp.cluster.environment import ClusterEnv, SlurmEnv, available_cpus, detect_environment, hostname, slurm_interactive
from ddp.errors import DDPError, print_error
from ddp.memory.nvml import cuda_handle, nvml_session, uuid_of
from ddp.cluster.network import NetworkError, interfaces, route_to
from launch.selftest import all_reduce_selftest


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--master-addr", help="also show which interface routes to this address")
    p.add_argument("--nproc", type=int, default=2, help="local ranks for the all_reduce self-test (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-selftest", action="store_true", help="skip the all_reduce self-test")
    return p.parse_args(argv)


def gpus() -> list[dict[str, Any]]:
    """One entry per GPU from NVML (name, memory total/used MiB, other processes) with the CUDA index
    it has in this process (None: hidden by CUDA_VISIBLE_DEVICES, or no CUDA in torch); [] without
    a driver. NVML numbers every GPU of the machine, CUDA only the visible ones (``ddp.memory.nvml``)."""
    with nvml_session() as nvml:
        if nvml is None:
            return []
        cuda_index: dict[str, int] = {}
        for index in range(torch.cuda.device_count()):
            handle = cuda_handle(nvml, index)
            uuid = uuid_of(nvml, handle) if handle is not None else None
            if uuid is not None:
                cuda_index.setdefault(uuid, index)
        found = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            found.append({"index": index, "cuda_index": cuda_index.get(uuid_of(nvml, handle) or ""),
                          "name": name.decode() if isinstance(name, bytes) else name,
                          "memory_total_mib": memory.total // 2**20, "memory_used_mib": memory.used // 2**20,
                          "processes": [p.pid for p in procs]})
        return found


def _nccl(version: str | None, built: bool) -> str:
    """"2.21.5" when NCCL can run here, else whether this torch was built with it."""
    if version:
        return version
    return "built in, no GPU to run it" if built else "no"


def _cuda_name(index: int | None) -> str:
    return "not visible to this process" if index is None else f"cuda:{index} here"


def versions() -> dict[str, Any]:
    nccl = None
    if dist.is_nccl_available() and torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": nccl, "gloo": dist.is_gloo_available()}


def network(master_addr: str | None) -> dict[str, Any]:
    found: dict[str, Any] = {"interfaces": interfaces(), "route": None}
    if master_addr:
        try:
            route = route_to(master_addr)
            found["route"] = {"master_addr": master_addr, "master_ip": route.master_ip, "interface": route.interface,
                              "source_ip": route.source_ip, "local": route.local}
        except NetworkError as err:
            found["route"] = {"master_addr": master_addr, "error": str(err)}
    return found


def interactive_notes(env: ClusterEnv) -> list[str]:
    """In ``srun --pty bash`` (job name bash/interactive), say which variables win and why."""
    if not slurm_interactive():
        return []
    if isinstance(env, SlurmEnv):
        return ["slurm: interactive allocation (SLURM_JOB_NAME bash/interactive); no RANK/WORLD_SIZE/MASTER_ADDR "
                "set by hand, so this shell's own Slurm task (rank 0 of 1) is used"]
    return ["slurm: interactive allocation (SLURM_JOB_NAME bash/interactive): the hand-set RANK/WORLD_SIZE/"
            "MASTER_ADDR win over Slurm's variables, as in Lightning; start ranks with srun for a Slurm launch"]


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Everything doctor knows, as plain data. Raises ``ClusterEnvError`` for bad launcher variables."""
    env = detect_environment()
    devices = detect_devices()
    backend = choose_backend(Backend.auto, env, devices)
    memory = psutil.virtual_memory()
    report = {
        "host": hostname(), "platform": platform.platform(), "versions": versions(),
        "environment": {"kind": env.source, "rank": env.rank, "local_rank": env.local_rank,
                        "world_size": env.world_size, "local_world_size": env.local_world_size,
                        "node_rank": env.node_rank, "master_addr": env.master_addr, "master_port": env.master_port,
                        "distributed": env.distributed, "description": env.describe()},
        "notes": interactive_notes(env),
        "backend": backend, "device": str(choose_device(backend, Parallel.ddp, env, devices)),
        "cuda": {"available": devices.cuda_available, "count": devices.cuda_count}, "gpus": gpus(),
        "cpu": {"usable": available_cpus(), "threads_per_rank": max(1, available_cpus() // env.local_world_size)},
        "memory": {"total_mib": memory.total // 2**20, "available_mib": memory.available // 2**20},
        "network": network(args.master_addr), "selftest": None,
    }
    if not args.no_selftest:
        backends = ["gloo"] + (["nccl"] if devices.cuda_count >= args.nproc and dist.is_nccl_available() else [])
        report["selftest"] = [all_reduce_selftest(name, args.nproc) for name in backends]
    return report


def failures(report: dict[str, Any]) -> list[str]:
    failed = [f"self-test {t['backend']}: {t['error']}" for t in report["selftest"] or [] if not t["ok"]]
    route = report["network"]["route"]
    if route and "error" in route:
        failed.append(route["error"])
    return failed


def human(report: dict[str, Any]) -> list[str]:
    v, env, net = report["versions"], report["environment"], report["network"]
    lines = [f"host: {report['host']} ({report['platform']})",
             f"environment: {env['description']}", *report["notes"],
             f"backend (auto): {report['backend']}; device: {report['device']}",
             f"cuda: {'available' if report['cuda']['available'] else 'not available'}, "
             f"{report['cuda']['count']} device(s)"]
    lines += [f"gpu {g['index']} ({_cuda_name(g['cuda_index'])}): {g['name']}, "
              f"{g['memory_used_mib']}/{g['memory_total_mib']} MiB used, processes {g['processes'] or 'none'}"
              for g in report["gpus"]]
    lines += [f"cpus: {report['cpu']['usable']} usable, {report['cpu']['threads_per_rank']} threads per rank; "
              f"RAM {report['memory']['available_mib']}/{report['memory']['total_mib']} MiB available",
              f"torch {v['torch']} (python {v['python']}, cuda {v['cuda'] or 'none'}): gloo "
              f"{'yes' if v['gloo'] else 'no'}, nccl {_nccl(v['nccl'], dist.is_nccl_available())}"]
    lines += [f"interface {name}: {', '.join(addrs) or '-'}" for name, addrs in net["interfaces"].items()]
    route = net["route"]
    if route:
        lines.append(f"route to {route['master_addr']}: " + (route.get("error") or
                     f"{route['master_ip']} via {route['interface']} from {route['source_ip']}"
                     f"{' (this machine)' if route['local'] else ''}"))
    for test in report["selftest"] or []:
        lines.append(f"self-test {test['backend']} all_reduce on {test['nproc']} local ranks: " +
                     (f"ok in {test['seconds']:.1f} s" if test["ok"] else f"FAILED: {test['error']}"))
    return lines


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        report = collect(args)
    except DDPError as err:
        print_error(err, 0)
        return err.exit_code
    print(json.dumps(report) if args.json else "\n".join(human(report)))
    return 1 if failures(report) else 0
