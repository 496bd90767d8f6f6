"""The app builder's warning for APIs open to other machines without a key (no Ray needed)."""

from __future__ import annotations

import pytest

from moray.deploy.app import exposure_warning
from moray.deploy.serve.config import ServerConfig


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MORAY_API_KEY", raising=False)


@pytest.mark.parametrize(("host", "key", "warns"), [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("0.0.0.0", None, True), ("192.0.2.2", None, True), ("0.0.0.0", "k", False),
])
def test_warns_only_for_a_non_loopback_host_without_a_key(host: str, key: str | None, warns: bool) -> None:
    warning = exposure_warning(ServerConfig(host=host, api_key=key))
    assert (warning is not None) is warns
    if warning:
        assert warning.startswith("warning: ") and host in warning and "API key" in warning
        assert "\n" not in warning


def test_grpc_is_off_unless_asked_for() -> None:
    assert ServerConfig().grpc_port is None
    assert ServerConfig(grpc_port=9000).grpc_port == 9000
    with pytest.raises(ValueError, match="grpc_port"):
        ServerConfig(port=9000, grpc_port=9000)
