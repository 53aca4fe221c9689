"""The benchmark script runs, and a signed-in request costs one pipelined Redis round trip."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def test_bench_reports_every_target_and_two_redis_commands_per_signed_in_request(
        redis_url: str) -> None:
    # Database 1 of the test server: the sessions the bench makes stay out of other tests' way.
    store = redis_url.rsplit("/", 1)[0] + "/1"
    result = subprocess.run(
        [sys.executable, "bench/proxy_bench.py", "--requests", "300", "--concurrency", "5",
         "--store", store], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = dict(re.findall(r"^(\w[\w ]+?) +\d+ req/s.*\n.*commands per request: ([\d.]+)$",
                           result.stdout, re.M))
    assert set(rows) == {"upstream direct", "gateway public route", "gateway with session"}
    assert float(rows["gateway public route"]) == 0
    assert float(rows["gateway with session"]) == 2  # GET + PTTL, one pipelined round trip
