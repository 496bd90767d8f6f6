"""The served app for the e2e tests: moray on the tiny checkpoint with 2 expert shards, started once.

It runs on the session's Ray (`ray_session`, a 3-node local cluster) with Serve's HTTP proxy on the
head only (the simulated nodes share one host, so one proxy per node would fight over the port) and
moray's gRPC server in this process (as `moray serve` runs them), on free ports, without an API key
(the key is tested on `moray serve` in test_serve_cli.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from moray.deploy.app import engine_config as from_server
from moray.deploy.app import run_app
from moray.deploy.serve.config import ServerConfig
from moray.deploy.serve.network import free_port
from moray.model.engine import EngineConfig, GenerateRequest, TokenEvent

README = Path(__file__).resolve().parents[2] / "README.md"
READY_S = 180.0
Oracle = Callable[[list[GenerateRequest]], list[list[TokenEvent]]]


@dataclass
class ServedApp:
    http_url: str  # http://127.0.0.1:PORT
    grpc_target: str  # 127.0.0.1:PORT
    app_name: str
    model_name: str
    model_dir: Path
    ray_address: str
    config: ServerConfig

    @property
    def base_url(self) -> str:
        return f"{self.http_url}/v1"


def engine_config(config: ServerConfig) -> EngineConfig:
    return from_server(config)


@pytest.fixture(scope="session")
def served_app(ray_session: Any, tiny_dir: Path) -> Iterator[ServedApp]:
    from ray import serve

    config = ServerConfig(model=str(tiny_dir), served_model_name="moray-tiny-e2e", num_shards=2,
                          max_num_seqs=32, max_batch_tokens=512, max_waiting=32, api_key=None,
                          port=free_port(), grpc_port=free_port(), shard_cpus=0.5, dispatcher_cpus=1.0,
                          torch_threads=1)  # the suite's many replicas share 2 cores: one thread each
    running = run_app(config, proxy_location="HeadOnly")
    app = ServedApp(f"http://127.0.0.1:{config.port}", f"127.0.0.1:{config.grpc_port}", config.app_name,
                    config.served_model_name or "", Path(tiny_dir), ray_session.address, config)
    wait_ready(app.http_url)
    yield app
    running.stop()
    serve.shutdown()


# ---- a second app: an API key and a short request timeout -----------------------------------------------
KEYED_API_KEY = "sk-moray-keyed-test"  # tests read it from the fixture's config
KEYED_TIMEOUT_S = 5.0  # its request timeout: long streams end with a 504 error event


@pytest.fixture(scope="session")
def keyed_app(served_app: ServedApp) -> Iterator[ServedApp]:
    """One app with an API key and a 5 s request timeout, on the same proxies under its own route prefix
    (HTTP: `http_url`) and behind its own moray gRPC server (`grpc_target`): the HTTP and gRPC key tests
    share it, so the suite starts it once."""
    from ray import serve

    from moray.deploy.api.grpc_server import GrpcServer
    from moray.deploy.app import build_app

    name = "moray-keyed"
    config = served_app.config.model_copy(update={
        "app_name": name, "api_key": KEYED_API_KEY, "request_timeout_s": KEYED_TIMEOUT_S, "num_shards": 1,
        "max_num_seqs": 4, "max_batch_tokens": 64, "dispatcher_cpus": 0.5})
    handle = serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    grpc = GrpcServer("127.0.0.1", free_port(), handle).start()
    yield ServedApp(f"{served_app.http_url}/{name}", grpc.address, name, served_app.model_name,
                    served_app.model_dir, served_app.ray_address, config)
    grpc.stop()
    serve.delete(name)


def wait_ready(http_url: str, timeout_s: float = READY_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{http_url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{http_url} not healthy after {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def oracle(tiny_dir: Path, served_app: ServedApp) -> Oracle:
    """The in-process model (every expert local) with the served app's engine settings; runs each
    request alone, one after another, in a fresh engine."""
    from moray.model.engine import AsyncEngine
    from moray.model.mixtral import load_local
    from moray.model.tokenizer import Tokenizer

    model, experts = load_local(tiny_dir)
    tokenizer = Tokenizer.from_model_dir(tiny_dir)

    def run(requests: list[GenerateRequest]) -> list[list[TokenEvent]]:
        engine = AsyncEngine(model, experts, tokenizer, engine_config(served_app.config))

        async def all_alone() -> list[list[TokenEvent]]:
            out = []
            for r in requests:
                out.append([e async for e in engine.generate(r)])
            return out

        return asyncio.run(all_alone())

    return run


@pytest.fixture(scope="session")
def readme(served_app: ServedApp) -> Callable[[str], str]:
    """`readme(name)`: README.md's example `name`, pointed at the test server."""
    return lambda name: localize(readme_example(name), served_app)


def readme_example(name: str) -> str:
    """The fenced code block after `<!-- example: NAME -->` in README.md (the tests run what it shows)."""
    text = README.read_text()
    m = re.search(rf"<!-- example: {re.escape(name)} -->\s*```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"README.md has no example {name!r}"
    return m.group(1)


def localize(code: str, app: ServedApp) -> str:
    """A README example pointed at the test server instead of the default ports and model."""
    return (code.replace("127.0.0.1:8000", app.http_url.removeprefix("http://"))
            .replace("127.0.0.1:9000", app.grpc_target).replace('"moray-tiny"', f'"{app.model_name}"'))
