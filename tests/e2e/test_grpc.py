"""The gRPC API against the running Serve app, with HTTP `/v1/completions` as the oracle.

moray's gRPC server (`deploy/api/grpc_server.py`, as `moray serve --grpc-port` runs it) in front of the
app. A `grpcio` client built from the checked-in stubs (`deploy/api/moray_pb2*.py`) must get the same
tokens and text as the HTTP API for the same request (greedy and seeded), unary and streaming;
bad arguments get INVALID_ARGUMENT, an unknown model NOT_FOUND, and the server keeps answering.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from moray.deploy.api import moray_pb2, moray_pb2_grpc

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def stub(served_app: Any) -> Iterator[moray_pb2_grpc.MorayStub]:
    channel = grpc.insecure_channel(served_app.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=60)
    yield moray_pb2_grpc.MorayStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def metadata(served_app: Any) -> tuple[tuple[str, str], ...]:
    return (("application", getattr(served_app, "app_name", "moray")),)


def http_completion(served_app: Any, **body: Any) -> dict[str, Any]:
    """The oracle: `/v1/completions` with vLLM's `return_token_ids` extension."""
    payload = {"model": served_app.model_name, "return_token_ids": True, **body}
    response = httpx.post(f"{served_app.http_url}/v1/completions", json=payload, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    choice: dict[str, Any] = response.json()["choices"][0]
    choice["usage"] = response.json()["usage"]
    return choice


def generate(stub: moray_pb2_grpc.MorayStub, metadata: Any, **fields: Any) -> moray_pb2.GenerateReply:
    reply: moray_pb2.GenerateReply = stub.Generate(moray_pb2.GenerateRequest(**fields), metadata=metadata,
                                                   timeout=TIMEOUT_S)
    return reply


def stream(stub: moray_pb2_grpc.MorayStub, metadata: Any, **fields: Any) -> list[moray_pb2.GenerateChunk]:
    request = moray_pb2.GenerateRequest(**fields)
    return list(stub.GenerateStream(request, metadata=metadata, timeout=TIMEOUT_S))


def test_greedy_unary_equals_http(served_app: Any, stub: Any, metadata: Any) -> None:
    http = http_completion(served_app, prompt=PROMPT, max_tokens=12, temperature=0.0)
    reply = generate(stub, metadata, model=served_app.model_name, prompt=PROMPT, max_tokens=12,
                     temperature=0.0)
    assert reply.text == http["text"]
    if "token_ids" in http:
        assert list(reply.token_ids) == http["token_ids"]
    assert len(reply.token_ids) == http["usage"]["completion_tokens"]
    assert reply.finish_reason == http["finish_reason"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        http["usage"]["prompt_tokens"], http["usage"]["completion_tokens"])
    assert reply.model == served_app.model_name


def test_stream_concatenates_to_unary(served_app: Any, stub: Any, metadata: Any) -> None:
    fields = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.0}
    reply = generate(stub, metadata, **fields)
    chunks = stream(stub, metadata, **fields)
    assert "".join(c.text for c in chunks) == reply.text
    assert [c.token_id for c in chunks] == list(reply.token_ids)
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == reply.finish_reason
    assert [c.HasField("usage") for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage == reply.usage


def test_seeded_sampling_and_token_prompt_equal_http(served_app: Any, stub: Any, metadata: Any) -> None:
    ids = http_completion(served_app, prompt=PROMPT, max_tokens=1, temperature=0.0).get("prompt_token_ids")
    options = {"max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    http = http_completion(served_app, prompt=ids or PROMPT, **options)
    prompt = {"prompt_token_ids": moray_pb2.TokenIds(ids=ids)} if ids else {"prompt": PROMPT}
    assert generate(stub, metadata, **prompt, **options).text == http["text"]
    assert "".join(c.text for c in stream(stub, metadata, **prompt, **options)) == http["text"]


def test_logprobs_equal_http(served_app: Any, stub: Any, metadata: Any) -> None:
    http = http_completion(served_app, prompt=PROMPT, max_tokens=6, temperature=0.0, logprobs=2)
    reply = generate(stub, metadata, prompt=PROMPT, max_tokens=6, temperature=0.0, logprobs=2)
    assert len(reply.logprobs) == len(reply.token_ids)
    assert [lp.token_id for lp in reply.logprobs] == list(reply.token_ids)
    expected = http["logprobs"]["token_logprobs"]
    assert [lp.logprob for lp in reply.logprobs] == pytest.approx(expected, abs=1e-5)
    assert all(len(lp.top_logprobs) == 2 for lp in reply.logprobs)
    for lp in reply.logprobs:  # best first, and the chosen (greedy) token is the best
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob
        assert lp.top_logprobs[0].logprob == pytest.approx(lp.logprob, abs=1e-6)


BAD_REQUESTS: dict[str, dict[str, Any]] = {
    "temperature-negative": {"prompt": PROMPT, "temperature": -1.0},
    "max-tokens-zero": {"prompt": PROMPT, "max_tokens": 0},
    "empty-prompt": {"prompt": ""},
    "no-prompt": {},
    "top-p-zero": {"prompt": PROMPT, "top_p": 0.0},
    "too-many-stops": {"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]},
    "prompt-longer-than-context": {"prompt_token_ids": moray_pb2.TokenIds(ids=[1] * 100_000)},
    "token-id-out-of-vocab": {"prompt_token_ids": moray_pb2.TokenIds(ids=[1, 10**9])},
}


@pytest.mark.parametrize("fields", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_arguments_are_invalid_argument(stub: Any, metadata: Any, fields: dict[str, Any]) -> None:
    with pytest.raises(grpc.RpcError) as unary:
        generate(stub, metadata, **fields)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT, unary.value.details()
    assert unary.value.details()
    with pytest.raises(grpc.RpcError) as streamed:
        stream(stub, metadata, **fields)
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, streamed.value.details()


def test_unknown_model_is_not_found(stub: Any, metadata: Any) -> None:
    for call in (generate, stream):
        with pytest.raises(grpc.RpcError) as info:
            call(stub, metadata, model="no-such-model", prompt=PROMPT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-model" in info.value.details()


def test_still_answers_after_errors(served_app: Any, stub: Any, metadata: Any) -> None:
    for fields in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            generate(stub, metadata, **fields)
    reply = generate(stub, metadata, prompt=PROMPT, max_tokens=4, temperature=0.0)
    assert reply.usage.completion_tokens == len(reply.token_ids) > 0
    assert httpx.get(f"{served_app.http_url}/health", timeout=TIMEOUT_S).status_code == 200


# ---- API key -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_stub(keyed_app: Any) -> Iterator[moray_pb2_grpc.MorayStub]:
    """moray's gRPC server for the keyed app (tests/e2e/conftest.py)."""
    with grpc.insecure_channel(keyed_app.grpc_target) as channel:
        yield moray_pb2_grpc.MorayStub(channel)


@pytest.fixture(scope="module")
def key(keyed_app: Any) -> str:
    return str(keyed_app.config.api_key)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic {key}", "Bearer "],
                         ids=["missing", "wrong", "not-bearer", "empty"])
def test_api_key_required(keyed_stub: Any, key: str, authorization: str | None) -> None:
    metadata = (("authorization", authorization.format(key=key)),) if authorization else ()
    for call in (generate, stream):
        with pytest.raises(grpc.RpcError) as info:
            call(keyed_stub, metadata, prompt=PROMPT, max_tokens=2)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert key not in info.value.details()


def test_api_key_accepted(stub: Any, metadata: Any, keyed_stub: Any, key: str) -> None:
    keyed = (("authorization", f"Bearer {key}"),)
    fields = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0.0}
    expected = generate(stub, metadata, **fields)  # the same checkpoint, served without a key
    assert generate(keyed_stub, keyed, **fields).token_ids == expected.token_ids
    assert "".join(c.text for c in stream(keyed_stub, keyed, **fields)) == expected.text


def running_sequences(served_app: Any) -> int:
    response = httpx.get(f"{served_app.http_url}/v1/moray/status", timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return int(response.json()["dispatcher"]["running"])


def test_a_cancelled_stream_frees_its_slot(served_app: Any, stub: Any, metadata: Any) -> None:
    from moray.model.config import MixtralConfig

    context = MixtralConfig.load(served_app.model_dir).max_seq_len
    long = moray_pb2.GenerateRequest(prompt_token_ids=moray_pb2.TokenIds(ids=[1, 42]), temperature=0.0,
                                      max_tokens=min(context - 4, served_app.config.max_tokens_limit))
    call = stub.GenerateStream(long, metadata=metadata, timeout=TIMEOUT_S)
    assert next(call).finish_reason == ""
    assert running_sequences(served_app) >= 1
    call.cancel()
    gone = time.monotonic()
    while running_sequences(served_app) > 0:
        assert time.monotonic() - gone < 10.0, "the cancelled stream still holds its slot"
        time.sleep(0.2)


def test_readme_grpc_example(readme: Any, stub: Any, metadata: Any,
                             capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(readme("grpc-client"), "README.md", "exec"), {})
    reply = generate(stub, metadata, prompt="The capital of France is", max_tokens=16, temperature=0.0)
    shown = f"{reply.text} {list(reply.token_ids)} {reply.usage.completion_tokens}\n{reply.text}\n"
    assert capsys.readouterr().out == shown
