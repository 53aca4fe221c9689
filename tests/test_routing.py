"""Canonical paths and route matching: one form, used for both matching and forwarding."""

from __future__ import annotations

import pytest
from conftest import built_route, route_table

from gateway import routing
from gateway.config_routes import RouteConfig, RuleConfig
from gateway.errors import BadRequestError, URITooLongError
from gateway.routing import Target, canonical_path, parse_target


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
    # a raw '#' starts a fragment that URL builders drop: /admin/assets/..# became /admin/..
    "/admin/assets/..#", "/public/..#", "/a#b", "/#/../admin",
    # a segment that is only ;params: Tomcat strips them and merges // into /
    "/;/admin/users", "/;jsessionid=x/admin/users", "/public//;x/admin", "/a/;/b", "/%2e;x/a",
    # an encoded ';' anywhere, and its double encoding
    "/admin%3Busers", "/admin%3b/users", "/public/..%3b/admin", "/a%253bb",
    # whitespace, non-ASCII and the characters servlet containers refuse
    "/a b", "/a\tb", "/caf\u00e9", "/x\udcff", "/a|b", "/a{b}", "/a^b", "/a`b",
    '/a"b', "/a<b>",
    # bytes that are not UTF-8 once decoded; overlong forms are dots and slashes to some
    "/%ff", "/%c0%ae%c0%ae/admin", "/%c0%af", "/%e0%80%ae",
    # double encodings spelled with encoded digits: '%25%32%66' is '%252f' once decoded
    "/public/%25%32%66..%25%32%66admin", "/%25%32%65%25%32%65/admin", "/%25%35%63",
    "/%25%33%62", "/%25%30%30",
])
def test_ambiguous_paths_are_refused(raw: str) -> None:
    """Path confusion: encodings upstreams may decode differently never reach a route."""
    with pytest.raises(BadRequestError):
        canonical_path(raw)


@pytest.mark.parametrize(("raw", "canonical"), [
    ("/caf%C3%A9", "/caf%C3%A9"),  # percent-encoded UTF-8 passes, still encoded
    ("/a;b=1/c", "/a;b=1/c"),
    ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
    ("/x/report[1].pdf", "/x/report%5B1%5D.pdf"),  # browsers send brackets raw
    ("/app/;jsessionid=ABC", "/app/;jsessionid=ABC"),  # Tomcat's encodeURL, first visit
    ("/;jsessionid=ABC", "/;jsessionid=ABC"),
])
def test_plain_rfc3986_paths_pass_unchanged(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(("raw", "target"), [
    ("/x?y=../z", Target("/x", "y=../z")),
    ("/a/../b?q=1&r=%2F", Target("/b", "q=1&r=%2F")),
    ("/a?", Target("/a", "")),
    ("/a?b[]=1&c={d}|e", Target("/a", "b[]=1&c={d}|e")),  # as browsers send them
])
def test_targets_keep_the_query_as_sent(raw: str, target: Target) -> None:
    assert parse_target(raw) == target
    assert target.with_path("/p") == "/p" + ("?" + target.query if target.query else "")


@pytest.mark.parametrize("raw", ["/a?b#c", "/a?b c", "/a?caf\u00e9", "/a?\x7f"])
def test_queries_with_a_fragment_whitespace_or_non_ascii_are_refused(raw: str) -> None:
    with pytest.raises(BadRequestError):
        parse_target(raw)


def test_overlong_path_is_refused_as_too_long() -> None:
    with pytest.raises(URITooLongError):
        canonical_path("/" + "a" * 8200)


def route(name: str, prefix: str = "/", host: str | None = None, **kw: object) -> RouteConfig:
    return RouteConfig(name=name, path_prefix=prefix, host=host, upstream="http://u", **kw)


TABLE = route_table((
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
    table = route_table((route("app", "/app"), route("h", "/", "only.example.com")))
    assert table.match("gw", "/other") is None
    assert table.match("gw", "/") is None


def test_strip_prefix_forwards_the_rest_of_the_path() -> None:
    stripped = built_route(route("s", "/api", strip_prefix=True))
    assert stripped.upstream_path("/api/v1/x") == "/v1/x"
    assert stripped.upstream_path("/api") == "/"
    kept = built_route(route("k", "/api"))
    assert kept.upstream_path("/api/v1") == "/api/v1"


def test_strip_prefix_drops_the_params_of_the_stripped_segments() -> None:
    """Matching ignored `;params`, so stripping must remove the whole matched segments."""
    stripped = built_route(route("s", "/api/v1", strip_prefix=True))
    assert stripped.upstream_path("/api;jsessionid=1/v1/x") == "/x"
    assert stripped.upstream_path("/api/v1/") == "/"


def test_case_insensitive_route_claims_every_spelling_of_its_prefix() -> None:
    table = route_table((route("public", auth="public"),
                        route("admin", "/admin", case_insensitive=True),
                        route("api", "/api", strip_prefix=True, case_insensitive=True)))
    for path in ("/admin/x", "/ADMIN/x", "/Admin", "/aDmIn;x=1/y"):
        assert table.match("gw", path).name == "admin", path  # type: ignore[union-attr]
    api = table.match("gw", "/API/v1")
    assert api is not None and api.upstream_path("/API/v1") == "/v1"


def test_routes_nested_in_a_case_insensitive_route_ignore_case_too() -> None:
    """/api on an IIS app is case-insensitive, so /api/ADMIN is /api/admin there."""
    table = route_table((route("api", "/api", auth="public", case_insensitive=True),
                        route("admin", "/api/admin")))
    for path in ("/api/ADMIN/x", "/API/Admin", "/api/admin"):
        assert table.match("gw", path).name == "admin", path  # type: ignore[union-attr]


def test_case_folding_is_ascii_only() -> None:
    """str.lower() maps the Kelvin sign to 'k'; .NET maps other letters (a dotless i to 'I'). A
    non-ASCII look-alike of a case-insensitive prefix is neither taken for it nor left to
    another route: it is refused."""
    table = route_table((route("root"), route("k", "/kpublic", auth="public",
                                             case_insensitive=True)))
    assert table.match("gw", "/KPUBLIC").name == "k"  # type: ignore[union-attr]
    with pytest.raises(BadRequestError):
        table.match("gw", "/\u212apublic")
    assert table.match("gw", "/\u212apublicity").name == "root"  # type: ignore[union-attr]


def test_case_sensitive_route_leaves_other_spellings_to_other_routes() -> None:
    table = route_table((route("public", auth="public"), route("admin", "/admin")))
    assert table.match("gw", "/ADMIN/x").name == "public"  # type: ignore[union-attr]


IIS = route_table((route("public", auth="public"),
                  route("admin", "/admin", case_insensitive=True),
                  route("docs", "/docs", auth="public", case_insensitive=True)))


@pytest.mark.parametrize("path", [
    "/admin.", "/admin%20", "/admin./users", "/ADMIN%20./x", "/admin::$DATA", "/admin:x/y",
    "/admin%3A%3A$DATA", "/adm%C4%B1n", "/%EF%BD%81dmin", "/admin%09",
    # ASP.NET removes cookieless segments before it maps the path (CVE-2023-36899)
    "/(S(x))/admin", "/(F(abc))/ADMIN/x", "/(A(x))/docs",
])
def test_iis_equivalents_of_a_case_insensitive_prefix_are_refused(path: str) -> None:
    """IIS serves /admin., /admin%20 and /admin::$DATA as /admin; .NET folds a dotless i to 'I', and
    8.3 names like ADMINI~1 name long ones: such forms never fall to the public route."""
    with pytest.raises(BadRequestError):
        IIS.match("gw", canonical_path(path))


@pytest.mark.parametrize(("path", "expected"), [
    ("/ADMIN/x.", "admin"),  # odd forms past the prefix stay within the route
    ("/Admin;x=1/y", "admin"),
    ("/administration", "public"),
    ("/adminx.", "public"),
    ("/other./x", "public"),  # no case-insensitive prefix could read it as its own
    ("/docs/a::$DATA", "docs"),
])
def test_case_insensitive_routes_match_plain_spellings(path: str, expected: str) -> None:
    matched = IIS.match("gw", canonical_path(path))
    assert matched is not None and matched.name == expected


@pytest.mark.parametrize(("path", "expected"), [
    ("/caf%C3%A9/x", "public"),  # non-ASCII that cannot stand for any prefix
    ("/%E2%82%AC", "public"),
    ("/files~2024/x", "public"),  # not an 8.3 name of anything here
    ("/(x)/admin", "public"),
])
def test_odd_segments_that_cannot_equal_a_prefix_still_pass(path: str, expected: str) -> None:
    matched = IIS.match("gw", canonical_path(path))
    assert matched is not None and matched.name == expected


@pytest.mark.parametrize(("prefix", "path"), [
    ("/administration", "/ADMINI~1/x"),
    ("/administration", "/admini~2"),
    ("/administration", "/AD3F2A~1/x"),  # the hashed form NTFS uses after a few collisions
    ("/admin.panel.old", "/ADMINP~1.OLD/x"),
    ("/web+admin", "/WEB_AD~1/x"),  # '+' is not allowed in an 8.3 name: '_'
])
def test_an_8_3_short_name_of_a_case_insensitive_prefix_is_refused(prefix: str,
                                                                    path: str) -> None:
    table = route_table((route("public", auth="public"),
                        route("admin", prefix, case_insensitive=True)))
    with pytest.raises(BadRequestError):
        table.match("gw", canonical_path(path))


def test_a_short_name_cannot_stand_for_an_8_3_name_or_another_first_letter() -> None:
    table = route_table((route("public", auth="public"),
                        route("admin", "/administration", case_insensitive=True),
                        route("tools", "/tools", case_insensitive=True)))
    for path in ("/XDMINI~1", "/TOOLS~1", "/files~2024/x"):
        assert table.match("gw", path).name == "public", path  # type: ignore[union-attr]


def test_routes_nested_under_a_wildcard_host_case_insensitive_route_ignore_case_too() -> None:
    table = route_table((route("iis-all", "/api", "*.example.com", auth="public",
                              case_insensitive=True),
                        route("iis-admin", "/api/admin", "app.example.com",
                              allow=(RuleConfig(groups=("admins",)),))))
    for path in ("/api/admin/x", "/api/ADMIN/x", "/API/Admin/x"):
        assert table.match("app.example.com", path).name == "iis-admin", path  # type: ignore[union-attr]


@pytest.mark.parametrize(("path", "expected"), [
    ("/%40admin/x", "at"), ("/odata/Items%281%29", "odata"), ("/a%2Bb/x", "plus"),
    ("/a%2bb", "plus"), ("/%61%2B%62", "plus"),
])
def test_prefixes_with_sub_delims_match_their_percent_encoded_spellings(
        path: str, expected: str) -> None:
    """Every upstream decodes %40 to '@' before it maps the path: so must matching."""
    table = route_table((route("root", auth="public"), route("at", "/@admin"),
                        route("odata", "/odata/Items(1)"), route("plus", "/a+b")))
    assert table.match("gw", canonical_path(path)).name == expected  # type: ignore[union-attr]


def test_kept_answers_are_the_computed_ones_and_refusals_are_never_kept() -> None:
    """canonical_path and match keep their answers for short paths (routing.CACHED): the
    answer kept is the one computed, a refusal is refused every time, a long path is
    computed every time, and a reload's new table starts with nothing kept."""
    for path in ("/a/../b", "/%2e%2e/admin", "/x;y=1/z", "/" + "a" * 300):
        assert canonical_path(path) == canonical_path(path) == routing._canonical(path)
    for _ in range(2):
        with pytest.raises(BadRequestError):
            canonical_path("/a%2fb")
    table = route_table((route("public", auth="public"),
                        route("admin", "/admin", case_insensitive=True)))
    for _ in range(2):
        assert table.match("gw", "/ADMIN/x").name == "admin"  # type: ignore[union-attr]
        with pytest.raises(BadRequestError):  # an IIS form of /admin
            table.match("gw", "/admin::$DATA/x")
    assert table._kept.cache_info().hits == 1  # the refusal was never kept
    long = "/admin/" + "x" * 300
    assert table.match("gw", long).name == "admin"  # type: ignore[union-attr]
    assert table._kept.cache_info().currsize == 1
    again = route_table((route("public", auth="public"),))
    assert again._kept.cache_info().currsize == 0
    assert again.match("gw", "/ADMIN/x").name == "public"  # type: ignore[union-attr]
