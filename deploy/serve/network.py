"""Ports and addresses: free ports, port checks before anything starts, loopback, and Ray on loopback.

`moray serve` listens only where it is told: HTTP and gRPC on `ServerConfig.host` (127.0.0.1 by
default), and in local mode the Ray cluster it starts on 127.0.0.1 as well (`ray_on_loopback`), which
it records for second drivers (`record_local_cluster`): `join_address` reads that record, and what
Ray's "auto" would find, to run a second driver's Ray on loopback too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Ray's switch for single-machine clusters (what it uses on macOS and Windows): with clusters off, the
# node address is 127.0.0.1 and every Ray listener binds it. Read at import into `ray_constants`.
RAY_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Where a local `moray serve` records its Ray: beside Ray's own `ray_current_cluster`, which Ray writes
# for `ray start` clusters only (a `ray.init()` cluster is found by scanning for its GCS process).
LOCAL_CLUSTER_FILE = "moray_current_cluster.json"


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


@dataclass(frozen=True)
class LocalCluster:
    """Where the Ray cluster a local `moray serve` started listens, as it records it for second drivers."""

    gcs_address: str  # host:port
    loopback: bool  # its listeners bind 127.0.0.1 only: a driver joining it must run Ray on loopback too
    pid: int  # the `moray serve` process (only it removes the record)
    session_dir: str = ""  # Ray's session directory (logs)


def local_cluster_file() -> Path:
    """The record's path: in Ray's temp directory ($RAY_TMPDIR, else $TMPDIR, else /tmp, then `ray/`)."""
    from ray._common.utils import get_default_ray_temp_dir

    return Path(get_default_ray_temp_dir()) / LOCAL_CLUSTER_FILE


def record_local_cluster(gcs_address: str, session_dir: str = "") -> Path:
    """Record (atomically, replacing another server's record) this process's local Ray at `gcs_address`."""
    host = gcs_address.rpartition(":")[0]
    record = LocalCluster(gcs_address, is_loopback(host), os.getpid(), session_dir)
    path = local_cluster_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(asdict(record)) + "\n")
    os.replace(partial, path)
    return path


def forget_local_cluster() -> None:
    """Remove the record if this process wrote it (a server started later keeps its own)."""
    path = local_cluster_file()
    record = _load_record(path)
    if record is not None and record.pid == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def read_local_cluster() -> LocalCluster | None:
    """The recorded local cluster, if there is a record and its GCS port accepts connections (a server
    killed before it could remove its record leaves a stale one)."""
    record = _load_record(local_cluster_file())
    if record is None:
        return None
    try:
        check_reachable(record.gcs_address, timeout_s=2.0)
    except ClusterUnreachableError:
        log.debug("ignoring the stale record of a local Ray at %s", record.gcs_address)
        return None
    return record


def _load_record(path: Path) -> LocalCluster | None:
    try:
        body = json.loads(path.read_text())
        return LocalCluster(str(body["gcs_address"]), bool(body["loopback"]), int(body["pid"]),
                            str(body.get("session_dir", "")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring an unreadable record of a local Ray at %s: %s", path, e)
        return None


def ray_auto_address() -> str:
    """The GCS address Ray's "auto" dials, as Ray finds it before it swaps a loopback host for this
    machine's network address: the cluster in its address file (`ray start`), or a GCS process it sees
    (a `ray.init()` cluster; any one of them when it sees several). "": none found."""
    from ray._private.services import get_ray_address_from_environment

    try:
        return get_ray_address_from_environment("auto", None) or ""
    except ConnectionError:
        return ""


def join_address(address: str | None) -> str:
    """The Ray address a driver joins: `address`, else $RAY_ADDRESS, else "auto": the cluster a local
    `moray serve` recorded (`read_local_cluster`; its address, with token auth as "auto" would have
    it), else Ray's own "auto" (`ray_auto_address`). When that cluster is on loopback, this process
    switches to loopback too, so that Ray dials 127.0.0.1 rather than this machine's network address."""
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    record = read_local_cluster() if address == "auto" else None
    if record is not None:  # its GCS port answered (`read_local_cluster`)
        address, loopback = record.gcs_address, record.loopback
        _token_auth_as_auto()
    else:
        check_reachable(address)
        target = ray_auto_address() if address == "auto" else address
        host = target.removeprefix("ray://").rpartition(":")[0]
        loopback = bool(host) and is_loopback(host)
    if loopback:
        ray_on_loopback()
    return address


class ClusterUnreachableError(ConnectionError):
    """The Ray cluster at an address does not accept connections; the message names the address."""


REACH_S = 5.0  # Ray itself keeps dialling an address that does not answer for minutes


def check_reachable(address: str, timeout_s: float = REACH_S) -> None:
    """Raise `ClusterUnreachableError` unless `address` ("host:port" or "ray://host:port"; others are left
    to Ray) accepts a TCP connection within `timeout_s`."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterUnreachableError(f"the Ray cluster at {address} does not answer "
                                      f"({e.strerror or type(e).__name__})") from None


def _token_auth_as_auto() -> None:
    """What `ray.init(address="auto")` does about token auth (an explicit address does nothing): turn it
    on when $RAY_AUTH_MODE is unset and a token exists (`~/.ray/auth_token`, made by the server)."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
