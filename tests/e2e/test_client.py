"""`moray.connect()` from a second Ray driver (a separate process) gets what HTTP gets; the README's
Python-client and gRPC examples run as shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
TIMEOUT_S = 180

SECOND_DRIVER = """
import json, sys
import moray
from moray.deploy.api.errors import APIError

client = moray.connect(sys.argv[1], app=sys.argv[2])
done = client.generate(sys.argv[3], max_tokens=10, temperature=0)
streamed = "".join(client.stream(sys.argv[3], max_tokens=10, temperature=0))
seeded = client.generate(sys.argv[3], max_tokens=10, temperature=0.9, seed=5)
chat = client.chat(json.loads(sys.argv[4]), max_tokens=6, temperature=0)
scored = client.generate(sys.argv[3], max_tokens=0, echo=True, prompt_logprobs=1)
try:
    client.generate(sys.argv[3], temperature=-1)
    status = None
except APIError as e:
    status = e.status
print(json.dumps({"text": done.text, "token_ids": done.token_ids, "finish_reason": done.finish_reason,
                  "usage": done.usage, "streamed": streamed, "seeded": seeded.text, "chat": chat.text,
                  "models": client.models(), "error_status": status, "scored": scored.prompt_logprobs}))
"""


def driver_env(served_app: Any) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": served_app.ray_address, "PYTHONUNBUFFERED": "1"}


def http(served_app: Any, path: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{served_app.base_url}{path}", json=body, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_second_driver_gets_the_http_completion(served_app: Any) -> None:
    out = subprocess.run([sys.executable, "-c", SECOND_DRIVER, served_app.ray_address, served_app.app_name,
                          PROMPT, json.dumps(MESSAGES)], capture_output=True, text=True, timeout=TIMEOUT_S,
                         env=driver_env(served_app))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    greedy = http(served_app, "/completions", prompt=PROMPT, max_tokens=10, temperature=0,
                  return_token_ids=True)
    choice = greedy["choices"][0]
    assert (got["text"], got["token_ids"], got["finish_reason"]) == (choice["text"], choice["token_ids"],
                                                                     choice["finish_reason"])
    assert got["usage"] == greedy["usage"]
    assert got["streamed"] == choice["text"]
    seeded = http(served_app, "/completions", prompt=PROMPT, max_tokens=10, temperature=0.9, seed=5)
    assert got["seeded"] == seeded["choices"][0]["text"]
    chat = http(served_app, "/chat/completions", messages=MESSAGES, max_tokens=6, temperature=0)
    assert got["chat"] == chat["choices"][0]["message"]["content"]
    assert got["models"] == [served_app.model_name]
    assert got["error_status"] == 400
    scored = http(served_app, "/completions", prompt=PROMPT, max_tokens=0, echo=True, prompt_logprobs=1)
    assert got["scored"] == scored["choices"][0]["prompt_logprobs"] and len(got["scored"]) > 1


def test_readme_python_client_example(served_app: Any, readme: Any) -> None:
    """The README's `moray.connect()` (address "auto"), pointed at the test cluster by RAY_ADDRESS."""
    out = subprocess.run([sys.executable, "-c", readme("python-client")], capture_output=True, text=True,
                         timeout=TIMEOUT_S, env=driver_env(served_app))
    assert out.returncode == 0, out.stderr[-3000:]
    greedy = http(served_app, "/completions", prompt="The capital of France is", max_tokens=16, temperature=0)
    assert out.stdout.startswith(greedy["choices"][0]["text"])


def test_readme_grpc_example(served_app: Any, readme: Any, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(readme("grpc-client"), "README.md", "exec"), {})
    greedy = http(served_app, "/completions", prompt="The capital of France is", max_tokens=16, temperature=0)
    assert capsys.readouterr().out.startswith(greedy["choices"][0]["text"] + " [")
