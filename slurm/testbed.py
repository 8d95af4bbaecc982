"""``python -m slurm.testbed start [--nodes 2]|stop|status``: a real Slurm cluster on this machine.

munged, MariaDB, slurmdbd (accounting: submitit reads job states through ``sacct``), slurmctld and
one slurmd named ``localhost`` with partition ``debug``, from Debian packages that ``start``
installs when missing (root only). With ``--nodes 2`` the partition holds two nodes, ``h0`` and
``h1``: each is a network namespace with its own address (10.98.0.1 and .2, on a bridge that has no
route out of this machine), hostname and ``/etc/hosts``, running its own slurmd, so a job's ranks
on the two nodes talk over a network as on a real cluster; their files are shared as on a cluster
with a shared filesystem. A change of node count is a fresh start. ``start`` is idempotent: running daemons are left alone and
restarted only when the generated config changed; a cold start wipes the previous state.
Daemons are stopped by the pids in their pid files, never by name. Config, state, logs and the
database live under ``DIR`` (``DDP_SLURM_TESTBED_DIR``); clients find the cluster through the
``/etc/slurm/slurm.conf`` symlink the start script makes.

The work is done by ``testbed_scripts/start.sh`` and ``stop.sh`` (shell: package installs and
daemons are shell's home ground); this module runs them and reports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "testbed_scripts"
DIR = Path("/var/tmp/ddp-slurm-testbed")
PARTITION = "debug"
DAEMONS = (("munged", Path("/run/munge/munged.pid")), ("mariadbd", DIR / "mysql" / "mysqld.pid"),
           ("slurmdbd", DIR / "slurmdbd.pid"), ("slurmctld", DIR / "slurmctld.pid"))
NODE_NAMES = {1: ("localhost",), 2: ("h0", "h1")}


def start(fresh: bool = False, quiet: bool = False, nodes: int = 1) -> float:
    """Start (or keep) a cluster of ``nodes`` nodes and wait until they are idle; return the seconds it took."""
    _require_root("start")
    began = time.monotonic()
    _run_script("start.sh", [*(["--fresh"] if fresh else []), "--nodes", str(nodes)], quiet)
    return time.monotonic() - began


def node_count() -> int:
    """How many nodes the testbed was last started with (1 when it never was)."""
    try:
        return int((DIR / "nodes").read_text().strip())
    except (OSError, ValueError):
        return 1


def daemons() -> tuple[tuple[str, Path], ...]:
    """Each daemon of the testbed as it was started, with its pid file."""
    nodes = node_count()
    slurmds = ((f"slurmd {name}", DIR / f"slurmd-{name}.pid") for name in NODE_NAMES[nodes]) if nodes > 1 \
        else (("slurmd", DIR / "slurmd.pid"),)
    return (*DAEMONS, *slurmds)


def stop(purge: bool = False, quiet: bool = False) -> None:
    """Cancel the cluster's jobs and stop its daemons by their pid files."""
    _require_root("stop")
    _run_script("stop.sh", ["--purge"] if purge else [], quiet)


def namespace(node: str) -> str:
    """The network namespace that is node ``node`` (h0, h1) of the two-node testbed."""
    return f"ddp-slurm-{node}"


def lose_node(node: str) -> None:
    """Make node ``node`` of the two-node testbed a lost machine: its link goes down, then every process on it
    (its slurmd, job steps and ranks) is SIGKILLed, so the other node hears nothing more from it, as after a power
    or network failure. ``start(nodes=2)`` brings it back."""
    _require_root("lose a node")
    name = namespace(node)
    subprocess.run(["ip", "-n", name, "link", "set", "eth0", "down"], check=True, timeout=30)
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=True, timeout=30)
    for pid in pids.stdout.split():
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass


def running() -> dict[str, int | None]:
    """Each daemon's pid when its pid file names a live process of that name, else None."""
    return {name: _live_pid(pid_file, name.split()[0]) for name, pid_file in daemons()}


def is_up(nodes: int | None = None) -> bool:
    """True when every daemon runs and slurmctld answers (and, given ``nodes``, the testbed has that many)."""
    if nodes is not None and node_count() != nodes:
        return False
    if not all(running().values()) or shutil.which("scontrol") is None:
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=10).returncode == 0


def _live_pid(pid_file: Path, name: str) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm == name and state != "Z" else None


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise SystemExit(f"error: 'python -m slurm.testbed {what}' needs root (it installs packages and starts "
                         "daemons). HINT: run it with sudo, or point slurm.submit at a real cluster")


def _run_script(name: str, args: list[str], quiet: bool) -> None:
    env = {"DDP_SLURM_TESTBED_DIR": str(DIR), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    out = subprocess.DEVNULL if quiet else None
    done = subprocess.run(["bash", str(SCRIPTS / name), *args], env=env, stdout=out, stderr=subprocess.PIPE,
                          text=True, timeout=900)
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise SystemExit(f"error: testbed {name.removesuffix('.sh')} failed: {detail}. HINT: logs are in {DIR}/log")
    if not quiet and done.stderr:
        sys.stderr.write(done.stderr)


def status_lines() -> list[str]:
    lines = [f"{name}: {'pid ' + str(pid) if pid else 'not running'}" for name, pid in running().items()]
    if is_up():
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%P %D %c %T"], capture_output=True, text=True, timeout=10)
        lines.append(f"sinfo: {sinfo.stdout.strip()}")
    lines.append(f"state: {DIR}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.testbed", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--fresh", action="store_true", help="start: wipe jobs, accounting and logs first")
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                        help="start: 1 node (localhost), or 2 nodes (h0, h1) in network namespaces")
    parser.add_argument("--purge", action="store_true", help="stop: also delete the state directory")
    args = parser.parse_args(argv)
    if args.command == "start":
        seconds = start(args.fresh, nodes=args.nodes)
        names = ", ".join(NODE_NAMES[args.nodes])
        print(f"testbed up in {seconds:.1f} s; partition '{PARTITION}': {names}; state in {DIR}")
    elif args.command == "stop":
        stop(args.purge)
    else:
        print("\n".join(status_lines()))
        return 0 if is_up() else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
