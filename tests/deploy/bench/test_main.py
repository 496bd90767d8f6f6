"""`moray bench`: short runs on a very small model (JSON keys, sane values, a Markdown table that
renders), in process, through the real OpenAI ingress over ASGI, and against transformers' `generate`."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from moray.deploy.api.engine import LocalEngine
from moray.deploy.api.http import create_api
from moray.deploy.api.ingress import OpenAIIngress
from moray.deploy.bench.http import HttpTarget
from moray.deploy.bench.measure import measure, model_facts
from moray.deploy.bench.targets import LocalTarget
from moray.deploy.bench.workload import LengthDist, make_jobs
from moray.deploy.cli import main as cli_main
from moray.deploy.serve.config import ServerConfig
from moray.model.engine import EngineConfig
from moray.model.tiny import TinySpec, make_tiny

SPEC = TinySpec(layers=1, dim=32, heads=2, kv_heads=1, experts=4, hidden=32, seed=5)
RUN_KEYS = {"system", "concurrency", "requests", "errors", "prompt_tokens", "output_tokens", "duration_s",
            "requests_per_s", "output_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s",
            "itl_s", "e2e_s", "step", "vs_transformers", "bound"}
STEP_PARTS = {"attention", "router", "transport", "expert_compute", "sampling", "total"}


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("micro"), SPEC)


# ---- statistics ------------------------------------------------------------------------------------------
def check_run(run: dict[str, Any], requests: int, output_len: int) -> None:
    assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
    assert run["errors"] == 0 and run["requests"] == requests
    assert run["output_tokens"] == requests * output_len  # greedy with ignore_eos: full length
    assert run["prompt_tokens"] > 0 and run["output_tokens_per_s"] > 0 and run["duration_s"] > 0
    for key in ("ttft_s", "itl_s", "e2e_s"):
        d = run[key]
        assert 0 <= d["p50"] <= d["p90"] <= d["p99"], (key, d)
    assert run["ttft_s"]["p99"] <= run["e2e_s"]["p99"]


def markdown_rows(text: str) -> list[list[str]]:
    """Cells of every table row (header rows included), as markdown-it renders GitHub tables."""
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark").enable("table").render(text)
    return [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", html, re.S)]


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_local_bench_writes_json_and_markdown(micro_dir: Path, tmp_path: Path) -> None:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = cli_main(["bench", "--local", "--model", str(micro_dir), "--concurrency", "1,3", "--prompt-len",
                     "4:9", "--output-len", "3", "--num-requests", "4", "--bandwidth-gib", "0.02",
                     "--out", str(out), "--markdown", str(md), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert {"machine", "model", "workload", "runs", "bandwidth"} <= set(report)
    assert report["bandwidth"]["copy_bytes_per_s"] > 0
    assert [(r["system"], r["concurrency"]) for r in report["runs"]] == [("moray-local", 1),
                                                                         ("moray-local", 3)]
    for run in report["runs"]:
        check_run(run, requests=4, output_len=3)
        assert set(run["step"]["ms_per_step"]) >= STEP_PARTS
        assert run["step"]["ms_per_step"]["transport"] == 0.0  # in process
        assert 0 < run["bound"]["fraction"]
        assert 1 <= run["bound"]["experts_touched_per_layer"] <= SPEC.experts
    text = md.read_text()
    rows = markdown_rows(text)
    runs_rows = 2 * (1 + len(report["runs"]))  # two tables: header + one row per run
    assert [r[:2] for r in rows[1:3]] == [["moray-local", "1"], ["moray-local", "3"]]
    # then the kernels the probe chose: a row per (weight shape, row bucket probed; "-" when not probed)
    choices = report["kernels"]["moray-local"]
    want = [key for key, c in choices.items() for _ in (c["ms"] or "-")]
    assert [r[1] for r in rows[runs_rows + 1:]] == want
    lines = table_lines(text)
    tables = lines[:4], lines[4:8], lines[8:]
    assert all(len({line.count("|") for line in table}) == 1 for table in tables)


def test_http_target_through_the_openai_ingress(micro_dir: Path) -> None:
    local = LocalTarget(str(micro_dir), EngineConfig(max_num_seqs=4))
    ingress = OpenAIIngress(LocalEngine(local.engine), ServerConfig(model=str(micro_dir), api_key=None),
                            str(micro_dir))
    target = HttpTarget("http://bench.test", True, ingress.served_model_name,
                        transport=httpx.ASGITransport(app=create_api(ingress)))
    jobs = make_jobs(3, LengthDist(5, 8), LengthDist(4, 4), SPEC.vocab, seed=2)
    facts = model_facts(str(micro_dir))
    run = asyncio.run(measure(target, jobs, 2, "http", False, facts))
    check_run({**run, "system": "http", "concurrency": 2, "vs_transformers": None, "bound": None}, 3, 4)
    assert run["step"] is not None and run["step"]["steps"] > 0  # /v1/moray/status answered


def test_compare_against_transformers(ray_session: Any, micro_dir: Path, tmp_path: Path) -> None:
    """Also: the bench leaves a Ray it did not start (here the session's) connected."""
    import ray

    out = tmp_path / "compare.json"
    code = cli_main(["bench", "--compare", "--systems", "transformers,moray-local", "--model", str(micro_dir),
                     "--concurrency", "2", "--prompt-len", "3:6", "--output-len", "3", "--bandwidth-gib",
                     "0.02", "--out", str(out), "--no-progress"])
    assert code == 0
    runs = {r["system"]: r for r in json.loads(out.read_text())["runs"]}
    check_run(runs["transformers"], requests=2, output_len=3)
    check_run(runs["moray-local"], requests=2, output_len=3)
    assert runs["transformers"]["vs_transformers"] == 1.0
    ratio = runs["moray-local"]["output_tokens_per_s"] / runs["transformers"]["output_tokens_per_s"]
    assert runs["moray-local"]["vs_transformers"] == pytest.approx(ratio)
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == ray_session.address


def test_bad_mode_combinations_fail_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--local", "--num-shards", "2"]) == 2
    assert cli_main(["bench", "--soak", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("moray: error:") for line in err)


def test_constrained_jobs_get_json_matching_the_bench_schema(micro_dir: Path) -> None:
    """`--constrained 0.5`: every other job asks for `BENCH_SCHEMA`, and the engine request the bench makes
    of it (`generate_request`, what the local and actor targets send) gives JSON that validates."""
    import jsonschema

    from moray.deploy.bench.targets import generate_request
    from moray.deploy.bench.workload import BENCH_SCHEMA

    jobs = make_jobs(4, LengthDist(8, 8), LengthDist(400, 400), 32000, seed=1, constrained=0.5)
    assert [j.schema is not None for j in jobs] == [False, True, False, True]
    engine = LocalTarget(str(micro_dir), EngineConfig(max_batch_tokens=512)).engine

    async def text(job: Any) -> tuple[str, str | None]:
        events = [e async for e in engine.generate(generate_request(job))]
        return "".join(e.text for e in events), events[-1].finish_reason

    for job in jobs[1::2]:
        out, finish = asyncio.run(text(job))
        assert finish == "stop", out
        jsonschema.validate(json.loads(out), BENCH_SCHEMA)
    assert asyncio.run(text(jobs[0]))[1] == "length"  # unconstrained: EOS ignored, the full length
