"""The OpenAI-compatible ingress: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
`/v1/moray/status`, `/v1/moray/routing`, and gRPC's `Generate` / `GenerateStream` (`grpc.py`).

`OpenAIIngress` admits a request (`admission.py`: limits, one engine job per prompt x choice), runs
its choices side by side (`fanout.py`) through an `EngineClient` (`engine.py`: the dispatcher's
Serve handle, or an engine in this process) and formats the `TokenEvent`s as OpenAI JSON or
Server-Sent Events. It runs as the Serve ingress deployment (`deploy/app.py`; the FastAPI app,
`http.py`, is built per replica by `__serve_build_asgi_app__`) and in process (tests, bench).

Prompt scores (the engine's `PromptLogprob`s, on a choice's first event) become `echo`'s logprobs of the
prompt tokens (OpenAI's legacy shape: the first token's logprob and alternatives null) and vLLM's
`prompt_logprobs` (per completion choice; per response in chat). `echo` with `max_tokens` 0 shows the
prompt only: the one token the engine generated is left out of the text, logprobs, ids and usage.

Every failure is an OpenAI error body (`errors.APIError`). Each choice's first token is awaited
before a response starts, so a request the engine refuses is a real HTTP error; an error after
that is a `data: {"error": ...}` event before `data: [DONE]`. The handle-callable methods
(`complete`, `complete_stream`, `chat`, `chat_stream`, `models`; `moray.connect`'s client) share
this path with HTTP.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import BaseModel

from moray.deploy.api import fanout
from moray.deploy.api.admission import Admission, InFlight, parse
from moray.deploy.api.engine import engine_client
from moray.deploy.api.fanout import Started
from moray.deploy.api.grpc import GrpcMixin
from moray.deploy.api.http import create_api
from moray.deploy.api.logprobs import (
    chat_logprobs,
    completion_logprobs,
    logprob_rows,
    prompt_logprobs,
    prompt_rows,
)
from moray.deploy.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    Choice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Job,
    ModelCard,
    ModelList,
    PromptLogprobs,
    SamplingFields,
    TokenLogprobs,
    Usage,
    chunk_dict,
    now,
    usage,
    with_token_ids,
)
from moray.deploy.api.tools import ToolAnswer, ToolStream
from moray.deploy.serve.config import ServerConfig
from moray.model.config import MixtralConfig
from moray.model.engine import GenerateRequest, PromptLogprob, TokenEvent
from moray.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class OpenAIIngress(GrpcMixin):
    """The API front: admits requests, fans choices out to the engine, formats OpenAI JSON.

    The gRPC methods (`Generate`, `GenerateStream`) come from `GrpcMixin` and use `admission`,
    `run_jobs` and `served_model_name` from here.
    """

    def __init__(self, engine: Any, config: ServerConfig | dict[str, Any], model_dir: str) -> None:
        self.config = config if isinstance(config, ServerConfig) else ServerConfig(**config)
        # Serve passes the dispatcher's handle
        self.engine = engine_client(engine, self.config.app_name, self.config.resume_timeout_s)
        self.served_model_name: str = self.config.served_model_name or "moray"
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        model_cfg = MixtralConfig.load(model_dir)
        self.max_model_len = min(self.config.max_model_len or model_cfg.max_seq_len, model_cfg.max_seq_len)
        self.admission = Admission(self.config, self.tokenizer, model_cfg.vocab_size, self.max_model_len)
        self.in_flight = InFlight(self.config)
        self._token_text: dict[int, str] = {}
        self.streamed: dict[str, int] = {"messages": 0, "tokens": 0}  # items, tokens from the engine
        log.info("ingress ready: model %r, context %d, api key %s", self.served_model_name,
                 self.max_model_len, "required" if self.config.api_key else "off")

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self)

    def token_text(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.token_text(token_id)
        return self._token_text[token_id]

    async def stream_jobs(self, jobs: list[Job]) -> AsyncIterator[list[TokenEvent]]:
        """The jobs' events as one stream, an item per engine step; closing it early frees the engine's
        sequences."""
        requests = [GenerateRequest(list(j.prompt_ids), j.params, j.request_id) for j in jobs]
        entered = 0
        try:
            for _ in requests:
                self.in_flight.enter()
                entered += 1
            async for events in self.engine.generate_steps(requests):
                self.streamed["messages"] += 1
                self.streamed["tokens"] += len(events)
                yield events
        finally:
            for _ in range(entered):
                self.in_flight.leave()

    async def _start(self, jobs: list[Job]) -> Started:
        return await fanout.start(jobs, self.stream_jobs(jobs), self.config.request_timeout_s)

    async def _collect(self, jobs: list[Job]) -> list[Choice]:
        return await fanout.collect(jobs, self.stream_jobs(jobs), self.config.request_timeout_s)

    async def run_jobs(self, jobs: list[Job]) -> AsyncIterator[TokenEvent]:
        """The events of `jobs` as they come (what gRPC streams)."""
        async for _, event in fanout.merge(await self._start(jobs), self.config.request_timeout_s):
            yield event

    # ---- Serve's view ---------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """The dispatcher's engine stats; under Serve also what `moray status` prints: each deployment's
        state and replica counts, each expert-shard replica's load report and per-(layer, expert) token
        counts and rates (`moray.deploy.serve.state.app_status`)."""
        out: dict[str, Any] = {"model": self.served_model_name, "max_model_len": self.max_model_len,
                               "dispatcher": await self.engine.stats(), "ingress": {"pid": os.getpid(),
                                                                                   **self.streamed}}
        app = await self.engine.app_status()
        out.update({k: app[k] for k in ("status", "deployments", "shards", "experts") if k in app})
        out["dispatcher"].pop("param_names", None)
        return out

    async def routing(self) -> dict[str, Any]:
        """Tokens routed per (layer, expert) so far, summed over the expert-shard deployments, as
        `moray.deploy.routing.live_routing` shapes them. One `token_counts()` call per shard deployment
        reaches ONE of its replicas (each counts its own calls): with several replicas of a shard, the
        sum holds only the replicas asked (`moray status` reads every replica)."""
        from moray.deploy.routing import live_routing

        counts, shards = await self.engine.routing_counts()  # [L][E]
        return {**live_routing(counts), "shards": shards}

    async def ready(self) -> None:
        """Raise unless the dispatcher can serve (HTTP 503 from /health).

        Not named `check_health`: Serve would take it for this replica's liveness check and, after three
        failures while a dispatcher restarts (a slow start on a loaded node takes over 20 s), kill the
        ingress replica and with it every stream it was holding to resume. The ingress is alive while its
        event loop answers, which Serve checks by itself."""
        await self.engine.check_health()

    # ---- completions ------------------------------------------------------------------------------------
    async def create_completion(self, req: CompletionRequest,
                                rid: str) -> CompletionResponse | AsyncIterator[dict]:
        jobs = self.admission.completion_jobs(req, rid)
        if req.stream:
            return self._completion_chunks(req, await self._start(jobs), f"cmpl-{rid}")
        choices = await self._collect(jobs)
        return CompletionResponse(id=f"cmpl-{rid}", model=self.served_model_name, usage=usage(choices),
                                  choices=[self._completion_choice(req, c) for c in choices])

    def _completion_choice(self, req: CompletionRequest, c: Choice) -> CompletionChoice:
        lp = None
        if req.logprobs is not None:
            rows = self._echo_rows(req, c.job, c.prompt_scores)
            rows += [] if c.job.score_only else logprob_rows(c.events)
            lp = completion_logprobs(rows, self.token_text, 0)
        text, finish = (c.job.prompt_text, "length") if c.job.score_only else (c.job.prompt_text + c.text,
                                                                              c.finish_reason)
        choice = CompletionChoice(index=c.job.index, text=text, logprobs=lp, finish_reason=finish)
        return self._with_prompt_logprobs(req, with_token_ids(req, choice, c), c)

    @staticmethod
    def _echo_rows(req: CompletionRequest, job: Job, scores: Sequence[PromptLogprob]) -> list[TokenLogprobs]:
        """The prompt's tokens as logprob rows when echo and logprobs ask for them, else none."""
        if not req.echo or req.logprobs is None:
            return []
        return prompt_rows(job.prompt_ids, scores, req.logprobs)

    def _prompt_logprobs(self, req: SamplingFields, c: Choice) -> PromptLogprobs | None:
        if req.prompt_logprobs is None:
            return None
        return prompt_logprobs(c.prompt_scores, self.token_text, req.prompt_logprobs)

    def _with_prompt_logprobs(self, req: CompletionRequest, choice: CompletionChoice,
                              c: Choice) -> CompletionChoice:
        if req.prompt_logprobs is not None:  # vLLM extension, on each completion choice
            choice.prompt_logprobs = self._prompt_logprobs(req, c)  # type: ignore[attr-defined]
        return choice

    async def _completion_chunks(self, req: CompletionRequest, started: Started,
                                 cid: str) -> AsyncIterator[dict]:
        created, offsets = now(), {j.index: len(j.prompt_text) for j in started.jobs}

        def chunk(choices: list[CompletionChoice], use: Usage | None = None) -> dict:
            return chunk_dict(CompletionChunk(id=cid, created=created, model=self.served_model_name,
                                              choices=choices, usage=use), req.include_usage)

        events = fanout.merge(started, self.config.request_timeout_s)
        firsts: dict[str, TokenEvent] = {}
        for e in started.read:
            firsts.setdefault(e.request_id, e)
        for j in started.jobs:
            if req.echo:
                rows = self._echo_rows(req, j, firsts[j.request_id].prompt_logprobs or [])
                lp = completion_logprobs(rows, self.token_text, 0) if rows else None
                offsets[j.index] = sum(map(len, lp.tokens)) if lp is not None else offsets[j.index]
                yield chunk([CompletionChoice(index=j.index, text=j.prompt_text, logprobs=lp)])
        seen: dict[int, Choice] = {}
        async for c, e in events:
            seen[c.job.index] = c
            if c.job.score_only:  # only the echo: the generated token is not shown
                yield chunk([with_token_ids(req, CompletionChoice(index=c.job.index, text="",
                                                                  finish_reason="length"), c)])
                continue
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(logprob_rows([e]), self.token_text, offsets[c.job.index])
                offsets[c.job.index] += len(lp.tokens[0])
            if e.text or lp is not None:
                yield chunk([CompletionChoice(index=c.job.index, text=e.text, logprobs=lp)])
            if e.finish_reason is not None:
                last = CompletionChoice(index=c.job.index, text="", finish_reason=e.finish_reason)
                yield chunk([with_token_ids(req, last, c)])
        if req.include_usage:
            yield chunk([], usage(list(seen.values())))

    # ---- chat ---------------------------------------------------------------------------------------------
    async def create_chat(self, req: ChatCompletionRequest,
                          rid: str) -> ChatCompletionResponse | AsyncIterator[dict]:
        jobs = self.admission.chat_jobs(req, rid)
        if req.stream:
            return self._chat_chunks(req, await self._start(jobs), f"chatcmpl-{rid}")
        choices = await self._collect(jobs)
        out = [self._chat_choice(req, c) for c in choices]
        return ChatCompletionResponse(id=f"chatcmpl-{rid}", model=self.served_model_name, choices=out,
                                      usage=usage(choices),
                                      prompt_logprobs=self._prompt_logprobs(req, choices[0]))

    def _chat_choice(self, req: ChatCompletionRequest, c: Choice) -> ChatChoice:
        lp = self._chat_logprobs(req, c.events)
        calls = ToolAnswer(req, self.tokenizer.tool_calls_id).calls(c.text, c.events, c.finish_reason)
        message = ChatResponseMessage(content=None if calls else c.text, tool_calls=calls or [])
        choice = ChatChoice(index=c.job.index, message=message, logprobs=lp,
                            finish_reason="tool_calls" if calls else c.finish_reason)
        return with_token_ids(req, choice, c)  # type: ignore[no-any-return]

    def _chat_logprobs(self, req: ChatCompletionRequest, events: Sequence[TokenEvent]) -> ChatLogprobs | None:
        if not req.logprobs:
            return None
        return chat_logprobs(logprob_rows(events), self.token_text, req.top_logprobs or 0)

    async def _chat_chunks(self, req: ChatCompletionRequest, started: Started,
                           cid: str) -> AsyncIterator[dict]:
        created = now()

        def chunk(choices: list[ChatChunkChoice], use: Usage | None = None) -> dict:
            return chunk_dict(ChatCompletionChunk(id=cid, created=created, model=self.served_model_name,
                                                  choices=choices, usage=use), req.include_usage)

        events = fanout.merge(started, self.config.request_timeout_s)
        for j in started.jobs:
            yield chunk([ChatChunkChoice(index=j.index, delta=ChatDelta(role="assistant", content=""))])
        seen: dict[int, Choice] = {}
        tools = ToolStream(ToolAnswer(req, self.tokenizer.tool_calls_id))
        async for c, e in events:
            first = c.job.index not in seen
            seen[c.job.index] = c
            lp = self._chat_logprobs(req, [e])
            delta, finish = tools.step(c.job.index, c.text, c.events, e, first)
            if delta is not None and (delta.content or delta.tool_calls or lp is not None):
                yield chunk([ChatChunkChoice(index=c.job.index, delta=delta, logprobs=lp)])
            if finish is not None:
                last = ChatChunkChoice(index=c.job.index, delta=ChatDelta(), finish_reason=finish)
                yield chunk([with_token_ids(req, last, c)])
        if req.include_usage:
            yield chunk([], usage(list(seen.values())))

    # ---- handle-callable entry points (moray.connect) -----------------------------------------------------
    async def complete(self, payload: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
        """`/v1/completions` without HTTP: the response as a dict; raises `APIError`."""
        out = await self.create_completion(parse(CompletionRequest, {**payload, "stream": False}),
                                           self.admission.request_id(request_id))
        assert isinstance(out, BaseModel)
        return out.model_dump()

    async def complete_stream(self, payload: dict[str, Any],
                              request_id: str | None = None) -> AsyncIterator[dict]:
        """Streaming `/v1/completions` without HTTP: the chunks as dicts; raises `APIError`."""
        out = await self.create_completion(parse(CompletionRequest, {**payload, "stream": True}),
                                           self.admission.request_id(request_id))
        assert not isinstance(out, BaseModel)
        async for item in out:
            yield item

    async def chat(self, payload: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
        """`/v1/chat/completions` without HTTP."""
        out = await self.create_chat(parse(ChatCompletionRequest, {**payload, "stream": False}),
                                     self.admission.request_id(request_id))
        assert isinstance(out, BaseModel)
        return out.model_dump()

    async def chat_stream(self, payload: dict[str, Any],
                          request_id: str | None = None) -> AsyncIterator[dict]:
        """Streaming `/v1/chat/completions` without HTTP."""
        out = await self.create_chat(parse(ChatCompletionRequest, {**payload, "stream": True}),
                                     self.admission.request_id(request_id))
        assert not isinstance(out, BaseModel)
        async for item in out:
            yield item

    def models(self) -> dict[str, Any]:
        name = self.served_model_name
        card = ModelCard(id=name, root=name, max_model_len=self.max_model_len)
        return ModelList(data=[card]).model_dump()
