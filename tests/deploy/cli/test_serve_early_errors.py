"""`moray serve` reports a bad config or checkpoint before it loads torch (or Ray, or Serve): what it
imported is read from Python's own import log (`-X importtime`), not from our code."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "ray.serve")


@pytest.mark.parametrize("args, error", [
    (["--model", "/nonexistent"], "cannot load checkpoint /nonexistent"),
    (["--kernel", "fp8"], "kernel 'fp8' computes none of the weights"),
    (["--quantize-attention"], "quantize_attention needs quantization"),
])
def test_an_early_error_loads_no_torch_ray_or_serve(args: list[str], error: str) -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "moray.deploy.cli", "serve", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("moray: error:")]
    assert len(errors) == 1 and error in errors[0], errors
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))
