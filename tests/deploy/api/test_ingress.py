"""HTTP and gRPC on one table of good and bad requests: the same tokens, the same error class.

Both go to the real ingress over an in-process engine (the tiny checkpoint): HTTP through the
FastAPI app over ASGI, gRPC through the `Generate` / `GenerateStream` methods Serve's gRPC proxy
calls, with a stand-in for the proxy's context (metadata in, status code out). Each row is written
once, in the proto's terms; `as_json` writes it as the `/v1/completions` body a client would send.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import httpx
import pytest

from moray.deploy.api import moray_pb2
from moray.deploy.api.grpc import GRPC_CODES, GrpcError
from moray.deploy.api.http import create_api
from moray.deploy.api.ingress import OpenAIIngress

KEY = "sk-api-test-" + "k" * 20  # conftest's KEY
Row = dict[str, Any]

GOOD: dict[str, Row] = {
    "greedy text": {"prompt": "Hello there", "max_tokens": 5, "temperature": 0.0},
    "greedy ids": {"prompt_token_ids": [1, 5, 9, 42], "max_tokens": 4, "temperature": 0.0},
    "seeded, top_k clamped": {"prompt": "Once", "max_tokens": 6, "temperature": 0.9, "seed": 7,
                              "top_k": 2**31 - 1, "top_p": 0.9},
    "ignore_eos, stop ids": {"prompt": "x", "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
                             "stop_token_ids": [5]},
    "logprobs": {"prompt": "Hi", "max_tokens": 3, "temperature": 0.0, "logprobs": 2},
}
BAD: dict[str, Row] = {
    "max_tokens 0": {"prompt": "x", "max_tokens": 0},
    "max_tokens over the limit": {"prompt": "x", "max_tokens": 33},
    "temperature < 0": {"prompt": "x", "temperature": -1.0},
    "top_p > 1": {"prompt": "x", "top_p": 1.5},
    "logprobs 6": {"prompt": "x", "logprobs": 6},
    "5 stops": {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
    "empty prompt": {"prompt": ""},
    "past the context": {"prompt_token_ids": [1] * 60, "max_tokens": 8},
    "not in the vocabulary": {"prompt_token_ids": [1, 10**6]},
    "unknown model": {"prompt": "x", "model": "other"},
    "no key": {"prompt": "x", "key": None},
    "wrong key": {"prompt": "x", "key": "wrong"},
}


def as_json(row: Row) -> dict[str, Any]:
    body = {k: v for k, v in row.items() if k not in ("key", "prompt_token_ids")}
    if "prompt_token_ids" in row:
        body["prompt"] = row["prompt_token_ids"]
    return {**body, "return_token_ids": True}


def as_proto(row: Row) -> moray_pb2.GenerateRequest:
    fields = {k: v for k, v in row.items() if k != "key"}
    if "prompt_token_ids" in fields:
        fields["prompt_token_ids"] = moray_pb2.TokenIds(ids=fields["prompt_token_ids"])
    return moray_pb2.GenerateRequest(**fields)


def key_of(row: Row) -> str | None:
    return row.get("key", KEY)


class ProxyContext:
    """What Serve's gRPC proxy hands a method: the client's metadata; takes back the status code."""

    def __init__(self, key: str | None) -> None:
        self.metadata = [("authorization", f"Bearer {key}")] if key else []
        self.code, self.details = grpc.StatusCode.OK, ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def over_http(ingress: OpenAIIngress, row: Row) -> tuple[int, list[int]]:
    async def go() -> httpx.Response:
        headers = {"authorization": f"Bearer {key_of(row)}"} if key_of(row) else {}
        transport = httpx.ASGITransport(app=create_api(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            return await client.post("/v1/completions", json=as_json(row), headers=headers)

    r = asyncio.run(go())
    return r.status_code, (r.json()["choices"][0]["token_ids"] if r.status_code == 200 else [])


def over_grpc(ingress: OpenAIIngress, row: Row) -> tuple[grpc.StatusCode, list[int]]:
    context = ProxyContext(key_of(row))
    reply = asyncio.run(ingress.Generate(as_proto(row), grpc_context=context))  # type: ignore[arg-type]
    return context.code, list(reply.token_ids)


def over_grpc_stream(ingress: OpenAIIngress, row: Row) -> tuple[grpc.StatusCode, list[int]]:
    context = ProxyContext(key_of(row))

    async def go() -> list[int]:
        return [c.token_id async for c in ingress.GenerateStream(as_proto(row), grpc_context=context)]

    try:
        return context.code, asyncio.run(go())
    except GrpcError:
        return context.code, []


@pytest.mark.parametrize("name", list(GOOD))
def test_good_requests_give_the_same_tokens(ingress: OpenAIIngress, name: str) -> None:
    status, http_tokens = over_http(ingress, GOOD[name])
    code, grpc_tokens = over_grpc(ingress, GOOD[name])
    stream_code, stream_tokens = over_grpc_stream(ingress, GOOD[name])
    assert (status, code, stream_code) == (200, grpc.StatusCode.OK, grpc.StatusCode.OK)
    assert http_tokens and grpc_tokens == http_tokens and stream_tokens == http_tokens


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_give_the_same_error_class(ingress: OpenAIIngress, name: str) -> None:
    status, _ = over_http(ingress, BAD[name])
    code, tokens = over_grpc(ingress, BAD[name])
    stream_code, _ = over_grpc_stream(ingress, BAD[name])
    assert status in (400, 401, 404) and not tokens
    assert code == stream_code == GRPC_CODES[status], (status, code)
