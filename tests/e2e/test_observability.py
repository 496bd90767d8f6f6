"""Request ids reach the dispatcher's and the shards' log lines (issue 10)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx


def log_lines_with(session_dirs: list[Path], needle: str) -> list[str]:
    lines = []
    for d in session_dirs:
        for f in (d / "logs").glob("worker-*.err"):
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            lines += [line for line in text.splitlines() if needle in line]
    return lines


def test_request_id_in_dispatcher_and_shard_logs(served_app: Any, ray_session: Any) -> None:
    rid = f"obs-{uuid.uuid4().hex[:12]}"
    r = httpx.post(f"{served_app.base_url}/completions", headers={"X-Request-Id": rid}, timeout=60,
                   json={"model": served_app.model_name, "prompt": "Hello there", "max_tokens": 3})
    assert r.status_code == 200
    sessions = sorted({Path(n.get_session_dir_path()) for n in ray_session.list_all_nodes()})
    deadline, lines = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        lines = log_lines_with(sessions, rid)
        if any("admitted" in line for line in lines) and any("expert shard" in line for line in lines):
            break
        time.sleep(0.5)
    assert any("moray.model.engine" in line and "admitted" in line for line in lines), lines
    assert any("moray.actors.experts" in line and "requests joined" in line for line in lines), lines
