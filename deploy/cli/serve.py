"""`moray serve`: check what can be checked, start (or join) Ray, run the app, stop cleanly on a signal.

Everything that can fail before Ray starts (config, checkpoint, placement, GPUs, free ports) is
checked first and reported as one line (exit code 2), before Ray, Serve, torch or the app are imported
(a bad checkpoint: 1.6 s on this 2-core box with a test suite running beside it, where it was 5.3, then
3.5 s while checking the kernel options still loaded torch: `model/options.py` checks them without it).
SIGINT and SIGTERM shut Serve and Ray down.

What listens where (`EPILOG`, also `moray serve --help`): the APIs on `--host` only, and in local
mode the Ray cluster on 127.0.0.1 (`ray_on_loopback`), recorded for second drivers on this machine
(`record_local_cluster`, removed at shutdown); joining a cluster (`--address`) leaves its own
settings as they are.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, get_args

from moray.deploy.cli.common import fail, one_line
from moray.deploy.serve.config import ConfigError, KernelName, ServerConfig, model_dir, placement
from moray.deploy.serve.network import (
    PortInUseError,
    check_port,
    forget_local_cluster,
    join_address,
    ray_on_loopback,
    record_local_cluster,
)
from moray.model.config import MixtralConfig
from moray.model.tokenizer import Tokenizer

log = logging.getLogger("moray")

EPILOG = """\
what listens where:
  HTTP (OpenAI API)  --host:--port, default 127.0.0.1:8000
  gRPC (moray.Moray) --host:--grpc-port, only when --grpc-port is given
  Ray                with no --address, a local cluster on 127.0.0.1 (GCS, raylet, workers, agents,
                     dashboard 127.0.0.1:8265), also guarded by Ray's token authentication; each
                     Serve replica's inter-deployment gRPC port binds every interface (Ray 2.60),
                     guarded by that token; with --address, the cluster's own settings
  --host 0.0.0.0 (or any non-loopback address) exposes HTTP and gRPC: set --api-key (or
  MORAY_API_KEY), or moray prints a warning."""


class StartupError(Exception):
    """A problem found before anything starts; printed as one line, exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--config", help="YAML file of ServerConfig fields; flags override it")
    p.epilog, p.formatter_class = EPILOG, argparse.RawDescriptionHelpFormatter
    p.add_argument("--host", help="address HTTP and gRPC listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="serve the gRPC API on this port (default: no gRPC)")
    p.add_argument("--num-shards", type=int, help="expert shards (default 2)")
    p.add_argument("--placement", help="placement JSON from `moray plan-placement`")
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument("--autoscaling", action="store_true", default=None, help="scale replicas on token load")
    p.add_argument("--pingpong", action="store_true", default=None, help="two micro-batches in flight")
    p.add_argument("--transport", choices=["auto", "socket", "ray"],
                   help="how each layer's rows reach the shards: the data plane (auto: shared memory on a "
                        "node, TCP across; socket: TCP always) or a Serve call per layer (ray); default auto")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="batch-invariant numerics: the same tokens whatever else is batched (slower)")
    p.add_argument("--shard-timeout", dest="shard_timeout_s", type=float,
                   help="seconds a layer's rows wait for a live expert-shard replica before HTTP 503 (60)")
    p.add_argument("--max-num-seqs", type=int, help="most sequences per engine step")
    p.add_argument("--max-waiting", type=int, help="requests allowed to wait; beyond: HTTP 429")
    p.add_argument("--api-key", help="bearer token clients must send (default $MORAY_API_KEY)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--quantization", choices=["none", "int8", "fp8"],
                   help="int8: expert weights as weight-only int8, made at load; fp8: as FP8 (an FP8 "
                        "checkpoint's as stored, a float one's quantized at load) (default none)")
    p.add_argument("--quantize-attention", action="store_true", default=None,
                   help="with --quantization int8 or fp8: the attention and lm_head linears too")
    p.add_argument("--kernel", choices=get_args(KernelName),
                   help="force one linear kernel (default: the fastest measured here, cached per machine)")
    p.add_argument("--served-model-name", help="model id clients send")
    p.add_argument("--verbose", action="store_true", help="stream the replicas' logs to this console")
    p.add_argument("--rebalance-interval", dest="rebalance_interval_s", type=float,
                   help="seconds between online expert re-placements (default: off; see moray rebalance)")
    p.add_argument("--redundant-experts", type=int, help="extra expert copies per layer re-placement may add")


def serve_config(args: argparse.Namespace) -> ServerConfig:
    names = ("model", "host", "port", "grpc_port", "num_shards", "placement", "autoscaling", "pingpong",
             "transport", "deterministic", "shard_timeout_s",
             "max_num_seqs", "max_waiting", "api_key", "device", "dtype", "served_model_name",
             "rebalance_interval_s", "redundant_experts", "quantization", "quantize_attention", "kernel")
    return ServerConfig.load(args.config, {n: getattr(args, n) for n in names})


def check_startup(config: Any, local: bool) -> tuple[str, Any]:
    """Everything that can be checked before Ray starts: the checkpoint, the placement, GPUs, ports."""
    path = model_dir(config)
    try:
        model = MixtralConfig.load(path)
        Tokenizer.from_model_dir(path)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same one-line error
        raise StartupError(f"cannot load checkpoint {path}: {one_line(e)}") from None
    if not any(Path(path).glob("*.safetensors")):
        raise StartupError(f"cannot load checkpoint {path}: no *.safetensors file")
    try:
        plan = placement(config, model)
    except (ValueError, OSError) as e:
        raise StartupError(f"placement: {one_line(e)}") from None
    if local and config.resolved_device() == "cuda":
        import torch

        need = plan.num_shards * config.shard_min_replicas + config.dispatcher_replicas
        have = torch.cuda.device_count()
        if need > have:
            raise StartupError(f"{plan.num_shards} shards and {config.dispatcher_replicas} dispatcher(s) "
                               f"need {need} GPUs, this machine has {have}")
    try:
        for port, what in ((config.port, "HTTP"), (config.grpc_port, "gRPC")):
            if port is not None:
                check_port(config.host, port, what)
    except PortInUseError as e:
        raise StartupError(str(e)) from None
    return path, plan


def _expert_memory(config: Any, num_shards: int) -> str:
    """The resident expert bytes each shard replica reports (`moray status` shows them too)."""
    from moray.deploy.cli.status import replica_megabytes
    from moray.deploy.serve.state import shard_name, shard_reports

    try:
        per_shard = [replica_megabytes(shard_reports(config.app_name, shard_name(g), 10.0))
                     for g in range(num_shards)]
    except Exception as e:  # noqa: BLE001 - the server runs either way; say why the figure is missing
        return f"expert MB per replica unknown ({one_line(e)})"
    dtype = str(config.resolved_dtype()).removeprefix("torch.")
    kind = config.quantization if config.quantization != "none" else dtype
    return f"expert weights per shard replica ({kind}): " + ", ".join(f"{mb} MB" for mb in per_shard)


def local_cpus(config: Any, num_shards: int) -> int:
    """Logical CPUs for a local Ray: every actor's reservation at its largest replica count, or the cores.
    `num_shards`: the placement's (a `--placement` file sets it, not `--num-shards`)."""
    per_shard = config.shard_max_replicas if config.autoscaling else config.shard_min_replicas
    shards = num_shards * per_shard
    dispatchers = config.dispatcher_max_replicas if config.autoscaling else config.dispatcher_replicas
    need = shards * config.shard_cpus + dispatchers * config.dispatcher_cpus
    return max(os.cpu_count() or 1, int(need + 0.999))


def run(args: argparse.Namespace) -> int:
    try:
        config = serve_config(args)
        path, plan = check_startup(config, local=args.address is None)
    except (ConfigError, StartupError) as e:
        return fail(str(e))
    stop = _stop_event()
    try:
        ray_info = _start_ray(args, config, plan.num_shards)
    except Exception as e:  # noqa: BLE001 - a cluster that does not answer, a node that did not start
        _stop_ray()
        return fail(f"{'cannot join Ray' if args.address else 'the local Ray did not start'}: {one_line(e)}")
    app = None
    try:
        from moray.deploy.app import run_app  # Ray Serve, the ingress: imported once the checks passed

        log.info("model %s (%s), %d expert shards, device %s", config.served_model_name, path,
                 plan.num_shards, config.resolved_device())
        app = run_app(config)
        log.info("ready: %s; %s; %s; Ctrl-C stops", "; ".join(app.addresses()), ray_info,
                 _expert_memory(config, plan.num_shards))
        stop.wait()
        log.info("shutting down")
        return 0
    except Exception as e:  # noqa: BLE001 - a deploy failure is one line, the details are in Ray's logs
        return fail(f"the app failed to start: {one_line(e)}")
    finally:
        if app is not None:
            app.stop()
        _shutdown(config, joined=args.address is not None)


def _start_ray(args: argparse.Namespace, config: ServerConfig, num_shards: int) -> str:
    """Join `--address`, or start a local Ray on loopback; where it listens, for the ready line."""
    import ray

    if args.address:
        ray.init(address=join_address(args.address), log_to_driver=args.verbose, namespace="serve",
                 ignore_reinit_error=True)
        return f"Ray cluster {args.address} (joined)"
    ray_on_loopback()
    context = ray.init(address="local", num_cpus=local_cpus(config, num_shards), log_to_driver=args.verbose,
                       namespace="serve", ignore_reinit_error=True)
    gcs_address = ray.get_runtime_context().gcs_address
    record_local_cluster(gcs_address, getattr(context, "address_info", {}).get("session_dir") or "")
    dashboard = context.dashboard_url or "off"
    return f"Ray {gcs_address} (local, loopback; dashboard {dashboard})"


def _stop_event() -> threading.Event:
    """Set on the first SIGINT/SIGTERM; a second one exits at once."""
    stop = threading.Event()

    def handler(signum: int, _: Any) -> None:
        if stop.is_set():
            os._exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def _shutdown(config: Any, joined: bool) -> None:
    import ray
    from ray import serve

    try:
        if joined:
            serve.delete(config.app_name)
        else:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 - shutting down what may be half started
        log.warning("serve shutdown: %s", one_line(e))
    if not joined:
        forget_local_cluster()
    ray.shutdown()


def _stop_ray() -> None:
    """Stop what a failed `ray.init` may have started (a local node's processes)."""
    import ray

    try:
        ray.shutdown()
    except Exception as e:  # noqa: BLE001 - already failing; say why the cleanup failed too
        log.warning("ray shutdown: %s", one_line(e))
