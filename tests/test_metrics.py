"""The request metrics: counted in the process, handed to prometheus-client's series later."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from gateway.metrics import FLUSH_AFTER, Metrics

# (route, status, outcome, seconds, upstream seconds): every bucket edge and both sides
REQUESTS = [("app", 200, "proxied", 0.0005, 0.0004), ("app", 200, "proxied", 0.001, 0.001),
            ("app", 302, "sign_in", 0.0049, None), ("app", 200, "proxied", 61.0, 60.5),
            ("admin", 403, "denied", 0.0025, None), (None, 404, "no_route", 0.25, None),
            ("app", 200, "proxied", 0.1, 0.0999)]


def _exposition(metrics: Metrics) -> list[str]:
    """The text a scrape reads, without the series' creation times."""
    return [line for line in generate_latest(metrics.registry).decode().splitlines()
            if "_created" not in line]


async def test_counted_requests_expose_what_observing_each_would() -> None:
    counted, observed = Metrics(), Metrics()
    for route, status, outcome, seconds, upstream in REQUESTS:
        counted.request(route, status, outcome, seconds, upstream)
        name = route or "(none)"
        observed._requests.labels(name, f"{status // 100}xx", outcome).inc()
        observed._request_seconds.labels(name).observe(seconds)
        if upstream is not None:
            observed._upstream_seconds.labels(name).observe(upstream)
    counted.current()
    assert _exposition(counted) == _exposition(observed)
    assert 'gateway_requests_total{outcome="proxied",route="app",status_class="2xx"} 4.0' \
        in _exposition(counted)


async def test_requests_reach_the_series_within_the_flush_interval_without_a_scrape() -> None:
    """With workers the supervisor reads the workers' files, never current(): each worker
    must hand its numbers on by itself."""
    metrics = Metrics()
    metrics.request("app", 200, "proxied", 0.01, 0.005)
    sample = ("gateway_requests_total",
              {"route": "app", "status_class": "2xx", "outcome": "proxied"})
    assert metrics.registry.get_sample_value(*sample) is None  # not yet
    await asyncio.sleep(FLUSH_AFTER + 0.2)
    assert metrics.registry.get_sample_value(*sample) == 1.0
    metrics.request("app", 200, "proxied", 0.01, 0.005)
    metrics.request("app", 200, "proxied", 0.01, None)
    await asyncio.sleep(FLUSH_AFTER + 0.2)
    assert metrics.registry.get_sample_value(*sample) == 3.0
    assert metrics.registry.get_sample_value(
        "gateway_upstream_duration_seconds_count", {"route": "app"}) == 2.0
