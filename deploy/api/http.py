"""HTTP plumbing of the OpenAI ingress: the FastAPI app, SSE framing, body limits, auth, error bodies.

`create_api(ingress)` builds the routes over an `OpenAIIngress` (`ingress.py`), which does the
work; this module turns requests into its calls and its results and failures into HTTP:

- every failure is an OpenAI error body (`errors.APIError`), never a stack trace (`to_api_error`);
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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from moray.deploy.api.admission import Admission, bearer, parse
from moray.deploy.api.errors import ERROR_TYPES, APIError, to_api_error
from moray.deploy.api.protocol import ChatCompletionRequest, CompletionRequest
from moray.deploy.serve import metrics
from moray.deploy.serve.config import ServerConfig

log = logging.getLogger(__name__)

ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/moray/status", "/v1/moray/routing"}


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


class Routes(Protocol):
    """What the routes call: `ingress.OpenAIIngress` (a protocol, so that this module does not import it)."""

    config: ServerConfig
    admission: Admission

    async def create_completion(self, req: CompletionRequest, rid: str) -> Any: ...

    async def create_chat(self, req: ChatCompletionRequest, rid: str) -> Any: ...

    async def ready(self) -> None: ...

    async def status(self) -> dict[str, Any]: ...

    async def routing(self) -> dict[str, Any]: ...

    def models(self) -> dict[str, Any]: ...


async def serve_openai(ingress: Routes, request: Any, model: type[BaseModel], create: Create,
                       endpoint: str) -> Any:
    """Parse, validate, run; a JSON response, an SSE stream, or an OpenAI error."""
    given = request.headers.get("x-request-id")
    rid = ingress.admission.request_id(given)
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


# ---- the app ----------------------------------------------------------------------------------------
class AuthMiddleware:
    """Pure ASGI: a configured API key guards every route but /health (401 before the body is read)."""

    def __init__(self, app: Any, ingress: Routes) -> None:
        self.app, self.ingress = app, ingress

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        route = path[len(root):] if root and path.startswith(root) else path  # under a Serve route prefix
        if scope["type"] == "http" and route != "/health":
            token = bearer(Headers(scope=scope).get("authorization", ""))
            if not self.ingress.admission.authorized(token):
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


def create_api(ingress: Routes) -> Any:
    """The FastAPI app for one ingress (built per replica, so the routes close over its state)."""
    app = FastAPI(title="moray", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AuthMiddleware, ingress=ingress)
    add_error_handlers(app)

    @app.get("/health")
    async def health() -> Any:
        try:
            await ingress.ready()
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
