"""The boundary check in proxy.upstream_url: the request target sent upstream is exactly the one
derived from the canonical target that was authorized, or nothing is sent."""

from __future__ import annotations

import pytest
from conftest import built_route

from gateway.config_routes import RouteConfig
from gateway.errors import BadRequestError
from gateway.proxy import upstream_url
from gateway.routing import Route, Target, parse_target


def route(**options: object) -> Route:
    return built_route(RouteConfig(name="r", path_prefix="/app",
                                   upstream="http://127.0.0.1:9/base",
                                   **options))  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "sent"), [
    ("/app/x?y=1", "/base/app/x?y=1"),
    ("/app/../app/%41?q=%2F", "/base/app/A?q=%2F"),
    ("/app;jsessionid=1/x", "/base/app;jsessionid=1/x"),
])
def test_the_sent_target_is_the_canonical_one(raw: str, sent: str) -> None:
    url = upstream_url(route(), parse_target(raw))
    assert url.raw_path_qs == sent
    ws = upstream_url(route(), parse_target(raw), websocket=True)
    assert (ws.scheme, ws.raw_path_qs) == ("ws", sent)


def test_strip_prefix_is_applied_to_the_canonical_path() -> None:
    url = upstream_url(route(strip_prefix=True), parse_target("/app;x=1/a/../b"))
    assert url.raw_path_qs == "/base/b"


@pytest.mark.parametrize("target", [
    Target("/app/assets/..#", ""),  # the bypass: yarl reads '#...' as a fragment and drops it
    Target("/app/x", "y#z"),
])
def test_a_target_the_url_library_would_change_is_never_sent(
        target: Target, caplog: pytest.LogCaptureFixture) -> None:
    """parse_target refuses these; this proves the last line of defence holds on its own."""
    for websocket in (False, True):
        with pytest.raises(BadRequestError):
            upstream_url(route(), target, websocket=websocket)
    assert "path_invariant_violated route=r" in caplog.text
