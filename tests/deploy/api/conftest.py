"""The real ingress over an in-process engine on the tiny checkpoint (no Ray), with an API key."""

from __future__ import annotations

from pathlib import Path

import pytest

from moray.deploy.api.admission import Admission
from moray.deploy.api.engine import LocalEngine
from moray.deploy.api.ingress import OpenAIIngress
from moray.deploy.serve.config import ServerConfig
from moray.model.engine import AsyncEngine, EngineConfig
from moray.model.mixtral import load_local
from moray.model.tokenizer import Tokenizer

KEY = "sk-api-test-" + "k" * 20
MAX_MODEL_LEN = 64  # small, so that "prompt + completion too long" is cheap to ask for


@pytest.fixture(scope="session")
def api_config(tiny_dir: Path) -> ServerConfig:
    return ServerConfig(model=str(tiny_dir), served_model_name="tiny", api_key=KEY,
                        max_model_len=MAX_MODEL_LEN, max_tokens_limit=32, max_num_seqs=4)


@pytest.fixture(scope="session")
def ingress(tiny_dir: Path, api_config: ServerConfig) -> OpenAIIngress:
    model, experts = load_local(tiny_dir)
    engine = AsyncEngine(model, experts, Tokenizer.from_model_dir(tiny_dir),
                         EngineConfig(max_num_seqs=4, max_model_len=MAX_MODEL_LEN))
    return OpenAIIngress(LocalEngine(engine), api_config, str(tiny_dir))


@pytest.fixture(scope="session")
def admission(ingress: OpenAIIngress) -> Admission:
    return ingress.admission
