"""The HTTP layer without Ray: error mapping and bodies, request parsing, body limits, the API key,
SSE framing, and the routes over the real ingress (an in-process engine on the tiny checkpoint)."""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import ray.exceptions as rex
import ray.serve.exceptions as sex

from moray.actors.faults import DispatcherUnavailableError, PeerGoneError, ShardUnavailableError
from moray.deploy.api.admission import bearer, lone_surrogate, parse
from moray.deploy.api.errors import APIError, to_api_error, unwrap
from moray.deploy.api.http import create_api, read_json, sse
from moray.deploy.api.ingress import OpenAIIngress
from moray.deploy.api.protocol import ChatCompletionRequest, CompletionRequest
from moray.model.engine import QueueFullError, RequestError

KEY_HEADER = {"authorization": "Bearer " + "sk-api-test-" + "k" * 20}  # conftest's KEY


# ---- errors -----------------------------------------------------------------------------------------
class RayTaskError(Exception):
    """Named as Ray's wrapper of a remote error (its str() holds a traceback; `cause` the error)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("Traceback (most recent call last): ...")
        self.cause = cause


@pytest.mark.parametrize(("error", "status"), [
    (RequestError("prompt too long"), 400), (QueueFullError("full"), 429), (asyncio.TimeoutError(), 504),
    (ShardUnavailableError("gone"), 503), (KeyError("a bug"), 500), (APIError(404, "no model"), 404),
    (RayTaskError(RequestError("wrapped")), 400), (RayTaskError(ShardUnavailableError("wrapped")), 503),
    (DispatcherUnavailableError("restarting"), 503), (PeerGoneError("hung", "hung"), 503),
    (rex.ActorDiedError(), 503), (sex.ReplicaUnavailableError("r1"), 503),
    (sex.BackPressureError(num_queued_requests=3, max_queued_requests=2), 429),
    (ConnectionResetError("a bug of ours, not a replica's fault"), 500),
])
def test_failures_map_to_http_statuses(error: BaseException, status: int) -> None:
    err = to_api_error(error)
    assert err.status == status
    assert "Traceback" not in err.message
    if status in (429, 503):
        assert err.headers["Retry-After"] == "1"


def test_unwrap_reaches_the_innermost_cause() -> None:
    inner = ValueError("x")
    assert unwrap(RayTaskError(RayTaskError(inner))) is inner
    assert unwrap(inner) is inner


def test_error_body_is_openai_shaped_and_pickles() -> None:
    err = APIError(400, "n must be at most 8", param="n", headers={"X": "y"})
    assert err.body() == {"error": {"message": "n must be at most 8", "type": "BadRequestError",
                                    "param": "n", "code": 400}}
    again = pickle.loads(pickle.dumps(err))
    assert (again.status, again.message, again.param, again.headers) == (400, err.message, "n", {"X": "y"})


# ---- parsing ----------------------------------------------------------------------------------------
def test_parse_names_the_first_bad_field() -> None:
    with pytest.raises(APIError) as info:
        parse(CompletionRequest, {"prompt": "x", "temperature": -1})
    assert info.value.status == 400 and info.value.param == "temperature"
    assert info.value.message.startswith("temperature:")
    with pytest.raises(APIError) as info:
        parse(ChatCompletionRequest, {"messages": []})
    assert info.value.param == "messages"


@pytest.mark.parametrize("payload", [[1, 2], "text", None, 3])
def test_parse_wants_a_json_object(payload: Any) -> None:
    with pytest.raises(APIError, match="JSON object"):
        parse(CompletionRequest, payload)


def test_lone_surrogates_are_refused_anywhere() -> None:
    assert lone_surrogate({"a": ["ok", {"b": "\ud800"}]})
    assert lone_surrogate({"\udfff": 1})
    assert not lone_surrogate({"a": ["héllo 😀", 1, None]})
    with pytest.raises(APIError, match="Unicode"):
        parse(CompletionRequest, {"prompt": "\ud800"})


def test_unknown_fields_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="moray"):
        req = parse(CompletionRequest, {"prompt": "x", "frequency_penalty": 0.5})
    assert req.ignored_fields() == ["frequency_penalty"]
    assert "'frequency_penalty'" in caplog.text


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer sk-1", "sk-1"), ("bearer   sk-2 ", "sk-2"), ("Basic abc", None), ("", None), ("Bearer", None),
])
def test_bearer(header: str, token: str | None) -> None:
    assert (bearer(header) or None) == token


# ---- bodies and SSE ---------------------------------------------------------------------------------
class Body:
    """A request whose body arrives in `parts` (the two things `read_json` reads)."""

    def __init__(self, parts: list[bytes], length: str | None = None) -> None:
        self.parts, self.headers = parts, {"content-length": length} if length else {}

    async def stream(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part


def read(parts: list[bytes], limit: int = 16, length: str | None = None) -> Any:
    return asyncio.run(read_json(Body(parts, length), limit))


def test_body_limits_and_json() -> None:
    assert read([b'{"a":', b" 1}"]) == {"a": 1}
    for parts, length in (([b"{}"], "17"), ([b'{"a": "', b'0123456789"}'], None)):
        with pytest.raises(APIError) as info:
            read(parts, length=length)
        assert info.value.status == 413
    for bad in (b"{", b"\xff\xfe", b"[" * 100_000):
        with pytest.raises(APIError) as info:
            read([bad], limit=200_000)
        assert info.value.status == 400


async def chunks(items: list[dict], error: Exception | None = None) -> AsyncIterator[dict]:
    for item in items:
        yield item
    if error is not None:
        raise error


def frames(items: list[dict], error: Exception | None = None) -> list[str]:
    async def go() -> list[str]:
        return [f async for f in sse(chunks(items, error), "/test/sse")]

    return asyncio.run(go())


def test_sse_frames_end_with_done() -> None:
    out = frames([{"a": 1}, {"b": "é"}])
    assert out == ['data: {"a": 1}\n\n', 'data: {"b": "é"}\n\n', "data: [DONE]\n\n"]


def test_sse_error_after_start_is_an_event_then_done() -> None:
    out = frames([{"a": 1}], QueueFullError("full"))
    assert out[0] == 'data: {"a": 1}\n\n' and out[-1] == "data: [DONE]\n\n"
    assert json.loads(out[1].removeprefix("data: "))["error"]["code"] == 429


# ---- the routes over the real ingress -----------------------------------------------------------------
def call(ingress: OpenAIIngress, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_api(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_the_key_guards_every_route_but_health(ingress: OpenAIIngress) -> None:
    assert call(ingress, "GET", "/health").status_code == 200
    wrong = {"authorization": "Bearer nope"}
    for headers, message in (({}, "missing API key"), (wrong, "incorrect API key")):
        r = call(ingress, "GET", "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["message"] == message
    assert call(ingress, "GET", "/v1/models", headers=KEY_HEADER).json()["data"][0]["id"] == "tiny"


def test_unknown_routes_and_methods_are_openai_errors(ingress: OpenAIIngress) -> None:
    r = call(ingress, "GET", "/v1/nothing", headers=KEY_HEADER)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = call(ingress, "GET", "/v1/completions", headers=KEY_HEADER)
    assert r.status_code == 405 and r.json()["error"]["type"]


def test_request_ids_are_kept_or_replaced(ingress: OpenAIIngress) -> None:
    body = {"prompt": "Hi", "max_tokens": 1}
    kept = call(ingress, "POST", "/v1/completions", json=body, headers={**KEY_HEADER, "x-request-id": "r-1"})
    assert kept.json()["id"] == "cmpl-r-1"
    fresh = call(ingress, "POST", "/v1/completions", json=body, headers={**KEY_HEADER, "x-request-id": "a b"})
    assert fresh.json()["id"] != "cmpl-a b" and len(fresh.json()["id"]) == len("cmpl-") + 32
    none_given = call(ingress, "POST", "/v1/completions", json=body, headers=KEY_HEADER)
    assert none_given.headers["x-request-id"] == none_given.json()["id"].removeprefix("cmpl-")


def test_a_stream_is_sse_ending_done(ingress: OpenAIIngress) -> None:
    body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    r = call(ingress, "POST", "/v1/completions", json=body, headers=KEY_HEADER)
    events = [line for line in r.text.split("\n\n") if line]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 3


def test_the_status_route_in_process(ingress: OpenAIIngress) -> None:
    out = call(ingress, "GET", "/v1/moray/status", headers=KEY_HEADER).json()
    assert out["model"] == "tiny" and "waiting" in out["dispatcher"] and "deployments" not in out
    r = call(ingress, "GET", "/v1/moray/routing", headers=KEY_HEADER)
    assert r.status_code == 404  # routing counts come from the shard deployments (Serve only)
