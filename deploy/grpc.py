"""gRPC API (`deploy/moray.proto`): `Generate` and `GenerateStream` on the Serve ingress.

Ray Serve's gRPC proxy calls the ingress deployment's methods named like the RPCs, passing the
request proto and, because the methods take a `grpc_context` keyword, a `RayServegRPCContext`
that carries the client's metadata (the `authorization` bearer token) and takes back a status
code. `GrpcMixin` holds those two methods; the HTTP ingress inherits it, so both APIs share one
tokenizer, one engine handle and one API key check.

Errors are status codes: INVALID_ARGUMENT (bad sampling options, empty or too long prompt),
NOT_FOUND (unknown model), UNAUTHENTICATED, RESOURCE_EXHAUSTED (queue full), UNAVAILABLE
(engine down), DEADLINE_EXCEEDED. A unary call sets the code and returns an empty reply (Serve's
documented way); a stream sets it and raises, since Serve forwards a stream's context only with
a yielded message or an exception.

`python -m moray.deploy.grpc` regenerates the checked-in stubs from the proto.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from pydantic import ValidationError
from ray.serve.config import gRPCOptions

from moray.deploy import moray_pb2
from moray.deploy.protocol import CompletionRequest
from moray.model.engine import TokenEvent
from moray.model.sampling import SamplingParams

if TYPE_CHECKING:
    from ray.serve.grpc_util import RayServegRPCContext

    from moray.deploy.config import ServerConfig
    from moray.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SERVICER_FUNCTION = "moray.deploy.moray_pb2_grpc.add_MorayServicer_to_server"
PROTO_PATH = Path(__file__).with_name("moray.proto")
STUB_FILES = ("moray_pb2.py", "moray_pb2.pyi", "moray_pb2_grpc.py")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions, as the HTTP API uses it
SEED_MODULUS = 2**63  # the HTTP API's seed mapping (choice 0), so a seed samples the same over both APIs
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs")  # proto3 `optional` fields

Code = grpc.StatusCode
# HTTP status of the OpenAI API -> gRPC code (the google.rpc.Code mapping).
GRPC_CODES = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED,
              404: Code.NOT_FOUND, 413: Code.INVALID_ARGUMENT, 429: Code.RESOURCE_EXHAUSTED,
              500: Code.INTERNAL, 503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED}


class GrpcError(Exception):
    """A request that ends with a non-OK gRPC status; `details` is what the client reads."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)  # both in args, so Ray can pickle it across processes
        self.code, self.details = code, details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


def grpc_options(port: int, request_timeout_s: float | None = None) -> gRPCOptions:
    """What `serve.start(grpc_options=...)` needs to serve the `Moray` service."""
    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION],
                       request_timeout_s=request_timeout_s)


# ---- request -> engine inputs ------------------------------------------------------------------
def _invalid(details: str) -> GrpcError:
    return GrpcError(Code.INVALID_ARGUMENT, details)


def completion_request(request: moray_pb2.GenerateRequest) -> CompletionRequest:
    """The request as the HTTP API's `CompletionRequest`: the same bounds and the same messages."""
    payload: dict[str, Any] = {name: getattr(request, name) for name in _OPTIONS if request.HasField(name)}
    which = request.WhichOneof("input")
    payload["prompt"] = list(request.prompt_token_ids.ids) if which == "prompt_token_ids" else request.prompt
    if request.stop:
        payload["stop"] = list(request.stop)
    try:
        return CompletionRequest.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise _invalid(f"{where}: {err['msg']}" if where else err["msg"]) from None


def sampling_params(request: moray_pb2.GenerateRequest, max_tokens_limit: int) -> SamplingParams:
    """The request's sampling options, checked as the HTTP API checks them (else INVALID_ARGUMENT)."""
    req = completion_request(request)
    max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
    if max_tokens > max_tokens_limit:
        raise _invalid(f"max_tokens must be at most {max_tokens_limit}, got {max_tokens}")
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
        seed=None if req.seed is None else req.seed % SEED_MODULUS, stop=req.stop_strings(),
        logprobs=req.logprobs)


def prompt_ids(request: moray_pb2.GenerateRequest, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the prompt: the text encoded with BOS, or the ids as given."""
    which = request.WhichOneof("input")
    if which is None:
        raise _invalid("one of prompt or prompt_token_ids is required")
    if which == "prompt_token_ids":
        ids = list(request.prompt_token_ids.ids)
        if not ids:
            raise _invalid("prompt_token_ids is empty")
        return ids
    if not request.prompt:
        raise _invalid("prompt is empty")
    return list(tokenizer.encode(request.prompt, bos=True))


def request_id(request: moray_pb2.GenerateRequest) -> str:
    """The client's id when it is a safe token (it reaches logs), else a fresh one."""
    if not request.request_id:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(request.request_id):
        raise _invalid("request_id must be 1-128 characters of [A-Za-z0-9._:-]")
    return request.request_id


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return None


# ---- engine events -> replies ------------------------------------------------------------------
def token_logprob(event: TokenEvent) -> moray_pb2.TokenLogprob | None:
    if event.logprob is None:
        return None
    top = [moray_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in event.top_logprobs or []]
    return moray_pb2.TokenLogprob(token_id=event.token_id, logprob=event.logprob, top_logprobs=top)


def usage(event: TokenEvent) -> moray_pb2.Usage:
    return moray_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                           total_tokens=event.prompt_tokens + event.completion_tokens)


def chunk(event: TokenEvent) -> moray_pb2.GenerateChunk:
    """One streamed token; the last one (finish_reason set) also carries the usage."""
    out = moray_pb2.GenerateChunk(text=event.text, token_id=event.token_id, request_id=event.request_id,
                                  finish_reason=event.finish_reason or "", logprob=token_logprob(event))
    if event.finish_reason is not None:
        out.usage.CopyFrom(usage(event))
    return out


def reply(events: Sequence[TokenEvent], model: str, rid: str) -> moray_pb2.GenerateReply:
    """The whole completion: texts concatenated, one token id (and logprob) per event."""
    out = moray_pb2.GenerateReply(
        text="".join(e.text for e in events), token_ids=[e.token_id for e in events], model=model,
        request_id=rid, logprobs=[lp for e in events if (lp := token_logprob(e)) is not None])
    if events:
        out.finish_reason = events[-1].finish_reason or ""
        out.usage.CopyFrom(usage(events[-1]))
    return out


def status_of(error: BaseException) -> GrpcError:
    """The status for a failure, classified as the HTTP API classifies it (a bug is INTERNAL, logged)."""
    if isinstance(error, GrpcError):
        return error
    from moray.deploy.openai import to_api_error  # openai.py imports this module: import late, no cycle

    api_error = to_api_error(error)
    return GrpcError(GRPC_CODES.get(api_error.status, Code.UNKNOWN), api_error.message)


def _set_status(context: RayServegRPCContext | None, status: GrpcError) -> None:
    if context is None:  # called through a handle, not the gRPC proxy
        raise status
    context.set_code(status.code)
    context.set_details(status.details)


class GrpcMixin:
    """`Generate` / `GenerateStream` for the Serve ingress; the ingress provides the members below."""

    tokenizer: Tokenizer
    config: ServerConfig
    served_model_name: str

    def authorized(self, token: str | None) -> bool:
        """True when no API key is set or `token` equals it (constant-time); the ingress defines it."""
        raise NotImplementedError

    def stream_tokens(self, prompt_ids: list[int], params: SamplingParams,
                      request_id: str) -> AsyncIterator[TokenEvent]:
        """The engine's events for one request; the ingress defines it."""
        raise NotImplementedError

    async def Generate(self, request: moray_pb2.GenerateRequest,  # noqa: N802 - the RPC's name
                       grpc_context: RayServegRPCContext | None = None) -> moray_pb2.GenerateReply:
        try:
            ids, params, rid = self._grpc_admit(request, grpc_context)
            events = [e async for e in self._grpc_events(ids, params, rid)]
        except Exception as e:
            status = status_of(e)
            log.info("grpc Generate: %s %r", status.code.name, status.details)
            _set_status(grpc_context, status)
            return moray_pb2.GenerateReply()
        return reply(events, self.served_model_name, rid)

    async def GenerateStream(self, request: moray_pb2.GenerateRequest,  # noqa: N802 - the RPC's name
                             grpc_context: RayServegRPCContext | None = None,
                             ) -> AsyncIterator[moray_pb2.GenerateChunk]:
        try:
            ids, params, rid = self._grpc_admit(request, grpc_context)
            async for event in self._grpc_events(ids, params, rid):
                yield chunk(event)
        except Exception as e:
            status = status_of(e)
            log.info("grpc GenerateStream: %s %r", status.code.name, status.details)
            _set_status(grpc_context, status)
            raise status from None

    def _grpc_admit(self, request: moray_pb2.GenerateRequest,
                    context: RayServegRPCContext | None) -> tuple[list[int], SamplingParams, str]:
        """Check the key, the model, then the arguments; the engine's inputs."""
        token = bearer_token(context.invocation_metadata()) if context is not None else None
        if not self.authorized(token):
            raise GrpcError(Code.UNAUTHENTICATED, "a valid API key is required: send metadata "
                                                  "'authorization: Bearer <key>'")
        if request.model and request.model != self.served_model_name:
            raise GrpcError(Code.NOT_FOUND, f"The model `{request.model}` does not exist.")
        rid = request_id(request)
        params = sampling_params(request, self.config.max_tokens_limit)
        return prompt_ids(request, self.tokenizer), params, rid

    async def _grpc_events(self, ids: list[int], params: SamplingParams,
                           rid: str) -> AsyncIterator[TokenEvent]:
        """The engine's events, ending in DEADLINE_EXCEEDED after `request_timeout_s` as over HTTP."""
        deadline = time.monotonic() + self.config.request_timeout_s
        stream = self.stream_tokens(ids, params, rid)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(anext(stream), max(deadline - time.monotonic(), 0.0))
                except StopAsyncIteration:
                    return
                yield event
        finally:
            aclose = getattr(stream, "aclose", None)  # an async generator: closing it frees the sequence
            if aclose is not None:
                await aclose()


# ---- stubs -------------------------------------------------------------------------------------
def generate_stubs(out_dir: Path, proto: Path = PROTO_PATH) -> list[Path]:
    """Run protoc (grpcio-tools, a dev/test dependency) on `proto`, writing the stubs into `out_dir`.

    protoc names the generated module after the proto's path under its include root, and pickles
    of the messages (Serve sends them between processes) refer to that name. So the proto is
    compiled as `moray/deploy/moray.proto`: the messages live in `moray.deploy.moray_pb2` and the
    service stub imports them from the package, with no text edits of generated code.
    """
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        root, package = Path(tmp), Path("moray", "deploy")
        (root / "src" / package).mkdir(parents=True)
        (root / "out").mkdir()
        shutil.copyfile(proto, root / "src" / package / proto.name)
        args = ["grpc_tools.protoc", f"-I{root / 'src'}", f"--python_out={root / 'out'}",
                f"--grpc_python_out={root / 'out'}", f"--pyi_out={root / 'out'}", str(package / proto.name)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copyfile(root / "out" / package / name, out_dir / name)) for name in STUB_FILES]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    written = generate_stubs(PROTO_PATH.parent)
    log.info("wrote %s", ", ".join(str(p) for p in written))
