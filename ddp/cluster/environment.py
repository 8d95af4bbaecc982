"""Cluster environments: how a process learns its rank, world and rendezvous address.

This is the only module that reads ``os.environ``. Every other module asks the ``ClusterEnv``
returned by ``detect_environment()`` (or the small helpers at the bottom).

Probe order (first match wins), after Lightning's ``_select_cluster_environment``:
  1. ``TorchrunEnv``  torchrun / torch.distributed.run (it can run inside a Slurm job, so first);
                      also reads TORCHELASTIC_USE_AGENT_STORE and TORCHELASTIC_RESTART_COUNT
  2. ``SlurmEnv``     ``srun`` tasks: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST
  3. ``ManualEnv``    hand-set RANK and WORLD_SIZE with MASTER_IP or MASTER_ADDR: the seed scripts'
                      style (one rank per machine), or with LOCAL_RANK and no LOCAL_WORLD_SIZE (older
                      torch.distributed.launch); a world > 1 without a master address is refused
  4. ``SingleProcessEnv`` plain ``python -m ddp.train``; refused when a stray RANK/WORLD_SIZE/
                      LOCAL_RANK/LOCAL_WORLD_SIZE says the world is larger than one

Whenever the variables say the world is larger than one, the process joins it with the stated
ranks or refuses with one line: it never trains alone.

Restarts: ``job_attempt`` says which launch this process belongs to (Slurm's job id, torchrun's run
id) and whether it was restarted (TORCHELASTIC_RESTART_COUNT) or requeued (SLURM_RESTART_COUNT).

Writing: ``export_variables`` (this process, before the process group forms) and ``child_environ``
(a launcher's children) set variables such as GLOO_SOCKET_IFNAME, never overwriting one the user set,
and return one log line per variable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ddp.errors import ClusterEnvError
from ddp.cluster.hostlist import expand_tasks_per_node, first_host

Environ = Mapping[str, str]

DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 15000  # Lightning's choice: 15000 + last 4 digits of the job id


@dataclass(frozen=True)
class ClusterEnv:
    """Who this process is in the job. Subclasses differ only in where the values come from."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    agent_store: bool = False  # a launcher agent already serves the TCPStore at master_addr:port
    restart_count: int = 0  # how many times the launcher restarted this worker group

    source: ClassVar[str] = "explicit"
    variables: ClassVar[str] = "RANK/WORLD_SIZE"
    # False where every rank on a machine inherits one environment (torchrun): then more ranks than
    # visible GPUs means ranks would share a GPU. True where a launcher may give each rank its own
    # GPUs (srun --gpus-per-task, --gpu-bind, a pod per rank): sharing is checked at the rendezvous.
    binds_devices: ClassVar[bool] = True

    @property
    def distributed(self) -> bool:
        """True when a process group must be created (every launcher, even with one rank)."""
        return True

    @property
    def init_method(self) -> str:
        """The rendezvous address as a URL (for logs; the store is built in ``process_group``)."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    @property
    def store_prefix(self) -> str:
        """Namespace for this attempt's keys in the rendezvous store.

        When torchrun's agent serves the store (``agent_store``), ONE server lives through all
        restarts of a job and workers reach it without any per-attempt prefix, so a restarted group
        could read the previous attempt's addresses and fail with "connectFullMesh ... Connection
        refused"; prefixing by restart count gives every attempt its own keys. That count is each
        agent's own, so it is used only there (one agent: ``--standalone``, one machine). Otherwise
        every attempt has a fresh store, served by its rank 0 on a port chosen for that round
        (``launch node --run-id`` asks torchrun for this: a restarted agent's count starts at 0
        again, and the agents' counts differ), so the prefix must not depend on the count.
        """
        return f"ddp/attempt_{self.restart_count}" if self.agent_store else "ddp/attempt"

    def describe(self) -> str:
        """One line for logs and ``python -m launch doctor``."""
        restarts = f", restart {self.restart_count}" if self.restart_count else ""
        return (
            f"{self.source}: rank {self.rank}/{self.world_size}, local rank "
            f"{self.local_rank}/{self.local_world_size}, node {self.node_rank}, "
            f"rendezvous {self.init_method}{restarts}"
        )

    def validate(self) -> ClusterEnv:
        """Raise ``ClusterEnvError`` naming the inconsistent values; return self when sound."""
        if self.world_size < 1:
            self._fail(f"world size is {self.world_size}", "it must be at least 1")
        if not 0 <= self.rank < self.world_size:
            self._fail(
                f"rank {self.rank} is outside world size {self.world_size}",
                "ranks run from 0 to world size - 1; check the launch command's rank arguments",
            )
        if not 0 <= self.local_rank < self.local_world_size:
            self._fail(
                f"local rank {self.local_rank} is outside local world size {self.local_world_size}",
                "local ranks run from 0 to (processes on this node) - 1",
            )
        if self.local_world_size > self.world_size:
            self._fail(
                f"local world size {self.local_world_size} exceeds world size {self.world_size}",
                "a node cannot hold more ranks than the whole job",
            )
        if not 0 < self.master_port < 65536:
            self._fail(f"master port {self.master_port} is not a TCP port", "use 1-65535")
        return self

    def _fail(self, problem: str, hint: str) -> None:
        raise ClusterEnvError(f"{self.source} environment ({self.variables}): {problem}.", hint)


@dataclass(frozen=True)
class SingleProcessEnv(ClusterEnv):
    """No launcher: one process, no process group."""

    source: ClassVar[str] = "single process"
    binds_devices: ClassVar[bool] = False

    @property
    def distributed(self) -> bool:
        return False

    def describe(self) -> str:
        return "single process (no launcher): rank 0/1"

    @staticmethod
    def detect(environ: Environ) -> bool:
        return True

    @classmethod
    def from_environ(cls, environ: Environ) -> SingleProcessEnv:
        _refuse_partial_launch(environ)
        return cls()


@dataclass(frozen=True)
class TorchrunEnv(ClusterEnv):
    """torchrun / torch.distributed.run / torchelastic."""

    source: ClassVar[str] = "torchrun"
    binds_devices: ClassVar[bool] = False
    variables: ClassVar[str] = "RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK"
    REQUIRED: ClassVar[tuple[str, ...]] = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")

    @staticmethod
    def detect(environ: Environ) -> bool:
        return all(name in environ for name in TorchrunEnv.REQUIRED)

    @classmethod
    def from_environ(cls, environ: Environ) -> TorchrunEnv:
        read = _IntReader(environ, cls.source)
        return cls(
            rank=read("RANK"),
            local_rank=read("LOCAL_RANK"),
            world_size=read("WORLD_SIZE"),
            local_world_size=read("LOCAL_WORLD_SIZE"),
            node_rank=read("GROUP_RANK", 0),
            master_addr=_torchrun_master(environ, read),
            master_port=read("MASTER_PORT", DEFAULT_MASTER_PORT),
            agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            restart_count=read("TORCHELASTIC_RESTART_COUNT", 0),
        )


@dataclass(frozen=True)
class SlurmEnv(ClusterEnv):
    """Tasks started by ``srun`` (one task per GPU/rank).

    Not detected in an interactive allocation's shell (``srun --pty bash``: ``SLURM_JOB_NAME`` is
    ``bash`` or ``interactive``) where ranks were set by hand (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` or ``MASTER_IP``): that shell is one Slurm task, but the processes started
    from it are a hand launch (Lightning's rule). The master is the first node of the *step*
    (``SLURM_STEP_NODELIST``), which differs from the job's when ``srun -w`` runs on part of it.
    """

    source: ClassVar[str] = "Slurm"
    variables: ClassVar[str] = "SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_TASKS_PER_NODE"

    @staticmethod
    def detect(environ: Environ) -> bool:
        if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
            return False
        return not (slurm_interactive(environ) and any(name in environ for name in HAND_SET))

    @classmethod
    def from_environ(cls, environ: Environ) -> SlurmEnv:
        read = _IntReader(environ, cls.source)
        node_rank = read("SLURM_NODEID", 0)
        return cls(
            rank=read("SLURM_PROCID"),
            local_rank=read("SLURM_LOCALID", 0),
            world_size=read("SLURM_NTASKS"),
            local_world_size=_slurm_local_world_size(environ, node_rank, read),
            node_rank=node_rank,
            master_addr=environ.get("MASTER_ADDR") or _slurm_first_host(environ),
            master_port=read("MASTER_PORT", _slurm_port(environ)),
        )


@dataclass(frozen=True)
class ManualEnv(ClusterEnv):
    """Hand-set ``RANK`` and ``WORLD_SIZE`` with ``MASTER_IP`` or ``MASTER_ADDR``.

    Without ``LOCAL_RANK`` (the seed scripts' style) it is one rank per machine. With
    ``LOCAL_RANK`` but no ``LOCAL_WORLD_SIZE`` (older ``torch.distributed.launch`` and hand-written
    launchers) the local world size is unknown: it is taken as the world size on every rank, so
    every rank makes the same backend choice (gloo unless there is a GPU per rank of the whole job;
    ask for ``dist.backend=nccl`` explicitly) and CPU threads are never oversubscribed.
    A world larger than one without a master address is refused, never trained alone.
    """

    source: ClassVar[str] = "manual"
    variables: ClassVar[str] = "MASTER_IP/MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE[, LOCAL_RANK]"

    @staticmethod
    def detect(environ: Environ) -> bool:
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return False
        has_master = bool(environ.get("MASTER_IP") or environ.get("MASTER_ADDR"))
        alone = environ["RANK"].strip() == "0" and environ["WORLD_SIZE"].strip() == "1"
        return has_master or not alone  # RANK=0 WORLD_SIZE=1 and no master: one process, no group

    @classmethod
    def from_environ(cls, environ: Environ) -> ManualEnv:
        read = _IntReader(environ, cls.source)
        rank, world = read("RANK"), read("WORLD_SIZE")
        master = _manual_master(environ, rank, world)
        if "LOCAL_RANK" in environ:
            local_rank = read("LOCAL_RANK")
            local_world = read("LOCAL_WORLD_SIZE", world)  # unknown: the same guess on every rank
            node_rank = read("GROUP_RANK", read("NODE_RANK", 0))
        else:
            local_rank, local_world, node_rank = 0, 1, rank
        return cls(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                   node_rank=node_rank, master_addr=master, master_port=read("MASTER_PORT", DEFAULT_MASTER_PORT))


PROBE_ORDER: tuple[type[ClusterEnv], ...] = (TorchrunEnv, SlurmEnv, ManualEnv, SingleProcessEnv)


def detect_environment(environ: Environ | None = None) -> ClusterEnv:
    """Return the first matching environment of ``PROBE_ORDER``, validated."""
    environ = os.environ if environ is None else environ
    for env_class in PROBE_ORDER:
        if env_class.detect(environ):
            return env_class.from_environ(environ).validate()
    raise AssertionError("SingleProcessEnv always matches")  # pragma: no cover


class _IntReader:
    """Reads integer variables, naming the variable and launcher when one is malformed."""

    _MISSING = object()

    def __init__(self, environ: Environ, source: str) -> None:
        self.environ, self.source = environ, source

    def __call__(self, name: str, default: object = _MISSING) -> int:
        raw = self.environ.get(name)
        if raw is None or raw == "":
            if default is self._MISSING:
                raise ClusterEnvError(
                    f"{self.source} environment: {name} is not set.",
                    f"launch with the {self.source} launcher, or set {name}",
                )
            return int(default)  # type: ignore[arg-type]
        try:
            return int(raw.strip())
        except ValueError:
            raise ClusterEnvError(
                f"{self.source} environment: {name}={raw!r} is not an integer.",
                f"unset {name} or give it a whole number",
            ) from None


def launcher_rank() -> int:
    """This process's rank as the launcher's variables say, or 0 when they are the problem (for
    saying an error once, before any process group)."""
    try:
        return detect_environment().rank
    except ClusterEnvError:
        return 0


# --- restarts and requeues ---------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """The launch this process belongs to and how often it was started again: what a restarted or
    requeued job needs to find the version it was training (``ddp.lifecycle.decision``).

    ``job`` stays the same across torchrun's restarts and Slurm's requeues: ``SLURM_JOB_ID`` (an
    array task has its own) and torchrun's run id (``--rdzv-id``; ``--standalone`` makes a fresh
    one per command; the static rendezvous's ``none`` is told apart by its address). Empty outside
    a launcher that restarts."""

    job: str = ""
    torchrun_restarts: int = 0  # TORCHELASTIC_RESTART_COUNT: torchrun --max-restarts
    slurm_requeues: int = 0  # SLURM_RESTART_COUNT: scontrol requeue, a preemption's requeue

    @property
    def restarted(self) -> bool:
        """True when this job ran before: a torchrun restart or a Slurm requeue."""
        return bool(self.job) and (self.torchrun_restarts > 0 or self.slurm_requeues > 0)

    def describe(self) -> str:
        """E.g. "torchrun restart 2 of Slurm job 812, torchrun run 812"."""
        again = [f"{what} {n}" for what, n in (("torchrun restart", self.torchrun_restarts),
                                                ("Slurm requeue", self.slurm_requeues)) if n]
        return f"{' and '.join(again) or 'first start'} of {self.job}"


def job_attempt(environ: Environ | None = None) -> Attempt:
    """This process's ``Attempt``, from Slurm's and torchrun's variables."""
    environ = os.environ if environ is None else environ
    parts = []
    if environ.get("SLURM_JOB_ID"):
        parts.append(f"Slurm job {environ['SLURM_JOB_ID'].strip()}")
    run_id = (environ.get("TORCHELASTIC_RUN_ID") or "").strip()
    if run_id and run_id != "none":
        parts.append(f"torchrun run {run_id}")
    elif run_id:
        parts.append(f"torchrun at {environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')}")
    return Attempt(job=", ".join(parts),
                   torchrun_restarts=_IntReader(environ, TorchrunEnv.source)("TORCHELASTIC_RESTART_COUNT", 0),
                   slurm_requeues=_IntReader(environ, SlurmEnv.source)("SLURM_RESTART_COUNT", 0))


INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # what `srun --pty bash` / `salloc` jobs are called
HAND_SET = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_IP")
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")  # step first


def slurm_interactive(environ: Environ | None = None) -> bool:
    """True inside an interactive Slurm allocation (``SLURM_JOB_NAME`` bash or interactive)."""
    environ = os.environ if environ is None else environ
    return "SLURM_JOB_ID" in environ and environ.get("SLURM_JOB_NAME", "") in INTERACTIVE_JOB_NAMES


def _slurm_first_host(environ: Environ) -> str:
    """First host of the step's node list (else the job's), read without expanding the list."""
    name = next((name for name in NODELIST_VARIABLES if environ.get(name)), None)
    if name is None:
        return "127.0.0.1"
    try:
        return first_host(environ[name])
    except ValueError as err:
        raise ClusterEnvError(
            f"Slurm environment: cannot read {name}={environ[name]!r} ({err}).",
            f"fix or unset {name}, or set MASTER_ADDR to the first node's address",
        ) from None


def _slurm_port(environ: Environ) -> int:
    return slurm_master_port(environ.get("SLURM_JOB_ID", ""))


def slurm_master_port(job_id: object) -> int:
    """The rendezvous port of a Slurm job: 15000 + the job id's last four digits (Lightning's rule),
    so two jobs sharing a node rarely collide; 29500 without a job id. Every Slurm path uses it:
    srun tasks, ``slurm.job`` on submitit's local executor, ``train.sbatch``."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit())[-4:]
    return SLURM_PORT_BASE + int(digits) if digits else DEFAULT_MASTER_PORT


def _slurm_local_world_size(environ: Environ, node_rank: int, read: _IntReader) -> int:
    if environ.get("SLURM_NTASKS_PER_NODE"):
        return read("SLURM_NTASKS_PER_NODE")
    name = "SLURM_STEP_TASKS_PER_NODE" if environ.get("SLURM_STEP_TASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
    spec = environ.get(name)
    if not spec:
        return read("SLURM_NTASKS")
    try:
        counts = expand_tasks_per_node(spec)
    except ValueError as err:
        raise ClusterEnvError(
            f"Slurm environment: cannot read {name}={spec!r} ({err}).",
            "launch with --ntasks-per-node",
        ) from None
    if node_rank >= len(counts):
        raise ClusterEnvError(
            f"Slurm environment: SLURM_NODEID={node_rank} but SLURM_TASKS_PER_NODE={spec!r} "
            f"lists {len(counts)} nodes.",
            "launch the step with srun inside the allocation",
        )
    return counts[node_rank]


def _manual_master(environ: Environ, rank: int, world: int) -> str:
    master_ip, master_addr = environ.get("MASTER_IP"), environ.get("MASTER_ADDR")
    if master_ip and master_addr and master_ip != master_addr:
        raise ClusterEnvError(
            f"manual environment: MASTER_IP={master_ip!r} and MASTER_ADDR={master_addr!r} disagree.",
            "set only one of them",
        )
    if not (master_ip or master_addr) and world > 1:
        raise ClusterEnvError(
            f"RANK={rank} and WORLD_SIZE={world} are set but neither MASTER_ADDR nor MASTER_IP is: "
            "this process cannot find its peers.",
            "export MASTER_ADDR=<rank 0's address> (and MASTER_PORT) on every machine, or unset RANK and "
            "WORLD_SIZE to train in one process",
        )
    return master_ip or master_addr or "127.0.0.1"


def _torchrun_master(environ: Environ, read: _IntReader) -> str:
    """torchrun always exports MASTER_ADDR; hand-set variables may not. Loopback is only right when
    every rank runs on this machine."""
    master = environ.get("MASTER_ADDR")
    if master:
        return master
    if read("LOCAL_WORLD_SIZE") < read("WORLD_SIZE"):
        raise ClusterEnvError(
            f"WORLD_SIZE={environ['WORLD_SIZE']} but LOCAL_WORLD_SIZE={environ['LOCAL_WORLD_SIZE']}: ranks run on "
            "other machines, and MASTER_ADDR is not set.",
            "export MASTER_ADDR=<node 0's address> and MASTER_PORT on every machine (torchrun sets them itself)",
        )
    return "127.0.0.1"


# Variables that say "you are one rank of several" on their own. If SingleProcessEnv would match
# while one of these says the world is larger than one, the launch is incomplete: refuse.
_PARTIAL_LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _refuse_partial_launch(environ: Environ) -> None:
    """Called when no launcher matched: train alone only if no variable says otherwise."""
    present = {name: environ[name] for name in _PARTIAL_LAUNCH if name in environ}
    says_more = {name: value for name, value in present.items()
                 if value.strip() not in ({"0", ""} if "RANK" in name else {"1", ""})}
    if not says_more:
        return
    shown = " ".join(f"{name}={value}" for name, value in present.items())
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
    raise ClusterEnvError(
        f"{shown} say this is one rank of several, but {' and '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not set: refusing to train alone.",
        "set RANK, WORLD_SIZE and MASTER_ADDR on every process (or launch with torchrun / python -m launch "
        "node), or unset them to train in one process",
    )


# --- variables this library sets -------------------------------------------------------------

def plan_variables(wanted: Mapping[str, str], why: str, environ: Environ | None = None
                   ) -> tuple[dict[str, str], list[str]]:
    """(the variables to set, one log line per wanted variable). A variable already set is kept
    and its line says so: the user's choice always wins, never silently."""
    environ = os.environ if environ is None else environ
    to_set, lines = {}, []
    for name, value in wanted.items():
        current = environ.get(name)
        if current is None or current == "":
            to_set[name] = value
            lines.append(f"set {name}={value} ({why})")
        elif current == value:
            lines.append(f"kept {name}={current} (already set, same as ours)")
        else:
            lines.append(f"kept {name}={current} (set by you; ours would be {value}: {why})")
    return to_set, lines


EXIT_CODES = "DDP_EXIT_CODES"


def environment_value(name: str) -> str | None:
    """One variable of this process's environment (None or '' when unset)."""
    return os.environ.get(name)


def exit_code_file() -> Path | None:
    """Where this process writes its exit code when a wrapper asked for it with ``DDP_EXIT_CODES``
    (a directory; one file per process): ``slurm/train.sbatch`` requeues only when the ranks
    stopped to checkpoint (75), which torchrun's own exit code after a signal (1) does not say."""
    directory = environment_value(EXIT_CODES)
    return Path(directory) / str(os.getpid()) if directory else None


def export_variables(wanted: Mapping[str, str], why: str) -> list[str]:
    """Set ``wanted`` in this process's environment where unset; return the log lines."""
    to_set, lines = plan_variables(wanted, why)
    os.environ.update(to_set)
    return lines


# --- other facts about this process's surroundings -------------------------------------------


def available_cpus() -> int:
    """CPU cores this process may run on (affinity and cgroup cpusets respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def child_environ(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus ``extra``: for a program started on this rank's behalf."""
    return {**os.environ, **extra}


def torch_variables(env: ClusterEnv) -> dict[str, str]:
    """The variables torchrun would give a worker in ``env``'s place (for a user's own program)."""
    return {"RANK": str(env.rank), "LOCAL_RANK": str(env.local_rank), "WORLD_SIZE": str(env.world_size),
            "LOCAL_WORLD_SIZE": str(env.local_world_size), "GROUP_RANK": str(env.node_rank),
            "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)}


def hostname() -> str:
    """Short host name for log records."""
    return socket.gethostname().split(".")[0]




def cuda_visible_devices(environ: Environ | None = None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as the CUDA runtime reads it: the entries before the first invalid
    one (an index, ``GPU-<uuid>`` or ``MIG-<uuid>``), so ``"2,-1,3"`` is ``["2"]`` and ``""`` or
    ``"-1"`` hide every GPU. None when the variable is unset (every GPU is visible)."""
    environ = os.environ if environ is None else environ
    raw = environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    entries = []
    for entry in (part.strip() for part in raw.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        entries.append(entry)
    return entries
