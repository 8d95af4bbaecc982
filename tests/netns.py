"""Two simulated hosts on one machine: network namespaces joined by a veth pair.

After ``/work/shared/notes/slurm-on-one-machine/two_hosts.sh``, as a context manager the tests use.

SAFETY: every process that sends traffic runs inside a namespace made here; the namespaces hold
only ``lo`` and one veth end (10.99.N.1 / 10.99.N.2, no default route), so no packet can leave the
machine. The test process in the root namespace never connects to a namespace address. Every
namespace and every process in it is removed on exit, also after a failure; namespaces a killed
run left behind (their creator's pid is gone) are removed at the next start.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "ddpt"  # namespace names: ddpt<creator pid>_<n>h<host>
IFNAME = "vnet0"  # the veth name inside both namespaces; deliberately not a root-namespace name
IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else (shutil.which("ip") or "ip")


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None (``require`` turns it into a skip or a failure)."""
    if not Path(IP).exists() and shutil.which("ip") is None:
        return "iproute2's `ip` is missing (apt-get install iproute2)"
    return None


def require() -> None:
    """Network-namespace tests run only when asked (``tests.harness.require_system``)."""
    from tests.harness import require_system

    require_system("network-namespace tests (ip netns add)", unavailable())


@dataclass
class TwoHosts:
    names: tuple[str, str]
    addresses: tuple[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def master(self) -> str:
        return self.addresses[0]

    def popen(self, host: int, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
        """Start ``argv`` inside host ``host``'s namespace; stdout+stderr go to ``log``."""
        out = open(log, "wb")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen([IP, "netns", "exec", self.names[host], *argv], env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def kill_host(self, host: int) -> None:
        """SIGKILL every process in host ``host`` (a machine that died)."""
        _kill_namespace(self.names[host], signal.SIGKILL)

    def cut_off(self, host: int) -> None:
        """Take host ``host``'s link down (a pulled cable, a partition): nothing is reset, packets vanish."""
        _run("-n", self.names[host], "link", "set", IFNAME, "down")


_counter = 0


@contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    global _counter
    _counter += 1
    _remove_stale()
    tag = f"{PREFIX}{os.getpid()}_{_counter}"
    names = (f"{tag}h0", f"{tag}h1")
    subnet = 20 + (os.getpid() * 7 + _counter) % 200
    hosts = TwoHosts(names, (f"10.99.{subnet}.1", f"10.99.{subnet}.2"))
    veth = f"d{os.getpid() % 100000}x{_counter % 100}"
    try:
        _create(hosts, veth)
        yield hosts
    finally:
        for proc in hosts.procs:
            if proc.poll() is None:
                proc.kill()
        for name in names:
            _delete(name)
        # only left in the root namespace when creation failed before moving it
        subprocess.run([IP, "link", "del", f"{veth}a"], capture_output=True, timeout=10)


def _run(*args: str) -> None:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")


def _create(hosts: TwoHosts, veth: str) -> None:
    for name in hosts.names:
        _run("netns", "add", name)
    _run("link", "add", f"{veth}a", "type", "veth", "peer", "name", f"{veth}b")
    for name, end, address in zip(hosts.names, ("a", "b"), hosts.addresses):
        _run("link", "set", f"{veth}{end}", "netns", name)
        _run("-n", name, "link", "set", f"{veth}{end}", "name", IFNAME)
        _run("-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
        _run("-n", name, "link", "set", "lo", "up")
        _run("-n", name, "link", "set", IFNAME, "up")
        routes = subprocess.run([IP, "-n", name, "route"], capture_output=True, text=True, timeout=10).stdout
        if "default" in routes:  # pragma: no cover - a fresh namespace has none
            raise RuntimeError(f"namespace {name} has a default route: refusing to run network tests")


def _kill_namespace(name: str, sig: signal.Signals) -> None:
    pids = subprocess.run([IP, "netns", "pids", name], capture_output=True, text=True, timeout=10).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), sig)
        except ProcessLookupError:
            pass


def _delete(name: str) -> None:
    if not Path("/run/netns", name).exists():
        return
    _kill_namespace(name, signal.SIGKILL)
    time.sleep(0.1)
    subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=10)


def _remove_stale() -> None:
    """Namespaces of ours whose creating process is gone (a run killed before its teardown)."""
    for path in Path("/run/netns").glob(f"{PREFIX}*") if Path("/run/netns").exists() else []:
        pid = path.name[len(PREFIX):].split("_")[0]
        if pid.isdigit() and not Path("/proc", pid).exists():
            _delete(path.name)
