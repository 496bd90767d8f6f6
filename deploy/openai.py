"""The OpenAI-compatible ingress: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
`/v1/moray/status`, `/v1/moray/routing`.

`OpenAIIngress` validates a request, turns it into one engine request per choice (prompt x n), and
streams the dispatcher's `TokenEvent`s back as OpenAI JSON or Server-Sent Events. The same class
runs as the Serve ingress deployment (`deploy/app.py`; the FastAPI app, `deploy/http.py`, is built
per replica by `__serve_build_asgi_app__`) and in process over a local dispatcher (tests, bench).

Every failure is an OpenAI error body (`protocol.APIError`). Each choice's first token is awaited
before a response starts, so a request the engine refuses is a real HTTP error; an error after
that is a `data: {"error": ...}` event before `data: [DONE]`. The handle-callable methods
(`complete`, `complete_stream`, `chat`, `chat_stream`, `stream_tokens`) share this path with HTTP.

Limits are checked before any work reaches the dispatcher: `n`, `max_tokens`, the prompt batch,
prompt + completion within the context, token ids within the vocabulary; and an ingress replica
keeps at most (max_num_seqs + max_waiting) x dispatcher replicas engine requests open, answering
429 beyond that without a dispatcher call (the engine's own `max_waiting` bound still holds).

When a dispatcher call fails because its process died, `DispatcherWatch` answers 503 at once until a
probe call reaches a live dispatcher again (Serve restarts it); without it, new requests would wait
in Serve's router.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import BaseModel

from moray.actors.dispatcher import DispatcherWatch
from moray.deploy.config import ServerConfig
from moray.deploy.grpc import GrpcMixin
from moray.deploy.http import (
    Timer,
    create_api,
    deployment_states,
    parse,
    shard_token_counts,
    to_api_error,
    unwrap,
)
from moray.deploy.protocol import (
    APIError,
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
    SamplingFields,
    Usage,
    chat_logprobs,
    chunk_dict,
    completion_logprobs,
    logprob_rows,
    now,
    random_id,
    usage,
    with_token_ids,
)
from moray.model.config import MixtralConfig
from moray.model.engine import GenerateRequest, QueueFullError, TokenEvent
from moray.model.sampling import SamplingParams
from moray.model.tokenizer import Tokenizer

__all__ = ["OpenAIIngress", "create_api", "parse", "to_api_error", "unwrap"]  # the last four: deploy/http.py

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0  # longest wait for the expert-shard replicas' load reports in /v1/moray/status
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
Started = tuple[Job, TokenEvent, AsyncIterator[TokenEvent]]


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
        self.watch = DispatcherWatch(lambda: self.dispatcher.check_health.remote())
        cfg = self.config
        replicas = cfg.dispatcher_max_replicas if cfg.autoscaling else cfg.dispatcher_replicas
        self.max_in_flight = (cfg.max_num_seqs + cfg.max_waiting) * replicas
        self.in_flight = 0  # engine requests this replica has open: beyond `max_in_flight`, 429 at once
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
        self.watch.check()
        if self.in_flight >= self.max_in_flight:  # every engine slot and waiting place is taken: no call
            raise QueueFullError(f"{self.in_flight} requests are in flight")
        stream, finished = self._dispatch(GenerateRequest(list(prompt_ids), params, request_id)), False
        self.in_flight += 1
        try:
            async for event in stream:
                yield event
            finished = True
        except Exception as e:
            self.watch.failed(e)
            raise unwrap(e) from None
        finally:
            self.in_flight -= 1
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
        """The dispatcher's engine stats; under Serve also what `moray status` prints: each deployment's
        state and replica counts, each expert-shard replica's load report and per-(layer, expert) token
        counts and rates (`moray.deploy.balance.app_status`)."""
        out: dict[str, Any] = {"model": self.served_model_name, "max_model_len": self.max_model_len}
        if self._is_handle():
            from moray.deploy.balance import app_status

            out["dispatcher"] = await self.dispatcher.stats.remote()
            try:
                app = await asyncio.to_thread(app_status, self.config.app_name, STATUS_TIMEOUT_S)
            except LookupError as e:  # the app is being deleted under us
                raise APIError(503, str(e)) from None
            out.update({k: app[k] for k in ("status", "deployments", "shards", "experts")})
        else:
            out["dispatcher"] = self.dispatcher.stats()
        out["dispatcher"].pop("param_names", None)
        return out

    async def routing(self) -> dict[str, Any]:
        """Tokens routed per (layer, expert) so far, summed over the expert-shard deployments, as
        `moray.deploy.routing.live_routing` shapes them. One `token_counts()` call per shard deployment
        reaches ONE of its replicas (each counts its own calls): with several replicas of a shard, the
        sum holds only the replicas asked (`moray status` reads every replica)."""
        if not self._is_handle():
            raise APIError(404, "routing counts come from the expert-shard deployments (Serve only)")
        from moray.deploy.routing import live_routing

        counts, shards = await shard_token_counts(self.config.app_name)  # [L][E]
        return {**live_routing(counts), "shards": shards}

    async def check_health(self) -> None:
        """Raise unless the dispatcher can serve (HTTP 503 from /health)."""
        self.watch.check()
        if not self._is_handle():
            self.dispatcher.check_health()
            return
        deployments = await asyncio.to_thread(deployment_states, self.config.app_name)
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

    def _check_prompts(self, prompts: list[list[int]], max_tokens: int) -> None:
        """Refuse, before any work, a prompt that cannot fit or names unknown tokens (as the engine would)."""
        for ids in prompts:
            if len(ids) + max_tokens > self.max_model_len:
                raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                    f"However, you requested {len(ids) + max_tokens} tokens ({len(ids)} in "
                                    f"the prompt, {max_tokens} for the completion).")
            if not all(0 <= t < self.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")

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
        timeout = self.config.request_timeout_s
        firsts_of_all = asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        try:
            firsts = await asyncio.wait_for(firsts_of_all, timeout)
        except asyncio.TimeoutError:
            firsts = [APIError(504, f"the request did not start within {timeout:g} s")]
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
        self._check_prompts(prompts, req.max_tokens or 16)
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
            lp = completion_logprobs(logprob_rows(c.events), self.token_text, len(c.job.prompt_text))
        choice = CompletionChoice(index=c.job.index, text=c.job.prompt_text + c.text, logprobs=lp,
                                  finish_reason=c.finish_reason)
        return with_token_ids(req, choice, c)  # type: ignore[no-any-return]

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
        self._check_limits(req, req.requested_max_tokens())
        prompt = self._chat_prompt(req)
        room = max(self.max_model_len - len(prompt), 1)
        max_tokens = req.requested_max_tokens() or min(room, self.config.max_tokens_limit)
        self._check_prompts([prompt], max_tokens)
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
        return with_token_ids(req, choice, c)  # type: ignore[no-any-return]

    def _chat_logprobs(self, req: ChatCompletionRequest, events: Sequence[TokenEvent]) -> ChatLogprobs | None:
        if not req.logprobs:
            return None
        return chat_logprobs(logprob_rows(events), self.token_text, req.top_logprobs or 0)

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
                yield chunk([with_token_ids(req, last, c)])
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
