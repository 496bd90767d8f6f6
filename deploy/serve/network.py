"""Ports and addresses: free ports, port checks before anything starts, loopback, and Ray on loopback.

`moray serve` listens only where it is told: HTTP and gRPC on `ServerConfig.host` (127.0.0.1 by
default), and in local mode the Ray cluster it starts on 127.0.0.1 as well (`ray_on_loopback`).
"""

from __future__ import annotations

import ipaddress
import os
import socket

# Ray's switch for single-machine clusters (what it uses on macOS and Windows): with clusters off, the
# node address is 127.0.0.1 and every Ray listener binds it. Read at import into `ray_constants`.
RAY_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class PortInUseError(OSError):
    """A port moray would listen on is taken; the message names the port, the host and why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(host: str, port: int, what: str) -> None:
    """Raise `PortInUseError` unless `port` can be bound on `host` (SO_REUSEADDR, as servers bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUseError(f"{what} port {port} on {host} is not free ({e.strerror})") from None


def is_loopback(host: str) -> bool:
    """True when `host` (an address or a name) reaches only this machine: 127.0.0.0/8, ::1, localhost."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback
                               for info in infos)


def url_host(host: str) -> str:
    """`host` as it goes into a URL or a gRPC target (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def ray_on_loopback() -> None:
    """Make Ray in this process (and the processes it starts) use 127.0.0.1 as the node address.

    A local cluster started afterwards binds its GCS, raylet, workers, agents and dashboard on
    loopback only; a driver joining a cluster that runs so must do the same (else Ray swaps a
    127.0.0.1 address for this machine's network address and cannot reach it). Ray reads the switch
    when imported, so the module constant is set too.
    """
    os.environ[RAY_CLUSTERS_ENV] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def join_address(address: str | None) -> str:
    """The Ray address a driver joins: `address`, else $RAY_ADDRESS, else "auto" (the cluster this
    machine started last); when that cluster is on loopback, this process switches to loopback too."""
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    target = address
    if target == "auto":
        from ray._private.utils import read_ray_address

        target = read_ray_address() or ""
    host = target.removeprefix("ray://").rpartition(":")[0]
    if host and is_loopback(host):
        ray_on_loopback()
    return address
