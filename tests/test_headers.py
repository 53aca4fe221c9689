"""Headers across the gateway: hop-by-hop, identity spoofing, cookies, X-Forwarded-*."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import pytest
from conftest import built_route
from multidict import CIMultiDict

from gateway import headers as headers_module
from gateway.config_routes import RouteConfig
from gateway.headers import (
    ClientInfo,
    RequestRules,
    Stripped,
    client_address,
    client_and_reporter,
    from_upstream,
)
from gateway.identity import Identity
from gateway.routing import Route

CLIENT = ClientInfo(ip="203.0.113.9", scheme="https", host="app.example.com", trusted=False)
PROXY = ClientInfo(ip="10.0.0.2", scheme="http", host="internal:4180", trusted=True)
BOB = Identity("bob", "bob@example.com", True, "bobby", ("staff", "ops"))
GATEWAY_COOKIES = frozenset({"gateway_session", "gateway_session_login"})


def route(**options: Any) -> Route:
    return built_route(RouteConfig(name="r", upstream="http://u", **options))


def rules(r: Route | None = None, *, stripped: Stripped | None = None,
          unverified_email: bool = False) -> RequestRules:
    return RequestRules.build(r or route(), gateway_cookies=GATEWAY_COOKIES,
                              stripped=stripped or Stripped(), unverified_email=unverified_email)


def upstream(headers: list[tuple[str, str]], identity: Identity | None = None,
             client: ClientInfo = CLIENT, host: str | None = None) -> CIMultiDict[str]:
    return rules().for_upstream(CIMultiDict(headers), identity, client, host=host)


def test_hop_by_hop_and_connection_listed_headers_are_removed() -> None:
    out = upstream([("Connection", "keep-alive, X-Secret"), ("Keep-Alive", "5"),
                    ("X-Secret", "1"), ("TE", "trailers"), ("Transfer-Encoding", "chunked"),
                    ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic x"), ("X-Keep", "y")])
    assert dict(out.items()).keys() >= {"X-Keep"}
    for name in ("Connection", "Keep-Alive", "X-Secret", "TE", "Transfer-Encoding", "Upgrade",
                 "Proxy-Authorization"):
        assert name not in out


@pytest.mark.parametrize("name", [
    "X-Forwarded-User", "x-forwarded-user", "X_Forwarded_User", "X-FORWARDED-EMAIL",
    "x_forwarded_groups", "X-Forwarded-Preferred-Username", "X-Forwarded-Access-Token",
    "X-Auth-Request-User", "Remote-User", "X_AUTH_REQUEST_EMAIL", "OIDC_CLAIM_email",
    "oidc-claim-groups", "OIDC_access_token", "OIDC_id_token", "X-Remote-Group", "X-Email",
    "X-User", "remote_groups", "GAP-Auth", "X-Pomerium-Jwt-Assertion", "X-WEBAUTH-USER",
    "X-Amzn-Oidc-Identity", "x_amzn_oidc_data", "X-Goog-Authenticated-User-Email",
    "X-Goog-Iap-Jwt-Assertion", "Cf-Access-Authenticated-User-Email", "CF_ACCESS_JWT_ASSERTION",
    "X-MS-CLIENT-PRINCIPAL-NAME", "X-MS-Client-Principal", "X-Authenticated-User",
])
@pytest.mark.parametrize("identity", [None, BOB])
def test_client_identity_headers_are_stripped_in_every_spelling(
        name: str, identity: Identity | None) -> None:
    """Spoofing: upstreams trust these headers, so only the gateway may set them."""
    out = upstream([(name, "admin"), (name, "admin2")], identity)
    values = [v for k, v in out.items() if k.lower().replace("_", "-") ==
              name.lower().replace("_", "-")]
    assert "admin" not in values and "admin2" not in values


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION",
                                  "X-Forwarded-Access-Token", "x_forwarded_access_token"])
@pytest.mark.parametrize("token", ["real-token", None])
def test_passed_tokens_replace_every_client_spelling(name: str, token: str | None) -> None:
    passing = rules(route(pass_access_token=True, pass_authorization_header=True))
    out = passing.for_upstream(CIMultiDict([(name, "forged"), (name, "forged2")]), BOB, CLIENT,
                               access_token=token)
    assert "forged" not in " ".join(out.values())
    assert out.getall("Authorization", []) == ([f"Bearer {token}"] if token else [])
    assert out.getall("X-Forwarded-Access-Token", []) == ([token] if token else [])


@pytest.mark.parametrize(("options", "sent"), [
    ({}, None),  # protected: the client's Basic user would become REMOTE_USER upstream
    ({"pass_client_authorization": True}, "Basic eDp5"),  # the app's own Basic auth
    ({"auth": "public"}, "Basic eDp5"),
    ({"pass_basic_auth": True}, "Basic " + base64.b64encode(b"bobby:").decode()),
    ({"pass_basic_auth": True, "basic_auth_user": "email"},
     "Basic " + base64.b64encode(b"bob@example.com:").decode()),
    ({"pass_basic_auth": True, "basic_auth_user": "sub"},
     "Basic " + base64.b64encode(b"bob:").decode()),
])
def test_the_clients_authorization_reaches_a_protected_upstream_only_when_asked(
        options: dict[str, Any], sent: str | None) -> None:
    out = rules(route(**options)).for_upstream(
        CIMultiDict([("Authorization", "Basic eDp5")]), BOB, CLIENT, access_token="t")
    assert out.getall("Authorization", []) == ([sent] if sent else [])


@pytest.mark.parametrize("user", [None, "a:b", ""])
def test_basic_auth_names_no_user_it_cannot(user: str | None) -> None:
    """No claim, or a user-id with ':' (RFC 7617): no Authorization at all."""
    identity = Identity("u", preferred_username=user)
    out = rules(route(pass_basic_auth=True)).for_upstream(
        CIMultiDict([("Authorization", "Basic eDp5")]), identity, CLIENT, access_token="t")
    assert "Authorization" not in out


@pytest.mark.parametrize(("allow_unverified", "sent"), [
    (False, []), (True, ["Basic " + base64.b64encode(b"eve@example.com:").decode()])])
def test_basic_auth_by_email_names_only_a_verified_one(allow_unverified: bool,
                                                       sent: list[str]) -> None:
    """Same rule as X-Forwarded-Email: an unverified address may be anybody's."""
    eve = Identity("eve", "eve@example.com", False)
    by_email = rules(route(pass_basic_auth=True, basic_auth_user="email"),
                     unverified_email=allow_unverified)
    out = by_email.for_upstream(CIMultiDict([("Authorization", "Basic eDp5")]), eve, CLIENT,
                                access_token="t")
    assert out.getall("Authorization", []) == sent


def test_identity_headers_come_from_the_session() -> None:
    out = upstream([], BOB)
    assert out["X-Forwarded-User"] == "bob"
    assert out["X-Forwarded-Email"] == "bob@example.com"
    assert out["X-Forwarded-Preferred-Username"] == "bobby"
    assert out["X-Forwarded-Groups"] == "staff,ops"
    sparse = upstream([], Identity("u"))
    assert sparse["X-Forwarded-User"] == "u"
    assert "X-Forwarded-Email" not in sparse and "X-Forwarded-Groups" not in sparse


def test_gateway_cookies_are_removed_and_others_kept() -> None:
    out = upstream([("Cookie", "a=1; gateway_session=xxx.yyy"),
                    ("Cookie", "gateway_session_login=z; b=2")])
    assert out.getall("Cookie") == ["a=1; b=2"]
    only_ours = upstream([("Cookie", "gateway_session=x")])
    assert "Cookie" not in only_ours


def test_untrusted_client_forwarding_headers_are_replaced() -> None:
    out = upstream([("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "http"),
                    ("X-Forwarded-Host", "evil.com"), ("Forwarded", "for=1.2.3.4"),
                    ("X-Real-IP", "1.2.3.4")])
    assert out.getall("X-Forwarded-For") == ["203.0.113.9"]
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "app.example.com"
    assert "Forwarded" not in out and "X-Real-IP" not in out


def test_trusted_proxy_forwarding_headers_are_appended_and_kept() -> None:
    out = upstream([("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-Proto", "https"),
                    ("X-Forwarded-Host", "app.example.com")], client=PROXY)
    assert out["X-Forwarded-For"] == "198.51.100.7, 10.0.0.2"
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "app.example.com"
    # Several lines are one list: none of its hops is lost (as the rate limits read it).
    out = upstream([("X-Forwarded-For", "198.51.100.7, 10.0.0.9"),
                    ("X-Forwarded-For", "10.0.0.8")], client=PROXY)
    assert out.getall("X-Forwarded-For") == ["198.51.100.7, 10.0.0.9, 10.0.0.8, 10.0.0.2"]


def test_the_host_sent_is_the_one_chosen_never_the_clients_by_itself() -> None:
    """First, as RFC 9112 §3.2 asks; the upstream URL's unless the route chose another."""
    sent = upstream([("X-A", "1"), ("Host", "evil.example")])
    assert next(iter(sent.items())) == ("Host", "u") and sent.getall("Host") == ["u"]
    assert upstream([("Host", "evil.example")], host="app.example.com").getall("Host") == [
        "app.example.com"]


def test_the_request_id_sent_is_the_gateways_never_the_clients_by_itself() -> None:
    """The proxy passes the client's own id on only when a trusted proxy sent it
    (observability._request_id); here any client copy, in any spelling, is dropped."""
    assert "X-Request-ID" not in upstream([("X-Request-ID", "forged")])
    out = rules().for_upstream(CIMultiDict([("x_request_id", "forged"), ("X-Request-Id", "f2")]),
                               None, CLIENT, request_id="0f1e")
    assert out.getall("X-Request-ID") == ["0f1e"]


def test_a_stripped_prefix_is_sent_as_x_forwarded_prefix_and_never_forged() -> None:
    forged = CIMultiDict([("X-Forwarded-Prefix", "/admin")])
    wiki = rules(route(path_prefix="/wiki", strip_prefix=True))
    out = wiki.for_upstream(forged, None, CLIENT)
    assert out.getall("X-Forwarded-Prefix") == ["/wiki"]
    assert "X-Forwarded-Prefix" not in upstream([("X-Forwarded-Prefix", "/admin")])


def test_the_upstreams_server_header_is_not_passed_on() -> None:
    out = from_upstream(CIMultiDict([("Server", "Apache/2.4.71 (Debian)"), ("X-App", "1")]))
    assert "Server" not in out and out["X-App"] == "1"


def test_operator_names_and_prefixes_are_stripped_in_every_spelling() -> None:
    stripped = Stripped.with_extra(["X-Corp-*", "X-App-User"])
    out = rules(stripped=stripped).for_upstream(
        CIMultiDict([("x_corp_role", "a"), ("X-CORP-ID", "1"), ("x-app_user", "r"),
                     ("X-Corporate", "kept"), ("OIDC_CLAIM_sub", "x")]), None, CLIENT)
    assert [name for name in out if name.lower().startswith(("x-c", "x_c", "x-a", "oidc"))] == [
        "X-Corporate"]


@pytest.mark.parametrize(("email", "sent"), [
    ("Bob@Example.COM", "Bob@Example.COM"),  # ASCII case as the IdP wrote it
    ("bob@Bücher.de", "bob@xn--bcher-kva.de"),  # what the policy compared
    ("bob@exa\u00admple.com", "bob@example.com"),  # a soft hyphen, dropped by IDNA
    ("bob@ＥＸＡＭＰＬＥ.com", "bob@example.com"),
    ("bob@evil.com@example.com", None),  # not one address: no header
    ("bob", None),
])
def test_the_email_header_carries_the_address_the_policy_checked(
        email: str, sent: str | None) -> None:
    out = upstream([], Identity("bob", email, True))
    assert out.get("X-Forwarded-Email") == sent


def test_the_email_header_needs_a_verified_email_unless_allowed() -> None:
    unverified = Identity("bob", "bob@example.com", False)
    assert "X-Forwarded-Email" not in upstream([], unverified)
    allowed = rules(unverified_email=True).for_upstream(CIMultiDict(), unverified, CLIENT)
    assert allowed["X-Forwarded-Email"] == "bob@example.com"
    assert upstream([], BOB)["X-Forwarded-Email"] == "bob@example.com"


def test_response_headers_keep_duplicates_and_drop_hop_by_hop() -> None:
    out = from_upstream(CIMultiDict([("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                                     ("Connection", "close, X-Internal"), ("X-Internal", "1"),
                                     ("Transfer-Encoding", "chunked"), ("Location", "/x")]))
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["Location"] == "/x"
    for name in ("Connection", "X-Internal", "Transfer-Encoding"):
        assert name not in out


@pytest.mark.parametrize(("location", "prefix", "expected"), [
    ("http://app.internal:8080/login?x=1", "/", "/login?x=1"),
    ("http://APP.internal:8080", "/", "/"),
    ("http://app.internal:8080/login", "/app", "/app/login"),
    ("http://app.internal:8080?q=1", "/app", "/app/?q=1"),
    ("http://app.internal:80801/x", "/", "http://app.internal:80801/x"),
    ("https://idp.example.com/auth", "/", "https://idp.example.com/auth"),
    ("/relative", "/app", "/relative"),
    # never made protocol-relative: browsers read //host and /\host as another origin
    ("http://app.internal:8080//evil.example/x", "/", "http://app.internal:8080//evil.example/x"),
    ("http://app.internal:8080/\\evil.example/x", "/",
     "http://app.internal:8080/\\evil.example/x"),
    ("http://app.internal:8080/\t/evil.example", "/", "http://app.internal:8080/\t/evil.example"),
    ("http://app.internal:8080//evil.example/x", "/app", "/app//evil.example/x"),
    # an app told its base path: already under the prefix, not prefixed again
    ("http://app.internal:8080/app/doku.php", "/app", "/app/doku.php"),
    ("http://app.internal:8080/app?x=1", "/app", "/app?x=1"),
    ("http://app.internal:8080/application", "/app", "/app/application"),
    # the public origin (an app building URLs from the Host it was sent) is the app's too
    ("https://gw.example.com/doku.php", "/app", "/app/doku.php"),
    ("https://gw.example.com/app/doku.php", "/app", "/app/doku.php"),
    ("https://gw.example.com.evil/x", "/", "https://gw.example.com.evil/x"),
])
def test_upstream_self_redirects_are_rewritten_to_the_gateway(
        location: str, prefix: str, expected: str) -> None:
    out = from_upstream(CIMultiDict([("Location", location), ("Content-Location", location)]),
                        origins=("http://app.internal:8080", "https://gw.example.com"),
                        prefix=prefix)
    assert out["Location"] == expected
    assert out["Content-Location"] == expected


def test_redirects_are_left_alone_without_rewriting() -> None:
    out = from_upstream(CIMultiDict([("Location", "http://app.internal:8080/x")]))
    assert out["Location"] == "http://app.internal:8080/x"


@pytest.mark.parametrize(("cookie", "prefix", "expected"), [
    ("sid=1; Path=/; HttpOnly", "/app", "sid=1; Path=/app; HttpOnly"),
    ("sid=1; path=/admin", "/app", "sid=1; path=/app/admin"),
    ("sid=1", "/app", "sid=1; Path=/app"),
    ("sid=1; Path=/", "/", "sid=1; Path=/"),
    ("sid=1; Domain=app.internal; Path=/", "/", "sid=1; Path=/"),
    ("sid=1; Domain=.APP.internal", "/", "sid=1"),
    ("sid=1; Domain=example.com", "/", "sid=1; Domain=example.com"),
    # an app told its base path: not /app/app
    ("sid=1; path=/app/", "/app", "sid=1; path=/app/"),
    ("sid=1; Path=/app", "/app", "sid=1; Path=/app"),
    ("sid=1; Path=/application", "/app", "sid=1; Path=/app/application"),
])
def test_upstream_cookies_are_scoped_to_where_the_browser_sees_the_app(
        cookie: str, prefix: str, expected: str) -> None:
    out = from_upstream(CIMultiDict([("Set-Cookie", cookie), ("Set-Cookie", "b=2")]),
                        cookies_from="http://app.internal:8080", prefix=prefix)
    assert out.getall("Set-Cookie")[0] == expected
    assert len(out.getall("Set-Cookie")) == 2


LB = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(("peer", "forwarded_for", "expected"), [
    ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),          # untrusted peer: XFF ignored
    ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),            # behind our load balancer
    ("10.0.0.2", ["1.1.1.1, 198.51.100.1, 10.0.0.7"], "198.51.100.1"),  # left part is forged
    ("10.0.0.2", ["1.1.1.1", "198.51.100.1"], "198.51.100.1"),  # repeated header
    ("10.0.0.2", ["10.0.0.5, 10.0.0.6"], "10.0.0.5"),          # all trusted: the first
    ("10.0.0.2", [], "10.0.0.2"),
    ("", ["198.51.100.1"], ""),                                 # Unix socket peer
    ("10.0.0.2", ["198.51.100.1:51234"], "198.51.100.1"),      # Azure adds the port
    ("10.0.0.2", ["[2001:db8::1]:443"], "2001:db8::1"),
    ("10.0.0.2", ["2001:db8::1"], "2001:db8::1"),
])
def test_client_address_trusts_only_the_hops_our_proxies_added(
        peer: str, forwarded_for: list[str], expected: str) -> None:
    assert client_address(peer, forwarded_for, LB) == expected


@pytest.mark.parametrize(("peer", "forwarded_for", "expected"), [
    ("203.0.113.9", ["198.51.100.1"], ("203.0.113.9", ())),  # the peer is the client
    ("10.0.0.2", [], ("10.0.0.2", ())),
    ("10.0.0.2", ["198.51.100.1"], ("198.51.100.1", ("10.0.0.2",))),  # reported by the LB
    # a client inside the trusted range, behind the LB: its own address is a voucher
    ("10.0.0.2", ["1.2.3.4, 10.9.9.9"], ("1.2.3.4", ("10.0.0.2", "10.9.9.9"))),
    ("10.0.0.2", ["10.0.0.5, 10.0.0.6"], ("10.0.0.5", ("10.0.0.2", "10.0.0.6"))),
])
def test_every_trusted_address_that_vouched_for_the_client_is_named(
        peer: str, forwarded_for: list[str], expected: tuple[str, tuple[str, ...]]) -> None:
    assert client_and_reporter(peer, forwarded_for, LB) == expected


@pytest.mark.parametrize("peer", ["10.5.5.5", "10.0.0.1"])
def test_a_forging_client_cannot_choose_every_voucher(peer: str) -> None:
    """Directly (peer 10.5.5.5, the client itself) or behind the balancer (peer 10.0.0.1,
    which appends the client's 10.5.5.5): the client's own address vouches every time,
    whatever it writes further left."""
    chains = [f"9.9.9.{n}, 10.77.0.{n}" + (", 10.5.5.5" if peer == "10.0.0.1" else "")
              for n in range(5)]
    vouchers = [set(client_and_reporter(peer, [chain], LB)[1]) for chain in chains]
    assert "10.5.5.5" in set.intersection(*vouchers)


def test_route_headers_come_from_claims_and_replace_every_client_copy() -> None:
    """Spoofing: a configured header is the gateway's, in every spelling the client tries;
    one that overrides a default header wins over it."""
    carol = Identity.from_claims({"sub": "carol", "email": "c@example.com",
                                  "email_verified": True, "department": "eng"}, "groups")
    r = route(headers={"X-Department": "{department}", "X-Forwarded-User": "{email}"},
              pass_id_token=True)
    forged = [("X-Department", "finance"), ("x_department", "finance"),
              ("X-Forwarded-Id-Token", "forged"), ("X-Forwarded-User", "root")]
    out = rules(r).for_upstream(CIMultiDict(forged), carol, CLIENT, access_token="at",
                                id_token="id.token.jwt")
    assert out.getall("X-Department") == ["eng"]
    assert "x_department" not in {k.lower() for k in out}
    assert out.getall("X-Forwarded-User") == ["c@example.com"]
    assert out.getall("X-Forwarded-Id-Token") == ["id.token.jwt"]


def test_a_route_header_without_a_value_sends_nothing_not_the_default() -> None:
    """X-Forwarded-User: "{email}" for a user without a verified email: no X-Forwarded-User
    at all (an upstream keyed by email must not get the sub in its place)."""
    r = route(headers={"X-Forwarded-User": "{email}", "X-Department": "{department}"})
    unverified = Identity.from_claims({"sub": "eve", "email": "e@example.com"}, "groups")
    out = rules(r).for_upstream(CIMultiDict([("X-Department", "finance")]), unverified, CLIENT,
                                access_token="at")
    assert "X-Forwarded-User" not in out and "X-Department" not in out


def test_identity_headers_follow_the_identity_object_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept per Identity object, a bounded number of them: a refreshed session's new
    identity (another email, other groups) is sent as it is now, never as it was kept."""
    monkeypatch.setattr(headers_module, "IDENTITIES_KEPT", 3)
    r = rules()
    before = Identity("bob", "bob@example.com", True, "bobby", ("staff",))
    after = Identity("bob", "robert@example.com", True, "bobby", ("ops",))
    assert r.for_upstream(CIMultiDict(), before, CLIENT)["X-Forwarded-Email"] == "bob@example.com"
    out = r.for_upstream(CIMultiDict(), after, CLIENT)
    assert (out["X-Forwarded-Email"], out["X-Forwarded-Groups"]) == ("robert@example.com", "ops")
    for n in range(10):
        user = Identity(f"u{n}")
        assert r.for_upstream(CIMultiDict(), user, CLIENT)["X-Forwarded-User"] == f"u{n}"
        assert len(r._sent) <= 3
    assert r.for_upstream(CIMultiDict(), before, CLIENT)["X-Forwarded-Groups"] == "staff"
