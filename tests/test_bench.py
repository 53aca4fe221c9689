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


def test_the_comparison_with_apache_runs_with_one_command_and_reports_every_row(
        tmp_path: Path) -> None:
    """Small (1 s per row, one run), only to prove it works end to end; its numbers are
    not asserted."""
    output = tmp_path / "latest.md"
    result = subprocess.run(
        [sys.executable, "bench/compare.py", "--seconds", "1", "--runs", "1",
         "--connections", "8", "--workers", "2", "--cache-ttl", "1s", "--output",
         str(output)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    table = output.read_text()
    assert table in result.stdout
    rows = re.findall(r"^\| ([^|]+) \| ([\d,]+) \|", table, re.M)
    assert [name for name, _ in rows] == [
        "nginx upstream direct", "gateway, public route", "Apache, no auth",
        "gateway, signed in", "Apache + mod_auth_openidc, signed in",
        "gateway, API request, no session (401)",
        "Apache + mod_auth_openidc, API request, no session (401)"]
    assert all(int(rate.replace(",", "")) > 0 for _, rate in rows)
    assert "gateway ÷ Apache + mod_auth_openidc, signed in:" in table
