"""The code stays lint-clean and type-checked (ruff, mypy --strict on the package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def test_ruff_finds_nothing() -> None:
    # The interpreter's own ruff: in a virtualenv (as .ci/run makes) its bin/ is not on PATH.
    pytest.importorskip("ruff", reason="ruff is not installed (pip install -e '.[test]')")
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_the_package() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr
