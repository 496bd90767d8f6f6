"""Addresses and ports: loopback detection, URL hosts, port checks, free ports, joining a Ray."""

from __future__ import annotations

import os
import socket

import pytest

from moray.deploy.serve.network import (
    RAY_CLUSTERS_ENV,
    PortInUseError,
    check_port,
    free_port,
    is_loopback,
    join_address,
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
