"""`make lint` in a fresh clone whose folder name is no Python package name (issue 20).

The repository root is the `moray` package (setuptools package-dir) and has an `__init__.py`, so mypy
must not name modules after the folder the clone sits in ("moray-server"). The clone runs the
Makefile's own `lint` target with this environment's tools (`VENV=`, its setup stamp left alone), and
mypy there must still report a type error put in model/ and in deploy/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the environment running the tests: its ruff and mypy
PROBES = ("model/config.py", "deploy/cli/common.py")  # a type error appended to each
PROBE = '\n\ndef _lint_probe() -> int:\n    return "not an int"\n'


def lint(repo: Path) -> subprocess.CompletedProcess[str]:
    """`make lint` in `repo` with this environment's tools; `-o` keeps make from reinstalling it."""
    return subprocess.run(["make", "--no-print-directory", "-o", str(VENV / ".installed"), "lint",
                           f"VENV={VENV}"], cwd=repo, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of this repository's HEAD in a folder named `moray-server`, with mypy's cache copied in
    (the third-party modules' part stays valid: the same installed files), so it checks in seconds."""
    if not (ROOT / ".git").exists() or shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("needs a git checkout, git and make")
    if not (VENV / "bin" / "mypy").exists():
        pytest.skip(f"no mypy in {VENV}")
    dest = tmp_path_factory.mktemp("clone") / "moray-server"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, timeout=120)
    if (ROOT / ".mypy_cache").is_dir():
        shutil.copytree(ROOT / ".mypy_cache", dest / ".mypy_cache")
    return dest


def test_lint_passes_in_a_clone_named_with_a_dash(clone: Path) -> None:
    out = lint(clone)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout


def test_mypy_there_still_reports_type_errors_in_model_and_deploy(clone: Path) -> None:
    for path in PROBES:
        with (clone / path).open("a") as f:
            f.write(PROBE)
    out = lint(clone)
    errors = [line for line in out.stdout.splitlines() if 'Incompatible return value type (got "str"' in line]
    assert out.returncode != 0 and sorted(e.split(":")[0] for e in errors) == sorted(PROBES), out.stdout
