"""The OpenAI-compatible HTTP API, driven by the official `openai` client and raw HTTP.

Oracles: the in-process model (every expert local, `oracle` fixture) for tokens, text and
log-probs; the `openai` client's parsing and error classes for the wire format; non-streamed
responses for streamed ones.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from moray.model.config import MixtralConfig
from moray.model.engine import GenerateRequest, TokenEvent
from moray.model.sampling import SamplingParams
from moray.model.tokenizer import Tokenizer

Oracle = Any  # conftest's `oracle` fixture: requests -> each one's events, run alone in process
ServedApp = Any  # conftest's `served_app` fixture
Readme = Any  # conftest's `readme` fixture: example name -> code
pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Once upon a time", "In 1905, a clerk in Bern"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
EXTRA = {"ignore_eos": True, "return_token_ids": True}
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def client(served_app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=served_app.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(tiny_dir)


def greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


def text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def post(app: ServedApp, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{app.base_url}{path}", json=body, timeout=TIMEOUT_S, **kw)


# ---- parity with the in-process model -----------------------------------------------------------------
def test_models_lists_the_served_model(client: openai.OpenAI, served_app: ServedApp) -> None:
    assert [m.id for m in client.models.list().data] == [served_app.model_name]


def test_greedy_completion_equals_in_process(client: openai.OpenAI, served_app: ServedApp, oracle: Oracle,
                                             tokenizer: Tokenizer) -> None:
    wants = oracle([GenerateRequest(tokenizer.encode(p, bos=True), greedy(12, 3)) for p in PROMPTS])
    for prompt, want in zip(PROMPTS, wants, strict=True):
        r = client.completions.create(model=served_app.model_name, prompt=prompt, max_tokens=12,
                                      temperature=0, logprobs=3, extra_body=EXTRA)
        choice = r.choices[0]
        assert choice.token_ids == ids(want)  # type: ignore[attr-defined]
        assert choice.text == text(want)
        assert choice.finish_reason == "length"
        assert r.usage is not None
        prompt_len = len(tokenizer.encode(prompt, bos=True))
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_len, 12)
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert choice.logprobs.token_logprobs == pytest.approx([e.logprob for e in want], abs=1e-4)
        assert choice.logprobs.tokens == [tokenizer.token_text(e.token_id) for e in want]
        for got, e in zip(choice.logprobs.top_logprobs or [], want, strict=True):
            expected = {tokenizer.token_text(t): lp for t, lp in e.top_logprobs or []}
            expected[tokenizer.token_text(e.token_id)] = e.logprob
            assert got.keys() == expected.keys()
            assert list(got.values()) == pytest.approx(list(expected.values()), abs=1e-4)


def test_token_id_prompt_and_batch_equal_single_text_prompts(client: openai.OpenAI, served_app: ServedApp,
                                                              tokenizer: Tokenizer) -> None:
    singles = [client.completions.create(model=served_app.model_name, prompt=p, max_tokens=6, temperature=0,
                                         extra_body=EXTRA).choices[0].text for p in PROMPTS[:2]]
    as_ids = [tokenizer.encode(p, bos=True) for p in PROMPTS[:2]]
    batch = client.completions.create(model=served_app.model_name, prompt=as_ids, max_tokens=6, temperature=0,
                                      extra_body=EXTRA)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == singles
    assert batch.usage is not None and batch.usage.prompt_tokens == sum(len(i) for i in as_ids)


def test_chat_greedy_equals_in_process(client: openai.OpenAI, served_app: ServedApp, oracle: Oracle,
                                       tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode_chat(MESSAGES)
    want = oracle([GenerateRequest(prompt, greedy(10, 2))])[0]
    r = client.chat.completions.create(model=served_app.model_name, messages=MESSAGES,  # type: ignore[arg-type]
                                       max_tokens=10, temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body=EXTRA)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text(want)
    assert choice.token_ids == ids(want)  # type: ignore[attr-defined]
    assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
    content = choice.logprobs.content if choice.logprobs else None
    assert content is not None and len(content) == len(want)
    for got, e in zip(content, want, strict=True):
        assert got.token == tokenizer.token_text(e.token_id)
        assert got.bytes == list(got.token.encode())
        assert got.logprob == pytest.approx(e.logprob, abs=1e-4)
        top = e.top_logprobs or []
        assert [t.token for t in got.top_logprobs] == [tokenizer.token_text(t) for t, _ in top]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([lp for _, lp in top], abs=1e-4)


def test_prompt_scores_equal_transformers(served_app: ServedApp, teacher_forced: Any) -> None:
    """Teacher-forced scores through 2 shards (`echo` + `logprobs`, `max_tokens` 0, the `openai` client)
    equal transformers' MixtralForCausalLM log-softmax on the same checkpoint, for a prompt longer than
    one prefill step (max_batch_tokens 512)."""
    import torch

    transformers = pytest.importorskip("transformers")
    tokens = [1, *torch.randint(3, 32000, (599,), generator=torch.Generator().manual_seed(23)).tolist()]
    hf = transformers.MixtralForCausalLM.from_pretrained(served_app.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([tokens])).logits[0, :-1].float(), dim=-1)  # [599, V]
    scored = teacher_forced(served_app.base_url, served_app.model_name, tokens)
    want = expected.gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1)
    assert torch.tensor(scored.logprobs).sub(want).abs().max().item() <= 1e-4
    assert scored.argmax == expected.argmax(dim=-1).tolist()


# ---- sampling options ---------------------------------------------------------------------------------
SEEDED = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 7}


def test_streamed_completion_equals_non_streamed(client: openai.OpenAI, served_app: ServedApp) -> None:
    full = client.completions.create(model=served_app.model_name, prompt=PROMPTS[0], **SEEDED)
    chunks = list(client.completions.create(model=served_app.model_name, prompt=PROMPTS[0], stream=True,
                                            **SEEDED))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_streamed_chat_equals_non_streamed(client: openai.OpenAI, served_app: ServedApp) -> None:
    """Both requests find the prompt's blocks in the prefix cache (the first request puts them there):
    a cold prefill computes the prompt in other row counts, so its logits can differ in the last bits,
    and a random model's near-uniform distribution makes the seeded draw tell them apart (run alone,
    the test met that; equality across batch shapes is what --deterministic guarantees)."""
    client.chat.completions.create(model=served_app.model_name, messages=MESSAGES,  # type: ignore[arg-type]
                                   max_tokens=1)
    full = client.chat.completions.create(model=served_app.model_name, messages=MESSAGES,  # type: ignore[arg-type]
                                          **SEEDED)
    chunks = list(client.chat.completions.create(model=served_app.model_name, messages=MESSAGES,  # type: ignore
                                                 stream=True, **SEEDED))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_include_usage_sends_a_last_usage_chunk(client: openai.OpenAI, served_app: ServedApp) -> None:
    full = client.chat.completions.create(model=served_app.model_name, messages=MESSAGES,  # type: ignore[arg-type]
                                          **SEEDED)
    chunks = list(client.chat.completions.create(model=served_app.model_name, messages=MESSAGES,  # type: ignore
                                                 stream=True, stream_options={"include_usage": True},
                                                 **SEEDED))
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None and c.choices for c in chunks[:-1])


def test_sse_wire_format(served_app: ServedApp) -> None:
    """`data: {json}` events separated by blank lines, ending `data: [DONE]`, as OpenAI sends them."""
    body = {"prompt": PROMPTS[1], "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    r = post(served_app, "/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert {p["object"] for p in payloads} == {"text_completion"}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 5
    assert all(p["usage"] is None for p in payloads[:-1])


def test_stop_strings_end_the_text_before_them(client: openai.OpenAI, served_app: ServedApp) -> None:
    opts: dict[str, Any] = {"model": served_app.model_name, "prompt": PROMPTS[2], "max_tokens": 24,
                            "temperature": 0, "extra_body": EXTRA}
    full = client.completions.create(**opts).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"the tiny model's text has no usable middle: {full!r}"
    cut = client.completions.create(**opts, stop=[stop, "\x00never"]).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = client.completions.create(**opts, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_n_choices_are_seed_plus_i(client: openai.OpenAI, served_app: ServedApp) -> None:
    opts: dict[str, Any] = {"model": served_app.model_name, "prompt": PROMPTS[0], "max_tokens": 8,
                            "temperature": 1.0}
    both = client.completions.create(**opts, n=2, seed=11)
    singles = [client.completions.create(**opts, seed=11 + i) for i in range(2)]
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [s.choices[0].text for s in singles]
    assert both.usage is not None and singles[0].usage is not None
    assert both.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert both.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles if s.usage)


def test_a_steps_tokens_for_all_choices_reach_the_ingress_in_one_message(served_app: ServedApp) -> None:
    """n=4 choices decode together: each engine step's 4 tokens travel from the dispatcher to the ingress
    as one streamed message, so the ingress receives at most one message per step (per-token streaming
    would be 4 a step)."""
    before = status(served_app)
    body = {"model": served_app.model_name, "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 1.0,
            "seed": 5, "n": 4, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{served_app.base_url}/completions", json=body, timeout=TIMEOUT_S) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    after = status(served_app)
    assert sorted({c["choices"][0]["index"] for c in chunks}) == [0, 1, 2, 3]
    steps = after["dispatcher"]["time_steps"] - before["dispatcher"]["time_steps"]
    messages = after["ingress"]["messages"] - before["ingress"]["messages"]
    assert after["ingress"]["tokens"] - before["ingress"]["tokens"] == 4 * 8
    assert 8 <= steps and 1 <= messages <= steps, (messages, steps)


def test_echo_prepends_the_prompt(client: openai.OpenAI, served_app: ServedApp) -> None:
    opts: dict[str, Any] = {"model": served_app.model_name, "prompt": PROMPTS[1], "max_tokens": 5,
                            "temperature": 0}
    plain = client.completions.create(**opts).choices[0].text
    assert client.completions.create(**opts, echo=True).choices[0].text == PROMPTS[1] + plain


def test_request_id_is_propagated(served_app: ServedApp) -> None:
    r = post(served_app, "/completions", {"prompt": "hi", "max_tokens": 2},
             headers={"X-Request-Id": "e2e-id.42"})
    assert r.status_code == 200
    assert r.headers.get_list("x-request-id") == ["e2e-id.42"]
    assert r.json()["id"] == "cmpl-e2e-id.42"
    fresh = post(served_app, "/completions", {"prompt": "hi", "max_tokens": 2})
    assert len(fresh.headers.get_list("x-request-id")) == 1


# ---- errors -----------------------------------------------------------------------------------------
def error_cases(app: ServedApp) -> dict[str, tuple[str, Any, int, str | None]]:
    """name -> (path, body, status, param); body bytes are sent raw."""
    ctx, limit = MixtralConfig.load(app.model_dir).max_seq_len, app.config.max_tokens_limit
    return {
        "malformed-json": ("/completions", b'{"prompt": "x",', 400, None),
        "not-an-object": ("/completions", [1, 2], 400, None),
        "missing-prompt": ("/completions", {"max_tokens": 3}, 400, "prompt"),
        "wrong-type": ("/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        "temperature-negative": ("/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
        "max-tokens-zero": ("/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        "max-tokens-over-limit": ("/completions", {"prompt": "x", "max_tokens": limit + 1}, 400,
                                  "max_tokens"),
        "n-over-limit": ("/completions", {"prompt": "x", "n": app.config.max_n + 1}, 400, "n"),
        "five-stops": ("/completions", {"prompt": "x", "stop": list("abcde")}, 400, "stop"),
        "logprobs-over-5": ("/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
        "prompt-over-context": ("/completions", {"prompt": [5] * ctx, "max_tokens": 4}, 400, None),
        "prompt-over-context-streamed": ("/completions", {"prompt": [5] * ctx, "stream": True}, 400, None),
        "token-out-of-vocab": ("/completions", {"prompt": [1, 10**7]}, 400, None),
        "empty-prompt": ("/completions", {"prompt": []}, 400, "prompt"),
        "chat-no-messages": ("/chat/completions", {"messages": []}, 400, "messages"),
        "chat-bad-role": ("/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
                          "messages"),
        "chat-top-logprobs-alone": ("/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400,
                                    "top_logprobs"),
        "unknown-model": ("/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
        "unknown-route": ("/nowhere", {"prompt": "x"}, 404, None),
        "body-too-large": ("/completions", {"prompt": "x" * (app.config.max_body_bytes + 10)}, 413, None),
    }


ERROR_NAMES = ["malformed-json", "not-an-object", "missing-prompt", "wrong-type", "temperature-negative",
               "max-tokens-zero", "max-tokens-over-limit", "n-over-limit", "five-stops", "logprobs-over-5",
               "prompt-over-context", "prompt-over-context-streamed", "token-out-of-vocab", "empty-prompt",
               "chat-no-messages", "chat-bad-role", "chat-top-logprobs-alone", "unknown-model",
               "unknown-route", "body-too-large"]


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_errors_are_openai_json_with_the_right_status(served_app: ServedApp, name: str) -> None:
    path, body, status, param = error_cases(served_app)[name]
    if isinstance(body, bytes):
        r = httpx.post(f"{served_app.base_url}{path}", content=body, timeout=TIMEOUT_S,
                       headers={"content-type": "application/json"})
    else:
        r = post(served_app, path, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param


def test_openai_client_raises_its_error_classes(client: openai.OpenAI, served_app: ServedApp) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=served_app.model_name, prompt="x", temperature=-1)
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)  # type: ignore[arg-type]


def test_unknown_fields_are_ignored(served_app: ServedApp) -> None:
    r = post(served_app, "/completions", {"prompt": "x", "max_tokens": 2, "frobnicate": {"a": [1]},
                                          "presence_penalty": 0.0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_server_still_answers_after_errors(client: openai.OpenAI, served_app: ServedApp) -> None:
    for path, body, _, _ in error_cases(served_app).values():
        if not isinstance(body, bytes):
            post(served_app, path, body)
    assert httpx.get(f"{served_app.http_url}/health", timeout=TIMEOUT_S).status_code == 200
    r = client.completions.create(model=served_app.model_name, prompt="ok", max_tokens=3, temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 3 or r.choices[0].finish_reason == "stop"


def test_a_full_queue_answers_429_with_retry_after(served_app: ServedApp) -> None:
    cfg = served_app.config
    flood = cfg.max_num_seqs + cfg.max_waiting + 48

    async def one(http: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"prompt": [1, 100 + i], "max_tokens": 64, "temperature": 0, "ignore_eos": True}
        return await http.post(f"{served_app.base_url}/completions", json=body)

    async def all_at_once() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=flood)
        async with httpx.AsyncClient(timeout=TIMEOUT_S * 2, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(flood)))

    responses = asyncio.run(all_at_once())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) >= cfg.max_waiting
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] and r.json()["error"]["code"] == 429
        else:
            assert r.json()["usage"]["completion_tokens"] == 64


# ---- concurrency and cancellation ---------------------------------------------------------------------
def test_32_concurrent_streams_are_each_right(served_app: ServedApp, oracle: Oracle) -> None:
    prompts = [[1, 200 + 37 * i, 300 + i, 4000 + 11 * i] for i in range(32)]
    wants = oracle([GenerateRequest(p, greedy(10)) for p in prompts])
    aclient = openai.AsyncOpenAI(base_url=served_app.base_url, api_key="unused", max_retries=0,
                                 timeout=TIMEOUT_S)

    async def one(p: list[int]) -> tuple[str, list[int]]:
        stream = await aclient.completions.create(model=served_app.model_name, prompt=p, max_tokens=10,
                                                  temperature=0, stream=True, extra_body=EXTRA)
        pieces, token_ids = [], []
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            token_ids = getattr(chunk.choices[0], "token_ids", None) or token_ids
        return "".join(pieces), token_ids

    async def all_together() -> list[tuple[str, list[int]]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    for (got_text, got_ids), want in zip(asyncio.run(all_together()), wants, strict=True):
        assert got_ids == ids(want)
        assert got_text == text(want)


def status(app: ServedApp) -> dict[str, Any]:
    r = httpx.get(f"{app.base_url}/moray/status", timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def engine_stats(app: ServedApp) -> dict[str, Any]:
    stats: dict[str, Any] = status(app)["dispatcher"]
    return stats


def test_a_client_that_disconnects_frees_its_slot(served_app: ServedApp) -> None:
    import time

    ctx = MixtralConfig.load(served_app.model_dir).max_seq_len
    body = {"prompt": [1, 42], "max_tokens": ctx - 4, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{served_app.base_url}/completions", json=body, timeout=TIMEOUT_S) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine_stats(served_app)["running"] >= 1
    gone = time.monotonic()
    while engine_stats(served_app)["running"] > 0:
        assert time.monotonic() - gone < 10.0, "the cancelled request still holds its slot"
        time.sleep(0.2)
    assert engine_stats(served_app)["waiting"] == 0


def test_status_lists_every_deployment(served_app: ServedApp) -> None:
    """What `moray status` prints: deployments, each shard replica's load report, [L][E] token tables."""
    body = {"prompt": "status check", "max_tokens": 3, "temperature": 0}
    assert httpx.post(f"{served_app.base_url}/completions", json=body, timeout=TIMEOUT_S).status_code == 200
    status = httpx.get(f"{served_app.base_url}/moray/status", timeout=TIMEOUT_S).json()
    deployments = status["deployments"]
    assert {"openai-ingress", "dispatcher", "expert-shard-0", "expert-shard-1"} <= set(deployments)
    assert deployments["expert-shard-1"]["replicas"].get("RUNNING") == 1
    assert status["status"] == "RUNNING"
    cfg = MixtralConfig.load(served_app.model_dir)
    assert {name: len(s["replicas"]) for name, s in status["shards"].items()} == {"expert-shard-0": 1,
                                                                                   "expert-shard-1": 1}
    tokens = np.asarray(status["experts"]["tokens"])  # [L, E]
    assert tokens.shape == (cfg.n_layers, cfg.n_experts)
    per_layer = tokens.sum(1)
    assert (per_layer == per_layer[0]).all() and per_layer[0] > 0 and per_layer[0] % cfg.top_k == 0


# ---- the README's examples run as shown -------------------------------------------------------------------
def test_replicas_run_with_the_configured_threads_and_passive_omp_waits(served_app: ServedApp) -> None:
    """The dispatcher and shard processes got OpenMP's passive wait settings in their environment (they
    must be there before OpenMP loads) and torch's threads from the config."""
    from ray import serve

    from moray.actors.threads import node_cores

    passive = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}
    dispatcher = engine_stats(served_app)
    shard = serve.get_deployment_handle("expert-shard-1", served_app.app_name).info.remote().result()
    for process in (dispatcher, shard):
        assert process["omp_env"] == passive
        assert process["torch_threads"] == (served_app.config.torch_threads or node_cores())  # 0: every core


def test_readme_curl_examples(readme: Readme) -> None:
    for name in ("curl-completion", "curl-chat-stream", "curl-score"):
        script = readme(name)
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S,
                             env={"PATH": "/usr/bin:/bin", "MORAY_API_KEY": ""})
        assert out.returncode == 0, out.stderr
        if name == "curl-completion":
            assert json.loads(out.stdout)["choices"][0]["text"] is not None
        elif name == "curl-score":
            choice = json.loads(out.stdout)["choices"][0]
            assert choice["text"] == "The capital of France is Paris"
            assert len(choice["logprobs"]["token_logprobs"]) == len(choice["prompt_logprobs"]) > 1
        else:
            assert out.stdout.rstrip().endswith("data: [DONE]")


def test_readme_openai_example(readme: Readme, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(readme("openai-client"), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


# ---- the keyed app (an API key and a 5 s request timeout; tests/e2e/conftest.py) ---------------------------
@pytest.fixture(scope="module")
def keyed_url(keyed_app: ServedApp) -> str:
    return str(keyed_app.http_url)


@pytest.fixture(scope="module")
def key(keyed_app: ServedApp) -> str:
    return str(keyed_app.config.api_key)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic {key}", "Bearer"],
                         ids=["missing", "wrong", "not-bearer", "empty"])
def test_api_key_is_required(keyed_url: str, key: str, authorization: str | None) -> None:
    headers = {"Authorization": authorization.format(key=key)} if authorization else {}
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/v1/moray/status")):
        r = httpx.request(method, f"{keyed_url}{path}", json={"prompt": "x"}, headers=headers,
                          timeout=TIMEOUT_S)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == 401 and key not in r.text


def test_api_key_accepted_and_health_open(keyed_url: str, key: str) -> None:
    assert httpx.get(f"{keyed_url}/health", timeout=TIMEOUT_S).status_code == 200
    keyed = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=key, max_retries=2, timeout=TIMEOUT_S)
    r = keyed.completions.create(model="moray-tiny-e2e", prompt="x", max_tokens=1, temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 1


def test_an_error_after_the_stream_started_is_an_error_event(keyed_url: str, key: str) -> None:
    """The request timeout strikes mid-stream: `data: {"error": ...}` then `data: [DONE]`."""
    body = {"prompt": [1, 42], "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{keyed_url}/v1/completions", json=body, headers=auth, timeout=TIMEOUT_S)
    assert r.status_code == 200
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert error["code"] == 504 and set(error) == {"message", "type", "param", "code"}
    assert len(events) > 4  # tokens came before the error
    unary = httpx.post(f"{keyed_url}/v1/completions", json={**body, "stream": False},
                       headers=auth, timeout=TIMEOUT_S)
    assert unary.status_code == 504 and unary.json()["error"]["code"] == 504
