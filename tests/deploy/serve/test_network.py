"""Addresses and ports: loopback detection, URL hosts, port checks, free ports, joining a Ray (the local
cluster `moray serve` records, what Ray's "auto" finds)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from moray.deploy.serve.network import (
    RAY_CLUSTERS_ENV,
    ClusterUnreachableError,
    LocalCluster,
    PortInUseError,
    check_port,
    forget_local_cluster,
    free_port,
    is_loopback,
    join_address,
    local_cluster_file,
    ray_auto_address,
    read_local_cluster,
    record_local_cluster,
    url_host,
)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("10.0.0.5", False),
    ("no-such-host.invalid", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_url_host_brackets_ipv6() -> None:
    assert [url_host(h) for h in ("127.0.0.1", "::1", "[::1]", "0.0.0.0")] == ["127.0.0.1", "[::1]", "[::1]",
                                                                                "0.0.0.0"]


def test_a_taken_port_is_named_with_its_host() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"gRPC port {port} on 127.0.0.1"):
            check_port("127.0.0.1", port, "gRPC")
    check_port("127.0.0.1", free_port(), "HTTP")


def test_joining_a_remote_cluster_leaves_ray_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_CLUSTERS_ENV, raising=False)
    assert join_address("10.0.0.5:6379") == "10.0.0.5:6379"
    assert join_address("ray://10.0.0.5:10001") == "ray://10.0.0.5:10001"
    assert RAY_CLUSTERS_ENV not in os.environ


# ---- the local cluster `moray serve` records for second drivers ----------------------------------------
@pytest.fixture
def ray_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Ray's loopback switch off (restored afterwards), Ray's temp dir empty, Ray's GCS scan finding none,
    token auth left as it is (`RAY_AUTH_MODE` set: "auto"'s token rule keeps to it)."""
    import ray._private.ray_constants as ray_constants
    from ray._private import services

    monkeypatch.delenv(RAY_CLUSTERS_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(services, "find_gcs_addresses", frozenset)
    yield


def on_loopback() -> bool:
    import ray._private.ray_constants as ray_constants

    return os.environ.get(RAY_CLUSTERS_ENV) == "0" and not ray_constants.ENABLE_RAY_CLUSTER


@pytest.fixture
def gcs() -> Iterator[str]:
    """Something listening on 127.0.0.1, standing for a local GCS: host:port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_auto_joins_the_recorded_loopback_cluster(ray_switch: None, gcs: str) -> None:
    path = record_local_cluster(gcs, "/tmp/ray/session_x")
    assert path == local_cluster_file() and path.parent.name == "ray"
    record = json.loads(path.read_text())
    assert record == {"gcs_address": gcs, "loopback": True, "pid": os.getpid(),
                      "session_dir": "/tmp/ray/session_x"}
    assert read_local_cluster() == LocalCluster(gcs, True, os.getpid(), "/tmp/ray/session_x")
    assert join_address(None) == gcs and on_loopback()


def test_a_stale_or_unreadable_record_is_ignored(ray_switch: None, gcs: str) -> None:
    stale = f"127.0.0.1:{free_port()}"  # nothing listens there: the server was killed
    record_local_cluster(stale)
    assert read_local_cluster() is None
    assert ray_auto_address() == ""
    local_cluster_file().write_text("{not json")
    assert read_local_cluster() is None
    assert join_address("auto") == "auto" and not on_loopback()


def test_auto_finding_a_gcs_on_loopback_switches_without_a_record(ray_switch: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A `ray.init()` cluster on loopback: Ray's "auto" finds its GCS process (not its address file)."""
    from ray._private import services

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset({"127.0.0.1:40123"}))
    assert ray_auto_address() == "127.0.0.1:40123"
    assert join_address(None) == "auto" and on_loopback()


def test_the_record_wins_over_rays_pick(ray_switch: None, gcs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeing several GCS processes, Ray's "auto" picks its address file's cluster (a `ray start` one)."""
    from ray._private import services

    (local_cluster_file().parent).mkdir(parents=True)
    (local_cluster_file().parent / "ray_current_cluster").write_text("10.0.0.5:6379")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset({gcs, "10.0.0.5:6379"}))
    assert ray_auto_address() == "10.0.0.5:6379"
    assert join_address("auto") == "auto" and not on_loopback()
    record_local_cluster(gcs)
    assert join_address("auto") == gcs and on_loopback()


def test_an_address_that_does_not_answer_is_an_error_at_once(ray_switch: None, gcs: str) -> None:
    """Ray keeps dialling an address that refuses for minutes; `join_address` says so within `REACH_S`."""
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # never listening: connections are refused
        address = f"127.0.0.1:{refusing.getsockname()[1]}"
        for given in (address, f"ray://{address}"):
            with pytest.raises(ClusterUnreachableError, match=f"{given} does not answer"):
                join_address(given)
    assert join_address(gcs) == gcs


def test_only_the_server_that_wrote_the_record_removes_it(ray_switch: None, gcs: str) -> None:
    path = record_local_cluster(gcs)
    other = {**json.loads(path.read_text()), "pid": os.getpid() + 1}  # a server started later
    path.write_text(json.dumps(other))
    forget_local_cluster()
    assert path.exists()
    record_local_cluster(gcs)
    forget_local_cluster()
    assert not path.exists()
    forget_local_cluster()  # nothing to remove
