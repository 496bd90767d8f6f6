"""The Serve application: expert-shard deployments, a dispatcher deployment, the OpenAI/gRPC ingress.

    openai-ingress (HTTP + gRPC) ──► dispatcher (engine, attention; N replicas) ──► expert-shard-{g}

The composition root of `deploy/`: it binds `deploy/api/`'s ingress to `deploy/serve/`'s deployments
(the serving subclasses of the runtime's `ExpertShard` / `Dispatcher`: load reporting for
autoscaling, Prometheus, replica-aware splits), so neither package imports the other's builder.

Every dispatcher replica gets handles to the same shard deployments, so attention scales apart
from the experts. `build_app` is also what KubeRay's `serveConfigV2` imports
(`import_path: moray.deploy.app:build_app`, `args:` = `ServerConfig` fields).

What listens where (`run_app`, what `moray serve` runs): Serve's HTTP proxy on `host:port`, and when
`grpc_port` is set moray's own gRPC server on `host:grpc_port` (`api/grpc_server.py`; Serve's gRPC
proxy binds every interface, so it is not started). `host` is 127.0.0.1 unless told otherwise; a
non-loopback host without an API key gets one warning line from `build_app`.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from moray.actors.threads import runtime_env
from moray.deploy.api.grpc_server import GrpcServer
from moray.deploy.api.ingress import OpenAIIngress
from moray.deploy.serve.autoscaling import autoscaling_config
from moray.deploy.serve.config import ServerConfig, model_dir, placement
from moray.deploy.serve.deployments import ServedDispatcher, ServedExpertShard
from moray.deploy.serve.network import is_loopback, url_host
from moray.deploy.serve.rebalancer import RebalancePolicy
from moray.deploy.serve.router import shard_router_config
from moray.deploy.serve.state import DISPATCHER, INGRESS, shard_name
from moray.model.config import MixtralConfig
from moray.model.engine import EngineConfig

log = logging.getLogger(__name__)

# A shard replica that hangs (a stalled device, a stopped process) fails Serve's health check three times
# in a row (Ray 2.60's threshold) within ~3 x (period + timeout) = 21 s, well inside the dispatchers'
# shard_timeout_s; Serve then replaces it. The dispatchers stopped using it at their first missed deadline.
SHARD_OPTIONS: dict[str, Any] = {"max_ongoing_requests": 64, "graceful_shutdown_timeout_s": 5.0,
                                 "health_check_period_s": 2.0, "health_check_timeout_s": 5.0}
DISPATCHER_OPTIONS: dict[str, Any] = {"graceful_shutdown_timeout_s": 5.0, "health_check_period_s": 5.0}
INGRESS_OPTIONS: dict[str, Any] = {"name": INGRESS, "max_ongoing_requests": 2000,
                                   "graceful_shutdown_timeout_s": 5.0, "ray_actor_options": {"num_cpus": 0}}
HEALTH_MARGIN = 16  # dispatcher calls beyond the engine's own limits: stats, health checks


def engine_config(config: ServerConfig) -> EngineConfig:
    return EngineConfig(max_num_seqs=config.max_num_seqs, max_batch_tokens=config.max_batch_tokens,
                        max_model_len=config.max_model_len, block_size=config.block_size,
                        max_waiting=config.max_waiting, pingpong=config.pingpong,
                        deterministic=config.deterministic)


def _process(config: ServerConfig) -> dict[str, Any]:
    """Ray options of a dispatcher or shard replica's process: its GPU, OpenMP's wait policy."""
    env = runtime_env(config.omp_wait_policy)
    return {**({"num_gpus": 1} if config.resolved_device() == "cuda" else {}),
            **({"runtime_env": env} if env else {})}


def _shard_scaling(config: ServerConfig) -> dict[str, Any]:
    if not config.autoscaling:
        return {"num_replicas": config.shard_min_replicas}
    kwargs = {"target_tokens_per_s": config.target_tokens_per_replica_s,
              "upscale_delay_s": config.upscale_delay_s, "downscale_delay_s": config.downscale_delay_s}
    return {"autoscaling_config": autoscaling_config(
        "tokens", min_replicas=config.shard_min_replicas, max_replicas=config.shard_max_replicas,
        policy_kwargs=kwargs)}


def _dispatcher_scaling(config: ServerConfig) -> dict[str, Any]:
    limits = {"max_ongoing_requests": config.max_num_seqs + config.max_waiting + HEALTH_MARGIN,
              "max_queued_requests": max(config.max_waiting, 1)}
    if not config.autoscaling:
        return {**limits, "num_replicas": config.dispatcher_replicas}
    kwargs = {"target_seqs_per_replica": config.target_seqs_per_dispatcher,
              "upscale_delay_s": config.upscale_delay_s, "downscale_delay_s": config.downscale_delay_s}
    return {**limits, "autoscaling_config": autoscaling_config(
        "sequences", min_replicas=config.dispatcher_replicas, max_replicas=config.dispatcher_max_replicas,
        policy_kwargs=kwargs)}


def dataplane_group(config: ServerConfig) -> str | None:
    """The data-plane group the app's shards announce their endpoints in (None: transport "ray").
    Fresh per build, so a redeployed app never finds the old replicas' endpoints."""
    return None if config.transport == "ray" else f"serve-{config.app_name}-{uuid.uuid4().hex[:12]}"


def exposure_warning(config: ServerConfig) -> str | None:
    """The warning for APIs open to other machines without an API key, None when there is nothing to say."""
    if config.api_key or is_loopback(config.host):
        return None
    return (f"warning: the API on {config.host} accepts requests from other machines without an API key; "
            f"set --api-key or MORAY_API_KEY")


def build_app(args: dict[str, Any] | ServerConfig) -> Any:
    """The moray Serve application for `args` (a `ServerConfig` or its fields as a dict)."""
    from ray import serve

    config = args if isinstance(args, ServerConfig) else ServerConfig(**args)
    warning = exposure_warning(config)
    if warning:
        log.warning(warning)
    path, device = model_dir(config), config.resolved_device()
    dtype = str(config.resolved_dtype()).removeprefix("torch.")
    plan, group = placement(config, MixtralConfig.load(path)), dataplane_group(config)
    board = group or f"serve-{config.app_name}-{uuid.uuid4().hex[:12]}"  # placement board (re-placement)
    # Each step's chunks for one shard go to its least-loaded replicas (Serve's default router would
    # often put both chunks of a step on one replica).
    shard: Any = serve.deployment(ServedExpertShard, **SHARD_OPTIONS, **_shard_scaling(config),
                                  request_router_config=shard_router_config())
    shards = [shard.options(name=shard_name(g),
                            ray_actor_options={"num_cpus": config.shard_cpus, **_process(config)})
              .bind(path, g, plan.shard_experts(g), dtype=dtype, device=device, group=group, board=board,
                    deterministic=config.deterministic, num_threads=config.torch_threads,
                    kernels=config.kernel_options())
              for g in range(plan.num_shards)]
    dispatcher_cpus = {"num_cpus": config.dispatcher_cpus, **_process(config)}
    dispatcher: Any = serve.deployment(ServedDispatcher, name=DISPATCHER, **DISPATCHER_OPTIONS,
                                       ray_actor_options=dispatcher_cpus, **_dispatcher_scaling(config))
    ingress: Any = serve.deployment(serve.ingress()(OpenAIIngress), **INGRESS_OPTIONS)
    log.info("moray app: model %s, %d expert shards, %d dispatcher replica(s), device %s, dtype %s, "
             "transport %s", path, plan.num_shards, config.dispatcher_replicas, device, dtype,
             config.transport)
    rebalance = RebalancePolicy(config.rebalance_interval_s, config.redundant_experts,
                                config.rebalance_margin)
    engine = dispatcher.bind(path, plan, shards, engine_config(config), dtype=dtype, device=device,
                             transport=config.transport, group=group, board=board, rebalance=rebalance,
                             shard_timeout_s=config.shard_timeout_s, num_threads=config.torch_threads,
                             kernels=config.kernel_options())
    return ingress.bind(engine, config, path)


@dataclass
class RunningApp:
    """A deployed app: its ingress handle, and moray's gRPC server when one was asked for."""

    config: ServerConfig
    handle: Any
    grpc: GrpcServer | None = None

    def addresses(self) -> list[str]:
        """Where its APIs answer, as a client would write them."""
        host = url_host(self.config.host)
        http = f"HTTP http://{host}:{self.config.port}/v1"
        return [http, f"gRPC {host}:{self.config.grpc_port}" if self.grpc else "gRPC off (--grpc-port)"]

    def stop(self) -> None:
        """Stop the gRPC server (Serve and the app are the caller's to shut down)."""
        if self.grpc is not None:
            self.grpc.stop()
            self.grpc = None


def run_app(config: ServerConfig, proxy_location: str = "EveryNode") -> RunningApp:
    """Start Serve's HTTP proxy on `host:port`, deploy the app at route `/`, and start moray's gRPC
    server on `host:grpc_port` when `grpc_port` is set."""
    from ray import serve

    serve.start(proxy_location=proxy_location, http_options={"host": config.host, "port": config.port})
    handle = serve.run(build_app(config), name=config.app_name, route_prefix="/")
    grpc = GrpcServer(config.host, config.grpc_port, handle).start() if config.grpc_port else None
    return RunningApp(config, handle, grpc)
