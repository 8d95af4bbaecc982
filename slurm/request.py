"""What a submission asks for, and whether the cluster's partitions can hold it (pure functions).

``check(request, partitions)`` raises ``SubmitError`` (exit 2) naming the mismatch and the fix;
``slurm.cluster`` asks ``sinfo`` for the partitions, ``slurm.submit`` turns the request into
submitit parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ddp.errors import DDPError


class SubmitError(DDPError):
    """The job cannot be submitted as asked: nothing was sent to Slurm."""

    exit_code = 2


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int  # nodes in the partition
    cpus: int  # CPUs of its smallest node
    gpus: int  # GPUs of its smallest node (0: none)
    default: bool = False


@dataclass(frozen=True)
class Request:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int  # 0 for a CPU job
    time_min: int
    signal_lead_s: int
    partition: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # more sbatch options, long names without "--"

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def parse_gres_gpus(gres: str) -> int:
    """GPUs per node in sinfo's GRES column: ``gpu:4``, ``gpu:a100:8(S:0-1)``; 0 for ``(null)``."""
    return sum(int(n) for n in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", gres))


def parse_sinfo(text: str) -> dict[str, Partition]:
    """``sinfo -h -o '%P|%D|%c|%G'`` → partitions; several lines of one partition are combined."""
    found: dict[str, Partition] = {}
    for line in text.splitlines():
        if line.count("|") != 3:
            continue
        name, nodes, cpus, gres = (part.strip() for part in line.split("|"))
        default = name.endswith("*")
        name = name.rstrip("*")
        cpus_n = int(re.sub(r"\D.*", "", cpus) or 0)  # "2" or "2+" (mixed nodes)
        new = Partition(name, int(nodes or 0), cpus_n, parse_gres_gpus(gres), default)
        old = found.get(name)
        if old:
            new = Partition(name, old.nodes + new.nodes, min(old.cpus, new.cpus), min(old.gpus, new.gpus),
                            old.default or default)
        found[name] = new
    return found


def check(request: Request, partitions: dict[str, Partition]) -> Partition:
    """The partition the job goes to; SubmitError when the request cannot run there."""
    _check_numbers(request)
    partition = _choose_partition(request.partition, partitions)
    if request.nodes > partition.nodes:
        raise SubmitError(f"--nodes {request.nodes} but partition '{partition.name}' has {partition.nodes} node(s).",
                          f"use --nodes {partition.nodes} or a larger partition")
    if request.gpus_per_node and not partition.gpus:
        gpu_parts = sorted(p.name for p in partitions.values() if p.gpus)
        raise SubmitError(f"--gpus-per-node {request.gpus_per_node} but partition '{partition.name}' has no GPUs "
                          "(sinfo shows no gpu GRES).",
                          "use --tasks-per-node for a CPU job" + (f", or --partition {gpu_parts[0]}" if gpu_parts else ""))
    if request.gpus_per_node > partition.gpus > 0:
        raise SubmitError(f"--gpus-per-node {request.gpus_per_node} but the nodes of '{partition.name}' have "
                          f"{partition.gpus} GPU(s).", f"use --gpus-per-node {partition.gpus} and more --nodes")
    cpus = request.tasks_per_node * (request.cpus_per_task or 1)
    if partition.cpus and cpus > partition.cpus:
        fit = max(1, partition.cpus // (request.cpus_per_task or 1))
        raise SubmitError(f"{request.tasks_per_node} task(s) per node × {request.cpus_per_task or 1} CPU(s) per task "
                          f"= {cpus} CPUs, but the nodes of '{partition.name}' have {partition.cpus}.",
                          f"use --tasks-per-node {fit} (or fewer --cpus-per-task) and more --nodes")
    return partition


def _check_numbers(request: Request) -> None:
    for flag, value in (("--nodes", request.nodes), ("--tasks-per-node", request.tasks_per_node),
                        ("--time", request.time_min)):
        if value < 1:
            raise SubmitError(f"{flag} {value} is invalid: it must be ≥ 1.", f"give {flag} a whole number ≥ 1")
    if not 0 <= request.signal_lead_s < request.time_min * 60:
        raise SubmitError(f"--signal-lead {request.signal_lead_s} s does not fit in --time {request.time_min} min.",
                          "the warning signal must come after the start: use a lead shorter than the time limit")


def _choose_partition(name: str | None, partitions: dict[str, Partition]) -> Partition:
    known = ", ".join(sorted(partitions)) or "none"
    if name is None:
        default = next((p for p in partitions.values() if p.default), None)
        if default is None:
            raise SubmitError("no --partition given and the cluster has no default partition.",
                              f"pass --partition (sinfo lists: {known})")
        return default
    if name not in partitions:
        raise SubmitError(f"unknown partition '{name}'.", f"sinfo lists: {known}")
    return partitions[name]
