"""The benchmarks run, measure every row and column, and a signed-in request costs one
pipelined Redis round trip."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def test_bench_reports_every_target_and_two_redis_commands_per_signed_in_request(
    redis_url: str,
) -> None:
    # Database 1 of the test server: the sessions the bench makes stay out of other tests' way.
    store = redis_url.rsplit("/", 1)[0] + "/1"
    result = subprocess.run(
        [
            sys.executable,
            "bench/proxy_bench.py",
            "--requests",
            "300",
            "--concurrency",
            "5",
            "--store",
            store,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = dict(
        re.findall(
            r"^(\w[\w ]+?) +\d+ req/s.*\n.*commands per request: ([\d.]+)$", result.stdout, re.M
        )
    )
    assert set(rows) == {"upstream direct", "gateway public route", "gateway with session"}
    assert float(rows["gateway public route"]) == 0
    # one round trip: an EVALSHA that runs GET and PTTL (Redis counts all three)
    assert float(rows["gateway with session"]) == 3


def _cells(table: str) -> dict[str, list[str]]:
    """Every markdown table row of `table`, by its first cell: the other cells."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            name, *cells = (cell.strip() for cell in line.strip("|").split("|"))
            rows[name] = cells
    return rows


def _number(text: str) -> float:
    return float(text.replace(",", "").strip("*x"))


def test_the_comparison_with_apache_runs_with_one_command_and_measures_every_row(
    tmp_path: Path,
) -> None:
    """--quick: 1 s per row, one run, 1,000 sessions, 50 WebSockets, a 50 MB download. It
    proves every row and column is measured, and holds each to what it must be whatever the
    speed: numbers that parse and are positive, no Redis where there is no session, the
    signed-in Redis cost of one pipelined read, a download that streams. No speed is
    asserted (a loaded CI machine would fail it)."""
    output = tmp_path / "latest.md"
    result = subprocess.run(
        [
            sys.executable,
            "bench/compare.py",
            "--quick",
            "--workers",
            "2",
            "--cache-ttl",
            "1s",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = output.read_text()
    assert table in result.stdout
    cells = _cells(table)

    requests = [
        "nginx upstream direct",
        "bare aiohttp proxy, no auth, 2 processes",
        "gateway, public route",
        "Apache, no auth",
        "gateway, signed in, memory store, 1 worker",
        "gateway, signed in, Redis, 1 worker, no cache",
        "gateway, signed in, Redis, 2 workers, cache_ttl 1s",
        "Apache + mod_auth_openidc, signed in",
        "gateway, browser request, no session (302)",
        "Apache + mod_auth_openidc, browser request, no session (302)",
        "gateway, API request, no session (401)",
        "Apache + mod_auth_openidc, API request, no session (401)",
        "bare aiohttp app, a fixed 401, 2 processes",
    ]
    assert cells["row"] == [
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU ms / 1,000 req",
        "Redis cmds / req",
        "peak RSS MB",
        "peak PSS MB",
    ]
    assert [name for name in cells if name in requests] == requests
    for name in requests:  # req/s, p50, p99, CPU, Redis, RSS, PSS
        rate, p50, p99, cpu, redis, rss, pss = (_number(cell) for cell in cells[name])
        assert min(rate, p50, p99, cpu, rss, pss) > 0, (name, cells[name])
        assert p50 <= p99 and pss <= rss and redis >= 0, (name, cells[name])
    redis = {name: _number(cells[name][4]) for name in requests}
    # Nothing reads Redis without a session (the 401 is a flood target), nor on the memory
    # store.
    for name in (
        "gateway, public route",
        "gateway, signed in, memory store, 1 worker",
        "gateway, API request, no session (401)",
        "nginx upstream direct",
    ):
        assert redis[name] == 0, name
    # Without the cache, a signed-in request reads its session in one round trip (an EVALSHA
    # running GET and PTTL: 3 commands in Redis's counts) and writes nothing; with it,
    # almost never.
    assert 0.5 < redis["gateway, signed in, Redis, 1 worker, no cache"] <= 3.5
    assert redis["gateway, signed in, Redis, 2 workers, cache_ttl 1s"] < 0.5
    assert redis["Apache + mod_auth_openidc, signed in"] > 0  # its sessions are in Redis too

    sign_ins = ["gateway, full sign-in", "Apache + mod_auth_openidc, full sign-in"]
    for name in sign_ins:  # sign-ins/s, p50, p99, callback p50, CPU, Redis, RSS
        rate, p50, p99, callback, cpu, redis_per, rss = (_number(c) for c in cells[name])
        assert min(rate, p50, p99, callback, cpu, redis_per, rss) > 0, (name, cells[name])
        assert callback <= p99, (name, cells[name])

    for name in ("nginx direct, 50 MB download", "gateway, signed in, 50 MB download"):
        rate, seconds, cpu, before, peak, _growth = (_number(c) for c in cells[name])
        # (nginx's CPU for 50 MB can round to 0.00 s per GB)
        assert min(rate, seconds, before, peak) > 0 and cpu >= 0, (name, cells[name])
    # The body streams through: the gateway's memory does not grow with it.
    assert _number(cells["gateway, signed in, 50 MB download"][5]) < 25

    assert cells["sessions in Redis"][0] == "req/s"
    scale = {
        int(_number(name)): [_number(c) for c in row]
        for name, row in cells.items()
        if name.replace(",", "").isdigit()
    }
    assert len(scale) == 2 and min(scale) < 100 and max(scale) >= 1000, scale
    assert all(min(row[:4]) > 0 for row in scale.values()), scale
    per_session = re.search(r"Redis memory per session: ([\d,]+) bytes \(([\d.]+) keys", table)
    assert per_session is not None, table
    assert 200 < _number(per_session[1]) < 50_000 and _number(per_session[2]) >= 2
    sockets = re.search(
        r"RSS with 50 idle WebSockets: the largest of 2 workers ([\d,]+) MB "
        r"\(([\d,]+) MB before",
        table,
    )
    assert sockets is not None, table
    assert _number(sockets[1]) >= _number(sockets[2]) > 0

    for ratio in (
        "gateway ÷ Apache + mod_auth_openidc, signed in",
        "gateway signed in ÷ gateway public route",
        "gateway signed in ÷ bare aiohttp proxy",
        "gateway ÷ Apache, unauthenticated API request (401)",
        "gateway ÷ Apache, unauthenticated browser request (302)",
        "gateway ÷ Apache, full sign-ins per second",
    ):
        found = re.search(rf"^- {re.escape(ratio)}: \**([\d.]+)x", table, re.M)
        assert found is not None and float(found[1]) > 0, ratio
    floor = re.search(r"answering every request with that 401 and doing nothing else: ([\d.]+)x",
                      table)
    assert floor is not None and float(floor[1]) > 0, table


def test_instruction_counts_are_counted_and_the_gateway_does_more_than_the_bare_proxy() -> None:
    """bench/instructions.py: callgrind's count over the requests alone (a count of nothing,
    when counting never switched on, would be 0), and the bare aiohttp proxy's below the
    gateway's public route, which does everything the bare proxy does and more."""
    counts = {}
    for extra in ([], ["--bare"]):
        result = subprocess.run(
            [sys.executable, "bench/instructions.py", "--requests", "20", "--rows", "public",
             *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        found = re.search(r"^(\w+) +([\d.]+) k instructions per request$", result.stdout, re.M)
        assert found is not None, result.stdout
        counts[found[1]] = float(found[2])
    assert 100 < counts["bare"] < counts["public"] < 10_000, counts
