"""Serving options: one pydantic model, loadable from YAML, overridable from the CLI.

The same fields are the `args:` of a KubeRay `serveConfigV2` application
(`import_path: moray.deploy.app:build_app`), so `k8s/` manifests are validated against this model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    import torch

    from moray.actors.placement import Placement
    from moray.model.config import MixtralConfig
    from moray.model.kernels import KernelOptions

TINY_MODEL_NAME = "moray-tiny"
# model/options.py KERNELS, as a Literal for the config's schema (a test checks they agree)
KernelName = Literal["onednn", "dense", "int8", "int8-bf16", "int8-dequant", "fp8", "fp8-dequant"]
API_KEY_ENV = "MORAY_API_KEY"


class ConfigError(ValueError):
    """A server config that cannot be used; the message names the file and every bad field."""


def _api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def _port(default: int, description: str) -> Any:
    return Field(default=default, ge=1, le=65535, description=description)


class ServerConfig(BaseModel):
    """Everything `moray serve` and `build_app` need to know; every field is described."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- model ---
    model: str | None = Field(
        None, description="Local checkpoint directory (HF or Mistral layout); None = embedded tiny model.")
    served_model_name: str | None = Field(
        None, min_length=1,
        description=f"Model id clients send; default: the checkpoint dir's name, or {TINY_MODEL_NAME!r}.")
    num_shards: int = Field(2, ge=1, description="Expert shards (Serve deployments) experts are dealt to.")
    placement: str | None = Field(
        None, description="Placement JSON file (from `moray plan-placement`); None = round-robin.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; 'auto' = cuda when a GPU is visible, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/activations dtype; 'auto' = bfloat16 on cuda, float32 on cpu.")
    quantization: Literal["none", "int8", "fp8"] = Field(
        "none", description="'int8': expert weights held as weight-only int8 (per output channel symmetric "
                            "scales), made at load from the checkpoint by each process that holds them. "
                            "'fp8': held as FP8 (float8_e4m3fn, per output channel scales): an FP8 "
                            "checkpoint's weights as stored, a float one's quantized at load. 'none': the "
                            "serving dtype (an FP8 checkpoint stays FP8 on GPUs with FP8, capability >= 8.9; "
                            "elsewhere it is dequantized at load).")
    quantize_attention: bool = Field(
        False, description="With quantization int8 or fp8: the attention and lm_head linears too.")
    kernel: KernelName | None = Field(
        None, description="Force one linear kernel wherever it fits the weights (a float kernel for float "
                          "weights, an int8 one for int8 weights, an fp8 one for fp8 weights: 'fp8' W8A8 "
                          "torch._scaled_mm, 'fp8-dequant' weight-only); None = the fastest measured on this "
                          "machine (a probe at load, cached per machine in $XDG_CACHE_HOME/moray; fp8: "
                          "'fp8' on GPUs with FP8, else 'fp8-dequant').")
    tiny_seed: int = Field(0, description="Seed of the embedded tiny model's random weights.")
    # --- engine ---
    max_num_seqs: int = Field(32, ge=1, description="Most sequences running in one engine step.")
    max_batch_tokens: int = Field(
        1024, ge=1, description="Most tokens (prefill chunks + decodes) in one engine step.")
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + completion in tokens; None = the model's context.")
    block_size: int = Field(16, ge=1, description="Tokens per paged KV-cache block.")
    max_waiting: int = Field(
        256, ge=0, description="Requests allowed to wait for a slot; beyond it they get HTTP 429.")
    request_timeout_s: float = Field(600.0, gt=0, description="A request unfinished after this fails.")
    shard_timeout_s: float = Field(
        60.0, gt=0, description="How long a layer's rows wait for a live replica of their expert shard "
                                "(retried on another replica or the restarted one) before the step fails "
                                "with HTTP 503.")
    resume_timeout_s: float = Field(
        60.0, ge=0, description="A stream whose dispatcher replica died continues on a live replica (another "
                                "one, or the restarted one) found within this many seconds, with the same "
                                "tokens; 0 = off (the stream ends with an error event).")
    deterministic: bool = Field(
        False, description="Batch-invariant numerics: a request's tokens and logprobs do not depend on what "
                           "else is in the step nor on how its prompt was chunked (slower).")
    pingpong: bool = Field(
        False, description="Two micro-batches in flight: attention of one while experts run the other.")
    transport: Literal["auto", "socket", "ray"] = Field(
        "auto", description="How hidden states reach the shards: the data plane ('auto': shared memory "
                            "on a node, TCP across; 'socket': TCP always) or a Serve handle call per "
                            "layer ('ray').")
    # --- replicas and autoscaling ---
    dispatcher_replicas: int = Field(
        1, ge=1, description="Dispatcher replicas (each has its own engine and KV cache).")
    autoscaling: bool = Field(False, description="Let Serve scale shard/dispatcher replicas on token load.")
    shard_min_replicas: int = Field(1, ge=1, description="Fewest replicas per expert shard.")
    shard_max_replicas: int = Field(4, ge=1, description="Most replicas per expert shard.")
    target_tokens_per_replica_s: float = Field(
        2000.0, gt=0, description="Expert tokens/s one shard replica carries before the autoscaler adds one.")
    upscale_delay_s: float = Field(3.0, ge=0, description="Load must stay high this long before scale-up.")
    downscale_delay_s: float = Field(20.0, ge=0, description="Load must stay low this long before scale-in.")
    dispatcher_max_replicas: int = Field(1, ge=1, description="Most dispatcher replicas when autoscaling.")
    target_seqs_per_dispatcher: int = Field(
        32, ge=1, description="Running + waiting sequences one dispatcher replica should carry.")
    # --- online expert re-placement (actors/rebalance.py) ---
    rebalance_interval_s: float | None = Field(
        None, gt=0, description="Seconds between online expert re-placements planned from the shards' "
                                "token windows; None = only when asked (`moray rebalance`).")
    redundant_experts: int = Field(
        0, ge=0, description="Extra expert copies per layer the re-placement planner may add (each shard "
                             "then holds up to ceil((experts + this) / shards) experts a layer).")
    rebalance_margin: float = Field(
        0.05, ge=0, le=1, description="Least gain in balancedness (mean / max tokens per shard) that "
                                      "justifies a move.")
    shard_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves per expert-shard replica.")
    dispatcher_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per dispatcher replica.")
    torch_threads: int = Field(
        0, ge=0, description="torch threads in each dispatcher and expert-shard replica; 0 = all the node's "
                             "cores, so that each process uses them in its phase (attention, then experts), "
                             "its OpenMP threads sleeping while it waits (`omp_wait_policy`) "
                             "(actors/threads.py; measured in docs/performance.md).")
    omp_wait_policy: Literal["passive", "active"] = Field(
        "passive", description="How OpenMP threads of the dispatcher and shard replicas wait between "
                               "parallel regions: passive = sleep at once (OMP_WAIT_POLICY=PASSIVE, "
                               "GOMP_SPINCOUNT=0, KMP_BLOCKTIME=0), so a waiting process leaves the cores "
                               "to the one whose phase it is; active = OpenMP's defaults (spin first).")
    # --- API surface ---
    app_name: str = Field("moray", min_length=1, description="Serve application name.")
    api_key: str | None = Field(
        default_factory=_api_key_from_env, min_length=1, repr=False,
        description=f"Bearer token clients must send (HTTP, gRPC); default ${API_KEY_ENV}; None = open.")
    host: str = Field("127.0.0.1", min_length=1,
                      description="Address the HTTP and gRPC APIs listen on (0.0.0.0: every interface).")
    port: int = _port(8000, "HTTP port.")
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="gRPC port on `host` (`moray serve`); None = no gRPC API. Under "
                                          "KubeRay, serveConfigV2's grpc_options start Serve's own proxy.")
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest HTTP request body accepted.")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request) accepted.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest `max_tokens` a request may ask for.")

    @model_validator(mode="before")
    @classmethod
    def _default_served_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("served_model_name") is None:
            model = data.get("model")
            name = Path(str(model).rstrip("/\\")).name if model else TINY_MODEL_NAME
            data = {**data, "served_model_name": name or TINY_MODEL_NAME}
        return data

    @model_validator(mode="after")
    def _check_bounds(self) -> ServerConfig:
        if self.shard_min_replicas > self.shard_max_replicas:
            raise ValueError(f"shard_min_replicas ({self.shard_min_replicas}) must be <= "
                             f"shard_max_replicas ({self.shard_max_replicas})")
        if self.autoscaling and self.dispatcher_replicas > self.dispatcher_max_replicas:
            raise ValueError(f"dispatcher_replicas ({self.dispatcher_replicas}) must be <= "
                             f"dispatcher_max_replicas ({self.dispatcher_max_replicas}) when autoscaling")
        if self.max_batch_tokens < self.max_num_seqs:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes one token per step")
        from moray.model.options import check_options  # no torch: `moray serve` checks before loading it

        check_options(self._quantization(), self.quantize_attention, self.kernel)  # one no kernel serves
        self._check_fp8()
        if self.grpc_port is not None and self.port == self.grpc_port:
            raise ValueError(f"port and grpc_port must differ (both {self.port})")
        return self

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ServerConfig:
        """Read a flat YAML mapping of field names to values."""
        return cls.load(os.fspath(path), {})

    @classmethod
    def load(cls, config_file: str | None, overrides: dict[str, Any]) -> ServerConfig:
        """File values first, then `overrides` (CLI flags) on top; None overrides are ignored."""
        values = _read_yaml(config_file) if config_file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            raise ConfigError(_one_line(e, config_file)) from None

    def _check_fp8(self) -> None:
        """FP8 on CUDA: `torch._scaled_mm` with per-row scales writes bfloat16 only (cuBLASLt), so the W8A8
        kernel needs bfloat16 activations; the weight-only one computes any dtype."""
        if (self.quantization == "fp8" and self.kernel != "fp8-dequant" and self.resolved_device() == "cuda"
                and self.dtype not in ("auto", "bfloat16")):
            raise ValueError(f"quantization fp8 on cuda computes in bfloat16 (torch._scaled_mm with per-row "
                             f"scales), not {self.dtype}: use dtype bfloat16, or kernel fp8-dequant")

    def kernel_options(self) -> KernelOptions:
        from moray.model.kernels import KernelOptions

        return KernelOptions(self._quantization(), self.quantize_attention, self.kernel)

    def _quantization(self) -> str | None:
        return None if self.quantization == "none" else self.quantization

    def resolved_device(self) -> str:
        """'cpu' or 'cuda'. An explicit 'cuda' is returned unchecked: the head building the app has no GPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> torch.dtype:
        """The torch dtype; 'auto' is bfloat16 on cuda and float32 on cpu."""
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device() == "cuda" else torch.float32
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype


def model_dir(config: ServerConfig) -> str:
    """The checkpoint directory; no `model`: the embedded tiny model (made on first use)."""
    if config.model:
        return str(Path(config.model).expanduser())
    from moray.model.tiny import TinySpec, default_model_dir

    return str(default_model_dir(TinySpec(seed=config.tiny_seed)))


def placement(config: ServerConfig, model: MixtralConfig) -> Placement:
    """The placement file, or experts dealt round-robin over `num_shards`; checked against the model."""
    from moray.actors.placement import Placement

    if config.placement:
        plan = Placement.load(config.placement)
    else:
        plan = Placement.round_robin(model.n_layers, model.n_experts, config.num_shards)
    plan.validate(model.n_layers, model.n_experts)
    return plan


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option names to values, "
                          f"got {type(data).__name__}")
    return dict(data)


def _one_line(error: ValidationError, source: str | None) -> str:
    parts = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    origin = f" ({source})" if source else ""
    return f"invalid server config{origin}: " + "; ".join(parts)
