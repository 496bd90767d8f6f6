"""HTTP plumbing of the OpenAI ingress: the FastAPI app, SSE framing, body limits, auth, error mapping.

`create_api(ingress)` builds the routes over an `OpenAIIngress` (deploy/openai.py), which does the
work; this module turns requests into its calls and its results and failures into HTTP:

- every failure is an OpenAI error body (`protocol.APIError`), never a stack trace (`to_api_error`);
- a body is read at most `max_body_bytes` (413 past it, before any parsing), must be JSON (400) and
  must not carry lone UTF-16 surrogates, which no tokenizer can encode (400);
- a configured API key guards every route but `/health` (`AuthMiddleware`, constant-time compare);
- streams are `data: {json}` events, an error after the start is a `data: {"error": ...}` event,
  and every stream ends `data: [DONE]`.

Request-provided strings reach logs only through `%r` (quoted, escaped), never a format string.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from moray.deploy import metrics
from moray.deploy.protocol import (
    ERROR_TYPES,
    APIError,
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    OpenAIBaseModel,
    usage,
)
from moray.model.engine import QueueFullError, RequestError

if TYPE_CHECKING:
    from moray.deploy.openai import OpenAIIngress

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
UNAVAILABLE = {"RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError",
               "ReplicaUnavailableError", "ShardUnavailableError", "WorkerCrashedError", "RayServeException",
               "ObjectLostError", "DispatcherUnavailableError"}
ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/moray/status", "/v1/moray/routing"}


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


def lone_surrogate(payload: Any) -> bool:
    """True when any string (or key) in a JSON value holds an unpaired UTF-16 surrogate (`"\\ud800"`):
    valid JSON, but no UTF-8 text, so nothing downstream could encode it."""
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse(model: type[BaseModel], payload: Any) -> Any:
    """Validate a JSON payload; any problem is a 400 naming the first bad field."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    if lone_surrogate(payload):
        raise APIError(400, "the request holds a string that is not valid Unicode (an unpaired surrogate)")
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


def error_response(err: APIError, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse(err.body(), status_code=err.status, headers={**(headers or {}), **err.headers})


# ---- bodies and streams -----------------------------------------------------------------------------
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
    except (ValueError, RecursionError):  # UnicodeDecodeError (invalid UTF-8) is a ValueError too
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


# ---- metrics and Serve's view (for the ingress) --------------------------------------------------------
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


def deployment_states(app_name: str) -> dict[str, Any]:
    """Each deployment of the Serve app: status and replica counts by state (blocking: a controller call)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    return {name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                   "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
            for name, d in (app.deployments.items() if app else [])}


async def shard_token_counts(app_name: str) -> tuple[list[list[int]], int]:
    """Tokens served per [layer][expert], summed over the app's expert-shard deployments (one
    `token_counts()` handle call each, so one replica each), and how many shards answered."""
    from ray import serve

    states = await asyncio.to_thread(deployment_states, app_name)
    names = sorted(n for n in states if n.startswith("expert-shard-"))
    shards = [serve.get_deployment_handle(n, app_name) for n in names]
    counts = await asyncio.gather(*(shard.token_counts.remote() for shard in shards))  # each [L][E]
    if not counts:
        raise APIError(503, "the app has no expert-shard deployments")
    total = [[sum(c[layer][e] for c in counts) for e in range(len(row))]  # [L][E]
             for layer, row in enumerate(counts[0])]
    return total, len(counts)


# ---- the app ----------------------------------------------------------------------------------------
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
                metrics.record_request(401, route if route in ROUTES else "other")  # bounded label values
                msg = "missing API key" if token is None else "incorrect API key"
                await error_response(APIError(401, msg))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """Starlette's own errors (404 route, 405 method, ...) and anything unexpected as OpenAI errors."""

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


async def answer(call: Callable[[], Awaitable[Any]]) -> Any:
    """A GET route's JSON, or its failure as an OpenAI error."""
    try:
        return await call()
    except Exception as e:
        return error_response(to_api_error(e))


def create_api(ingress: OpenAIIngress) -> Any:
    """The FastAPI app for one ingress (built per replica, so the routes close over its state)."""
    app = FastAPI(title="moray", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AuthMiddleware, ingress=ingress)
    add_error_handlers(app)

    @app.get("/health")
    async def health() -> Any:
        try:
            await ingress.check_health()
        except Exception as e:
            return error_response(to_api_error(e))
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> Any:
        return ingress.models()

    @app.get("/v1/moray/status")
    async def status() -> Any:
        return await answer(ingress.status)

    @app.get("/v1/moray/routing")
    async def routing() -> Any:
        return await answer(ingress.routing)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await serve_openai(ingress, request, CompletionRequest, ingress.create_completion,
                                  "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await serve_openai(ingress, request, ChatCompletionRequest, ingress.create_chat,
                                  "/v1/chat/completions")

    return app
