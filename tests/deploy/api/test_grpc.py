"""gRPC: the checked-in stubs are what protoc makes of deploy/api/moray.proto; the proto's mapping on
to the HTTP API's request (absent options, zeros, the vLLM extensions), its admission and status codes.

The stubs are regenerated with grpcio-tools into a temp dir (by the same function as
`python -m moray.deploy.api.grpc`) and compared with the checked-in files. The tool's version stamps
are masked: a newer grpcio-tools must not fail the check, a changed proto must.
"""

from __future__ import annotations

import asyncio
import pickle
import re
from pathlib import Path

import grpc
import pytest

from moray.deploy.api import grpc as moray_grpc
from moray.deploy.api import moray_pb2, moray_pb2_grpc
from moray.deploy.api.admission import Admission
from moray.deploy.api.errors import APIError
from moray.model.engine import QueueFullError, RequestError
from moray.model.sampling import SamplingParams

DEPLOY = Path(moray_grpc.__file__).parent
_VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"ValidateProtobufRuntimeVersion\(.*?'',", re.S), "ValidateProtobufRuntimeVersion(X,"),
    (re.compile(r"^GRPC_GENERATED_VERSION = '.*'$", re.M), "GRPC_GENERATED_VERSION = 'X'"),
]


def _mask_versions(source: str) -> str:
    for pattern, replacement in _VERSION_STAMPS:
        source = pattern.sub(replacement, source)
    return source


def test_checked_in_stubs_equal_regenerated(tmp_path: Path) -> None:
    written = moray_grpc.generate_stubs(tmp_path)
    assert sorted(p.name for p in written) == sorted(moray_grpc.STUB_FILES)
    for path in written:
        fresh, checked_in = path.read_text(), (DEPLOY / path.name).read_text()
        assert _mask_versions(fresh) == _mask_versions(checked_in), (
            f"deploy/api/{path.name} is stale: run `python -m moray.deploy.api.grpc` and commit the stubs")


def test_stubs_live_in_the_package() -> None:
    # Serve pickles request protos between processes: the class must be importable by its module name.
    source = (DEPLOY / "moray_pb2_grpc.py").read_text()
    assert re.search(r"^import moray_pb2\b", source, re.M) is None
    assert moray_pb2_grpc.moray_dot_deploy_dot_api_dot_moray__pb2 is moray_pb2
    request = moray_pb2.GenerateRequest(prompt="x", temperature=0.0)
    assert type(request).__module__ == "moray.deploy.api.moray_pb2"
    again = pickle.loads(pickle.dumps(request))
    assert again == request and again.HasField("temperature")


def test_service_shape() -> None:
    service = moray_pb2.DESCRIPTOR.services_by_name["Moray"]
    assert moray_pb2.DESCRIPTOR.package == "moray"
    unary, stream = service.methods_by_name["Generate"], service.methods_by_name["GenerateStream"]
    assert (unary.input_type.name, unary.output_type.name) == ("GenerateRequest", "GenerateReply")
    assert (stream.input_type.name, stream.output_type.name) == ("GenerateRequest", "GenerateChunk")
    assert not unary.server_streaming and stream.server_streaming
    assert not unary.client_streaming and not stream.client_streaming
    assert callable(moray_pb2_grpc.add_MorayServicer_to_server)


# ---- the proto as the HTTP API's request -------------------------------------------------------------
KEY_METADATA = [("authorization", "Bearer " + "sk-api-test-" + "k" * 20)]  # conftest's KEY


def jobs(admission: Admission, **fields: object) -> list:
    fields.setdefault("prompt", "x")
    return moray_grpc.completion_jobs(moray_pb2.GenerateRequest(**fields), admission, KEY_METADATA)


def params(admission: Admission, **fields: object) -> SamplingParams:
    (job,) = jobs(admission, **fields)
    return job.params


def test_absent_options_stay_absent() -> None:
    assert moray_grpc.completion_payload(moray_pb2.GenerateRequest(prompt="x")) == {"prompt": "x"}


def test_present_zero_is_not_absent() -> None:
    request = moray_pb2.GenerateRequest(prompt="x", temperature=0.0, seed=0, logprobs=0, max_tokens=3,
                                        top_k=-1, stop=["\n", "END"])
    wire = moray_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert moray_grpc.completion_payload(wire) == {"prompt": "x", "temperature": 0.0, "seed": 0,
                                                   "logprobs": 0, "max_tokens": 3, "top_k": -1,
                                                   "stop": ["\n", "END"]}


def test_extensions_and_token_prompts_map_as_given() -> None:
    request = moray_pb2.GenerateRequest(prompt_token_ids=moray_pb2.TokenIds(ids=[1, 5, 7]), model="tiny",
                                        stop_token_ids=[9, 10], ignore_eos=True)
    assert moray_grpc.completion_payload(request) == {"prompt": [1, 5, 7], "model": "tiny",
                                                      "stop_token_ids": [9, 10], "ignore_eos": True}


def test_admitted_as_http_admits_it(admission: Admission) -> None:
    """OpenAI's defaults; top_k clamped to the vocabulary; seeds mod 2**63; the vLLM extensions passed on."""
    assert params(admission) == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=None,
                                               stop=(), logprobs=None)
    p = params(admission, top_k=2**31 - 1, seed=-1, stop_token_ids=[7], ignore_eos=True, stop=["a", ""])
    assert p.top_k == admission.vocab_size and p.seed == 2**63 - 1
    assert p.stop_token_ids == (7,) and p.ignore_eos and p.stop == ("a",)


def code_of(admission: Admission, metadata: list | None = None, **fields: object) -> grpc.StatusCode:
    if "prompt_token_ids" not in fields:
        fields.setdefault("prompt", "x")
    with pytest.raises(Exception) as info:  # noqa: B017 - APIError or GrpcError: both map to a code
        moray_grpc.completion_jobs(moray_pb2.GenerateRequest(**fields), admission,
                                   KEY_METADATA if metadata is None else metadata)
    return moray_grpc.status_of(info.value).code


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -1.0), ("temperature", float("nan")), ("max_tokens", 0), ("max_tokens", -5),
    ("max_tokens", 33), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("logprobs", -1), ("logprobs", 6),
    ("stop", ["a", "b", "c", "d", "e"]),
])
def test_bad_options_are_invalid_argument(admission: Admission, field: str, value: object) -> None:
    assert code_of(admission, **{field: value}) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("fields", [
    {"prompt": ""}, {"prompt_token_ids": moray_pb2.TokenIds(ids=[])},
    {"prompt_token_ids": moray_pb2.TokenIds(ids=[1] * 60), "max_tokens": 8},  # past the context (64)
    {"prompt_token_ids": moray_pb2.TokenIds(ids=[1, 10**6])},  # not in the vocabulary
], ids=["empty-text", "empty-ids", "too-long", "vocab"])
def test_unusable_prompts_are_invalid_argument(admission: Admission, fields: dict) -> None:
    assert code_of(admission, **fields) == grpc.StatusCode.INVALID_ARGUMENT


def test_model_and_key(admission: Admission) -> None:
    assert code_of(admission, model="other") == grpc.StatusCode.NOT_FOUND
    assert code_of(admission, metadata=[]) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(admission, metadata=[("authorization", "Bearer wrong")]) == grpc.StatusCode.UNAUTHENTICATED


def test_request_ids_are_kept_when_safe_and_replaced_when_not(admission: Admission) -> None:
    assert jobs(admission, request_id="abc-1.2:3")[0].request_id == "abc-1.2:3"
    for bad in ("", "bad\nid", "x" * 129):
        rid = jobs(admission, request_id=bad)[0].request_id
        assert rid != bad and len(rid) == 32


@pytest.mark.parametrize(("metadata", "token"), [
    ([("authorization", "Bearer sk-1")], "sk-1"),
    ([("application", "moray"), ("authorization", "bearer  sk-2 ")], "sk-2"),
    ([("authorization", b"Bearer sk-3")], "sk-3"),
    ([("authorization", "Basic abc")], None),
    ([("application", "moray")], None),
    ([], None),
])
def test_bearer_token(metadata: list[tuple[str, str | bytes]], token: str | None) -> None:
    assert moray_grpc.bearer_token(metadata) == token


def test_errors_map_to_grpc_codes() -> None:
    cases = {RequestError("too long"): grpc.StatusCode.INVALID_ARGUMENT,
             QueueFullError("full"): grpc.StatusCode.RESOURCE_EXHAUSTED,
             asyncio.TimeoutError(): grpc.StatusCode.DEADLINE_EXCEEDED,
             APIError(404, "no model"): grpc.StatusCode.NOT_FOUND,
             KeyError("a bug"): grpc.StatusCode.INTERNAL}
    for error, code in cases.items():
        assert moray_grpc.status_of(error).code == code, error


def test_grpc_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(moray_grpc.GrpcError(grpc.StatusCode.NOT_FOUND, "no such model")))
    assert (error.code, error.details) == (grpc.StatusCode.NOT_FOUND, "no such model")
