"""Prometheus metrics: what the gateway counts, and the listener that shows them.

Each app owns a `Metrics` (its own CollectorRegistry, on the Runtime: no module globals, so
tests and reloads never see another app's numbers). The counters are kept whether or not
they are shown; `server.metrics_listen` (off by default) serves them, in the Prometheus text
format, on a listener of its own: never on the public port, where anyone could read them.

With `server.workers` > 1 every worker writes its numbers to files in a directory the
supervisor made (prometheus-client's multiprocess mode, chosen by PROMETHEUS_MULTIPROC_DIR
in the workers' environment before they start), and the supervisor's listener adds them up:
one scrape sees the whole gateway. Counters of a worker that died stay in the sum (a counter
never goes back); its WebSocket gauge leaves it (`livesum`).

Labels are bounded by the config (route names) and by code (outcomes, reasons, kinds):
never a path, a user or anything else a client chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

from gateway.config import host_and_port
from gateway.errors import ConfigError, bind_errors

log = logging.getLogger("gateway")

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client at import
PATH = "/metrics"
NO_ROUTE = "(none)"  # the route label of requests no route served (gateway endpoints, 404s)
# Seconds. The request buckets reach past the default upstream timeout; the store's start
# well under a millisecond, where a healthy Redis answers.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
# Request observations are added up in the process and handed to prometheus-client at most
# this long after the first of them (and before a scrape, and at shutdown).
FLUSH_AFTER = 1.0
_STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 1.0)


class _Observed:
    """Durations of one request histogram not yet handed to prometheus-client: counts by
    bucket (not cumulative, as prometheus-client keeps them; the last is +Inf) and sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_REQUEST_BUCKETS) + 1)
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect_left(_REQUEST_BUCKETS, seconds)] += 1
        self.total += seconds

    def hand_to(self, histogram: Histogram) -> None:
        """Into a histogram's child, as its observe() would have put them one by one
        (prometheus-client has no call for many; tests/test_metrics.py checks both give the
        same exposition)."""
        histogram._sum.inc(self.total)
        for index, count in enumerate(self.counts):
            if count:
                histogram._buckets[index].inc(count)


class _Pending:
    """One request series' requests not yet handed to prometheus-client."""

    __slots__ = ("count", "upstream", "whole")

    def __init__(self) -> None:
        self.count = 0
        self.whole = _Observed()
        self.upstream: _Observed | None = None  # none of them reached an upstream yet


class Metrics:
    """The gateway's counters, gauges and histograms, and one method per thing it counts.

    A request is counted in plain numbers of the process, handed to prometheus-client's
    series at most FLUSH_AFTER later (flush()): its counter and histograms take a lock each
    (and, with workers, write to a memory-mapped file), five per proxied request, which was
    3% of a request's instructions (callgrind)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "gateway_requests", "Requests, by route, status class and outcome (proxied, "
            "sign_in, unauthenticated, denied, no_route, rate_limited, refused, gateway, "
            "error).", ("route", "status_class", "outcome"), registry=registry)
        self._request_seconds = Histogram(
            "gateway_request_duration_seconds", "Whole requests, from the first byte read to "
            "the response handed over.", ("route",), buckets=_REQUEST_BUCKETS,
            registry=registry)
        self._upstream_seconds = Histogram(
            "gateway_upstream_duration_seconds", "Proxied requests, until the upstream's "
            "response head.", ("route",), buckets=_REQUEST_BUCKETS, registry=registry)
        self._logins = Counter(
            "gateway_logins", "Sign-ins, by stage (started, completed, failed) and, for "
            "failures, the reason.", ("stage", "reason"), registry=registry)
        self._refreshes = Counter(
            "gateway_refreshes", "Token refreshes, by result (refreshed; refused: the IdP "
            "ended the session; failed: the IdP could not be reached or answered badly; "
            "discarded: the session ended meanwhile).", ("result",), registry=registry)
        self._logouts = Counter(
            "gateway_logouts", "Sessions ended, by kind (sign_out, backchannel, "
            "frontchannel, refresh_refused, user_revoked).", ("kind",), registry=registry)
        self._store_seconds = Histogram(
            "gateway_store_duration_seconds", "Session store (Redis) calls, by operation.",
            ("operation",), buckets=_STORE_BUCKETS, registry=registry)
        self._store_errors = Counter(
            "gateway_store_errors", "Session store calls that failed (the request got a 503), "
            "by operation.", ("operation",), registry=registry)
        self._websockets = Gauge(
            "gateway_websockets_active", "Client WebSockets open now.", registry=registry,
            multiprocess_mode="livesum")
        self._idp_fetches = Counter(
            "gateway_idp_fetches", "Fetches of the IdP's discovery document and JWKS, by "
            "document and result (ok, error).", ("document", "result"), registry=registry)
        self._request_series: dict[tuple[str | None, int, str], tuple[Counter, Histogram]] = {}
        self._pending: dict[tuple[str | None, int, str], _Pending] = {}
        self._flush_due = False
        self._upstream_series: dict[str | None, Histogram] = {}
        self._reloads = Counter(
            "gateway_config_reloads", "Config reloads, by result (applied, refused); with "
            "workers, each worker counts its own.", ("result",), registry=registry)

    def request(self, route: str | None, status: int, outcome: str, seconds: float,
                upstream_seconds: float | None) -> None:
        """Every request, from the event loop: counted here, handed on by flush()."""
        key = (route, status // 100, outcome)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
        pending.count += 1
        pending.whole.add(seconds)
        if upstream_seconds is not None:
            if pending.upstream is None:
                pending.upstream = _Observed()
            pending.upstream.add(upstream_seconds)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        """Hand the requests counted so far to their series (looked up once per label set
        and kept: labels() costs as much as the counting, and the label sets are few)."""
        self._flush_due = False
        pending, self._pending = self._pending, {}
        for key, counted in pending.items():
            series = self._request_series.get(key)
            route, status_class, outcome = key
            if series is None:
                name = route or NO_ROUTE
                series = self._request_series[key] = (
                    self._requests.labels(name, f"{status_class}xx", outcome),
                    self._request_seconds.labels(name))
            count, whole = series
            count.inc(counted.count)
            counted.whole.hand_to(whole)
            if counted.upstream is not None:
                upstream = self._upstream_series.get(route)
                if upstream is None:
                    upstream = self._upstream_series[route] = self._upstream_seconds.labels(
                        route or NO_ROUTE)
                counted.upstream.hand_to(upstream)

    def current(self) -> CollectorRegistry:
        """The registry with every request so far in it: what a scrape reads."""
        self.flush()
        return self.registry

    def login(self, stage: str, reason: str = "") -> None:
        self._logins.labels(stage, reason).inc()

    def refresh(self, result: str) -> None:
        self._refreshes.labels(result).inc()

    def logout(self, kind: str, sessions: int = 1) -> None:
        if sessions:
            self._logouts.labels(kind).inc(sessions)

    def store_call(self, operation: str, seconds: float, failed: bool) -> None:
        self._store_seconds.labels(operation).observe(seconds)
        if failed:
            self._store_errors.labels(operation).inc()

    def websockets(self, open_now: int) -> None:
        self._websockets.set(open_now)

    def idp_fetch(self, document: str, ok: bool) -> None:
        self._idp_fetches.labels(document, "ok" if ok else "error").inc()

    def reload(self, applied: bool) -> None:
        self._reloads.labels("applied" if applied else "refused").inc()


def _exposition(registry: Callable[[], CollectorRegistry]) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry()),
                            headers={"Content-Type": CONTENT_TYPE_LATEST,
                                     "Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get(PATH, metrics)
    return app


@contextlib.asynccontextmanager
async def listener(address: str,
                   registry: Callable[[], CollectorRegistry]) -> AsyncIterator[None]:
    """Serve `registry()` at http://`address`/metrics (server.metrics_listen) while the
    context lasts."""
    runner = web.AppRunner(_exposition(registry), access_log=None)
    await runner.setup()
    try:
        with bind_errors("server.metrics_listen", address):
            await web.TCPSite(runner, *host_and_port(address)).start()
        log.info("metrics_listening listen=%s path=%s", address, PATH)
        yield
    finally:
        await runner.cleanup()


class WorkerMetrics:
    """The supervisor's side of multiprocess mode: the directory the workers write to, and a
    registry that adds up what they wrote."""

    def __init__(self) -> None:
        try:
            self.directory = tempfile.mkdtemp(prefix="gateway-metrics-")
        except OSError as exc:
            raise ConfigError("server.metrics_listen", "with server.workers the workers' "
                              "metrics need a writable temporary directory ($TMPDIR or "
                              f"/tmp): {exc.strerror or exc}") from None  # noqa: S108 (a message)

    def environment(self) -> dict[str, str]:
        """What a worker's environment needs (before it starts: the mode is chosen at
        import)."""
        return {MULTIPROC_DIR: self.directory}

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        return registry

    def worker_gone(self, pid: int) -> None:
        """A dead worker's live gauges (open WebSockets) no longer count."""
        _multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
