"""The OpenAI-compatible HTTP ingress: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`.

`OpenAIIngress` validates a request, turns it into one engine request per choice (prompt x n), and
streams the dispatcher's `TokenEvent`s back as OpenAI JSON or Server-Sent Events. The same class
runs as the Serve ingress deployment (`deploy/app.py`; the FastAPI app is built per replica by
`__serve_build_asgi_app__`) and in process over a local dispatcher (tests, `moray generate`).

Every failure is an OpenAI error body (`protocol.APIError`). Each choice's first token is awaited
before a response starts, so a request the engine refuses is a real HTTP error; an error after
that is a `data: {"error": ...}` event before `data: [DONE]`. The handle-callable methods
(`complete`, `complete_stream`, `chat`, `chat_stream`, `stream_tokens`) share this path with HTTP.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from moray.deploy import metrics
from moray.deploy.config import ServerConfig
from moray.deploy.grpc import GrpcMixin
from moray.deploy.protocol import (
    ERROR_TYPES,
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIBaseModel,
    SamplingFields,
    TokenLogprobs,
    Usage,
    chat_logprobs,
    chunk_dict,
    completion_logprobs,
    now,
    random_id,
)
from moray.model.config import MixtralConfig
from moray.model.engine import GenerateRequest, QueueFullError, RequestError, TokenEvent
from moray.model.sampling import SamplingParams
from moray.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
RETRY_AFTER_S = "1"
UNAVAILABLE = {"RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError",
               "ShardUnavailableError", "WorkerCrashedError", "RayServeException", "ObjectLostError"}
Started = tuple["Job", TokenEvent, AsyncIterator[TokenEvent]]


# ---- errors ---------------------------------------------------------------------------------------
def unwrap(e: BaseException) -> BaseException:
    """The exception a remote replica raised, not Ray's wrapper (whose str() holds a traceback)."""
    cause = getattr(e, "cause", None)
    if type(e).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        return unwrap(cause)
    return e


def to_api_error(e: BaseException) -> APIError:
    """Map any failure to what the client sees; never a stack trace."""
    e = unwrap(e)
    name = type(e).__name__
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestError):
        return APIError(400, str(e))
    if isinstance(e, QueueFullError) or name == "BackPressureError":
        return APIError(429, "the server is overloaded; retry later", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(e, asyncio.TimeoutError):
        return APIError(504, "the request timed out")
    if name in UNAVAILABLE:
        return APIError(503, f"the model is unavailable ({name}); retry later",
                        headers={"Retry-After": RETRY_AFTER_S})
    log.error("internal error: %s", name, exc_info=e)
    return APIError(500, f"internal server error ({name})")


def parse(model: type[BaseModel], payload: Any) -> Any:
    """Validate a JSON payload; any problem is a 400 naming the first bad field."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(payload)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"],
                       param=str(err["loc"][0]) if err["loc"] else None) from None
    ignored: list[str] = req.ignored_fields() if isinstance(req, OpenAIBaseModel) else []
    if ignored:
        log.warning("ignoring unknown request fields: %s", ", ".join(repr(f)[:64] for f in ignored[:20]))
    return req


# ---- one request's choices ----------------------------------------------------------------------------
@dataclass
class Job:
    """One engine request: choice `index` of the response."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    prompt_text: str = ""  # echoed before the completion


@dataclass
class Choice:
    """What one choice has produced so far."""

    job: Job
    events: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    last_t: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return [e.token_id for e in self.events]


def usage(choices: Sequence[Choice]) -> Usage:
    """Prompt tokens counted once per prompt (not per choice), as OpenAI and vLLM do."""
    prompt = sum({id(c.job.prompt_ids): len(c.job.prompt_ids) for c in choices}.values())
    completion = sum(len(c.events) for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class Timer:
    """TTFT, inter-token gaps and end-to-end latency of one request, recorded as metrics."""

    def __init__(self) -> None:
        self.start, self.first = time.perf_counter(), True

    def token(self, choice: Choice) -> None:
        t = time.perf_counter()
        if self.first:
            metrics.record_latencies(ttft_s=t - self.start)
        elif choice.last_t is not None:
            metrics.record_latencies(itl_s=t - choice.last_t)
        self.first, choice.last_t = False, t

    def done(self, choices: Sequence[Choice]) -> None:
        metrics.record_latencies(e2e_s=time.perf_counter() - self.start)
        u = usage(choices)
        metrics.record_tokens(u.prompt_tokens, u.completion_tokens)


def _with_token_ids(req: SamplingFields, choice: Any, c: Choice) -> Any:
    if req.return_token_ids:  # vLLM extension: ids beside the text
        choice.token_ids, choice.prompt_token_ids = c.token_ids, c.job.prompt_ids
    return choice


def _logprob_rows(events: Sequence[TokenEvent]) -> list[TokenLogprobs]:
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events]


# ---- the ingress ------------------------------------------------------------------------------------
class OpenAIIngress(GrpcMixin):
    """The API front: tokenizes, validates, fans choices out to the dispatcher, formats OpenAI JSON.

    The gRPC methods (`Generate`, `GenerateStream`) come from `GrpcMixin` and use `stream_tokens`,
    `authorized`, `tokenizer`, `config` and `served_model_name` from here.
    """

    def __init__(self, dispatcher: Any, config: ServerConfig | dict[str, Any], model_dir: str) -> None:
        self.dispatcher = dispatcher  # a Serve DeploymentHandle, or an in-process object with `generate()`
        self.config = config if isinstance(config, ServerConfig) else ServerConfig(**config)
        self.served_model_name: str = self.config.served_model_name or "moray"
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        model_cfg = MixtralConfig.load(model_dir)
        self.vocab_size = model_cfg.vocab_size
        self.max_model_len = min(self.config.max_model_len or model_cfg.max_seq_len, model_cfg.max_seq_len)
        self._token_text: dict[int, str] = {}
        log.info("ingress ready: model %r, context %d, api key %s", self.served_model_name,
                 self.max_model_len, "required" if self.config.api_key else "off")

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self)

    # ---- shared helpers (the gRPC ingress uses them too) ----------------------------------------------
    def authorized(self, token: str | None) -> bool:
        """True when no key is configured or `token` equals it (constant-time compare)."""
        key = self.config.api_key
        return not key or (token is not None and hmac.compare_digest(token.encode(), key.encode()))

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model")

    def request_id(self, given: str | None) -> str:
        """The client's X-Request-Id when it is a sane token, else a fresh one."""
        if given and REQUEST_ID_RE.match(given):
            return given
        if given:
            log.warning("replacing malformed X-Request-Id %r", given[:64])
        return random_id()

    def token_text(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.token_text(token_id)
        return self._token_text[token_id]

    async def stream_tokens(self, prompt_ids: list[int], params: SamplingParams,
                            request_id: str) -> AsyncIterator[TokenEvent]:
        """One engine request's events; raises RequestError / QueueFullError / ... unwrapped from Ray."""
        stream, finished = self._dispatch(GenerateRequest(list(prompt_ids), params, request_id)), False
        try:
            async for event in stream:
                yield event
            finished = True
        except Exception as e:
            raise unwrap(e) from None
        finally:
            if not finished:  # client gone, timeout or error: free the engine's sequence now
                if hasattr(stream, "cancel"):
                    stream.cancel()
                else:
                    await stream.aclose()

    def _is_handle(self) -> bool:
        from ray.serve.handle import DeploymentHandle

        return isinstance(self.dispatcher, DeploymentHandle)

    def _dispatch(self, request: GenerateRequest) -> Any:
        if self._is_handle():
            return self.dispatcher.generate.options(stream=True).remote(request)
        return self.dispatcher.generate(request)

    async def status(self) -> dict[str, Any]:
        """Replica counts per deployment (under Serve) and the dispatcher's engine stats."""
        out: dict[str, Any] = {"model": self.served_model_name, "max_model_len": self.max_model_len}
        if self._is_handle():
            out["dispatcher"] = await self.dispatcher.stats.remote()
            out["deployments"] = await asyncio.to_thread(self._deployments)
        else:
            out["dispatcher"] = self.dispatcher.stats()
        out["dispatcher"].pop("param_names", None)
        return out

    def _deployments(self) -> dict[str, Any]:
        from ray import serve

        app = serve.status().applications.get(self.config.app_name)
        return {name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                       "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
                for name, d in (app.deployments.items() if app else [])}

    async def check_health(self) -> None:
        """Raise unless the dispatcher can serve (HTTP 503 from /health)."""
        if not self._is_handle():
            self.dispatcher.check_health()
            return
        deployments = await asyncio.to_thread(self._deployments)
        status = deployments.get("dispatcher", {}).get("status", "missing")
        if status not in ("HEALTHY", "UPSCALING", "DOWNSCALING"):
            raise APIError(503, f"the dispatcher is {status.lower()}")

    # ---- sampling and prompts -------------------------------------------------------------------------
    def _check_limits(self, req: SamplingFields, max_tokens: int | None) -> None:
        self.check_model(req.model)
        if req.n > self.config.max_n:
            raise APIError(400, f"n must be at most {self.config.max_n}, got {req.n}", param="n")
        if max_tokens is not None and max_tokens > self.config.max_tokens_limit:
            raise APIError(400, f"max_tokens must be at most {self.config.max_tokens_limit}, "
                                f"got {max_tokens}", param="max_tokens")

    def _params(self, req: SamplingFields, max_tokens: int, logprobs: int | None, i: int) -> SamplingParams:
        seed = None if req.seed is None else (req.seed + i) % (2**63)
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=min(max(req.top_k, 0), self.vocab_size), seed=seed,
                              stop=req.stop_strings(), stop_token_ids=tuple(req.stop_token_ids or ()),
                              logprobs=logprobs, ignore_eos=req.ignore_eos)

    def _jobs(self, req: SamplingFields, prompts: list[list[int]], max_tokens: list[int],
              logprobs: int | None, rid: str, texts: list[str]) -> list[Job]:
        n, many = req.n, len(prompts) * req.n > 1
        return [Job(p * n + i, ids, self._params(req, max_tokens[p], logprobs, i),
                    f"{rid}-{p * n + i}" if many else rid, texts[p])
                for p, ids in enumerate(prompts) for i in range(n)]

    def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompts = req.prompt_list()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return [self.tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts]

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids: list[int] = self.tokenizer.encode_chat(messages)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        return ids

    # ---- the fan-out ------------------------------------------------------------------------------------
    async def _start(self, jobs: list[Job]) -> list[Started]:
        """Submit every choice and await each one's first event: refusals surface before any output."""
        streams = [self.stream_tokens(j.prompt_ids, j.params, j.request_id) for j in jobs]
        firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        failed = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failed is not None:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)  # type: ignore[attr-defined]
            raise to_api_error(failed)
        return [(j, f, s) for j, f, s in zip(jobs, firsts, streams, strict=True)]  # type: ignore[misc]

    async def _events(self, started: list[Started]) -> AsyncIterator[tuple[Choice, TokenEvent]]:
        """All choices' events as they come, recorded in `Choice`s; cancels the rest on exit."""
        choices = {j.index: Choice(j) for j, _, _ in started}
        queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

        async def pump(job: Job, first: TokenEvent, rest: AsyncIterator[TokenEvent]) -> None:
            try:
                queue.put_nowait((job.index, first))
                if first.finish_reason is None:
                    async for event in rest:
                        queue.put_nowait((job.index, event))
            except Exception as e:
                queue.put_nowait((job.index, e))
            finally:
                queue.put_nowait((job.index, None))
                await rest.aclose()  # type: ignore[attr-defined]

        tasks = [asyncio.create_task(pump(*s)) for s in started]
        timer, live = Timer(), len(tasks)
        deadline = time.monotonic() + self.config.request_timeout_s
        try:
            while live:
                index, item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0.0))
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise to_api_error(item)
                else:
                    choice = choices[index]
                    timer.token(choice)
                    choice.events.append(item)
                    choice.text += item.text
                    choice.finish_reason = item.finish_reason or choice.finish_reason
                    yield choice, item
            timer.done(list(choices.values()))
        except asyncio.TimeoutError:
            timeout = self.config.request_timeout_s
            raise APIError(504, f"the request did not finish within {timeout:g} s") from None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, jobs: list[Job]) -> list[Choice]:
        choices: dict[int, Choice] = {}
        async for choice, _ in self._events(await self._start(jobs)):
            choices[choice.job.index] = choice
        return [choices[j.index] for j in jobs]

    # ---- completions ------------------------------------------------------------------------------------
    async def create_completion(self, req: CompletionRequest,
                                rid: str) -> CompletionResponse | AsyncIterator[dict]:
        self._check_limits(req, req.max_tokens)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (no prompt logprobs)", param="echo")
        prompts = self._completion_prompts(req)
        texts = [self.tokenizer.decode(p) if req.echo else "" for p in prompts]
        jobs = self._jobs(req, prompts, [req.max_tokens or 16] * len(prompts), req.logprobs, rid, texts)
        if req.stream:
            return self._completion_chunks(req, await self._start(jobs), f"cmpl-{rid}")
        choices = await self._collect(jobs)
        return CompletionResponse(id=f"cmpl-{rid}", model=self.served_model_name, usage=usage(choices),
                                  choices=[self._completion_choice(req, c) for c in choices])

    def _completion_choice(self, req: CompletionRequest, c: Choice) -> CompletionChoice:
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs(_logprob_rows(c.events), self.token_text, len(c.job.prompt_text))
        choice = CompletionChoice(index=c.job.index, text=c.job.prompt_text + c.text, logprobs=lp,
                                  finish_reason=c.finish_reason)
        return _with_token_ids(req, choice, c)  # type: ignore[no-any-return]

    async def _completion_chunks(self, req: CompletionRequest, started: list[Started],
                                 cid: str) -> AsyncIterator[dict]:
        created, offsets = now(), {j.index: len(j.prompt_text) for j, _, _ in started}

        def chunk(choices: list[CompletionChoice], use: Usage | None = None) -> dict:
            return chunk_dict(CompletionChunk(id=cid, created=created, model=self.served_model_name,
                                              choices=choices, usage=use), req.include_usage)

        events = self._events(started)
        for j, _, _ in started:
            if j.prompt_text:
                yield chunk([CompletionChoice(index=j.index, text=j.prompt_text)])
        seen: dict[int, Choice] = {}
        async for c, e in events:
            seen[c.job.index] = c
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(_logprob_rows([e]), self.token_text, offsets[c.job.index])
                offsets[c.job.index] += len(lp.tokens[0])
            if e.text or lp is not None:
                yield chunk([CompletionChoice(index=c.job.index, text=e.text, logprobs=lp)])
            if e.finish_reason is not None:
                last = CompletionChoice(index=c.job.index, text="", finish_reason=e.finish_reason)
                yield chunk([_with_token_ids(req, last, c)])
        if req.include_usage:
            yield chunk([], usage(list(seen.values())))

    # ---- chat ---------------------------------------------------------------------------------------------
    async def create_chat(self, req: ChatCompletionRequest,
                          rid: str) -> ChatCompletionResponse | AsyncIterator[dict]:
        self._check_limits(req, req.requested_max_tokens())
        prompt = self._chat_prompt(req)
        room = max(self.max_model_len - len(prompt), 1)
        max_tokens = req.requested_max_tokens() or min(room, self.config.max_tokens_limit)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        jobs = self._jobs(req, [prompt], [max_tokens], logprobs, rid, [""])
        if req.stream:
            return self._chat_chunks(req, await self._start(jobs), f"chatcmpl-{rid}")
        choices = await self._collect(jobs)
        out = [self._chat_choice(req, c) for c in choices]
        return ChatCompletionResponse(id=f"chatcmpl-{rid}", model=self.served_model_name, choices=out,
                                      usage=usage(choices))

    def _chat_choice(self, req: ChatCompletionRequest, c: Choice) -> ChatChoice:
        lp = self._chat_logprobs(req, c.events)
        choice = ChatChoice(index=c.job.index, message=ChatResponseMessage(content=c.text), logprobs=lp,
                            finish_reason=c.finish_reason)
        return _with_token_ids(req, choice, c)  # type: ignore[no-any-return]

    def _chat_logprobs(self, req: ChatCompletionRequest, events: Sequence[TokenEvent]) -> ChatLogprobs | None:
        if not req.logprobs:
            return None
        return chat_logprobs(_logprob_rows(events), self.token_text, req.top_logprobs or 0)

    async def _chat_chunks(self, req: ChatCompletionRequest, started: list[Started],
                           cid: str) -> AsyncIterator[dict]:
        created = now()

        def chunk(choices: list[ChatChunkChoice], use: Usage | None = None) -> dict:
            return chunk_dict(ChatCompletionChunk(id=cid, created=created, model=self.served_model_name,
                                                  choices=choices, usage=use), req.include_usage)

        events = self._events(started)
        for j, _, _ in started:
            yield chunk([ChatChunkChoice(index=j.index, delta=ChatDelta(role="assistant", content=""))])
        seen: dict[int, Choice] = {}
        async for c, e in events:
            seen[c.job.index] = c
            lp = self._chat_logprobs(req, [e])
            if e.text or lp is not None:
                delta = ChatDelta(content=e.text)
                yield chunk([ChatChunkChoice(index=c.job.index, delta=delta, logprobs=lp)])
            if e.finish_reason is not None:
                last = ChatChunkChoice(index=c.job.index, delta=ChatDelta(), finish_reason=e.finish_reason)
                yield chunk([_with_token_ids(req, last, c)])
        if req.include_usage:
            yield chunk([], usage(list(seen.values())))

    # ---- handle-callable entry points (moray.connect) -----------------------------------------------------
    async def complete(self, payload: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
        """`/v1/completions` without HTTP: the response as a dict; raises `APIError`."""
        out = await self.create_completion(parse(CompletionRequest, {**payload, "stream": False}),
                                           self.request_id(request_id))
        assert isinstance(out, BaseModel)
        return out.model_dump()

    async def complete_stream(self, payload: dict[str, Any],
                              request_id: str | None = None) -> AsyncIterator[dict]:
        """Streaming `/v1/completions` without HTTP: the chunks as dicts; raises `APIError`."""
        out = await self.create_completion(parse(CompletionRequest, {**payload, "stream": True}),
                                           self.request_id(request_id))
        assert not isinstance(out, BaseModel)
        async for item in out:
            yield item

    async def chat(self, payload: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
        """`/v1/chat/completions` without HTTP."""
        out = await self.create_chat(parse(ChatCompletionRequest, {**payload, "stream": False}),
                                     self.request_id(request_id))
        assert isinstance(out, BaseModel)
        return out.model_dump()

    async def chat_stream(self, payload: dict[str, Any],
                          request_id: str | None = None) -> AsyncIterator[dict]:
        """Streaming `/v1/chat/completions` without HTTP."""
        out = await self.create_chat(parse(ChatCompletionRequest, {**payload, "stream": True}),
                                     self.request_id(request_id))
        assert not isinstance(out, BaseModel)
        async for item in out:
            yield item

    def models(self) -> dict[str, Any]:
        name = self.served_model_name
        card = ModelCard(id=name, root=name, max_model_len=self.max_model_len)
        return ModelList(data=[card]).model_dump()


# ---- HTTP ---------------------------------------------------------------------------------------------
def error_response(err: APIError, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse(err.body(), status_code=err.status, headers={**(headers or {}), **err.headers})


async def read_json(request: Any, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes (413) and anything that is not JSON (400)."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None


async def sse(chunks: AsyncIterator[dict], endpoint: str) -> AsyncIterator[str]:
    """`data: {json}` events, an error event if the stream breaks, then `data: [DONE]`."""
    status = 200
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    except Exception as e:
        err = to_api_error(e)
        status = err.status
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        metrics.record_request(status, endpoint)
        await chunks.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


Create = Callable[[Any, str], Awaitable[BaseModel | AsyncIterator[dict]]]


async def serve_openai(ingress: OpenAIIngress, request: Any, model: type[BaseModel], create: Create,
                       endpoint: str) -> Any:
    """Parse, validate, run; a JSON response, an SSE stream, or an OpenAI error."""
    given = request.headers.get("x-request-id")
    rid = ingress.request_id(given)
    headers = {} if given else {"X-Request-Id": rid}  # under Serve the proxy sets it (one header, not two)
    try:
        out = await create(parse(model, await read_json(request, ingress.config.max_body_bytes)), rid)
    except Exception as e:
        err = to_api_error(e)
        metrics.record_request(err.status, endpoint)
        return error_response(err, headers)
    if isinstance(out, BaseModel):
        metrics.record_request(200, endpoint)
        return JSONResponse(out.model_dump(), headers=headers)
    return StreamingResponse(sse(out, endpoint), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache"})


class AuthMiddleware:
    """Pure ASGI: a configured API key guards every route but /health (401 before the body is read)."""

    def __init__(self, app: Any, ingress: OpenAIIngress) -> None:
        self.app, self.ingress = app, ingress

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        route = path[len(root):] if root and path.startswith(root) else path  # under a Serve route prefix
        if scope["type"] == "http" and route != "/health":
            auth = Headers(scope=scope).get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            if not self.ingress.authorized(token):
                metrics.record_request(401, route)
                msg = "missing API key" if token is None else "incorrect API key"
                await error_response(APIError(401, msg))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_api(ingress: OpenAIIngress) -> Any:
    """The FastAPI app for one ingress (built per replica, so the routes close over its state)."""
    app = FastAPI(title="moray", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AuthMiddleware, ingress=ingress)

    async def http_error(_: Request, exc: Exception) -> Any:
        status = getattr(exc, "status_code", 500)
        detail = str(getattr(exc, "detail", "")) or ERROR_TYPES.get(status, "error")
        return error_response(APIError(status, detail))

    async def validation_error(_: Request, exc: Exception) -> Any:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        return error_response(APIError(400, f"{where}: {errors[0]['msg']}" if errors else "invalid request"))

    async def internal_error(_: Request, exc: Exception) -> Any:
        return error_response(to_api_error(exc))

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)

    @app.get("/health")
    async def health() -> Any:
        try:
            await ingress.check_health()
        except Exception as e:
            return error_response(to_api_error(e) if not isinstance(e, APIError) else e)
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> Any:
        return ingress.models()

    @app.get("/v1/moray/status")
    async def status() -> Any:
        try:
            return await ingress.status()
        except Exception as e:
            return error_response(to_api_error(e))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await serve_openai(ingress, request, CompletionRequest, ingress.create_completion,
                                  "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await serve_openai(ingress, request, ChatCompletionRequest, ingress.create_chat,
                                  "/v1/chat/completions")

    return app
