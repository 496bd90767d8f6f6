"""`moray bench --hop`: one layer's hop through each transport, and the bench's system names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moray.deploy.bench.hop import ROWS, TRANSPORTS, _serve_running
from moray.deploy.bench.main import parse_system
from moray.deploy.cli import main as cli_main


def test_hop_measures_every_transport(ray_session: Any, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Echo shards behind Serve handles, Ray actors, shared memory and TCP: each answers every row count
    (the echo is checked inside), and the table names them all. A Serve it started (without proxies) is
    shut down again: the session's apps that come later need Serve's HTTP proxy."""
    serve_before = _serve_running()
    out = tmp_path / "hop.json"
    assert cli_main(["bench", "--hop", "--num-requests", "5", "--out", str(out)]) == 0
    assert _serve_running() == serve_before
    hop = json.loads(out.read_text())["hop"]
    assert list(hop) == list(TRANSPORTS)
    for per_rows in hop.values():
        assert [int(n) for n in per_rows] == list(ROWS)
        assert all(0 < p["p50_us"] <= p["p99_us"] for p in per_rows.values())
    table = capsys.readouterr().out
    assert all(f"| {t} |" in table for t in TRANSPORTS)


@pytest.mark.parametrize("name, parsed", [
    ("moray-local", ("local", 0, False, "auto", False)),
    ("moray-local-det", ("local", 0, False, "auto", True)),
    ("moray-actors-2", ("actors", 2, False, "auto", False)),
    ("moray-actors-3-ray", ("actors", 3, False, "ray", False)),
    ("moray-actors-2-pingpong", ("actors", 2, True, "auto", False)),
    ("moray-serve-4-pingpong-det-ray", ("serve", 4, True, "ray", True)),
])
def test_system_names(name: str, parsed: tuple[str, int, bool, str, bool]) -> None:
    assert parse_system(name) == parsed
