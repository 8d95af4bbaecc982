"""Checks ``launch node`` runs before any rank starts, so a network problem is one line within
seconds instead of a hang until the 300 s collective timeout.

* the master address resolves and is routable (``ddp.cluster.network.route_to``, done while planning);
* on the master (node 0): the address is one of this machine's, and the port is free — else the
  process holding it is named (``psutil.net_connections``);
* on a worker: the master's port accepts a TCP connection within ``--preflight-timeout``
  (retrying while node 0 starts).
A failure raises ``PreflightError`` (exit 2) naming the address, port, interface and the fix.
"""

from __future__ import annotations

import errno
import logging
import socket
import time

import psutil

from ddp.errors import DDPError
from ddp.cluster.network import Route

RETRY_S = 0.5


class PreflightError(DDPError):
    exit_code = 2


def check(route: Route, node_rank: int, port: int, timeout_s: float, log: logging.Logger) -> None:
    """Raise ``PreflightError`` when this node cannot take part; log what was checked."""
    if node_rank == 0:
        check_master(route, port)
        log.info("preflight: master %s, port %d is free", route.describe(), port)
    else:
        waited = check_reachable(route, port, timeout_s)
        log.info("preflight: master %s accepts TCP on port %d (after %.1f s)", route.describe(), port, waited)


def check_master(route: Route, port: int) -> None:
    """Node 0 must own the master address, and the port must be free."""
    if not route.local:
        raise PreflightError(
            f"--node-rank 0 is the master, but --master-addr {route.master} ({route.master_ip}) is not an address "
            f"of this machine (the route to it leaves via {route.interface}).",
            f"on node 0 pass one of its own addresses (e.g. {route.source_ip} on {route.interface}), or give "
            "this machine another --node-rank")
    holder = port_holder(port)
    if holder is not None:
        raise PreflightError(
            f"port {port} on {route.master_ip} ({route.interface}) is taken by {holder}.",
            f"stop that process, or pick another --master-port (the same on every node)")


def port_holder(port: int) -> str | None:
    """None when ``port`` can be listened on; else a description of who holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like TCPStore: TIME_WAIT is no obstacle
        try:
            probe.bind(("", port))
            return None
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                return f"the system ({err.strerror})"
    return _listener(port)


def _listener(port: int) -> str:
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return "another process (run as root to see which)"
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return _process(conn.pid)
    return "another process"


def _process(pid: int | None) -> str:
    if pid is None:
        return "another process (run as root to see which)"
    try:
        proc = psutil.Process(pid)
        command = " ".join(" ".join(proc.cmdline()).split())  # one line, even for python -c "..."
        return f"pid {pid} ({command[:120] or proc.name()})"
    except psutil.Error:
        return f"pid {pid}"


def check_reachable(route: Route, port: int, timeout_s: float) -> float:
    """Seconds until the master's port accepted a TCP connection; raises after ``timeout_s``."""
    start = time.monotonic()
    last = ""
    while True:
        try:
            with socket.create_connection((route.master_ip, port), timeout=min(2.0, max(timeout_s, 0.1))):
                return time.monotonic() - start
        except OSError as err:
            last = _reason(err)
        if time.monotonic() - start + RETRY_S > timeout_s:
            break
        time.sleep(RETRY_S)
    raise PreflightError(
        f"cannot reach the master at {route.master_ip}:{port} from {route.source_ip} ({route.interface}) within "
        f"{timeout_s:.0f} s: {last}.",
        "start node 0 first (python -m launch node --node-rank 0 ...), check --master-addr/--master-port, and "
        f"that node 0's firewall allows TCP {port} and the ranks' ports from this machine")


def _reason(err: OSError) -> str:
    if isinstance(err, socket.timeout) or err.errno == errno.ETIMEDOUT:
        return "no answer (a firewall dropping packets, or a wrong address)"
    if err.errno == errno.ECONNREFUSED:
        return "connection refused (nothing listens there yet)"
    if err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "host unreachable"
    return err.strerror or str(err)
