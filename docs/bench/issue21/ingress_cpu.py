"""CPU of Serve's HTTP proxy and moray's ingress per output token over a fixed workload (psutil)."""
import asyncio, json, os, sys, time
import httpx, psutil, ray
from moray.deploy.app import run_app
from moray.deploy.serve.config import ServerConfig
from moray.deploy.serve.network import free_port

MODEL = sys.argv[1]
WORKLOADS = {"16 streams, n=1": (16, 1), "4 requests, n=4": (4, 4)}
OUT_TOKENS = 64

async def one(http, url, n, i):
    body = {"model": "moray", "prompt": [1] + [100 + (i * 7 + j) % 500 for j in range(31)], "max_tokens": OUT_TOKENS,
            "n": n, "temperature": 1.0, "seed": i, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens = 0
    async with http.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                u = json.loads(line[6:]).get("usage")
                if u: tokens = u["completion_tokens"]
    return tokens

async def workload(url, k, n):
    async with httpx.AsyncClient(timeout=600) as http:
        return sum(await asyncio.gather(*(one(http, url, n, i) for i in range(k))))

def cpu(procs):
    return {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}

def main():
    ray.init(num_cpus=4, include_dashboard=False)
    cfg = ServerConfig(model=MODEL, served_model_name="moray", num_shards=2, port=free_port(), api_key=None,
                       shard_cpus=0.5, dispatcher_cpus=1.0, max_num_seqs=32)
    run_app(cfg, proxy_location="HeadOnly")
    base = f"http://127.0.0.1:{cfg.port}"
    while True:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200: break
        except httpx.HTTPError: pass
        time.sleep(0.5)
    node = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    procs = {}
    for c in psutil.Process(raylet).children(recursive=True):
        cmd = " ".join(c.cmdline())
        if "ProxyActor" in cmd: procs["proxy"] = c
        if "openai-ingress" in cmd: procs["ingress"] = c
        if ":dispatcher" in cmd: procs["dispatcher"] = c
    print(procs, flush=True)
    assert {"proxy", "ingress"} <= set(procs)
    url = base + "/v1/completions"
    asyncio.run(workload(url, 2, 1))  # warm up
    for name, (k, n) in WORKLOADS.items():
        for rep in range(int(os.environ.get("REPS", "3"))):
            c0, t0 = cpu(procs), time.perf_counter()
            tokens = asyncio.run(workload(url, k, n))
            c1, wall = cpu(procs), time.perf_counter() - t0
            per = {p: (c1[p] - c0[p]) / tokens * 1e6 for p in c0}
            print(json.dumps({"workload": name, "tokens": tokens, "wall_s": round(wall, 2),
                              **{f"{p}_us_per_token": round(v, 1) for p, v in per.items()}}), flush=True)
    ray.shutdown()

main()
