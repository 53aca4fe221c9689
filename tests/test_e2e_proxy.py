"""End to end: what the proxy forwards and how it fails, over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import resource
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from conftest import CLIENT_SECRET, Stack, StackFactory, free_port, login, raw_config, serve
from multidict import CIMultiDict
from yarl import URL

from gateway import config as config_module
from gateway import observability
from gateway.demo.upstream import create_upstream_app
from gateway.runtime import RUNTIME, Snapshot

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


async def test_request_line_headers_and_body_reach_the_upstream(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    await login(browser, stack.gateway, "/echo")
    body = os.urandom(300_000)
    async with browser.post(stack.gateway + "/echo/a/b?q=1&q=2", data=body,
                            headers={"X-Custom": "v", "Connection": "keep-alive, X-Drop",
                                     "X-Drop": "secret"}) as resp:
        echoed = await resp.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo/a/b"
    assert echoed["query"] == "q=1&q=2"
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    names = {name.lower(): value for name, value in echoed["headers"]}
    assert names["x-custom"] == "v"
    assert "x-drop" not in names  # named in Connection: hop-by-hop
    assert names["x-forwarded-for"] == "127.0.0.1"
    assert names["x-forwarded-proto"] == "http"
    assert names["x-forwarded-host"] == URL(stack.gateway).raw_authority


async def test_upstream_redirects_and_duplicate_set_cookies_pass_through(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    async with browser.get(stack.gateway + "/public/redirect?to=/public/next",
                           allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/public/next"
    async with browser.get(stack.gateway + "/public/set-cookies") as resp:
        assert len(resp.headers.getall("Set-Cookie")) == 2


async def test_no_matching_route_is_404_and_oauth2_is_reserved(make_stack: StackFactory) -> None:
    stack = await make_stack(routes=[{"name": "only", "path_prefix": "/app",
                                      "upstream": "http://127.0.0.1:9", "auth": "public"}])
    async with aiohttp.ClientSession() as http:
        for path in ("/other", "/oauth2/nothing"):
            async with http.get(stack.gateway + path,
                                headers={"Accept": "application/json"}) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"] == "route_not_found"


async def test_unreachable_upstream_gives_502_page(make_stack: StackFactory,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    stack = await make_stack(routes=[{"name": "dead", "path_prefix": "/",
                                      "upstream": dead, "auth": "public"}])
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/x?token=secret",
                            headers={"Accept": "text/html"}) as resp:
            assert resp.status == 502
            text = await resp.text()
            assert "Bad gateway" in text and "Traceback" not in text
    # the log names what could not be reached, never the query
    assert f"route dead: {dead}/x: ClientConnectorError" in caplog.text
    assert "secret" not in caplog.text


@pytest.fixture
async def hanging_upstream() -> AsyncIterator[str]:
    """An upstream that answers nothing for 3 s, well past the tests' read timeouts."""

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response()

    slow = web.Application()
    slow.router.add_get("/{tail:.*}", hang)
    runner, url = await serve(slow)
    yield url
    await runner.cleanup()


async def test_slow_upstream_gives_504_and_other_routes_are_unaffected(
        make_stack: StackFactory, hanging_upstream: str) -> None:
    probe = await make_stack()
    stack = await make_stack(routes=[
        {"name": "slow", "path_prefix": "/slow", "upstream": hanging_upstream, "auth": "public",
         "read_timeout": "300ms"},
        {"name": "fast", "path_prefix": "/", "upstream": probe.upstream, "auth": "public"},
    ])
    async with aiohttp.ClientSession() as http:
        slow_call = http.get(stack.gateway + "/slow/x", headers={"Accept": "text/html"})
        fast_call = http.get(stack.gateway + "/echo")
        slow_resp, fast_resp = await asyncio.gather(slow_call, fast_call)
        assert slow_resp.status == 504
        assert fast_resp.status == 200
        slow_resp.release()
        fast_resp.release()


async def test_chunked_stream_arrives_in_pieces(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/public/stream?chunks=3&delay=0.2") as resp:
            first = await asyncio.wait_for(resp.content.readline(), timeout=0.15 + 0.2)
            assert first == b"chunk 0\n"
            rest = await resp.read()
    assert rest == b"chunk 1\nchunk 2\n"


async def test_the_upstreams_headers_are_passed_on_before_its_body_comes(stack: Stack) -> None:
    """A small answer goes out in one write, headers and body together; but headers are never
    held back for a body still to come (a long poll, an event stream that waits)."""
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.get(stack.gateway + "/public/stream?chunks=1&first_after=1.5") as resp:
            assert resp.status == 200 and time.monotonic() - started < 1.0
            assert await resp.read() == b"chunk 0\n"
        assert time.monotonic() - started >= 1.5


GIB = 1024 * 1024 * 1024


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def test_1gb_download_streams_without_growing_memory(stack: Stack) -> None:
    """The gateway, upstream and client share this process: a buffered body would show."""
    before = peak_rss_kib()
    received = 0
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + f"/public/download?bytes={GIB}") as resp:
            assert resp.headers["Content-Length"] == str(GIB)
            async for chunk in resp.content.iter_chunked(1024 * 1024):
                received += len(chunk)
    grown_kib = peak_rss_kib() - before
    assert received == GIB
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB for a 1 GiB download"


async def test_1gb_upload_streams_without_growing_memory(stack: Stack) -> None:
    block = b"u" * (1024 * 1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(GIB // len(block)):
            yield block

    before = peak_rss_kib()
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.gateway + "/public/echo", data=body()) as resp:
            echoed = await resp.json()
    grown_kib = peak_rss_kib() - before
    assert echoed["body_length"] == GIB
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB for a 1 GiB upload"


async def test_strip_prefix_host_header_and_host_routing(make_stack: StackFactory) -> None:
    stack = await make_stack(routes=[
        {"name": "api", "host": "api.example.com", "path_prefix": "/v1", "auth": "public",
         "strip_prefix": True, "host_header": "client"},
        {"name": "wild", "host": "*.example.com", "path_prefix": "/", "auth": "public",
         "host_header": "upstream"},
        {"name": "named", "host": "named.example.org", "auth": "public"},
        {"name": "default", "path_prefix": "/", "auth": "public"},
    ])
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/v1/echo/x?a=1",
                            headers={"Host": "api.example.com"}) as resp:
            echoed = await resp.json()
        assert echoed["path"] == "/echo/x"
        assert echoed["query"] == "a=1"
        sent = {k.lower(): v for k, v in echoed["headers"]}
        assert sent["host"] == "api.example.com"
        assert sent["x-forwarded-prefix"] == "/v1"
        async with http.get(stack.gateway + "/echo", headers={"Host": "www.example.com"}) as resp:
            echoed = await resp.json()
        hosts = [v for k, v in echoed["headers"] if k.lower() == "host"]
        assert hosts == [URL(stack.upstream).raw_authority]  # host_header: upstream
        async with http.get(stack.gateway + "/echo", headers={"Host": "evil.example"}) as resp:
            echoed = await resp.json()
        hosts = [v for k, v in echoed["headers"] if k.lower() == "host"]
        # by default the public one: absolute URLs the app builds point at the gateway, and
        # a client cannot choose them (no Host header injection into the app)
        assert hosts == [URL(stack.gateway).raw_authority]
        # on a route for a host, the public name is the one it matched, as routes match it
        async with http.get(stack.gateway + "/echo",
                            headers={"Host": "Named.Example.ORG.:8443"}) as resp:
            echoed = await resp.json()
        hosts = [v for k, v in echoed["headers"] if k.lower() == "host"]
        assert hosts == ["named.example.org:8443"]


async def test_routes_can_pass_the_access_token_and_clients_cannot_forge_it(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    probe = await make_stack()
    stack = await make_stack(routes=[
        {"name": "api", "path_prefix": "/api", "upstream": probe.upstream, "strip_prefix": True,
         "pass_access_token": True, "pass_authorization_header": True},
        {"name": "app", "path_prefix": "/", "upstream": probe.upstream},
    ])
    await login(browser, stack.gateway, "/echo")
    forged = [("Authorization", "Basic YWRtaW46YWRtaW4="), ("authorization", "Bearer forged"),
              ("X-Forwarded-Access-Token", "forged"), ("X_Forwarded_Access_Token", "forged")]
    async with browser.get(stack.gateway + "/api/echo", headers=CIMultiDict(forged)) as resp:
        sent = [(k.lower(), v) for k, v in (await resp.json())["headers"]]
    authorizations = [v for k, v in sent if k == "authorization"]
    tokens = [v for k, v in sent if k.replace("_", "-") == "x-forwarded-access-token"]
    assert len(authorizations) == 1 and len(tokens) == 1, sent
    assert authorizations[0] == f"Bearer {tokens[0]}" and "forged" not in tokens[0]
    async with aiohttp.ClientSession() as http:  # it is the user's real token
        async with http.get(stack.idp + "/userinfo",
                            headers={"Authorization": authorizations[0]}) as resp:
            assert resp.status == 200 and (await resp.json())["sub"] == "alice"
    # A protected route drops the client's own Authorization: nginx and Apache would make its
    # Basic user the REMOTE_USER of the app
    async with browser.get(stack.gateway + "/echo",
                           headers={"Authorization": "Basic dXNlcjpwdw=="}) as resp:
        sent = [(k.lower(), v) for k, v in (await resp.json())["headers"]]
    assert not any(k in ("authorization", "x-forwarded-access-token") for k, _ in sent)


async def test_access_log_has_one_line_per_request_with_route_status_and_user(
        stack: Stack, browser: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    await login(browser, stack.gateway, "/echo", user="bob")
    caplog.clear()
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with browser.get(stack.gateway + "/echo/q?token=secret-value") as resp:
        assert resp.status == 200
    async with browser.get(stack.gateway + "/admin/") as resp:
        assert resp.status == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 2
    assert lines[0].startswith("GET /echo/q route=app status=200 duration_ms=")
    assert lines[0].endswith("user=bob rule=-")  # no rules on that route
    assert "secret-value" not in lines[0]
    assert "route=admin status=403" in lines[1]
    assert lines[1].endswith("user=bob rule=routes[admin].allow")  # none of them matched


async def test_access_lines_as_json_have_typed_fields_and_the_request_id_goes_upstream(
        stack: Stack, browser: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    await login(browser, stack.gateway, "/echo", user="bob")
    caplog.clear()
    caplog.set_level(logging.INFO, logger="gateway.access")
    # The test client is not a trusted proxy: its own X-Request-ID is replaced.
    async with browser.get(stack.gateway + "/echo/q?code=secret-value",
                           headers={"X-Request-ID": "chosen-by-client"}) as resp:
        sent = {k.lower(): v for k, v in (await resp.json())["headers"]}
    async with browser.get(stack.gateway + "/admin/") as resp:
        assert resp.status == 403
    formatter = observability._JSONFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records
             if r.name == "gateway.access"]
    assert len(lines) == 2
    proxied, denied = lines
    assert proxied["request_id"] == sent["x-request-id"] != "chosen-by-client"
    assert re.fullmatch(r"[0-9a-f]{32}", proxied["request_id"])
    assert {k: proxied[k] for k in ("event", "method", "path", "route", "status", "outcome",
                                    "user", "rule")} == {
        "event": "access", "method": "GET", "path": "/echo/q", "route": "app", "status": 200,
        "outcome": "proxied", "user": "bob", "rule": None}
    assert isinstance(proxied["duration_ms"], float) and isinstance(proxied["upstream_ms"],
                                                                    float)
    assert proxied["upstream_ms"] <= proxied["duration_ms"]
    assert (denied["outcome"], denied["upstream_ms"], denied["rule"]) == (
        "denied", None, "routes[admin].allow")
    assert "secret-value" not in json.dumps(lines)


@pytest.fixture
def gateway_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """observability.setup() as `gateway run` does it, writing to a buffer (sys.stderr is
    swapped in the test itself: pytest sets its own again between a fixture and the test);
    logging is put back as it was afterwards."""
    stream = io.StringIO()
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate)
             for logger in map(logging.getLogger, ("gateway", "aiohttp"))]
    yield stream
    for logger, handlers, level, propagate in saved:
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


@pytest.mark.parametrize("form", ["text", "json"])
async def test_access_lines_written_directly_are_what_logging_writes(
        stack: Stack, gateway_logging: io.StringIO, form: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The access line skips logging's machinery while setup()'s handler alone hears it; a
    filter added to its logger (anyone listening) puts it back through logging. Both write
    the same line, but for the time, the durations and the request id."""
    monkeypatch.setattr(sys, "stderr", gateway_logging)
    observability.setup(config_module.LoggingConfig(format=form))
    seen: list[logging.LogRecord] = []

    def through_logging(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    lines = []
    async with aiohttp.ClientSession() as http:
        for listening in (False, True):
            if listening:
                observability.access_log.addFilter(through_logging)
            try:
                async with http.get(stack.gateway + "/public/echo?code=secret") as resp:
                    assert resp.status == 200
            finally:
                observability.access_log.removeFilter(through_logging)
            written = [line for line in gateway_logging.getvalue().splitlines()
                       if "gateway.access" in line]
            gateway_logging.truncate(0)
            gateway_logging.seek(0)
            assert len(written) == 1, written
            lines.append(written[0])
            assert len(seen) == listening
    variable = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}|(?<=_ms=)[\d.]+|"
                          r"(?<=_ms\": )[\d.]+|[0-9a-f]{32}")
    direct, logged = (variable.sub("*", line) for line in lines)
    assert direct == logged
    assert "secret" not in direct and "route" in direct and "*" in direct
    if form == "json":
        assert json.loads(lines[0])["status"] == 200
        assert json.loads(lines[0]).keys() == json.loads(lines[1]).keys()
    else:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO gateway.access "
                        r"GET /public/echo route=public status=200 ", lines[0]), lines[0]


async def test_a_trusted_proxys_request_id_is_kept(make_stack: StackFactory) -> None:
    stack = await make_stack(server={"trusted_proxies": ["127.0.0.1/32"]})
    async with aiohttp.ClientSession() as http:
        for given, kept in (("req-7f3a:01", True), ("bad id with spaces", False),
                            ("x" * 129, False)):
            async with http.get(stack.gateway + "/public/echo",
                                headers={"X-Request-ID": given}) as resp:
                sent = {k.lower(): v for k, v in (await resp.json())["headers"]}
            assert (sent["x-request-id"] == given) is kept


async def test_websocket_is_proxied_after_the_session_check(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    async with aiohttp.ClientSession() as anonymous:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await anonymous.ws_connect(stack.gateway + "/ws")
        assert refused.value.status == 401
    await login(browser, stack.gateway, "/echo")
    async with browser.ws_connect(stack.gateway + "/ws", protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert (await ws.receive()).data == "echo:hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive()).data == b"\x00\x01"
        await ws.close()


async def test_upstream_redirect_to_its_own_address_points_back_at_the_gateway(
        stack: Stack) -> None:
    target = URL(stack.upstream + "/public/next?x=1")
    async with aiohttp.ClientSession() as http:
        url = URL(stack.gateway + "/public/redirect").with_query(to=str(target))
        async with http.get(url, allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/public/next?x=1"
        url = URL(stack.gateway + "/public/redirect").with_query(to="https://elsewhere.example/")
        async with http.get(url, allow_redirects=False) as resp:
            assert resp.headers["Location"] == "https://elsewhere.example/"


async def test_protected_route_refuses_before_reading_the_body(stack: Stack) -> None:
    """A request without a session is answered without the upstream ever seeing its body."""
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(64):
            sent += 1024 * 1024
            yield b"x" * (1024 * 1024)

    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(stack.gateway + "/echo", data=body(),
                                 headers={"Accept": "application/json"}) as resp:
                assert resp.status == 401
        except aiohttp.ClientError:
            pass  # the gateway may close the connection on the unread body: also a refusal
    assert sent < 64 * 1024 * 1024


async def test_bodies_over_the_route_limit_get_413(make_stack: StackFactory) -> None:
    probe = await make_stack()
    stack = await make_stack(routes=[{"name": "small", "path_prefix": "/",
                                      "upstream": probe.upstream, "auth": "public",
                                      "max_body_size": "1MiB"}])

    async def chunked(total: int) -> AsyncIterator[bytes]:
        for _ in range(total // 65536):
            yield b"c" * 65536

    async with aiohttp.ClientSession(headers={"Accept": "application/json"}) as http:
        async with http.post(stack.gateway + "/echo",
                             data=io.BytesIO(b"x" * (1024 * 1024))) as resp:
            assert resp.status == 200  # exactly at the limit
        async with http.post(stack.gateway + "/echo",
                             data=io.BytesIO(b"x" * (1024 * 1024 + 1))) as resp:
            assert resp.status == 413  # Content-Length says so: refused up front
            assert (await resp.json())["error"] == "payload_too_large"
        async with http.post(stack.gateway + "/echo", data=chunked(4 * 1024 * 1024)) as resp:
            assert resp.status == 413  # chunked: refused once the count passes the limit
        async with http.post(stack.gateway + "/echo", data=chunked(512 * 1024)) as resp:
            assert (await resp.json())["body_length"] == 512 * 1024


class RetrySeen(logging.Handler):
    """Sets an event when the proxy logs its first retry."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("upstream_retry"):
            self.event.set()


async def test_idempotent_requests_are_retried_only_when_the_upstream_was_never_reached(
        make_stack: StackFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    seen = RetrySeen()
    logging.getLogger("gateway.proxy").addHandler(seen)
    port = free_port()
    stack = await make_stack(routes=[{"name": "late", "path_prefix": "/",
                                      "upstream": f"http://127.0.0.1:{port}", "auth": "public",
                                      "retries": 2}])
    async with aiohttp.ClientSession(headers={"Accept": "application/json"}) as http:
        async with http.post(stack.gateway + "/echo", data=b"body") as resp:
            assert resp.status == 502  # a POST is never retried
        assert "upstream_retry" not in caplog.text

        async def upstream_starts_late() -> web.AppRunner:
            await seen.event.wait()  # after the first refused attempt
            runner, _ = await serve(create_upstream_app(), port)
            return runner

        late = asyncio.create_task(upstream_starts_late())
        try:
            async with http.get(stack.gateway + "/echo") as resp:
                assert resp.status == 200
        finally:
            logging.getLogger("gateway.proxy").removeHandler(seen)
            await (await late).cleanup()


async def test_forwarding_headers_are_kept_only_from_trusted_proxies(
        make_stack: StackFactory) -> None:
    spoofed = {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https",
               "X-Forwarded-Host": "app.example.com"}
    for trusted, expected in (([], ("127.0.0.1", "http")),
                              (["127.0.0.0/8"], ("198.51.100.7, 127.0.0.1", "https"))):
        stack = await make_stack(server={"trusted_proxies": trusted})
        async with aiohttp.ClientSession() as http:
            async with http.get(stack.gateway + "/public/echo", headers=spoofed) as resp:
                names = {k.lower(): v for k, v in (await resp.json())["headers"]}
        assert (names["x-forwarded-for"], names["x-forwarded-proto"]) == expected


async def test_500_hung_requests_time_out_with_bounded_memory_and_spare_other_routes(
        make_stack: StackFactory, hanging_upstream: str) -> None:
    probe = await make_stack()
    stack = await make_stack(routes=[
        {"name": "hung", "path_prefix": "/hung", "upstream": hanging_upstream, "auth": "public",
         "read_timeout": "1s"},
        {"name": "fast", "path_prefix": "/", "upstream": probe.upstream, "auth": "public"},
    ])
    before = peak_rss_kib()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def status(path: str) -> int:
            async with http.get(stack.gateway + path) as resp:
                await resp.read()
                return resp.status

        hung = asyncio.gather(*(status(f"/hung/{i}") for i in range(500)))
        await asyncio.sleep(0.3)
        started = asyncio.get_running_loop().time()
        assert await status("/echo") == 200  # other routes stay served meanwhile
        assert asyncio.get_running_loop().time() - started < 1.0
        statuses = await hung
    assert statuses == [504] * 500
    assert peak_rss_kib() - before < 100 * 1024


async def test_server_sent_events_arrive_as_they_are_written(stack: Stack) -> None:
    """Streaming: no buffering between the upstream writing an event and the client."""
    delays = []
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/public/events?count=4&interval=0.2") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            async for line in resp.content:
                if line.startswith(b"data: "):
                    delays.append(time.monotonic() - float(line[6:]))
    assert len(delays) == 4
    assert max(delays) < 0.1, delays


async def test_head_options_204_and_304_pass_through_correctly(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.head(stack.gateway + "/public/download?bytes=1000") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == "1000"
            assert await resp.read() == b""
        async with http.options(stack.gateway + "/public/echo") as resp:
            assert (await resp.json())["method"] == "OPTIONS"
        for code in (204, 304):
            async with http.get(stack.gateway + f"/public/status/{code}") as resp:
                assert resp.status == code
                assert await resp.read() == b""
        async with http.get(stack.gateway + "/public/status/418") as resp:
            assert resp.status == 418  # upstream errors are the upstream's to show


async def raw_get(stack: Stack, target: str, version: str = "1.1") -> tuple[bytes, float]:
    """The whole raw answer, and when its first bytes arrived (seconds after sending)."""
    url = URL(stack.gateway)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(f"GET {target} HTTP/{version}\r\nHost: x\r\nConnection: close\r\n\r\n"
                     .encode())
        sent = time.monotonic()
        first = await asyncio.wait_for(reader.read(1), timeout=5)
        arrived = time.monotonic() - sent
        return first + await asyncio.wait_for(reader.read(), timeout=5), arrived
    finally:
        writer.close()


async def test_the_upstream_gets_no_header_the_client_did_not_send(stack: Stack) -> None:
    """aiohttp's client would add Accept, Accept-Encoding, User-Agent and, with a body,
    Content-Type; a legacy app must see the client's request, not the gateway's library.
    The Host comes first, once."""
    url = URL(stack.gateway)
    for head in ("GET /public/echo HTTP/1.1\r\nHost: x\r\n",
                 "POST /public/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"):
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write((head + "Connection: close\r\n\r\n").encode()
                         + (b"hello" if head.startswith("POST") else b""))
            answer = await asyncio.wait_for(reader.read(), timeout=5)
        finally:
            writer.close()
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200"), status
        sent = [name.lower() for name, _ in json.loads(body)["headers"]]
        names = set(sent)
        assert names.isdisjoint({"accept", "accept-encoding", "user-agent", "content-type"}), \
            names
        assert sent[0] == "host" and sent.count("host") == 1  # first, as RFC 9112 §3.2 asks
        assert ("content-length" in names) == head.startswith("POST")


@pytest.fixture
async def hints_stack(make_stack: StackFactory) -> Stack:
    probe = await make_stack()
    return await make_stack(routes=[
        {"name": "public", "path_prefix": "/public", "upstream": probe.upstream,
         "auth": "public", "early_hints": True},
        {"name": "app", "path_prefix": "/", "upstream": probe.upstream}])


async def test_early_hints_are_dropped_unless_the_route_asks(stack: Stack) -> None:
    """Fronts like nginx before 1.29 mis-frame any 1xx: relaying is opt-in."""
    answer, _ = await raw_get(stack, "/public/early-hints")
    assert answer.startswith(b"HTTP/1.1 200") and b" 103 " not in answer


async def test_103_early_hints_are_relayed_before_the_final_response(
        hints_stack: Stack) -> None:
    stack = hints_stack
    answer, arrived = await raw_get(stack, "/public/early-hints")
    interim, final = answer.split(b"\r\n\r\n", 1)
    assert interim.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert b"Link: </style.css>; rel=preload" in interim
    assert b"X-Hop" not in interim  # hop-by-hop (named in Connection) as in final responses
    assert b"Content-Length" not in interim  # a 1xx has no body: no framing headers
    assert final.startswith(b"HTTP/1.1 200") and final.endswith(b"page after hints")
    assert arrived < 0.15  # the hint came as soon as the upstream sent it, not with the page


async def test_interim_responses_reach_only_the_request_they_belong_to(
        hints_stack: Stack) -> None:
    stack = hints_stack
    targets = ["/public/early-hints", "/public/stream?chunks=3&delay=0.1"] * 10
    answers = await asyncio.gather(*(raw_get(stack, target) for target in targets))
    for target, (answer, _) in zip(targets, answers, strict=True):
        assert (b" 103 " in answer.split(b"\r\n", 1)[0]) == ("early" in target), target


async def test_client_leaving_after_the_hints_is_no_error(
        hints_stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    url = URL(hints_stack.gateway)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"GET /public/early-hints HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b" 103 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    writer.close()
    await asyncio.sleep(0.5)  # the upstream's page arrives for a client that is gone
    assert "unhandled_error" not in caplog.text and "Traceback" not in caplog.text
    assert "upstream_unreachable" not in caplog.text  # the client left, not the upstream


async def test_http_1_0_clients_get_no_interim_responses(hints_stack: Stack) -> None:
    answer, _ = await raw_get(hints_stack, "/public/early-hints", version="1.0")
    assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer[:40]
    assert b" 103 " not in answer


async def test_fat_cookies_pass_up_to_the_header_limit(stack: Stack) -> None:
    cookie = "legacy=" + "c" * 15000
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/public/echo", headers={"Cookie": cookie}) as resp:
            echoed = await resp.json()
    assert [v for k, v in echoed["headers"] if k.lower() == "cookie"] == [cookie]


async def test_upstream_that_resets_connections_gives_502_and_is_not_retried(
        make_stack: StackFactory) -> None:
    hits = 0

    async def reset(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        assert request.transport is not None
        request.transport.abort()  # a crash: the request reached it, no answer came back
        return web.Response()

    broken = web.Application()
    broken.router.add_get("/{tail:.*}", reset)
    runner, url = await serve(broken)
    try:
        stack = await make_stack(routes=[{"name": "broken", "path_prefix": "/",
                                          "upstream": url, "auth": "public", "retries": 3}])
        async with aiohttp.ClientSession() as http:
            async with http.get(stack.gateway + "/x", headers={"Accept": "text/html"}) as resp:
                assert resp.status == 502
                assert "Bad gateway" in await resp.text()
        assert hits == 1  # it may have acted on the request: never sent twice
    finally:
        await runner.cleanup()


async def test_clients_leaving_mid_download_are_logged_as_leaving_not_as_500s(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """Seen in a soak: aiohttp's 'Connection lost' from a drain was not a
    ConnectionResetError, so it came out as unhandled_error with a traceback, status 500."""
    caplog.set_level(logging.INFO, logger="gateway")
    port = URL(stack.gateway).port
    loop = asyncio.get_running_loop()
    for linger in (False, True, False, True, False, True):
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader
        if linger:  # a reset, not a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /public/download?bytes=200000000 HTTP/1.1\r\n"
                                      b"Host: x\r\nConnection: close\r\n\r\n")
        assert (await loop.sock_recv(sock, 1024)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.2)  # the gateway is waiting on drain: the client is slow
        sock.close()
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], lines
    access = [line for line in lines if line.startswith("GET /public/download")]
    assert len(access) == 6 and all("status=200" in line for line in access), access
    assert sum("client_went_away" in line for line in lines) == 6


async def test_clients_leaving_mid_upload_are_logged_as_leaving_not_as_upstream_failures(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """Seen behind DokuWiki: Chromium cancels a POST (an autosave) when it navigates away.
    The broken request body is the client's doing; a 502 upstream_unreachable for it would
    send operators looking at a healthy app."""
    caplog.set_level(logging.INFO, logger="gateway")
    port = URL(stack.gateway).port
    loop = asyncio.get_running_loop()
    for linger in (False, True):
        sock = socket.socket()
        sock.setblocking(False)
        if linger:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"POST /public/echo HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 1000000\r\n\r\n" + b"x" * 70000)
        await asyncio.sleep(0.3)  # the upstream has the start of the body
        sock.close()
        await asyncio.sleep(0.3)
    await asyncio.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records]
    ours = [r for r in caplog.records if r.name.startswith("gateway")]
    assert not [r for r in ours if r.levelno >= logging.WARNING], lines
    assert sum("client_went_away" in r.getMessage() for r in ours) == 2, lines
    assert sum("status=499" in r.getMessage() for r in ours) == 2, lines


async def test_a_malformed_chunked_body_is_the_clients_bad_request(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(stack.gateway).port)
    writer.write(b"POST /public/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"4\r\nabcd\r\nzz\r\n")
    head = await asyncio.wait_for(reader.read(300), timeout=5)
    writer.close()
    assert head.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), head
    # The client's mistake, logged without its bytes and not as the gateway's error.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert any("bad_http_request status=400" in r.getMessage() for r in caplog.records)
    assert not any("zz" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("rest", [
    b"Content-Length: 100000\r\n\r\n" + b"x" * 1000,  # then silence
    # a chunk framing error after the request went upstream: aiohttp's C parser never ends
    # such a body (its pure-Python parser fails it: 400)
    b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n",
])
async def test_a_body_that_stops_arriving_ends_in_a_408_not_a_held_upstream(
        make_stack: StackFactory, rest: bytes) -> None:
    """A client must not hold an upstream connection by trickling its body: past the
    route's read_timeout of silence it gets 408, as nginx's client_body_timeout."""
    stack = await make_stack(routes=[{"name": "public", "path_prefix": "/", "auth": "public",
                                      "read_timeout": "1s"}])
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(stack.gateway).port)
    writer.write(b"POST /public/echo HTTP/1.1\r\nHost: x\r\n" + rest)
    await writer.drain()
    await asyncio.sleep(0.3)  # the request is on its way upstream
    if b"chunked" in rest:
        writer.write(b"zz\r\n")
    started = time.monotonic()
    head = await asyncio.wait_for(reader.read(300), timeout=5)
    writer.close()
    assert head.startswith((b"HTTP/1.1 408", b"HTTP/1.1 400")), head
    assert time.monotonic() - started < 3


async def test_a_swapped_snapshot_serves_the_next_request(make_stack: StackFactory) -> None:
    """The seam config reload will use: the routes and per-request settings are one value,
    replaced whole, while the pools and sessions stay."""
    stack = await make_stack(routes=[{"name": "first", "path_prefix": "/", "auth": "public"}])
    rt = stack.runners[-1].app[RUNTIME]
    raw = raw_config(stack.gateway, stack.idp, stack.upstream, routes=[
        {"name": "second", "path_prefix": "/v2", "auth": "public", "strip_prefix": True}])
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/echo") as resp:
            assert resp.status == 200
        rt.snapshot = Snapshot.build(config_module.parse(raw, {"SECRET": CLIENT_SECRET}),
                                     rt.upstreams)
        async with http.get(stack.gateway + "/v2/echo") as resp:
            echoed = await resp.json()
        assert echoed["path"] == "/echo"
        assert ["X-Forwarded-Prefix", "/v2"] in echoed["headers"]
        async with http.get(stack.gateway + "/echo", headers={"Accept": "application/json"}) \
                as resp:
            assert resp.status == 404


async def test_a_method_the_route_refuses_is_refused_without_the_store(
        make_stack: StackFactory) -> None:
    """405 is known from the route alone: no session load, so it holds with the store down."""
    stack = await make_stack(routes=[{"name": "ro", "path_prefix": "/", "methods": ["GET"]}])
    rt = stack.runners[-1].app[RUNTIME]

    async def store_down(cookie_value: str | None) -> None:
        raise AssertionError("the store was asked")

    rt.sessions.load = store_down  # type: ignore[method-assign]
    async with aiohttp.ClientSession() as http:
        async with http.delete(stack.gateway + "/x", headers={"Accept": "application/json"}) \
                as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET, HEAD"
            assert (await resp.json())["error"] == "method_not_allowed"
