"""ServerConfig: YAML loading, CLI overrides, validation, env API key; bounds checked against Serve's own."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
import yaml
from ray.serve.config import AutoscalingConfig

from moray.deploy.serve.config import ConfigError, ServerConfig

FILE_VALUES: dict[str, Any] = {
    "model": "/models/Mixtral-8x7B-Instruct-v0.1",
    "num_shards": 8,
    "device": "cpu",
    "dtype": "bfloat16",
    "max_num_seqs": 64,
    "max_batch_tokens": 2048,
    "autoscaling": True,
    "shard_min_replicas": 2,
    "shard_max_replicas": 6,
    "host": "0.0.0.0",
    "port": 8123,
}


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MORAY_API_KEY", raising=False)


def write_yaml(tmp_path: Path, values: Any) -> Path:
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_every_field_is_described() -> None:
    undescribed = [n for n, f in ServerConfig.model_fields.items() if not f.description]
    assert undescribed == []


def test_defaults() -> None:
    config = ServerConfig()
    assert config.model is None and config.served_model_name == "moray-tiny"
    assert config.host == "127.0.0.1"  # never exposed unless told
    assert config.api_key is None


def test_from_yaml_reads_every_value(tmp_path: Path) -> None:
    config = ServerConfig.from_yaml(write_yaml(tmp_path, FILE_VALUES))
    assert config.model_dump(include=set(FILE_VALUES)) == FILE_VALUES
    assert config.served_model_name == "Mixtral-8x7B-Instruct-v0.1"


def test_overrides_beat_file_and_none_is_ignored(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, FILE_VALUES)
    config = ServerConfig.load(str(path), {"num_shards": 4, "port": None, "model": None, "max_n": 2})
    assert config.num_shards == 4  # the flag wins
    assert config.port == FILE_VALUES["port"]  # an unset flag (None) leaves the file's value
    assert config.model == FILE_VALUES["model"]
    assert config.max_n == 2


def test_load_without_file() -> None:
    assert ServerConfig.load(None, {"num_shards": 3}).num_shards == 3


def test_served_model_name_explicit_and_trailing_slash() -> None:
    assert ServerConfig(model="/m/mix/").served_model_name == "mix"
    assert ServerConfig(model="/m/mix", served_model_name="x").served_model_name == "x"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"num_shards": 0}, "num_shards"),
        ({"port": 70000}, "port"),
        ({"grpc_port": 0}, "grpc_port"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"num_shard": 2}, "num_shard"),  # a typo is an error, not ignored
        ({"shard_min_replicas": 5, "shard_max_replicas": 2}, "shard_min_replicas"),
        ({"autoscaling": True, "dispatcher_replicas": 3, "dispatcher_max_replicas": 2},
         "dispatcher_replicas"),
        ({"max_num_seqs": 64, "max_batch_tokens": 32}, "max_batch_tokens"),
        ({"port": 9000, "grpc_port": 9000}, "grpc_port"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"api_key": ""}, "api_key"),
        ({"quantization": "fp8", "device": "cuda", "dtype": "float32"}, "dtype"),
    ],
)
def test_invalid_values_name_the_field(values: dict[str, Any], field: str, tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError):
        ServerConfig(**values)
    path = write_yaml(tmp_path, values)
    with pytest.raises(ConfigError, match=field) as info:
        ServerConfig.from_yaml(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_dispatcher_bounds_only_matter_when_autoscaling() -> None:
    assert ServerConfig(dispatcher_replicas=3).dispatcher_replicas == 3


def test_assignment_is_validated() -> None:
    config = ServerConfig()
    with pytest.raises(pydantic.ValidationError):
        config.num_shards = 0


@pytest.mark.parametrize("content", ["- a\n- b\n", "num_shards: [1\n"])
def test_bad_yaml_is_a_clear_error(content: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match="bad.yaml"):
        ServerConfig.from_yaml(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        ServerConfig.from_yaml(tmp_path / "nope.yaml")


def test_empty_yaml_is_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert ServerConfig.from_yaml(path) == ServerConfig()


def test_api_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORAY_API_KEY", "s3cret")
    config = ServerConfig()
    assert config.api_key == "s3cret"
    assert "s3cret" not in repr(config)  # never logged by accident
    assert ServerConfig(api_key="other").api_key == "other"
    monkeypatch.setenv("MORAY_API_KEY", "")
    assert ServerConfig().api_key is None


@pytest.mark.parametrize(
    ("device", "dtype", "expected"),
    [
        ("cpu", "auto", torch.float32),
        ("cuda", "auto", torch.bfloat16),
        ("cpu", "bfloat16", torch.bfloat16),
        ("cuda", "float16", torch.float16),
        ("cpu", "float32", torch.float32),
    ],
)
def test_resolved_dtype(device: str, dtype: str, expected: torch.dtype) -> None:
    config = ServerConfig(device=device, dtype=dtype)
    assert config.resolved_device() == device
    assert config.resolved_dtype() == expected


def test_auto_device_follows_torch() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ServerConfig().resolved_device() == expected


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = ServerConfig(**FILE_VALUES)
    again = ServerConfig.from_yaml(write_yaml(tmp_path, config.model_dump()))
    assert again == config


@pytest.mark.parametrize(("low", "high"), list(itertools.product([1, 2, 4], [1, 2, 4])))
def test_shard_bounds_agree_with_serve(low: int, high: int) -> None:
    """Our shard replica bounds are accepted exactly when Serve's AutoscalingConfig accepts them."""
    serve_ok = _accepted(AutoscalingConfig, min_replicas=low, max_replicas=high)
    ours_ok = _accepted(ServerConfig, shard_min_replicas=low, shard_max_replicas=high, autoscaling=True)
    assert ours_ok == serve_ok


def _accepted(model: type[pydantic.BaseModel], **values: Any) -> bool:
    try:
        model(**values)
        return True
    except pydantic.ValidationError:
        return False


@pytest.mark.parametrize("field", ["upscale_delay_s", "downscale_delay_s"])
@pytest.mark.parametrize("delay", [-1.0, 0.0, 5.0])
def test_delays_agree_with_serve(field: str, delay: float) -> None:
    ours = _accepted(ServerConfig, **{field: delay})
    assert ours == _accepted(AutoscalingConfig, min_replicas=1, max_replicas=2, **{field: delay})
