"""The checked-in gRPC stubs are what protoc makes of deploy/moray.proto; the request converters.

The stubs are regenerated with grpcio-tools into a temp dir (by the same function as
`python -m moray.deploy.grpc`) and compared with the checked-in files. The tool's version stamps
are masked: a newer grpcio-tools must not fail the check, a changed proto must.
"""

from __future__ import annotations

import asyncio
import pickle
import re
from pathlib import Path

import grpc
import pytest

from moray.deploy import grpc as moray_grpc
from moray.deploy import moray_pb2, moray_pb2_grpc
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
    pytest.importorskip("grpc_tools")
    written = moray_grpc.generate_stubs(tmp_path)
    assert sorted(p.name for p in written) == sorted(moray_grpc.STUB_FILES)
    for path in written:
        fresh, checked_in = path.read_text(), (DEPLOY / path.name).read_text()
        assert _mask_versions(fresh) == _mask_versions(checked_in), (
            f"deploy/{path.name} is stale: run `python -m moray.deploy.grpc` and commit the stubs")


def test_stubs_live_in_the_package() -> None:
    # Serve pickles request protos between processes: the class must be importable by its module name.
    source = (DEPLOY / "moray_pb2_grpc.py").read_text()
    assert re.search(r"^import moray_pb2\b", source, re.M) is None
    assert moray_pb2_grpc.moray_dot_deploy_dot_moray__pb2 is moray_pb2
    request = moray_pb2.GenerateRequest(prompt="x", temperature=0.0)
    assert type(request).__module__ == "moray.deploy.moray_pb2"
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


# ---- converters --------------------------------------------------------------------------------
LIMIT = 4096


def test_absent_options_take_openai_defaults() -> None:
    # OpenAI /v1/completions defaults: max_tokens 16, temperature 1, top_p 1; no seed, stop, logprobs.
    params = moray_grpc.sampling_params(moray_pb2.GenerateRequest(prompt="x"), LIMIT)
    assert params == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=None,
                                    stop=(), logprobs=None)


def test_present_zero_is_not_absent() -> None:
    request = moray_pb2.GenerateRequest(prompt="x", temperature=0.0, seed=0, logprobs=0, max_tokens=3,
                                        top_k=-1, stop=["\n", "END"])
    wire = moray_pb2.GenerateRequest.FromString(request.SerializeToString())
    params = moray_grpc.sampling_params(wire, LIMIT)
    assert (params.temperature, params.seed, params.logprobs, params.max_tokens) == (0.0, 0, 0, 3)
    assert params.top_k == 0 and params.stop == ("\n", "END")


def test_errors_map_to_grpc_codes() -> None:
    cases = {RequestError("too long"): grpc.StatusCode.INVALID_ARGUMENT,
             QueueFullError("full"): grpc.StatusCode.RESOURCE_EXHAUSTED,
             asyncio.TimeoutError(): grpc.StatusCode.DEADLINE_EXCEEDED,
             KeyError("a bug"): grpc.StatusCode.INTERNAL}
    for error, code in cases.items():
        assert moray_grpc.status_of(error).code == code, error


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -1.0), ("temperature", float("nan")),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", LIMIT + 1),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("logprobs", -1), ("logprobs", 6),
    ("stop", ["a", "b", "c", "d", "e"]),
])
def test_bad_options_are_invalid_argument(field: str, value: object) -> None:
    request = moray_pb2.GenerateRequest(prompt="x", **{field: value})
    with pytest.raises(moray_grpc.GrpcError) as info:
        moray_grpc.sampling_params(request, LIMIT)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details


@pytest.mark.parametrize("request_proto", [
    moray_pb2.GenerateRequest(),
    moray_pb2.GenerateRequest(prompt=""),
    moray_pb2.GenerateRequest(prompt_token_ids=moray_pb2.TokenIds(ids=[])),
], ids=["missing", "empty-text", "empty-ids"])
def test_missing_or_empty_prompt_is_invalid_argument(request_proto: moray_pb2.GenerateRequest) -> None:
    with pytest.raises(moray_grpc.GrpcError) as info:
        moray_grpc.prompt_ids(request_proto, tokenizer=None)  # type: ignore[arg-type]  # never reached
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_token_id_prompt_is_used_as_given() -> None:
    request = moray_pb2.GenerateRequest(prompt_token_ids=moray_pb2.TokenIds(ids=[1, 5, 7]))
    assert moray_grpc.prompt_ids(request, tokenizer=None) == [1, 5, 7]  # type: ignore[arg-type]


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


def test_request_id_is_kept_when_safe_and_refused_when_not() -> None:
    assert moray_grpc.request_id(moray_pb2.GenerateRequest(request_id="abc-1.2:3")) == "abc-1.2:3"
    assert len(moray_grpc.request_id(moray_pb2.GenerateRequest())) == 32
    with pytest.raises(moray_grpc.GrpcError):
        moray_grpc.request_id(moray_pb2.GenerateRequest(request_id="bad\nid"))


def test_grpc_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(moray_grpc.GrpcError(grpc.StatusCode.NOT_FOUND, "no such model")))
    assert (error.code, error.details) == (grpc.StatusCode.NOT_FOUND, "no such model")
