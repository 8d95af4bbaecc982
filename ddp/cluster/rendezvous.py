"""Before the process group forms: the right network interface, a roll call that says who is
missing while it waits, and one recipe for every rank.

``init_process_group`` waits silently for up to ``dist.timeout_s`` when a peer is missing, and two
machines started with different recipes only fail later inside Gloo ("collective mismatch"). Here
every rank checks in under ``join/<rank>`` in the rendezvous store; while some are missing, each
waiting rank logs every ``WAIT_LOG_S`` seconds which ranks joined, which are missing and at which
address it waits. Then rank 0 publishes its resolved recipe and every other rank compares its own,
so a mismatch is refused on every rank with the differing keys named, before any collective.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

from ddp.cluster.environment import ClusterEnv, environment_value, export_variables, hostname
from ddp.config import Recipe, flat, per_machine, to_yaml
from ddp.errors import BackendError, ConfigError, DDPError
from ddp.cluster.network import NetworkError, nccl_interface_line, route_to

log = logging.getLogger(__name__)

FIRST_LOG_S = 2.0  # a normal start takes less; a longer wait is worth a line
WAIT_LOG_S = 5.0
POLL_S = 0.05
VERDICT_WAIT_S = 5.0


class RecipeMismatch(ConfigError):
    """Ranks were started with different recipes. Every rank says so (they may be on different
    machines, each with its own console), unlike other refusals, which rank 0 says once."""

    said_by_every_rank = True


class GpuShared(BackendError):
    """Two ranks would share one GPU under NCCL (exit 2, said once by rank 0)."""


class RendezvousTimeout(DDPError):
    """Some ranks never joined within ``dist.timeout_s``."""

    exit_code = 1


def choose_interface(env: ClusterEnv, backend: str = "gloo") -> list[str]:
    """Export GLOO_SOCKET_IFNAME (unless set) when peers run on other machines.

    Call before the process group forms, on every rank. Returns the log lines (what was set or
    kept). Gloo takes its address from the host name, which often resolves to loopback, so it
    needs the interface that routes to the master. NCCL is left to choose its own interfaces
    (InfiniBand first, then every interface but loopback and docker, per NCCL's documentation):
    forcing the master's route could put its traffic on a management network of a multi-NIC
    cluster. A NCCL_SOCKET_IFNAME the user set is kept and said. When every rank runs on this
    machine nothing is needed and nothing is set.
    """
    if env.world_size <= env.local_world_size:
        return []
    try:
        route = route_to(env.master_addr)
    except NetworkError as err:
        raise NetworkError(f"{env.source} environment: {err.problem}", err.hint) from None
    why = f"the route to the master {route.describe()}"
    lines = export_variables({"GLOO_SOCKET_IFNAME": route.interface}, why)
    if backend == "nccl":
        lines.append(nccl_interface_line(environment_value("NCCL_SOCKET_IFNAME"), route.interface))
    return lines


def check_gpus(store: dist.Store, env: ClusterEnv, gpu: str, timeout_s: float) -> None:
    """All ranks must call under NCCL (after ``gather``). Every rank publishes its host and GPU; when
    two ranks hold the same GPU, every rank refuses with ``GpuShared`` naming them, before the NCCL
    group forms (NCCL cannot run two ranks on one GPU: it fails with "Duplicate GPU detected")."""
    store.set(f"gpu/{env.rank}", f"{hostname()}\t{gpu}")
    keys = [f"gpu/{rank}" for rank in range(env.world_size)]
    store.wait(keys, timedelta(seconds=timeout_s))
    table = [tuple(store.get(key).decode().split("\t", 1)) for key in keys]
    store.add("gpu_read", 1)
    shared = shared_gpus(table)  # type: ignore[arg-type]
    if not shared:
        return
    if env.rank == 0:  # rank 0 may serve the store: let the others read the table first
        _wait_for_count(store, "gpu_read", env.world_size, VERDICT_WAIT_S)
    gpu_name, ranks = next(iter(shared.items()))
    host = table[ranks[0]][0]
    raise GpuShared(
        f"ranks {_ranks(ranks)} on {host} share GPU {gpu_name}: NCCL cannot run two ranks on one GPU"
        + (f" ({len(shared) - 1} more GPU(s) shared likewise)." if len(shared) > 1 else "."),
        "give each rank its own GPU (srun --gpus-per-task=1, or one rank per GPU per machine), or use "
        "dist.backend=gloo to train on the CPU")


def shared_gpus(table: list[tuple[str, str]]) -> dict[str, list[int]]:
    """{GPU: ranks} for every GPU that more than one rank holds. ``table[rank]`` is (host, GPU); a
    UUID names one GPU anywhere, an index only on its host."""
    holders: dict[str, list[int]] = {}
    for rank, (host, gpu) in enumerate(table):
        key = gpu if gpu.startswith(("GPU-", "MIG-")) else f"{gpu} of {host}"
        holders.setdefault(key, []).append(rank)
    return {gpu: ranks for gpu, ranks in holders.items() if len(ranks) > 1}


def connect(env: ClusterEnv, timeout: timedelta) -> dist.Store:
    """The TCPStore at master_addr:port (hosted by rank 0 unless torchrun's agent serves it),
    namespaced per restart attempt (``ClusterEnv.store_prefix``). Logs while the host is unreachable."""
    host = env.rank == 0 and not env.agent_store
    what = f"rank {env.rank}: reaching the rendezvous store at {env.master_addr}:{env.master_port} " \
           f"(served by {'this rank' if host else 'node 0'})"
    with _announce_while_waiting(what):
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=host,
                              timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(env.store_prefix, store)


def gather(store: dist.Store, env: ClusterEnv, timeout_s: float) -> None:
    """All ranks must call. Returns when every rank has checked in; logs who is missing meanwhile."""
    store.set(f"join/{env.rank}", f"{hostname()}\t{env.node_rank}")  # the heartbeat names hosts by it
    store.add("joined", 1)
    start = time.monotonic()
    next_log = start + FIRST_LOG_S
    while store.add("joined", 0) < env.world_size:  # one request per poll, whatever the world size
        waited = time.monotonic() - start
        if waited > timeout_s or time.monotonic() >= next_log:
            joined = [r for r in range(env.world_size) if store.check([f"join/{r}"])]
            missing = sorted(set(range(env.world_size)) - set(joined))
            if waited > timeout_s:
                raise RendezvousTimeout(
                    f"ranks {_ranks(missing)} of {env.world_size} never joined the rendezvous at "
                    f"{env.master_addr}:{env.master_port} within dist.timeout_s={timeout_s:.0f} s.",
                    "start every node with the same --nnodes/--master-addr/--master-port, and check the missing "
                    "nodes' logs and firewalls")
            log.warning("rank %d waiting %.0f s at %s:%d: joined %s, missing %s of %d", env.rank, waited,
                        env.master_addr, env.master_port, _ranks(joined), _ranks(missing), env.world_size)
            next_log += WAIT_LOG_S
        time.sleep(POLL_S)


def agree_on_recipe(store: dist.Store, env: ClusterEnv, recipe: Recipe, timeout_s: float) -> None:
    """All ranks must call (after ``gather``). Rank 0 publishes its recipe; a rank started with
    another one refuses naming the keys, and rank 0 refuses too. Raises ``RecipeMismatch`` (exit 2)."""
    timeout = timedelta(seconds=timeout_s)
    hint = "start every node with the same --recipe and key=value overrides"
    if env.rank == 0:
        store.set("recipe", to_yaml(recipe))  # serialised once, to cross to the other ranks
        verdicts = {}
        for other in range(1, env.world_size):
            store.wait([f"recipe_check/{other}"], timeout)
            verdicts[other] = store.get(f"recipe_check/{other}").decode()
        differing = {r: v for r, v in verdicts.items() if v}
        first = min(differing, default=None)
        problem = "" if first is None else (
            f"rank {_ranks(sorted(differing))} started with a different recipe than rank 0: "
            f"{differing[first]} (rank {first} vs rank 0).")
        store.set("recipe_verdict", problem)
        if problem:  # rank 0 may serve the store: let the agreeing ranks read the verdict first
            _wait_for_count(store, "recipe_verdict_read", env.world_size - 1 - len(differing), VERDICT_WAIT_S)
            raise RecipeMismatch(problem, hint)
        return
    store.wait(["recipe"], timeout)
    diff = recipe_differences(store.get("recipe").decode(), recipe)
    store.set(f"recipe_check/{env.rank}", diff)
    if diff:
        raise RecipeMismatch(f"this rank was started with a different recipe than rank 0: {diff} (here vs rank 0).", hint)
    store.wait(["recipe_verdict"], timeout)
    verdict = store.get("recipe_verdict").decode()
    store.add("recipe_verdict_read", 1)
    if verdict:  # another rank differs: nobody trains
        raise RecipeMismatch(verdict, hint)


def _wait_for_count(store: dist.Store, key: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < count and time.monotonic() < deadline:
        time.sleep(POLL_S)


def recipe_differences(theirs: str, ours: Recipe) -> str:
    """'' when rank 0's recipe (``theirs``, as YAML) equals ours, ignoring keys declared
    ``per_machine`` in ``ddp.config``; else 'key=ours≠theirs, ...' naming every key."""
    a, b = flat(ours), flat(theirs)
    keys = sorted(k for k in set(a) | set(b) if not per_machine(k) and a.get(k) != b.get(k))
    return ", ".join(f"{k}={a.get(k)!r}≠{b.get(k)!r}" for k in keys)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) if ranks else "none"


@contextmanager
def _announce_while_waiting(what: str) -> Iterator[None]:
    """Log ``what`` every ``WAIT_LOG_S`` seconds until the body returns (a blocking C++ call)."""
    done = threading.Event()
    start = time.monotonic()

    def announce() -> None:
        interval = FIRST_LOG_S
        while not done.wait(interval):
            interval = WAIT_LOG_S
            log.warning("%s: still waiting after %.0f s", what, time.monotonic() - start)

    thread = threading.Thread(target=announce, name="rendezvous-wait", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
