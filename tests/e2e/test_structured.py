"""Structured outputs through every interface of the served app (random weights: only the grammar makes
the output valid). Oracles: `jsonschema` for schemas, `re` for regexes, the official `openai` client
(its `parse` with a pydantic model included) for the wire format, the in-process engine for parity."""

from __future__ import annotations

import ast
import asyncio
import json
import re
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

import grpc
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

import moray
from moray.deploy.api import moray_pb2, moray_pb2_grpc
from moray.model.engine import GenerateRequest
from moray.model.sampling import SamplingParams

pytestmark = pytest.mark.slow

ServedApp = Any
T = TypeVar("T")
Oracle = Any
TIMEOUT_S = 300.0
MAX_TOKENS = 160
SHORT = {"type": "string", "maxLength": 5}
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 50}, "minItems": 1,
     "maxItems": 3},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}},
     "required": ["ok", "none"], "additionalProperties": False},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["p"],
     "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}, "note": SHORT,
                                      "flag": {"type": "boolean"}},
     "required": ["id"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"k": SHORT, "v": {"type": "boolean"}},
                                "required": ["k", "v"], "additionalProperties": False}, "maxItems": 2},
    {"type": "object", "properties": {"kind": {"const": "point"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}},
     "required": ["kind", "n"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "string", "maxLength": 4}]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]{2,5}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 1, "maxItems": 3, "uniqueItems": False}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "integer", "exclusiveMinimum": 10, "maximum": 20},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
        "type": "object", "properties": {"c": {"type": "integer", "minimum": 0, "maximum": 5}},
        "required": ["c"], "additionalProperties": False}},
        "required": ["b"], "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["x"], "additionalProperties": False}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
     "required": ["from", "to"], "additionalProperties": False},
    {"enum": [1, 2.5, "three", True, None]},
    {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["x", "y"]}],
     "items": False, "minItems": 2},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"], "maxLength": 3}},
     "required": ["maybe"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"enum": ["low", "mid", "high"]},
                                      "score": {"type": "integer", "minimum": -5, "maximum": 5},
                                      "extra": {"type": "array", "items": SHORT, "maxItems": 1}},
     "required": ["level", "score"], "additionalProperties": False},
]
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]
MODEL = "moray-tiny-e2e"  # conftest's served_app


def response_format(i: int) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}


def valid(schema: dict[str, Any], text: str) -> None:
    jsonschema.validate(json.loads(text), schema)


def aclient(served_app: ServedApp) -> openai.AsyncOpenAI:
    """A client for one `asyncio.run` (its connections belong to that event loop)."""
    return openai.AsyncOpenAI(base_url=served_app.base_url, api_key="unused", max_retries=0,
                              timeout=TIMEOUT_S)


async def limited(calls: list[Coroutine[Any, Any, T]], at_once: int = 16) -> list[T]:
    """The calls' results, at most `at_once` in flight (the served app's engine has 32 slots)."""
    gate = asyncio.Semaphore(at_once)

    async def one(call: Coroutine[Any, Any, T]) -> T:
        async with gate:
            return await call

    return await asyncio.gather(*(one(c) for c in calls))


@pytest.fixture(scope="module")
def client(served_app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=served_app.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def test_json_schemas_over_http_streamed_and_not(served_app: ServedApp) -> None:
    """All 20 schemas, each as a whole response and as a stream (chat), some as completions."""
    client = aclient(served_app)

    async def whole(i: int) -> tuple[str, str | None]:
        r = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,  # type: ignore
                                                  temperature=1.0, seed=i, response_format=response_format(i))
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    async def streamed(i: int) -> tuple[str, str | None]:
        chunks = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.9, seed=100 + i,  # type: ignore
            response_format=response_format(i), stream=True)
        parts, finish = [], None
        async for c in chunks:
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def completion(i: int) -> tuple[str, str | None]:
        r = await client.completions.create(model=MODEL, prompt="JSON:", max_tokens=MAX_TOKENS,
                                             temperature=0.0, extra_body={"guided_json": SCHEMAS[i]})
        return r.choices[0].text, r.choices[0].finish_reason

    async def everything() -> list[tuple[str, str | None]]:
        n = len(SCHEMAS)
        return await limited([*(whole(i) for i in range(n)), *(streamed(i) for i in range(n)),
                              *(completion(i) for i in range(0, n, 4))])

    outputs = asyncio.run(everything())
    schemas = SCHEMAS + SCHEMAS + SCHEMAS[::4]
    for schema, (text, finish) in zip(schemas, outputs, strict=True):
        assert finish == "stop", (schema, text)
        valid(schema, text)


class Reading(BaseModel):
    city: Literal["Paris", "Oslo", "Lima"]
    celsius: int = Field(ge=-40, le=50)
    rain: bool


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    out = client.chat.completions.parse(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                        temperature=0.7, seed=3, response_format=Reading)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Reading)
    assert message.parsed == Reading.model_validate_json(message.content or "")


def test_readme_example(readme: Any, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(readme("structured-output"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    # pydantic prints the name as Python's repr: quoted either way, escapes for what the model sampled
    found = re.fullmatch(r"name=(.+) population=(\d+)\n", printed, re.S)
    assert found, printed
    name = ast.literal_eval(found[1])
    assert isinstance(name, str) and len(name) <= 12 and 0 <= int(found[2]) <= 10**8, printed


def test_regex_choice_json_object_and_length(client: openai.OpenAI) -> None:
    regex = r"[A-Z]{2}-\d{2,4}"
    for i in range(2):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=1.0,
                                           seed=i, n=2, extra_body={"structured_outputs": {"regex": regex}})
        assert all(re.fullmatch(regex, c.message.content or "") for c in r.choices)
    choices = ["alpha", "beta", "gamma delta"]
    c = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=20, temperature=1.0, seed=1, n=3,
                                  extra_body={"guided_choice": choices})
    assert all(x.text in choices and x.finish_reason == "stop" for x in c.choices)
    cut = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                         response_format=response_format(15))  # needs more than 4 tokens
    assert cut.choices[0].finish_reason == "length"
    anything = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                              temperature=0, response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)
    assert (cut.choices[0].message.content or "").startswith("{")


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "invalid json constraint"),
    ({"guided_regex": "(unclosed"}, "invalid regex constraint"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "invalid grammar constraint"),
    ({"guided_choice": []}, "choice must be a non-empty list"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}},
     "only one kind of structured output"),
    ({"response_format": {"type": "json_schema"}}, "needs json_schema.schema"),
])
def test_bad_constraints_are_400_and_nothing_is_queued(served_app: ServedApp, body: dict[str, Any],
                                                       message: str) -> None:
    r = httpx.post(f"{served_app.base_url}/chat/completions", timeout=TIMEOUT_S,
                   json={"messages": MESSAGES, "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"] and r.json()["error"]["type"] == "BadRequestError"
    status = httpx.get(f"{served_app.base_url}/moray/status", timeout=TIMEOUT_S).json()["dispatcher"]
    assert status["waiting"] == status["running"] == 0
    assert httpx.get(f"{served_app.http_url}/health", timeout=TIMEOUT_S).status_code == 200


def test_free_request_batched_with_constrained_ones_equals_alone(served_app: ServedApp,
                                                                 oracle: Oracle) -> None:
    prompt = "The quick brown fox"

    async def batch() -> list[Any]:
        client = aclient(served_app)
        free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
        constrained = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                                  temperature=0.5, seed=i,
                                                  extra_body={"guided_json": SCHEMAS[i]})
                       for i in range(4)]
        return await asyncio.gather(free, *constrained)

    free, *_ = asyncio.run(batch())
    token_ids = free.choices[0].model_extra["token_ids"]
    prompt_ids = free.choices[0].model_extra["prompt_token_ids"]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    (alone,) = oracle([GenerateRequest(prompt_ids, greedy)])
    assert token_ids == [e.token_id for e in alone]


def test_grpc_and_python_client_take_the_same_constraints(served_app: ServedApp) -> None:
    channel = grpc.insecure_channel(served_app.grpc_target)
    stub = moray_pb2_grpc.MorayStub(channel)
    metadata = (("application", served_app.app_name),)
    for i in (0, 7, 15):
        so = moray_pb2.StructuredOutputs(json=json.dumps(SCHEMAS[i]))
        request = moray_pb2.GenerateRequest(prompt="JSON:", max_tokens=MAX_TOKENS, temperature=1.0, seed=i,
                                            structured_outputs=so)
        reply = stub.Generate(request, metadata=metadata, timeout=TIMEOUT_S)
        assert reply.finish_reason == "stop"
        valid(SCHEMAS[i], reply.text)
        chunks = list(stub.GenerateStream(request, metadata=metadata, timeout=TIMEOUT_S))
        assert "".join(c.text for c in chunks) == reply.text
    bad = moray_pb2.GenerateRequest(prompt="x", structured_outputs=moray_pb2.StructuredOutputs(regex="(x"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(bad, metadata=metadata, timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regex" in (err.value.details() or "")
    channel.close()

    python = moray.connect(served_app.ray_address, app=served_app.app_name)
    for i in (3, 11, 19):
        done = python.generate("JSON:", max_tokens=MAX_TOKENS, temperature=1.0, seed=i,
                               guided_json=SCHEMAS[i])
        assert done.finish_reason == "stop"
        valid(SCHEMAS[i], done.text)
    streamed = "".join(python.stream("JSON:", max_tokens=MAX_TOKENS, temperature=0, guided_json=SCHEMAS[19]))
    valid(SCHEMAS[19], streamed)
    chat = python.chat(MESSAGES, max_tokens=MAX_TOKENS, temperature=0, response_format=response_format(4))
    valid(SCHEMAS[4], chat.text)


# ---- tool calls -------------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                      "parameters": SCHEMAS[0]}},
    {"type": "function", "function": {"name": "add", "description": "Add two small numbers.",
                                      "parameters": SCHEMAS[8]}},
    {"type": "function", "function": {"name": "pick_colour", "parameters": {
        "type": "object", "properties": {"colour": SCHEMAS[3]}, "required": ["colour"],
        "additionalProperties": False}}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}  # type: ignore[index]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_calls(chunks: Any) -> tuple[list[dict[str, Any]], str | None]:
    """OpenAI's stream of `delta.tool_calls` put back together by index."""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] = (d.function.name if d.function else None) or call["name"]
            call["arguments"] += (d.function.arguments if d.function else "") or ""
        if c.choices and c.choices[0].finish_reason:
            finish = c.choices[0].finish_reason
    return [calls[i] for i in sorted(calls)], finish


def check_call(name: str, arguments: str, call_id: str) -> None:
    assert name in TOOL_SCHEMAS and re.fullmatch(r"[A-Za-z0-9]{9}", call_id)
    jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
def test_tool_calls_whole_and_streamed(client: openai.OpenAI, tool_choice: Any) -> None:
    for seed in range(2):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice,  # type: ignore
                                           max_tokens=MAX_TOKENS, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call.function.name, call.function.arguments, call.id)  # type: ignore[union-attr]
            if isinstance(tool_choice, dict):
                assert call.function.name == "add"  # type: ignore[union-attr]
    chunks = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice,  # type: ignore
                                            max_tokens=MAX_TOKENS, temperature=1.0, seed=7, stream=True)
    calls, finish = streamed_calls(chunks)
    assert finish == "tool_calls" and calls
    for call in calls:
        check_call(call["name"], call["arguments"], call["id"])


def test_follow_up_turn_is_tokenized_as_mistral_common_does(served_app: ServedApp,
                                                            client: openai.OpenAI) -> None:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore
                                           max_tokens=MAX_TOKENS, temperature=0)
    calls = first.choices[0].message.tool_calls or []
    history = [*ASK, {"role": "assistant", "content": None,
                      "tool_calls": [c.model_dump(include={"id", "type", "function"}) for c in calls]},
               *({"role": "tool", "tool_call_id": c.id, "name": c.function.name, "content": '{"ok": true}'}  # type: ignore[union-attr]
                 for c in calls)]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4,  # type: ignore
                                       temperature=0, extra_body={"return_token_ids": True})
    mistral = MistralTokenizer.from_file(str(served_app.model_dir / "tokenizer.model.v3"))
    expected = mistral.encode_chat_completion(ChatCompletionRequest.from_openai(history, tools=TOOLS)).tokens
    assert r.choices[0].model_extra["prompt_token_ids"] == expected  # type: ignore[index]
    assert mistral.instruct_tokenizer.tokenizer.get_control_token("[TOOL_RESULTS]") in expected


@pytest.mark.parametrize("body, message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'nope', which is not"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "cannot be combined"),
])
def test_bad_tool_choices_are_400(served_app: ServedApp, body: dict[str, Any], message: str) -> None:
    r = httpx.post(f"{served_app.base_url}/chat/completions", timeout=TIMEOUT_S,
                   json={"messages": ASK, "max_tokens": 8, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
