"""gRPC API (`moray.proto`): `Generate` and `GenerateStream` on the Serve ingress.

Ray Serve's gRPC proxy calls the ingress deployment's methods named like the RPCs, passing the
request proto and, because the methods take a `grpc_context` keyword, a `RayServegRPCContext`
that carries the client's metadata (the `authorization` bearer token) and takes back a status
code. `GrpcMixin` holds those two methods; the ingress inherits it, and a request takes the HTTP
API's path from there: the proto becomes the JSON payload of a `/v1/completions` request
(`completion_payload`), parsed, checked and turned into an engine job by `admission.py`, run by
`fanout.py`. So both APIs give the same tokens, the same limits and the same errors.

Errors are status codes mapped from the HTTP status (`GRPC_CODES`): INVALID_ARGUMENT (400: bad
sampling options, empty or too long prompt), NOT_FOUND (404: unknown model), UNAUTHENTICATED,
RESOURCE_EXHAUSTED (429: queue full), UNAVAILABLE (503: engine down), DEADLINE_EXCEEDED (504).
A unary call sets the code and returns an empty reply (Serve's documented way); a stream sets it
and raises, since Serve forwards a stream's context only with a yielded message or an exception.

`python -m moray.deploy.api.grpc` regenerates the checked-in stubs from the proto.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from moray.deploy.api import moray_pb2
from moray.deploy.api.admission import Admission, bearer, parse
from moray.deploy.api.errors import to_api_error
from moray.deploy.api.protocol import CompletionRequest, Job
from moray.model.engine import TokenEvent

if TYPE_CHECKING:
    from ray.serve.grpc_util import RayServegRPCContext

log = logging.getLogger(__name__)

SERVICER_FUNCTION = "moray.deploy.api.moray_pb2_grpc.add_MorayServicer_to_server"  # Serve's grpc_options
PROTO_PATH = Path(__file__).with_name("moray.proto")
PROTO_PACKAGE = Path("moray", "deploy", "api")  # the proto's path under protoc's include root
STUB_FILES = ("moray_pb2.py", "moray_pb2.pyi", "moray_pb2_grpc.py")
# proto3 `optional` fields
_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs", "prompt_logprobs")

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


# ---- request -> the HTTP API's payload ---------------------------------------------------------
def completion_payload(request: moray_pb2.GenerateRequest) -> dict[str, Any]:
    """The request as the JSON body of a `/v1/completions` request (absent options stay absent)."""
    payload: dict[str, Any] = {name: getattr(request, name) for name in _OPTIONS if request.HasField(name)}
    which = request.WhichOneof("input")
    payload["prompt"] = list(request.prompt_token_ids.ids) if which == "prompt_token_ids" else request.prompt
    if request.model:
        payload["model"] = request.model
    if request.stop:
        payload["stop"] = list(request.stop)
    if request.stop_token_ids:
        payload["stop_token_ids"] = list(request.stop_token_ids)
    if request.ignore_eos:
        payload["ignore_eos"] = True
    if request.HasField("structured_outputs"):
        payload["structured_outputs"] = structured_outputs(request.structured_outputs)
    return payload


def structured_outputs(so: moray_pb2.StructuredOutputs) -> dict[str, Any]:
    """The set fields as the JSON `structured_outputs` (the schema parsed when it is JSON text)."""
    out: dict[str, Any] = {name: getattr(so, name) for name in ("regex", "grammar", "json_object")
                           if getattr(so, name)}
    if so.choice:
        out["choice"] = list(so.choice)
    if so.json:
        try:
            out["json"] = json.loads(so.json)
        except ValueError:
            out["json"] = so.json  # the engine refuses it with the JSON parser's message
    return out


def completion_jobs(request: moray_pb2.GenerateRequest, admission: Admission,
                    metadata: Iterable[tuple[str, str | bytes]]) -> list[Job]:
    """Check the key, then admit the request as HTTP admits `/v1/completions`: the engine's job."""
    if not admission.authorized(bearer_token(metadata)):
        raise GrpcError(Code.UNAUTHENTICATED, "a valid API key is required: send metadata "
                                              "'authorization: Bearer <key>'")
    rid = admission.request_id(request.request_id or None)
    return admission.completion_jobs(parse(CompletionRequest, completion_payload(request)), rid)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of the first `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata:
        if key.lower() == "authorization":
            return bearer(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return None


# ---- engine events -> replies ------------------------------------------------------------------
def token_logprob(event: TokenEvent) -> moray_pb2.TokenLogprob | None:
    if event.logprob is None:
        return None
    top = [moray_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in event.top_logprobs or []]
    return moray_pb2.TokenLogprob(token_id=event.token_id, logprob=event.logprob, top_logprobs=top)


def prompt_logprobs(event: TokenEvent) -> list[moray_pb2.PromptLogprob]:
    """The prompt's scores, on a request's first event when it asked for them."""
    return [moray_pb2.PromptLogprob(token_id=s.token_id, logprob=s.logprob, rank=s.rank,
                                    top_logprobs=[moray_pb2.TopLogprob(token_id=t, logprob=lp)
                                                  for t, lp in s.top_logprobs])
            for s in event.prompt_logprobs or []]


def usage(event: TokenEvent) -> moray_pb2.Usage:
    return moray_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                           total_tokens=event.prompt_tokens + event.completion_tokens)


def chunk(event: TokenEvent) -> moray_pb2.GenerateChunk:
    """One streamed token; the last one (finish_reason set) also carries the usage."""
    out = moray_pb2.GenerateChunk(text=event.text, token_id=event.token_id, request_id=event.request_id,
                                  finish_reason=event.finish_reason or "", logprob=token_logprob(event),
                                  prompt_logprobs=prompt_logprobs(event))
    if event.finish_reason is not None:
        out.usage.CopyFrom(usage(event))
    return out


def reply(events: Sequence[TokenEvent], model: str, rid: str) -> moray_pb2.GenerateReply:
    """The whole completion: texts concatenated, one token id (and logprob) per event."""
    out = moray_pb2.GenerateReply(
        text="".join(e.text for e in events), token_ids=[e.token_id for e in events], model=model,
        request_id=rid, logprobs=[lp for e in events if (lp := token_logprob(e)) is not None],
        prompt_logprobs=prompt_logprobs(events[0]) if events else [])
    if events:
        out.finish_reason = events[-1].finish_reason or ""
        out.usage.CopyFrom(usage(events[-1]))
    return out


def status_of(error: BaseException) -> GrpcError:
    """The status for a failure, classified as the HTTP API classifies it (a bug is INTERNAL, logged)."""
    if isinstance(error, GrpcError):
        return error
    api_error = to_api_error(error)
    return GrpcError(GRPC_CODES.get(api_error.status, Code.UNKNOWN), api_error.message)


def _set_status(context: RayServegRPCContext | None, status: GrpcError) -> None:
    if context is None:  # called through a handle, not the gRPC proxy
        raise status
    context.set_code(status.code)
    context.set_details(status.details)


class GrpcMixin:
    """`Generate` / `GenerateStream` for the Serve ingress; the ingress provides the members below."""

    admission: Admission
    served_model_name: str

    def run_jobs(self, jobs: list[Job]) -> AsyncIterator[TokenEvent]:
        """The engine's events for `jobs` (HTTP's fan-out and timeout); the ingress defines it."""
        raise NotImplementedError

    async def Generate(self, request: moray_pb2.GenerateRequest,  # noqa: N802 - the RPC's name
                       grpc_context: RayServegRPCContext | None = None,
                       metadata: Sequence[tuple[str, str]] = ()) -> moray_pb2.GenerateReply:
        """Serve's gRPC proxy passes `grpc_context`; moray's own server (`grpc_server.py`) calls through
        a handle with the client's `metadata` and gets a failure as a raised `GrpcError`."""
        try:
            jobs = completion_jobs(request, self.admission, _metadata(grpc_context, metadata))
            events = [e async for e in self.run_jobs(jobs)]
        except Exception as e:
            status = status_of(e)
            log.info("grpc Generate: %s %r", status.code.name, status.details)
            _set_status(grpc_context, status)
            return moray_pb2.GenerateReply()
        return reply(events, self.served_model_name, jobs[0].request_id)

    async def GenerateStream(self, request: moray_pb2.GenerateRequest,  # noqa: N802 - the RPC's name
                             grpc_context: RayServegRPCContext | None = None,
                             metadata: Sequence[tuple[str, str]] = (),
                             ) -> AsyncIterator[moray_pb2.GenerateChunk]:
        try:
            jobs = completion_jobs(request, self.admission, _metadata(grpc_context, metadata))
            async for event in self.run_jobs(jobs):
                yield chunk(event)
        except Exception as e:
            status = status_of(e)
            log.info("grpc GenerateStream: %s %r", status.code.name, status.details)
            _set_status(grpc_context, status)
            raise status from None


def _metadata(context: RayServegRPCContext | None,
              given: Sequence[tuple[str, str]]) -> Iterable[tuple[str, str | bytes]]:
    return context.invocation_metadata() if context is not None else given


# ---- stubs -------------------------------------------------------------------------------------
def generate_stubs(out_dir: Path, proto: Path = PROTO_PATH) -> list[Path]:
    """Run protoc (grpcio-tools, a dev/test dependency) on `proto`, writing the stubs into `out_dir`.

    protoc names the generated module after the proto's path under its include root, and pickles
    of the messages (Serve sends them between processes) refer to that name. So the proto is
    compiled as `moray/deploy/api/moray.proto`: the messages live in `moray.deploy.api.moray_pb2` and the
    service stub imports them from the package, with no text edits of generated code.
    """
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        root, package = Path(tmp), PROTO_PACKAGE
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
