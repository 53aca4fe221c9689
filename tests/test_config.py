"""Config: parsed once into frozen objects; every mistake is an error naming its key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pydantic
import pytest

from gateway.advisories import advisories
from gateway.config import Config, load, parse
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ENV = {"S": "s" * 32}


def minimal(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "server": {"public_url": "http://127.0.0.1:4180"},
        "oidc": {"issuer": "https://idp.example.com", "client_id": "gw",
                 "client_secret": "${S}"},
        "routes": [{"name": "app", "upstream": "http://127.0.0.1:8080"}],
    }
    for name, value in sections.items():
        raw[name] = value
    return raw


def error_of(raw: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw, ENV if environ is None else environ)
    return str(info.value)


def with_change(path: str, value: Any) -> dict[str, Any]:
    raw = minimal()
    node = raw
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[last] = value
    return raw


def test_minimal_config_parses_into_frozen_objects_with_defaults() -> None:
    config = parse(minimal(), ENV)
    assert isinstance(config, Config)
    assert config.server.listen == "127.0.0.1:4180"
    assert config.session.store == "memory://"
    assert config.session.idle_timeout == 1800
    assert config.routes[0].auth == "required"
    assert config.redirect_uri == "http://127.0.0.1:4180/oauth2/callback"
    assert config.oidc.secret() == "s" * 32
    with pytest.raises(pydantic.ValidationError):
        config.server.listen = "0.0.0.0:1"  # type: ignore[misc]


def test_env_references_are_expanded_in_nested_values_and_lists() -> None:
    raw = minimal()
    raw["oidc"]["scopes"] = ["openid", "${EXTRA}"]
    raw["routes"][0]["upstream"] = "http://${HOST}:8080"
    config = parse(raw, {**ENV, "EXTRA": "groups", "HOST": "app.internal"})
    assert config.oidc.scopes == ("openid", "groups")
    assert config.routes[0].upstream == "http://app.internal:8080"


def test_expansion_happens_after_yaml_so_secrets_cannot_change_structure() -> None:
    config = parse(minimal(), {"S": "a: b # not a comment\nroutes: []"})
    assert config.oidc.secret() == "a: b # not a comment\nroutes: []"


def test_missing_environment_variable_names_the_key() -> None:
    assert error_of(minimal(), {}) == "oidc.client_secret: environment variable S is not set"


def test_literal_client_secret_is_refused() -> None:
    message = error_of(with_change("oidc.client_secret", "hunter2"))
    assert message.startswith("oidc.client_secret: must come from the environment")


def test_client_secret_file_is_read_on_demand(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    raw = minimal()
    raw["oidc"] = {**raw["oidc"], "client_secret_file": str(secret)}
    del raw["oidc"]["client_secret"]
    assert parse(raw, {}).oidc.secret() == "from-file"


def test_exactly_one_secret_source_is_required(tmp_path: Path) -> None:
    raw = minimal()
    raw["oidc"]["client_secret_file"] = str(tmp_path / "s")
    assert "exactly one" in error_of(raw)
    del raw["oidc"]["client_secret_file"]
    del raw["oidc"]["client_secret"]
    assert "exactly one" in error_of(raw)


@pytest.mark.parametrize(("path", "value", "key"), [
    ("server.bogus", 1, "server.bogus"),
    ("oidc.clientid", "x", "oidc.clientid"),
    ("session.cookie", "x", "session.cookie"),
    ("extra", {}, "extra"),
])
def test_unknown_keys_are_errors_naming_the_key(path: str, value: Any, key: str) -> None:
    assert error_of(with_change(path, value)) == f"{key}: unknown key"


def test_unknown_key_inside_a_route_names_the_route() -> None:
    raw = minimal()
    raw["routes"][0]["upstrem"] = "x"
    assert error_of(raw) == "routes[app].upstrem: unknown key"


@pytest.mark.parametrize("value", ["10", "5 parsecs", "", "-5s", "0s", "1w", 10])
def test_bad_durations_are_refused(value: Any) -> None:
    message = error_of(with_change("session.idle_timeout", value))
    assert message.startswith("session.idle_timeout: ")


@pytest.mark.parametrize(("path", "value", "needle"), [
    ("server.public_url", "ftp://x", "server.public_url"),
    ("server.public_url", "https://x/app", "without a path"),
    ("server.public_url", "https://x/?a=1", "query"),
    ("server.listen", "4180", "HOST:PORT"),
    ("server.listen", "host:99999", "HOST:PORT"),
    ("server.trusted_proxies", ["10.0.0.0/33"], "CIDR"),
    ("oidc.issuer", "idp.example.com", "oidc.issuer"),
    ("oidc.scopes", ["email"], "openid"),
    ("oidc.token_endpoint_auth_method", "private_key_jwt", "oidc.token_endpoint_auth_method"),
    ("session.store", "mysql://db", "session.store"),
    ("session.cookie_name", "bad name;", "session.cookie_name"),
    ("routes.0.upstream", "not a url", "routes[app].upstream"),
    ("routes.0.path_prefix", "app", "routes[app].path_prefix"),
    ("routes.0.path_prefix", "/oauth2", "reserved"),
    ("routes.0.path_prefix", "/a/../b", "routes[app].path_prefix"),
    ("routes.0.path_prefix", "/a//b", "no '//'"),
    ("routes.0.path_prefix", "/a;v=1", "plain ASCII path"),
    ("routes.0.path_prefix", "/caf\u00e9", "plain ASCII path"),
    ("routes.0.pass_access_token", "sometimes", "routes[app].pass_access_token"),
    ("routes.0.host", "bad host!", "routes[app].host"),
    ("routes.0.auth", "maybe", "routes[app].auth"),
    ("routes.0.allow", {"emails": ["alice@x@y.com"]}, "routes[app].allow[0].emails"),
    ("routes.0.allow", {"emails": ["alice"]}, "not an email address"),
    ("routes.0.allow", {"email_domains": ["exa mple.com"]}, "not a domain name"),
    ("server.strip_request_headers", ["X-Ok", "Bad Header"], "server.strip_request_headers"),
    ("server.login_starts_per_minute_per_proxy", -1, "server.login_starts_per_minute_per_proxy"),
    ("oidc.allow_unverified_email", "perhaps", "oidc.allow_unverified_email"),
    ("session.key_prefix", "app{1}", "no braces"),
    ("session.key_prefix", "", "session.key_prefix"),
    ("session.key_prefix", "a b", "session.key_prefix"),
    ("session.cache_ttl", "11s", "at most 10s"),
    ("server.workers", 2, "more than one worker needs a shared session store"),
    ("server.workers", "auto", "memory:// is per process"),
    ("server.workers", 0, "server.workers"),
    ("server.workers", "many", "server.workers"),
    ("server.redirect_domains", ["app.example.com/x"], "is not a host name"),
    ("server.redirect_domains", [".com"], "every host under a top-level domain"),
    ("server.redirect_domains", ["*.example.com"], "server.redirect_domains"),
    ("session.cookie_domain", "localhost", "is not a domain under which cookies"),
    ("session.cookie_domain", "other.example", "does not cover server.public_url's host"),
    ("api.audiences", ["https://api", " "], "api.audiences: an audience is empty"),
    ("api.token_typ", "JWT", "api.token_typ"),
    ("api.introspection", "opaque", "api.introspection"),
    ("api.introspection_endpoint", "/introspect", "api.introspection_endpoint"),
    ("api.introspection_cache", "-1s", "api.introspection_cache"),
])
def test_invalid_values_are_errors_naming_the_key(path: str, value: Any, needle: str) -> None:
    assert needle in error_of(with_change(path, value))


def test_missing_required_keys_are_named() -> None:
    raw = minimal()
    del raw["oidc"]["issuer"]
    assert error_of(raw) == "oidc.issuer: is required"
    raw = minimal()
    del raw["routes"]
    assert error_of(raw) == "routes: is required"


def test_token_passing_on_a_public_route_is_refused() -> None:
    raw = minimal()
    raw["routes"][0].update(auth="public", pass_authorization_header=True)
    assert "passing tokens or the user (pass_*, headers) needs auth: required" in error_of(raw)


@pytest.mark.parametrize(("rate_limit", "problem"), [
    ({"requests": 0, "per": "1m"}, "routes[app].rate_limit.requests: Input should be greater"),
    ({"requests": 10}, "routes[app].rate_limit.per: is required"),
    ({"requests": 10, "per": "1m", "key": "session"}, "routes[app].rate_limit.key"),
    ({"requests": 10, "per": "60"}, "routes[app].rate_limit.per"),
])
def test_rate_limits_that_are_not_are_refused(rate_limit: dict[str, Any],
                                              problem: str) -> None:
    raw = minimal()
    raw["routes"][0].update(rate_limit=rate_limit)
    assert problem in error_of(raw)


@pytest.mark.parametrize(("headers", "problem"), [
    ({"Host": "{a}"}, "routes[app].headers: Host: not a header routes can set"),
    ({"X-Forwarded-For": "{a}"}, "X-Forwarded-For: not a header routes can set"),
    ({"x_forwarded_access_token": "{a}"}, "not a header routes can set"),
    ({"Authorization": "Bearer {a}"}, "Authorization: not a header routes can set"),
    ({"X Dept": "{a}"}, "'X Dept' is not a header name"),
    ({"X-Dept": "{a}", "x_dept": "{b}"}, "x_dept: named twice"),
    ({"X-Dept": "eng"}, "X-Dept: 'eng' names no {claim}"),
    ({"X-Dept": "{a}}"}, "X-Dept: '{a}}': a brace outside a {claim}"),
])
def test_route_headers_that_cannot_be_are_refused(headers: dict[str, str],
                                                   problem: str) -> None:
    raw = minimal()
    raw["routes"][0].update(headers=headers)
    assert problem in error_of(raw)


@pytest.mark.parametrize("options", [
    {"pass_basic_auth": True, "pass_authorization_header": True},
    {"pass_basic_auth": True, "pass_client_authorization": True},
    {"host_header": "upstream", "preserve_host": True},
])
def test_options_that_contradict_each_other_are_refused(options: dict[str, Any]) -> None:
    raw = minimal()
    raw["routes"][0].update(options)
    assert error_of(raw).startswith("routes[app]: ")


@pytest.mark.parametrize(("first", "second"), [
    ({"path_prefix": "/app"}, {"path_prefix": "/app/"}),
    ({"path_prefix": "/Admin", "auth": "public"},
     {"path_prefix": "/admin", "case_insensitive": True}),
])
def test_routes_claiming_the_same_requests_are_refused(first: dict[str, Any],
                                                       second: dict[str, Any]) -> None:
    raw = minimal()
    upstream = raw["routes"][0]["upstream"]
    raw["routes"] = [{"name": "one", "upstream": upstream, **first},
                     {"name": "two", "upstream": upstream, **second}]
    assert "routes 'one' and 'two' have the same host and path_prefix" in error_of(raw)


def test_same_prefix_on_other_hosts_or_other_case_is_fine() -> None:
    raw = minimal()
    upstream = raw["routes"][0]["upstream"]
    raw["routes"] = [{"name": "one", "upstream": upstream, "path_prefix": "/app"},
                     {"name": "two", "upstream": upstream, "path_prefix": "/app",
                      "host": "b.example.com"},
                     {"name": "three", "upstream": upstream, "path_prefix": "/APP"}]
    parse(raw, ENV)


def test_duplicate_route_names_are_refused() -> None:
    raw = minimal()
    raw["routes"].append(copy.deepcopy(raw["routes"][0]))
    assert "duplicate route name 'app'" in error_of(raw)


def test_idle_timeout_longer_than_max_lifetime_is_refused() -> None:
    raw = minimal(session={"idle_timeout": "2h", "max_lifetime": "1h"})
    assert "idle_timeout must not be longer than max_lifetime" in error_of(raw)


def test_allow_rules_need_auth_required() -> None:
    raw = minimal()
    raw["routes"][0].update(auth="public", allow={"groups": ["a"]})
    assert "allow, deny and policy need auth: required" in error_of(raw)


def test_values_are_normalised() -> None:
    raw = minimal()
    raw["routes"][0].update(host="*.Example.COM", path_prefix="/app/",
                            allow={"emails": ["Alice@Example.com", "bob@Bücher.de"],
                                   "email_domains": ["@Ex.com", "bücher.DE"]})
    route = parse(raw, ENV).routes[0]
    assert route.host == "*.example.com"
    assert route.path_prefix == "/app"
    assert route.allow is not None
    [rule] = route.allow  # one mapping: a list of one rule
    assert rule.emails == ("alice@example.com", "bob@xn--bcher-kva.de")
    assert rule.email_domains == ("ex.com", "xn--bcher-kva.de")


def test_cookie_secure_follows_https_unless_set() -> None:
    assert parse(minimal(), ENV).cookie_secure is False
    https = with_change("server.public_url", "https://app.example.com")
    assert parse(https, ENV).cookie_secure is True
    https["session"] = {"cookie_secure": False}
    assert parse(https, ENV).cookie_secure is False


def test_load_reports_unreadable_files_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yaml", ENV)
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load(bad, ENV)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load(bad, ENV)


def test_example_config_documents_a_valid_configuration() -> None:
    config = load(ROOT / "config.example.yaml", {"GW_CLIENT_SECRET": "x" * 32})
    assert [route.name for route in config.routes] == ["app", "status-page"]


@pytest.mark.parametrize("url", [
    "memory://", "redis://127.0.0.1:6379/0", "rediss://:pw@redis.example.com:6380/2",
    "unix:///run/redis.sock", "redis+sentinel://s1:26379,s2/mymaster/1",
    "rediss+sentinel://:pw@s1/mymaster", "redis+cluster://n1:7000,n2:7001",
    "rediss+cluster://[::1]:7000",
])
def test_store_url_forms_are_accepted(url: str) -> None:
    assert parse(minimal(session={"store": url}), ENV).session.store == url


@pytest.mark.parametrize(("url", "problem"), [
    ("mysql://db", "use memory://, redis://"),
    ("redis://", "needs a host"),
    ("redis://h/abc", "database number"),
    ("redis+sentinel://s1:26379", "name the master"),
    ("redis+sentinel://s1:bad/m", "is not HOST[:PORT]"),
    ("redis+cluster://n1:7000/3", "only database 0"),
])
def test_bad_store_urls_say_what_is_wrong(url: str, problem: str) -> None:
    message = error_of(minimal(session={"store": url}))
    assert message.startswith("session.store: ") and problem in message


def test_sentinel_location_is_parsed() -> None:
    location = parse(minimal(session={"store": "redis+sentinel://u:p%40ss@s1,s2:26380/m/3"}),
                     ENV).session.store_location
    assert location.hosts == (("s1", 26379), ("s2", 26380))
    assert (location.username, location.password, location.master, location.db) == (
        "u", "p@ss", "m", 3)


@pytest.mark.parametrize("value", ["ten", "10 parsecs", "-1", "1.5MB", True, "0"])
def test_bad_sizes_are_refused(value: object) -> None:
    raw = minimal()
    raw["routes"][0]["max_body_size"] = value
    assert error_of(raw).startswith("routes[app].max_body_size: ")


def test_upstream_forms_and_tls_options() -> None:
    raw = minimal()
    raw["routes"][0]["upstream"] = "unix:/run/app.sock"
    assert parse(raw, ENV).routes[0].upstream == "unix:/run/app.sock"
    raw["routes"][0]["upstream"] = "unix:relative.sock"
    assert "unix:/absolute/path" in error_of(raw)
    raw["routes"][0].update(upstream="http://app", upstream_tls={"verify": False})
    assert "upstream_tls needs an https:// upstream" in error_of(raw)


def test_an_empty_client_secret_is_refused_at_load() -> None:
    """It used to pass check-config and fail the first login at the IdP with a 502."""
    assert error_of(minimal(), {"S": ""}).startswith("oidc.client_secret: is empty")
    assert error_of(minimal(), {"S": "  "}).startswith("oidc.client_secret: is empty")


def test_an_empty_client_secret_file_is_a_config_error(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("\n")
    raw = minimal()
    raw["oidc"] = {**raw["oidc"], "client_secret_file": str(secret)}
    del raw["oidc"]["client_secret"]
    with pytest.raises(ConfigError, match=r"oidc\.client_secret_file: .* is empty"):
        parse(raw, {}).oidc.secret()


def test_allow_nested_public_is_only_for_public_routes() -> None:
    assert "allow_nested_public is for auth: public routes" in error_of(
        with_change("routes.0.allow_nested_public", True))


def config_with_routes(*routes: dict[str, Any], scopes: tuple[str, ...] = (
        "openid", "email", "profile"), secret: str = "s" * 32) -> Config:
    raw = minimal()
    raw["oidc"]["scopes"] = list(scopes)
    raw["routes"] = [{"upstream": "http://u", **route} for route in routes]
    return parse(raw, {"S": secret})


def test_group_rules_without_a_groups_scope_are_flagged() -> None:
    """Seen: alice, an admin at the IdP, got 403 because no scope asked for her groups."""
    routes = ({"name": "admin", "path_prefix": "/admin", "allow": {"groups": ["admins"]}},)
    [note] = advisories(config_with_routes(*routes))
    assert note.startswith("routes[admin].allow[0].groups: oidc.scopes")
    assert "'groups' claim" in note
    assert advisories(config_with_routes(*routes, scopes=("openid", "groups"))) == []


@pytest.mark.parametrize(("routes", "flagged"), [
    (({"name": "admin", "path_prefix": "/admin", "allow": {"groups": ["admins"]}},
      {"name": "reports", "path_prefix": "/admin/reports", "auth": "public"}), True),
    (({"name": "admin", "path_prefix": "/Admin", "allow": {"groups": ["admins"]},
       "case_insensitive": True},
      {"name": "reports", "path_prefix": "/admin/reports", "auth": "public"}), True),
    (({"name": "admin", "path_prefix": "/admin", "allow": {"groups": ["admins"]}},
      {"name": "reports", "path_prefix": "/admin/reports", "auth": "public",
       "allow_nested_public": True}), False),
    (({"name": "admin", "path_prefix": "/admin", "allow": {"groups": ["admins"]}},
      {"name": "reports", "path_prefix": "/administration", "auth": "public"}), False),
    (({"name": "app", "path_prefix": "/"},  # a public corner of a login-only app is normal
      {"name": "public", "path_prefix": "/public", "auth": "public"}), False),
    (({"name": "app", "path_prefix": "/", "host": "a.example.com",
       "allow": {"groups": ["admins"]}},
      {"name": "public", "path_prefix": "/public", "auth": "public",
       "host": "b.example.com"}), False),
    (({"name": "admin", "path_prefix": "/admin", "host": "*.example.com",
       "allow": {"groups": ["admins"]}},
      {"name": "reports", "path_prefix": "/admin/reports", "auth": "public",
       "host": "app.example.com"}), True),
])
def test_a_public_route_inside_a_restricted_one_is_flagged_unless_intended(
        routes: tuple[dict[str, Any], ...], flagged: bool) -> None:
    notes = advisories(config_with_routes(*routes, scopes=("openid", "groups")))
    assert bool(notes) is flagged
    if flagged:
        assert notes[0].startswith("routes[reports]: public, but inside routes[admin]")


def test_a_bearer_audience_that_is_the_client_id_is_flagged_when_typ_is_not_checked() -> None:
    raw = minimal()
    raw["routes"][0].update(bearer=True, audiences=[raw["oidc"]["client_id"]])
    raw["api"] = {"token_typ": "any"}
    [note] = advisories(parse(raw, ENV))
    assert note.startswith("routes[app].audiences: holds oidc.client_id")
    raw["api"] = {"token_typ": "at+jwt"}
    assert advisories(parse(raw, ENV)) == []


def test_a_short_client_secret_is_flagged() -> None:
    notes = advisories(config_with_routes({"name": "app"}, secret="short"))
    assert notes == ["oidc.client_secret: shorter than 16 characters; a confidential "
                     "client's secret should be long and random"]


@pytest.mark.parametrize(("written", "canonical"), [
    ("https://App.Example.com:443/", "https://app.example.com"),
    ("HTTP://127.0.0.1:80", "http://127.0.0.1"),
    ("https://app.example.com:8443", "https://app.example.com:8443"),
])
def test_public_url_is_kept_in_the_form_browsers_send_as_origin(written: str,
                                                                canonical: str) -> None:
    """Sign-out's POST check compares Origin with it: https://app.example.com:443 refused
    every POST sign-out (the 403 page's button included)."""
    config = parse(with_change("server.public_url", written), ENV)
    assert config.server.public_url == canonical


def test_redirect_domains_and_cookie_domain_are_normalised() -> None:
    raw = minimal()
    raw["server"]["redirect_domains"] = ["App.Example.COM", ".Example.com"]
    raw["session"] = {"cookie_domain": ".Example.COM"}
    raw["server"]["public_url"] = "https://auth.example.com"
    config = parse(raw, ENV)
    assert config.server.redirect_domains == ("app.example.com", ".example.com")
    assert config.session.cookie_domain == "example.com"


def test_metrics_listen_is_off_by_default_and_never_the_public_address() -> None:
    assert parse(minimal(), ENV).server.metrics_listen is None
    assert parse(with_change("server.metrics_listen", "127.0.0.1:9180"),
                 ENV).server.metrics_listen == "127.0.0.1:9180"
    assert error_of(with_change("server.metrics_listen", "9180")) == (
        "server.metrics_listen: '9180' must be HOST:PORT, like 127.0.0.1:4180")
    assert error_of(with_change("server.metrics_listen", "127.0.0.1:4180")) == (
        "server: metrics_listen: must not be the public listen address (anyone who reaches "
        "the gateway could read its metrics)")
