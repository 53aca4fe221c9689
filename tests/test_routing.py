"""Canonical paths and route matching: one form, used for both matching and forwarding."""

from __future__ import annotations

import pytest

from gateway.config import RouteConfig
from gateway.errors import BadRequestError, URITooLongError
from gateway.routing import Route, RouteTable, canonical_path


@pytest.mark.parametrize(("raw", "canonical"), [
    ("/", "/"),
    ("/a/./b", "/a/b"),
    ("/public/../admin", "/admin"),
    ("/%2e%2e/admin", "/admin"),
    ("/public/%2E%2E/admin", "/admin"),
    ("/public/.%2e/admin", "/admin"),
    ("/public/%2e/x", "/public/x"),
    ("//a///b", "/a/b"),
    ("/..", "/"),
    ("/../../etc/passwd", "/etc/passwd"),
    ("/a/b/", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("/%41%7e%5f", "/A~_"),
    ("/a%3Fb", "/a%3Fb"),
    ("/a%20b", "/a%20b"),
    ("/x?y=../z", "/x"),
])
def test_canonical_path(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize("raw", [
    "/a%2Fb", "/a%2fb", "/a%5Cb", "/a%00b", "/a%252eb", "/a%252Fb", "/a%255Cb", "/a\\b",
    "/a%zz", "/a%4", "/a\x01b", "a/b", "*", "/public/..;/admin",
    "/public/.;x/a", "/p/%2e%2e;x/admin",
])
def test_ambiguous_paths_are_refused(raw: str) -> None:
    """Path confusion: encodings upstreams may decode differently never reach a route."""
    with pytest.raises(BadRequestError):
        canonical_path(raw)


def test_overlong_path_is_refused_as_too_long() -> None:
    with pytest.raises(URITooLongError):
        canonical_path("/" + "a" * 8200)


def route(name: str, prefix: str = "/", host: str | None = None, **kw: object) -> RouteConfig:
    return RouteConfig(name=name, path_prefix=prefix, host=host, upstream="http://u", **kw)


TABLE = RouteTable((
    route("root"),
    route("app", "/app"),
    route("app-admin", "/app/admin"),
    route("exact-host", "/", "api.example.com"),
    route("wild-host", "/", "*.example.com"),
    route("wild-host-v2", "/v2", "*.example.com"),
))


@pytest.mark.parametrize(("host", "path", "expected"), [
    ("gw", "/", "root"),
    ("gw", "/app", "app"),
    ("gw", "/app/", "app"),
    ("gw", "/app/x", "app"),
    ("gw", "/application", "root"),
    ("gw", "/app/admin/x", "app-admin"),
    ("gw", "/app/administrator", "app"),
    ("gw", "/app/admin;jsessionid=1/x", "app-admin"),
    ("gw", "/app;x=1/admin", "app-admin"),
    ("api.example.com", "/app", "exact-host"),
    ("API.Example.com:8443", "/", "exact-host"),
    ("a.example.com", "/", "wild-host"),
    ("a.b.example.com", "/v2/x", "wild-host-v2"),
    ("example.com", "/", "root"),
    ("badexample.com", "/", "root"),
])
def test_route_matching(host: str, path: str, expected: str) -> None:
    matched = TABLE.match(host, path)
    assert matched is not None and matched.name == expected


def test_no_match_is_none() -> None:
    table = RouteTable((route("app", "/app"), route("h", "/", "only.example.com")))
    assert table.match("gw", "/other") is None
    assert table.match("gw", "/") is None


def test_strip_prefix_forwards_the_rest_of_the_path() -> None:
    stripped = Route.from_config(route("s", "/api", strip_prefix=True))
    assert stripped.upstream_path("/api/v1/x") == "/v1/x"
    assert stripped.upstream_path("/api") == "/"
    kept = Route.from_config(route("k", "/api"))
    assert kept.upstream_path("/api/v1") == "/api/v1"


def test_strip_prefix_drops_the_params_of_the_stripped_segments() -> None:
    """Matching ignored `;params`, so stripping must remove the whole matched segments."""
    stripped = Route.from_config(route("s", "/api/v1", strip_prefix=True))
    assert stripped.upstream_path("/api;jsessionid=1/v1/x") == "/x"
    assert stripped.upstream_path("/api/v1/") == "/"


def test_case_insensitive_route_claims_every_spelling_of_its_prefix() -> None:
    table = RouteTable((route("public", auth="public"),
                        route("admin", "/admin", case_insensitive=True),
                        route("api", "/api", strip_prefix=True, case_insensitive=True)))
    for path in ("/admin/x", "/ADMIN/x", "/Admin", "/aDmIn;x=1/y"):
        assert table.match("gw", path).name == "admin", path  # type: ignore[union-attr]
    api = table.match("gw", "/API/v1")
    assert api is not None and api.upstream_path("/API/v1") == "/v1"


def test_routes_nested_in_a_case_insensitive_route_ignore_case_too() -> None:
    """/api on an IIS app is case-insensitive, so /api/ADMIN is /api/admin there."""
    table = RouteTable((route("api", "/api", auth="public", case_insensitive=True),
                        route("admin", "/api/admin")))
    for path in ("/api/ADMIN/x", "/API/Admin", "/api/admin"):
        assert table.match("gw", path).name == "admin", path  # type: ignore[union-attr]


def test_case_folding_is_ascii_only() -> None:
    table = RouteTable((route("root"), route("k", "/kpublic", auth="public",
                                             case_insensitive=True)))
    assert table.match("gw", "/\u212apublic").name == "root"  # type: ignore[union-attr]
    assert table.match("gw", "/KPUBLIC").name == "k"  # type: ignore[union-attr]


def test_case_sensitive_route_leaves_other_spellings_to_other_routes() -> None:
    table = RouteTable((route("public", auth="public"), route("admin", "/admin")))
    assert table.match("gw", "/ADMIN/x").name == "public"  # type: ignore[union-attr]
