"""Hostile input (issue 8): hypothesis fuzzes the served HTTP API, and the limits and input hygiene that
keep garbage away from work, logs and the API key check are tested one by one.

The fuzz is bounded (300 examples over four strategies, derandomized, no example database) and cheap:
a generated request that could be valid asks for at most `SMALL` tokens (values pydantic would read
as a bigger count are filtered out). Every answer must be below 500, within the client timeout; 4xx
bodies must be OpenAI errors; streams must end `data: [DONE]` with no 5xx error event. The last test
checks the server is healthy and correct afterwards.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from moray.deploy.api import moray_pb2
from moray.deploy.api.engine import LocalEngine
from moray.deploy.api.http import create_api
from moray.deploy.api.ingress import OpenAIIngress
from moray.deploy.api.protocol import MAX_PROMPTS
from moray.deploy.cli import build_parser
from moray.deploy.cli.serve import serve_config
from moray.deploy.serve.config import ServerConfig

ServedApp = Any  # conftest's `served_app` fixture
pytestmark = pytest.mark.slow

TIMEOUT_S = 60.0
SMALL = 3  # most tokens a fuzzed request that might be valid asks for
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
KNOWN = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
         "top_k", "seed", "stop", "stop_token_ids", "n", "logprobs", "top_logprobs", "echo", "stream",
         "stream_options", "ignore_eos", "return_token_ids", "user"}


# ---- strategies -----------------------------------------------------------------------------------------
HUGE = st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**30, -(10**30), 10**400, 1e308, -1e308, math.inf,
                        -math.inf, math.nan, 1e-320])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=24) | HUGE
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def not_a_big_count(value: Any) -> bool:
    """False for what pydantic could read as a token count in (SMALL, 4096] ("40", 40.0, ...)."""
    try:
        return not SMALL < float(value) <= 4096
    except (TypeError, ValueError, OverflowError):
        return True


EXTRA = st.dictionaries(st.text(max_size=12).filter(lambda k: k not in KNOWN), JUNK, max_size=3)
SAMPLING = {  # values of the right type (not all in range: top_p 0, 5 stops, ...)
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(-2, 40),
    "seed": st.integers(), "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=4),
    "stop_token_ids": st.lists(st.integers(-1, 40000), max_size=3), "n": st.integers(1, SMALL),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(), "return_token_ids": st.booleans(), "user": st.text(max_size=8),
}
TOKEN_IDS = st.lists(st.integers(0, 32100), min_size=1, max_size=5)  # a few beyond the vocabulary
PROMPT = (st.text(min_size=1, max_size=60) | st.lists(st.integers(0, 31999), min_size=1, max_size=8)
          | st.lists(st.text(min_size=1, max_size=16), min_size=1, max_size=3)
          | st.lists(TOKEN_IDS, min_size=1, max_size=3))
PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=16)})
CONTENT = st.one_of(st.text(max_size=40), st.text(max_size=40), st.none(), st.lists(PART, max_size=2), JUNK)
ROLE = st.sampled_from(["user", "assistant", "assistant", "system", "wizard"])
MESSAGE = st.fixed_dictionaries({"role": ROLE}, optional={"content": CONTENT, "name": st.text(max_size=6)})
OPENING = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "system"]),
                                 "content": st.text(max_size=40)})
MESSAGES = st.builds(lambda first, rest: [first, *rest], OPENING, st.lists(MESSAGE, max_size=3))


def with_extra(body: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda b, extra: {**extra, **b}, body, EXTRA)


def bodies(required: dict[str, Any], optional: dict[str, Any],
           droppable: list[str]) -> st.SearchStrategy[Any]:
    """Well-formed bodies (random fields, unknown extras) half the time, else, a sixth each: the same with
    one field's value junk, with a required field dropped, junk of any shape."""
    valid = with_extra(st.fixed_dictionaries(required, optional=optional))
    junk_value = JUNK.filter(lambda v: v is not None and not_a_big_count(v))  # null max_tokens = no bound
    mutated = st.builds(lambda b, k, v: {**b, k: v}, valid, st.sampled_from(sorted({*required, *optional})),
                        junk_value)
    dropped = st.builds(lambda b, k: {x: y for x, y in b.items() if x != k}, valid,
                        st.sampled_from(droppable))
    return st.one_of(valid, valid, valid, mutated, dropped, JUNK)


def completion_bodies(model: str) -> st.SearchStrategy[Any]:
    optional = {**SAMPLING, "model": st.just(model), "logprobs": st.integers(0, 5), "echo": st.booleans()}
    return bodies({"prompt": PROMPT, "max_tokens": st.integers(1, SMALL)}, optional, ["prompt"])


def chat_bodies(model: str) -> st.SearchStrategy[Any]:
    optional = {**SAMPLING, "model": st.just(model), "logprobs": st.booleans(),
                "top_logprobs": st.integers(0, 20), "max_completion_tokens": st.integers(1, SMALL)}
    return bodies({"messages": MESSAGES, "max_tokens": st.integers(1, SMALL)}, optional, ["messages"])


# ---- checks ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(served_app: ServedApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served_app.http_url, timeout=TIMEOUT_S) as client:
        yield client


def check_answer(r: httpx.Response) -> None:
    """Below 500; an error is an OpenAI error body; a stream ends [DONE] without a 5xx error event."""
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == r.status_code
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]", r.text[-300:]
        for data in events[:-1]:
            payload = json.loads(data)
            assert "error" not in payload or payload["error"]["code"] < 500, payload
    elif r.request.url.path.endswith("completions"):
        assert r.json()["choices"]


def send_json(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    """POST `body` as Python's json writes it: NaN and Infinity included (which httpx's `json=` refuses)."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def fuzzed(r: httpx.Response) -> None:
    check_answer(r)
    event(f"HTTP {r.status_code}")  # `pytest --hypothesis-show-statistics` shows how deep the fuzz went


@pytest.fixture(scope="module")
def model_name(served_app: ServedApp) -> str:
    return str(served_app.model_name)


@settings(FUZZ, max_examples=110)
@given(data=st.data())
def test_fuzz_completions(http: httpx.Client, model_name: str, data: st.DataObject) -> None:
    fuzzed(send_json(http, "/v1/completions", data.draw(completion_bodies(model_name))))


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_fuzz_chat(http: httpx.Client, model_name: str, data: st.DataObject) -> None:
    fuzzed(send_json(http, "/v1/chat/completions", data.draw(chat_bodies(model_name))))


CONTENT_TYPES = ["application/json", "text/plain", "", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/json; charset=latin-1"]


@settings(FUZZ, max_examples=60)
@given(body=st.binary(max_size=300), content_type=st.sampled_from(CONTENT_TYPES),
       chat=st.booleans())
@example(body=b'{"prompt": "\xff\xfe", "max_tokens": 1}', content_type="application/json", chat=False)
@example(body=b'{"prompt": "a\\ud800b", "max_tokens": 1}', content_type="application/json", chat=False)
@example(body=b'{"messages": [{"role": "user", "content": "\\udfff"}]}', content_type="", chat=True)
@example(body=b"[" * 100_000, content_type="application/json", chat=False)
@example(body=b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", content_type="", chat=False)
@example(body=b'{"prompt": "x", "max_tokens": 1, "temperature": NaN}', content_type="", chat=False)
@example(body=b'\xef\xbb\xbf{"prompt": "x", "max_tokens": 1}', content_type="", chat=False)
@example(body=b"", content_type="application/json", chat=True)
def test_fuzz_raw_bodies(http: httpx.Client, body: bytes, content_type: str, chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    fuzzed(http.post(path, content=body, headers={"content-type": content_type}))


HEADER_TEXT = st.text(alphabet=string.printable.strip() + " ", max_size=200)
PATH_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-._~%/", max_size=30)


@settings(FUZZ, max_examples=50)
@given(request_id=HEADER_TEXT, authorization=HEADER_TEXT, path=PATH_TEXT,
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
def test_fuzz_headers_and_paths(http: httpx.Client, request_id: str, authorization: str, path: str,
                                method: str) -> None:
    headers = {"x-request-id": request_id, "authorization": authorization}
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers)
    fuzzed(r)
    assert r.status_code == 200
    fuzzed(http.request(method, f"/v1/{path}", headers=headers))


def test_healthy_and_right_after_the_fuzz(http: httpx.Client, served_app: ServedApp) -> None:
    assert http.get("/health").status_code == 200
    body = {"prompt": [1, 4000, 300], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    first, again = http.post("/v1/completions", json=body), http.post("/v1/completions", json=body)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 4
    assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]
    stats = http.get("/v1/moray/status").json()["dispatcher"]
    assert stats["running"] == 0 and stats["waiting"] == 0  # nothing the fuzz sent is stuck


# ---- limits enforced before work ---------------------------------------------------------------------------
def post(http: httpx.Client, body: Any, path: str = "/v1/completions") -> httpx.Response:
    r = http.post(path, json=body)
    check_answer(r)
    return r


def test_a_body_over_the_limit_is_413_even_without_a_content_length(http: httpx.Client,
                                                                     served_app: ServedApp) -> None:
    limit = served_app.config.max_body_bytes

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_prompt_batch_n_and_max_tokens_are_bounded(http: httpx.Client, served_app: ServedApp) -> None:
    cfg = served_app.config
    too_many = post(http, {"prompt": ["x"] * (MAX_PROMPTS + 1), "max_tokens": 1})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
    assert post(http, {"prompt": ["x"] * 2, "max_tokens": 1}).status_code == 200
    assert post(http, {"prompt": "x", "n": cfg.max_n + 1}).json()["error"]["param"] == "n"
    assert post(http, {"prompt": "x", "max_tokens": cfg.max_tokens_limit + 1}).status_code == 400
    messages = [{"role": "user", "content": "x"}]
    assert post(http, {"messages": messages, "max_completion_tokens": cfg.max_tokens_limit + 1},
                "/v1/chat/completions").status_code == 400


def test_prompts_that_cannot_be_served_are_refused_before_the_engine(http: httpx.Client,
                                                                      tiny_dir: Path) -> None:
    from moray.model.config import MixtralConfig

    cfg = MixtralConfig.load(tiny_dir)
    echo_out_of_vocab = post(http, {"prompt": [1, cfg.vocab_size], "echo": True, "max_tokens": 1})
    assert echo_out_of_vocab.status_code == 400 and echo_out_of_vocab.json()["error"]["param"] == "prompt"
    too_long = post(http, {"prompt": [1] * (cfg.max_seq_len - 1), "max_tokens": 2})
    assert too_long.status_code == 400 and "context length" in too_long.json()["error"]["message"]
    surrogate = http.post("/v1/completions", content=b'{"prompt": "a\\ud800", "max_tokens": 1}',
                          headers={"content-type": "application/json"})
    assert surrogate.status_code == 400 and "Unicode" in surrogate.json()["error"]["message"]


# ---- in process: logs, the key compare, the bind address -------------------------------------------
KEY = "sk-fuzz-" + "k" * 24


@pytest.fixture(scope="module")
def local_ingress(tiny_dir: Path) -> Any:
    """The real ingress over an in-process engine (no Ray), with an API key."""
    from moray.model.engine import AsyncEngine, EngineConfig
    from moray.model.mixtral import load_local
    from moray.model.tokenizer import Tokenizer

    model, experts = load_local(tiny_dir)
    engine = AsyncEngine(model, experts, Tokenizer.from_model_dir(tiny_dir), EngineConfig(max_num_seqs=2))
    return OpenAIIngress(LocalEngine(engine), ServerConfig(model=str(tiny_dir), api_key=KEY), str(tiny_dir))


def asgi_post(ingress: Any, body: Any, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_api(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            return await client.post("/v1/completions", json=body, headers=headers)

    return asyncio.run(go())


def test_request_strings_reach_the_logs_escaped(local_ingress: Any, caplog: pytest.LogCaptureFixture) -> None:
    forged = "x\nCRITICAL moray: forged line\x1b[31m"
    moray_log = logging.getLogger("moray")  # actors' logging setup may stop it propagating to the root
    moray_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="moray"):
            r = asgi_post(local_ingress, {"prompt": "x", "max_tokens": 1, forged: 1},
                          {"authorization": f"Bearer {KEY}", "x-request-id": "bad id\twith tab"})
    finally:
        moray_log.removeHandler(caplog.handler)
    assert r.status_code == 200
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert repr(forged) in logged  # the unknown field, quoted and escaped
    assert "\nCRITICAL moray: forged" not in logged and "\x1b" not in logged
    assert "'bad id\\twith tab'" in logged  # the replaced request id, escaped


def test_the_api_key_is_compared_in_constant_time(local_ingress: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP and gRPC both check the key with `hmac.compare_digest`."""
    import grpc

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    body = {"prompt": "x", "max_tokens": 1}
    assert asgi_post(local_ingress, body, {"authorization": "Bearer wrong"}).status_code == 401
    assert asgi_post(local_ingress, body, {"authorization": f"Bearer {KEY}"}).status_code == 200
    assert calls == [(b"wrong", KEY.encode()), (KEY.encode(), KEY.encode())]

    class Context:  # stands in for Ray Serve's gRPC context: the client's metadata, the status set
        code: Any = None

        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("authorization", "Bearer grpc-wrong")]

        def set_code(self, code: Any) -> None:
            self.code = code

        def set_details(self, details: str) -> None:
            pass

    context = Context()
    asyncio.run(local_ingress.Generate(moray_pb2.GenerateRequest(prompt="x", max_tokens=1), context))
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert calls[-1] == (b"grpc-wrong", KEY.encode())


def test_the_server_binds_localhost_unless_told() -> None:
    assert ServerConfig().host == "127.0.0.1" and ServerConfig().grpc_port is None
    default = serve_config(build_parser("serve").parse_args(["serve"]))
    assert default.host == "127.0.0.1" and default.grpc_port is None  # gRPC only when asked for
