"""Which network interface reaches the master: the one Gloo and NCCL must use.

Gloo takes its own address from the host name unless ``GLOO_SOCKET_IFNAME`` is set, and
Debian-style ``/etc/hosts`` maps the host name to 127.0.1.1 (network namespaces and many containers:
127.0.0.1). Peers on other machines are then told to connect to loopback and the job fails with
"Gloo connectFullMesh failed". The fix is to name the interface whose route reaches the master.

How: ``connect()`` a UDP socket to the master (no packet is sent: UDP connect only asks the kernel
for a route and fixes the source address), read the source address the kernel chose, and find the
interface holding it (``psutil.net_if_addrs``). On the master itself the source is the master's
own address, so the answer is the interface holding that address.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import psutil

from ddp.errors import DDPError


class NetworkError(DDPError):
    """The master address cannot be resolved or routed to."""

    exit_code = 2


@dataclass(frozen=True)
class Route:
    """How this machine reaches ``master``: resolved address, source address and interface."""

    master: str  # as given (a name or an address)
    master_ip: str  # resolved
    source_ip: str  # the address this machine uses to reach it
    interface: str  # the interface holding source_ip
    local: bool  # master_ip is an address of this machine

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.master_ip).is_loopback or \
            ipaddress.ip_address(self.source_ip).is_loopback

    def describe(self) -> str:
        where = "this machine" if self.local else f"from {self.source_ip}"
        name = self.master if self.master == self.master_ip else f"{self.master} ({self.master_ip})"
        return f"{name} via {self.interface} ({where})"


def resolve(host: str) -> str:
    """The address ``host`` resolves to (IPv4 preferred, like torch's TCPStore)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise NetworkError(f"the master address {host!r} does not resolve on this machine ({err}).",
                           "use node 0's IP address, or a name every node can resolve (/etc/hosts or DNS)") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][4][0]


def source_address(ip: str) -> str:
    """The local address the kernel would use to reach ``ip``. Sends nothing (UDP connect)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((ip, 9))  # port is irrelevant: no datagram is sent
        except OSError as err:
            raise NetworkError(f"no route from this machine to the master address {ip} ({err.strerror}).",
                               "check the address: it must be node 0's address on a network every node "
                               "shares (ip route get " + ip + ")") from None
        return probe.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The interface holding ``address``, or None."""
    for name, addresses in psutil.net_if_addrs().items():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6) and entry.address.split("%")[0] == address:
                return name
    return None


def route_to(master: str) -> Route:
    """Resolve ``master`` and name the interface this machine reaches it through."""
    master_ip = resolve(master)
    source = source_address(master_ip)
    interface = interface_of(source)
    if interface is None:
        raise NetworkError(f"the route to {master} ({master_ip}) leaves from {source}, which no interface holds.",
                           "set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface of the nodes' network")
    return Route(master=master, master_ip=master_ip, source_ip=source, interface=interface,
                 local=interface_of(master_ip) is not None or ipaddress.ip_address(master_ip).is_loopback)


def interfaces() -> dict[str, list[str]]:
    """Every interface with its IPv4/IPv6 addresses (for ``python -m launch doctor``)."""
    return {name: [entry.address.split("%")[0] for entry in addresses
                   if entry.family in (socket.AF_INET, socket.AF_INET6)]
            for name, addresses in psutil.net_if_addrs().items()}


def nccl_interface_line(current: str | None, master_route: str) -> str:
    """What NCCL will use, for the log."""
    if current:
        return f"kept NCCL_SOCKET_IFNAME={current} (set by you)"
    return (f"NCCL_SOCKET_IFNAME unset: NCCL chooses its interfaces itself (the master's route is "
            f"{master_route}; export NCCL_SOCKET_IFNAME={master_route} to force it)")
