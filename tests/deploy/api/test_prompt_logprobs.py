"""Prompt logprobs through the real ingress over an in-process engine: `echo` with `logprobs` (OpenAI's
legacy shape, streamed and not, `max_tokens` 0 for scoring only), vLLM's `prompt_logprobs` on
completions and chat, gRPC's `prompt_logprobs`, and the refusals. The numbers themselves are checked
against transformers in tests/model/test_parity.py and through the served app in tests/e2e."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from moray.deploy.api import moray_pb2
from moray.deploy.api.http import create_api
from moray.deploy.api.ingress import OpenAIIngress

KEY = "sk-api-test-" + "k" * 20  # conftest's KEY
PROMPT = "The quick brown fox jumps"
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def post(ingress: OpenAIIngress, path: str, body: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_api(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            return await client.post(f"/v1{path}", json=body, headers={"authorization": f"Bearer {KEY}"})

    return asyncio.run(go())


def completion(ingress: OpenAIIngress, **body: Any) -> dict[str, Any]:
    r = post(ingress, "/completions", {"prompt": PROMPT, **GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def streamed(ingress: OpenAIIngress, **body: Any) -> list[dict[str, Any]]:
    r = post(ingress, "/completions", {"prompt": PROMPT, **GREEDY, **body, "stream": True})
    assert r.status_code == 200, r.text
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def joined_logprobs(chunks: list[dict[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for choice in c["choices"]:
            for key, values in (choice.get("logprobs") or {}).items():
                out[key] += values
    return out


@pytest.fixture(scope="module")
def prompt_ids(ingress: OpenAIIngress) -> list[int]:
    return ingress.tokenizer.encode(PROMPT, bos=True)


def test_echo_with_logprobs_prepends_the_scored_prompt(ingress: OpenAIIngress,
                                                       prompt_ids: list[int]) -> None:
    plain = completion(ingress, max_tokens=3, logprobs=2)["choices"][0]
    out = completion(ingress, max_tokens=3, logprobs=2, echo=True, prompt_logprobs=2)["choices"][0]
    lp, n = out["logprobs"], len(prompt_ids)
    assert out["text"] == ingress.tokenizer.decode(prompt_ids) + plain["text"]
    assert lp["tokens"] == [ingress.token_text(t) for t in prompt_ids] + plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][n:] == plain["logprobs"]["token_logprobs"]
    assert lp["top_logprobs"][n:] == plain["logprobs"]["top_logprobs"]
    # the same scores in vLLM's shape: {token id: {logprob, rank, decoded_token}}, the prompt token first
    vllm = out["prompt_logprobs"]
    assert len(vllm) == n and vllm[0] is None
    for i, (token, entry) in enumerate(zip(prompt_ids[1:], vllm[1:], strict=True), start=1):
        mine = entry[str(token)]
        assert mine["logprob"] == lp["token_logprobs"][i] and mine["decoded_token"] == lp["tokens"][i]
        best = sorted(entry.values(), key=lambda e: -e["logprob"])
        assert {e["rank"] for e in best} >= {1, 2} and best[0]["rank"] == 1
        assert max(lp["top_logprobs"][i].values()) == best[0]["logprob"]
        assert (mine["rank"] == 1) == (mine["logprob"] == best[0]["logprob"])
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp["tokens"],
                                                                      strict=False))


def test_streamed_echo_with_logprobs_equals_non_streamed(ingress: OpenAIIngress) -> None:
    body = {"max_tokens": 4, "logprobs": 3, "echo": True}
    whole = completion(ingress, **body)["choices"][0]
    chunks = streamed(ingress, **body)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["text"]
    assert joined_logprobs(chunks) == whole["logprobs"]


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_with_echo_scores_the_prompt_only(ingress: OpenAIIngress, prompt_ids: list[int],
                                                       stream: bool) -> None:
    body = {"max_tokens": 0, "logprobs": 1, "echo": True, "return_token_ids": True}
    scored = completion(ingress, **{**body, "max_tokens": 2})["choices"][0]["logprobs"]
    n = len(prompt_ids)
    if stream:
        chunks = streamed(ingress, **body, stream_options={"include_usage": True})
        choice = {**chunks[-2]["choices"][0], "logprobs": joined_logprobs(chunks),
                  "text": "".join(c["choices"][0]["text"] for c in chunks if c["choices"])}
        usage = chunks[-1]["usage"]
    else:
        out = completion(ingress, **body)
        choice, usage = out["choices"][0], out["usage"]
    assert choice["text"] == ingress.tokenizer.decode(prompt_ids) and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {k: v[:n] for k, v in scored.items()}
    assert choice["token_ids"] == [] and choice["prompt_token_ids"] == prompt_ids
    assert usage == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}


def test_chat_prompt_logprobs_cover_the_conversation(ingress: OpenAIIngress) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    r = post(ingress, "/chat/completions", {"messages": messages, "max_tokens": 2, "prompt_logprobs": 0,
                                            "return_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    out = r.json()
    conversation = out["choices"][0]["prompt_token_ids"]
    scores = out["prompt_logprobs"]
    assert len(scores) == len(conversation) > 1 and scores[0] is None
    assert [list(map(int, s)) for s in scores[1:]] == [[t] for t in conversation[1:]]  # k = 0: the token
    for s, t in zip(scores[1:], conversation[1:], strict=True):
        assert s[str(t)]["rank"] >= 1 and s[str(t)]["logprob"] <= 0


def test_grpc_prompt_logprobs_equal_http(ingress: OpenAIIngress, prompt_ids: list[int]) -> None:
    http = completion(ingress, max_tokens=2, prompt_logprobs=3)["choices"][0]["prompt_logprobs"]
    request = moray_pb2.GenerateRequest(prompt=PROMPT, max_tokens=2, temperature=0.0, prompt_logprobs=3)
    metadata = [("authorization", f"Bearer {KEY}")]
    reply = asyncio.run(ingress.Generate(request, metadata=metadata))

    async def chunks() -> list[moray_pb2.GenerateChunk]:
        return [c async for c in ingress.GenerateStream(request, metadata=metadata)]

    first, *rest = asyncio.run(chunks())
    assert list(first.prompt_logprobs) == list(reply.prompt_logprobs)
    assert not any(c.prompt_logprobs for c in rest)
    assert [p.token_id for p in reply.prompt_logprobs] == prompt_ids[1:]
    for p, entry in zip(reply.prompt_logprobs, http[1:], strict=True):
        assert entry[str(p.token_id)] == {"logprob": p.logprob, "rank": p.rank,
                                          "decoded_token": ingress.token_text(p.token_id)}
        assert [(t.token_id, t.logprob) for t in p.top_logprobs] == [
            (int(t), e["logprob"]) for t, e in sorted(entry.items(), key=lambda kv: kv[1]["rank"])
            if e["rank"] <= 3][: len(p.top_logprobs)]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1,
                           "stream": True}, "prompt_logprobs"),
], ids=["max-tokens-0-without-echo", "prompt-logprobs-streamed", "prompt-logprobs-21", "chat-streamed"])
def test_refusals(ingress: OpenAIIngress, path: str, body: dict[str, Any], param: str) -> None:
    r = post(ingress, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
