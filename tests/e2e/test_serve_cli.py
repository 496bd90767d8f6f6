"""`moray serve` as users run it: a subprocess with its own Ray, ready in time, answering, an API key,
a clean exit on SIGINT with no process left behind; startup errors as one line and exit code 2; and
what it listens on (psutil over its whole process tree): loopback only unless told otherwise."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest

from moray.deploy.api import moray_pb2, moray_pb2_grpc
from moray.deploy.serve.network import free_port

pytestmark = pytest.mark.slow

READY_S, EXIT_S = 180.0, 30.0  # Ray alone takes up to a minute to start on a busy 2-core machine
MARK = "MORAY_E2E_MARK"  # every process a `moray` subprocess starts inherits it: how leftovers are found


def moray_command() -> list[str]:
    script = Path(sys.executable).with_name("moray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "moray.deploy.cli"]


def clean_env(mark: str = "") -> dict[str, str]:
    """This environment without the session cluster's address or an API key, plus a `MARK`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MORAY_API_KEY")}
    return {**env, "PYTHONUNBUFFERED": "1", MARK: mark or os.urandom(8).hex()}


def marked(mark: str) -> list[str]:
    """Live processes started (directly or not) by the subprocess carrying `mark`, as short command lines."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(" ".join(p.cmdline()[:3]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def alive(proc: tuple[int, float]) -> bool:
    """Whether the process (pid, create time) still runs (a recycled pid is another process)."""
    pid, created = proc
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Server:
    """`moray serve ...` in its own session, its output collected, its process tree tracked."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.mark = os.urandom(8).hex()
        self.proc = subprocess.Popen([*moray_command(), "serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**clean_env(self.mark), **(env or {})}, start_new_session=True)
        self.lines: list[str] = []
        self.tree: set[tuple[int, float]] = set()  # (pid, create time) of every child seen
        self.port = self.grpc_port = 0  # set by `started`
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def track(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
            self.tree |= {(c.pid, c.create_time()) for c in children}
        except psutil.NoSuchProcess:
            pass

    def wait_ready(self, url: str) -> float:
        start = time.monotonic()
        while time.monotonic() - start < READY_S:
            assert self.proc.poll() is None, "\n".join(self.lines[-30:])
            self.track()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready within {READY_S} s:\n" + "\n".join(self.lines[-30:]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid, created in self.tree:
            if alive((pid, created)):
                with contextlib.suppress(psutil.NoSuchProcess):  # it may exit between the check and the kill
                    psutil.Process(pid).kill()


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def channel_mappings(tree: set[tuple[int, float]]) -> dict[str, int]:
    """Per process of the tree (named by its Ray title): its mappings of data-plane memfds."""
    found = {}
    for pid, created in tree:
        if not alive((pid, created)):
            continue
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
            title = psutil.Process(pid).cmdline()[0]
        except (OSError, psutil.NoSuchProcess, IndexError):
            continue
        if "memfd:moray-channel" in maps:
            found[title] = maps.count("memfd:moray-channel")
    return found


def bad_placement(path: Path, tiny_dir: Path) -> Path:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    layers, experts = cfg["num_hidden_layers"], cfg["num_local_experts"]
    shards = [[list(range(1, experts))] * layers]  # expert 0 nowhere
    path.write_text(json.dumps({"shards": shards}))
    return path


def startup_error_cases(tmp: Path, tiny_dir: Path, busy_port: int, busy_grpc_port: int,
                        refusing_port: int) -> dict[str, tuple[list[str], str]]:
    """Case -> (`moray serve` arguments, a word its one-line error must name)."""
    (tmp / "empty").mkdir()
    (tmp / "bad.yaml").write_text("num_shards: [oops\n")
    broken = tmp / "broken"  # the tiny checkpoint with a config.json that is not JSON
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "config.json").unlink()
    (broken / "config.json").write_text("{not json")
    cases = {
        "missing-checkpoint": (["--model", str(tmp / "nowhere")], "nowhere"),
        "empty-checkpoint": (["--model", str(tmp / "empty")], "empty"),
        "unreadable-config-json": (["--model", str(broken)], "broken"),
        "placement-misses-an-expert": (["--model", str(tiny_dir), "--placement",
                                        str(bad_placement(tmp / "p.json", tiny_dir))], "placement"),
        "more-shards-than-experts": (["--model", str(tiny_dir), "--num-shards", "999"], "shard"),
        "port-in-use": (["--model", str(tiny_dir), "--port", str(busy_port)], str(busy_port)),
        "grpc-port-in-use": (["--model", str(tiny_dir), "--grpc-port", str(busy_grpc_port)], "gRPC"),
        "bad-config-file": (["--config", str(tmp / "bad.yaml")], "bad.yaml"),
        "unreachable-cluster": (["--model", str(tiny_dir), "--address", f"127.0.0.1:{refusing_port}"],
                                "does not answer"),
        "int8-kernel-without-int8": (["--model", str(tiny_dir), "--kernel", "int8"], "int8"),
        # FP8's W8A8 kernel on CUDA writes bfloat16 only: fp32 activations are refused before anything starts
        "fp8-in-float32-on-cuda": (["--model", str(tiny_dir), "--quantization", "fp8", "--device", "cuda",
                                    "--dtype", "float32"], "bfloat16"),
        **{case: (["--model", str(quantized_copy(tmp / case, tiny_dir, quant))], named)
           for case, (quant, named) in UNSUPPORTED_QUANTIZATION.items()},
    }
    if not torch_cuda_available():  # with GPUs the GPU count check passes
        cases["more-shards-than-gpus"] = (["--model", str(tiny_dir), "--device", "cuda", "--num-shards", "2"],
                                          "2 shards")
    return cases


def torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def int4_group(group_size: int) -> dict[str, Any]:
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group_size, "symmetric": True}
    return {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}}


FP8_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "tensor"}
FP8_GROUPS = {"group_0": {"targets": ["Linear"], "weights": FP8_WEIGHTS}}
# config.json `quantization_config`s moray cannot load -> the word its one-line error must name
UNSUPPORTED_QUANTIZATION: dict[str, tuple[dict[str, Any], str]] = {
    "quant-method-unknown": ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
    "int4-group-size": ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                         "config_groups": int4_group(128)}, "group size 128"),
    "compressed-tensors-format-unknown": ({"quant_method": "compressed-tensors",
                                           "format": "sparse-24-bitmask", "config_groups": FP8_GROUPS},
                                          "sparse-24-bitmask"),
}


def quantized_copy(path: Path, plain: Path, quant: dict[str, Any]) -> Path:
    """`plain`'s files (linked) under a config.json that declares `quant`."""
    path.mkdir()
    for f in plain.iterdir():
        if f.name != "config.json":
            (path / f.name).symlink_to(f)
    cfg = json.loads((plain / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    return path


CASES = ["missing-checkpoint", "empty-checkpoint", "unreadable-config-json", "placement-misses-an-expert",
         "more-shards-than-experts", "port-in-use", "grpc-port-in-use", "bad-config-file",
         "unreachable-cluster", "int8-kernel-without-int8", "fp8-in-float32-on-cuda",
         *UNSUPPORTED_QUANTIZATION, "more-shards-than-gpus"]


@dataclass(frozen=True)
class Failed:
    named: str  # a word its one-line error must name
    returncode: int
    stderr: str
    left: list[str]  # processes the run left behind


@pytest.fixture(scope="module")
def startup_errors(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Failed]:
    """Every startup-error case's `moray serve`, run a few at once (each is an import-bound process that
    exits within seconds), while the ports its cases need taken (or refusing) are held."""
    with socket.socket() as busy, socket.socket() as busy_grpc, socket.socket() as refusing:
        busy.bind(("127.0.0.1", 0))
        busy_grpc.bind(("0.0.0.0", 0))
        refusing.bind(("127.0.0.1", 0))  # bound, never listening: a connection to it is refused
        for s in (busy, busy_grpc):
            s.listen()
        cases = startup_error_cases(tmp_path_factory.mktemp("startup"), tiny_dir, busy.getsockname()[1],
                                    busy_grpc.getsockname()[1], refusing.getsockname()[1])

        def run(args: list[str], named: str) -> Failed:
            mark = os.urandom(8).hex()
            ports = [["--port", str(free_port())], ["--grpc-port", str(free_port())]]  # taken: their case
            free = [a for flag, port in ports if flag not in args for a in (flag, port)]
            out = subprocess.run([*moray_command(), "serve", *free, *args], capture_output=True,
                                 text=True, timeout=180, env=clean_env(mark))
            return Failed(named, out.returncode, out.stderr, marked(mark))

        with ThreadPoolExecutor(4) as pool:
            runs = {case: pool.submit(run, *c) for case, c in cases.items()}
            return {case: f.result() for case, f in runs.items()}


@pytest.mark.parametrize("case", CASES)
def test_startup_errors_are_one_line_and_leave_nothing(case: str, startup_errors: dict[str, Failed]) -> None:
    if case not in startup_errors:
        pytest.skip("this machine has GPUs: the GPU count check passes")
    failed = startup_errors[case]
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2, failed.stderr
    assert len(lines) == 1 and lines[0].startswith("moray: error: "), failed.stderr
    assert failed.named in lines[0]
    assert not failed.left, f"a startup error left processes running: {failed.left}"


def test_generate_in_process_equals_the_server(served_app: Any) -> None:
    prompt = "The quick brown fox"
    model = str(served_app.model_dir)
    command = [*moray_command(), "generate", "--model", model, "--max-tokens", "8", prompt]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=clean_env())
    assert out.returncode == 0, out.stderr
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    http = httpx.post(f"{served_app.base_url}/completions", json=body, timeout=120).json()
    assert out.stdout == http["choices"][0]["text"] + "\n"


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    from moray.model.config import MixtralConfig

    command = [*moray_command(), "make-tiny", str(tmp_path / "ckpt"), "--layers", "2", "--experts", "4",
               "--shards", "2"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=clean_env())
    assert out.returncode == 0, out.stderr
    cfg = MixtralConfig.load(tmp_path / "ckpt")
    assert (cfg.n_layers, cfg.n_experts) == (2, 4)
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) == 2


# ---- what listens where --------------------------------------------------------------------------------
def listeners(pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of `pid` and its descendants."""
    found = set()
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            found |= {(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def is_loopback_ip(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool((mapped or address).is_loopback)


def machine_ip() -> str:
    """An IPv4 address of this machine that is not loopback."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not is_loopback_ip(a.address):
                return str(a.address)
    pytest.skip("this machine has no non-loopback IPv4 address")


def grpc_generate(target: str, key: str | None) -> moray_pb2.GenerateReply:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    with grpc.insecure_channel(target) as channel:
        stub = moray_pb2_grpc.MorayStub(channel)
        request = moray_pb2.GenerateRequest(prompt="Hello", max_tokens=2, temperature=0.0)
        reply: moray_pb2.GenerateReply = stub.Generate(request, metadata=metadata, timeout=60)
        return reply


def moray_warnings(server: Server) -> list[str]:
    """moray's own warning lines (Ray prints warnings of its own)."""
    return [line for line in server.lines if line.startswith("moray: warning")]


GRPC_PORT = "{grpc_port}"  # in `started`'s args: a gRPC port picked (and re-picked) with the HTTP one


def started(args: list[str], host: str = "127.0.0.1", env: dict[str, str] | None = None,
            shards: int = 2) -> Server:
    """`moray serve --port PORT ARGS`, healthy and past its ready line; `server.port` is PORT.

    The ports are free on every address when picked, and picked again when another process took one
    before the server bound it (the suite's Ray processes open ports all the time)."""
    for _ in range(3):
        port, grpc_port = free_port("0.0.0.0"), free_port("0.0.0.0")
        server = Server(["--port", str(port), "--num-shards", str(shards),
                         *(a.replace(GRPC_PORT, str(grpc_port)) for a in args)], env)
        server.port, server.grpc_port = port, grpc_port
        try:
            server.wait_ready(f"http://{host}:{port}/health")
            deadline = time.monotonic() + 30
            while not any("ready:" in line for line in server.lines):
                assert time.monotonic() < deadline, server.lines
                time.sleep(0.2)
        except AssertionError:
            server.kill()  # a server that never became ready is not left running
            server.reader.join(timeout=10)  # the exited server's last lines
            if any("is not free" in line for line in server.lines):
                continue
            raise
        return server
    raise AssertionError("three picked ports were taken before the server bound them")


def test_exposed_with_a_key_answers_elsewhere_and_refuses_without() -> None:
    ip, key = machine_ip(), "k-" + os.urandom(8).hex()
    server = started(["--host", "0.0.0.0", "--grpc-port", GRPC_PORT, "--api-key", key], ip)
    port, grpc_port = server.port, server.grpc_port
    try:
        models = f"http://{ip}:{port}/v1/models"
        assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
        assert httpx.get(models, timeout=30).status_code == 401
        assert httpx.get(f"http://{ip}:{port}/health", timeout=30).status_code == 200  # open without a key
        body = {"model": "moray-tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            denied = httpx.post(f"http://{ip}:{port}/v1/completions", json=body, headers=headers, timeout=60)
            assert denied.status_code == 401 and denied.json()["error"]["code"] == 401
        assert grpc_generate(f"{ip}:{grpc_port}", key).usage.completion_tokens >= 1
        with pytest.raises(grpc.RpcError) as info:
            grpc_generate(f"{ip}:{grpc_port}", None)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not moray_warnings(server)
    finally:
        server.kill()


def test_exposed_without_a_key_warns_once() -> None:
    server = started(["--host", "0.0.0.0"], shards=1)  # the warning is the app's; one shard is enough
    try:
        warnings = moray_warnings(server)
        assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "API key" in warnings[0], server.lines
    finally:
        server.kill()


# ---- second drivers --------------------------------------------------------------------------------------
ANSWER_S = 10.0  # joining and answering, imports excluded; Ray dialling the wrong address hangs for minutes
DRIVER = """
import sys, time
import ray, ray.serve  # loaded first: the clock times joining the cluster and answering
import moray
from moray.deploy.cli import main

start = time.monotonic()
if sys.argv[1] == "connect":
    print(moray.connect("auto").generate("Hello", max_tokens=2, temperature=0).token_ids)
    rc = 0
else:
    rc = main(sys.argv[1:])
sys.stderr.write(f"\\nanswered in {time.monotonic() - start:.3f} s\\n")
sys.exit(rc)
"""


def routable_env(tmp: Path) -> dict[str, str]:
    """The drivers' environment: Ray's node-address lookup gives a network address, as on any machine
    with one (issue 20); where this one has none, a sitecustomize makes the lookup return 192.0.2.2."""
    from ray._private.services import node_ip_address_from_perspective

    if not is_loopback_ip(node_ip_address_from_perspective(None)):
        return {}
    (tmp / "sitecustomize.py").write_text("import ray._private.services as s\n"
                                          "s.node_ip_address_from_perspective = lambda a=None: '192.0.2.2'\n")
    return {"PYTHONPATH": str(tmp)}


def drive(command: list[str], env: dict[str, str]) -> float:
    """Run `command` (moray CLI arguments, or ["connect"]) as a second driver; seconds to its answer."""
    out = subprocess.run([sys.executable, "-c", DRIVER, *command], capture_output=True, text=True,
                         timeout=120, env={**clean_env(), **env})
    assert out.returncode == 0, f"{command}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return float(out.stderr.rsplit("answered in ", 1)[1].split()[0])


def assert_loopback_only(server: Server, port: int) -> None:
    """No gRPC unless asked for; HTTP and the local Ray on 127.0.0.1; no warning. The one exception
    Ray 2.60 leaves: each Serve replica's inter-deployment gRPC server binds `[::]:0` (hard-coded in
    `ray/serve/_private/replica.py`), guarded by Ray's token authentication."""
    found = listeners(server.proc.pid)
    exposed = {(ip, p, name) for ip, p, name in found if not is_loopback_ip(ip)}
    print(f"\nmoray serve, default flags: {len(found)} listening sockets, {len(exposed)} beyond "
          f"loopback: {sorted(name for *_, name in exposed)}")
    assert all(name.startswith("ray::ServeReplica:") for *_, name in exposed), exposed
    assert {p for _, p, _ in found} >= {port} and port not in {p for _, p, _ in exposed}
    assert 9000 not in {p for _, p, _ in found}  # no gRPC
    ready = next(line for line in server.lines if "ready:" in line)
    assert f"http://127.0.0.1:{port}/v1" in ready and "gRPC off" in ready and "loopback" in ready
    assert not moray_warnings(server)


def test_default_flags_answer_on_loopback_only_second_drivers_join_and_stop_clean() -> None:
    """No --model: the embedded tiny model. Default flags listen on loopback only (`assert_loopback_only`).
    The dispatcher reaches the shards over shared memory that never has a name: nothing appears in
    /dev/shm, ever. `moray status`, `moray rebalance --dry-run` and `moray.connect("auto")` answer at once:
    they join the Ray `moray serve` started on 127.0.0.1 over loopback, where Ray would swap 127.0.0.1 for
    this machine's network address and dial that for minutes. The server records its Ray and removes the
    record when it stops; SIGINT stops it with exit 0 and nothing left running. Ray's temp dir (where the
    record is) is this test's own."""
    shm_before = shm_entries()
    ray_tmp = Path(tempfile.mkdtemp(prefix="moray-"))  # short: Ray's socket paths live under it
    env = {"RAY_TMPDIR": str(ray_tmp)}
    drivers = {**env, **routable_env(ray_tmp)}
    server = started([], env=env)
    port = server.port
    try:
        assert_loopback_only(server, port)
        body = {"model": "moray-tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1, ok.text
        server.track()
        mapped = channel_mappings(server.tree)  # the dispatcher and both shards map the channels' memfds
        assert any("dispatcher" in title for title in mapped), mapped
        assert sum("expert-shard" in title for title in mapped) == 2, mapped
        assert shm_entries() == shm_before
        record = json.loads((ray_tmp / "ray" / "moray_current_cluster.json").read_text())
        assert record["loopback"] and record["pid"] == server.proc.pid, record
        took = {name: drive(command, drivers) for name, command in
                {"status": ["status", "--json"], "rebalance": ["rebalance", "--dry-run"],
                 "connect": ["connect"]}.items()}
        print(f"\nsecond drivers answered in {took} s")
        assert all(t < ANSWER_S for t in took.values()), took
        server.track()
        os.kill(server.proc.pid, signal.SIGINT)
        assert server.proc.wait(timeout=EXIT_S) == 0, "\n".join(server.lines[-30:])
        assert not (ray_tmp / "ray" / "moray_current_cluster.json").exists()
        deadline = time.monotonic() + 10
        while (marked(server.mark) or any(map(alive, server.tree))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not marked(server.mark), f"processes left behind: {marked(server.mark)}"
        assert not [p for p in server.tree if alive(p)]
        assert shm_entries() == shm_before
    finally:
        server.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
