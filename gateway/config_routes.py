"""Configuration models for routes (`routes[]` in the YAML) and what they share with the rest
of config.py: the frozen model base and the URL check. Split from config.py to keep each module
to one screenful of concerns; config.py re-exports these names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from yarl import URL

from gateway.identity import ClaimTemplate, email_address, email_domain
from gateway.units import Duration, NonNegativeDuration, Size

_PREFIX = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,=:@/]*$")
_HOST_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_METHOD = re.compile(r"^[A-Z]{1,20}$")
_TOKEN = re.compile(r"^[!#$%&'+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 §5.6.2: a header name
# Headers routes[].headers may not set: framing and routing, the client's own, and those
# that other settings own (pass_* options, the forwarding headers).
_NOT_SETTABLE = frozenset({
    "host", "cookie", "authorization", "proxy-authorization", "content-length",
    "content-type", "transfer-encoding", "te", "trailer", "connection", "keep-alive",
    "upgrade", "expect", "forwarded", "x-real-ip", "x-forwarded-for", "x-forwarded-proto",
    "x-forwarded-host", "x-forwarded-prefix", "x-forwarded-port", "x-forwarded-access-token",
    "x-forwarded-id-token"})
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3 scope-token
POLICY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ClaimValue = StrictBool | StrictInt | StrictStr


def http_url(value: str, *, require_path_free: bool = False) -> str:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value!r} is not an absolute http(s) URL")
    if require_path_free and (url.query_string or url.fragment):
        raise ValueError(f"{value!r} must not have a query or fragment")
    return value


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _methods(value: tuple[str, ...]) -> tuple[str, ...]:
    """HTTP method names in upper case; GET brings HEAD (a HEAD is a GET without the body,
    as nginx's limit_except reads it)."""
    methods = []
    for entry in value:
        method = entry.strip().upper()
        if not _METHOD.fullmatch(method):
            raise ValueError(f"{entry!r} is not an HTTP method name")
        methods.append(method)
    if "GET" in methods and "HEAD" not in methods:
        methods.append("HEAD")
    return tuple(dict.fromkeys(methods))


def _listed(value: Any) -> Any:
    """One mapping where a list of them is expected: a list of one."""
    return [value] if isinstance(value, dict) else value


class RuleConfig(FrozenModel):
    """One allow or deny rule: every kind present must match; within a kind any listed
    value matches; `methods` limits the rule to those requests."""

    emails: tuple[str, ...] = ()
    email_domains: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    # claim name (a dotted path reaches into objects: realm_access.roles) -> value or values
    claims: dict[str, tuple[ClaimValue, ...]] = Field(default_factory=dict)
    methods: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()  # one of them granted to the bearer token

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for scope in value:
            if not _SCOPE.fullmatch(scope):
                raise ValueError(f"{scope!r} is not an OAuth scope (RFC 6749 §3.3: printable "
                                 "ASCII without spaces, '\"' or '\\')")
        return value

    @field_validator("emails")
    @classmethod
    def _parse_emails(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Parsed like the users' addresses (identity.email_address), so they compare."""
        parsed = []
        for entry in value:
            address = email_address(entry.strip())
            if address is None:
                raise ValueError(f"{entry!r} is not an email address (local@domain)")
            parsed.append(address)
        return tuple(parsed)

    @field_validator("email_domains")
    @classmethod
    def _parse_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parsed = []
        for entry in value:
            domain = email_domain(entry.strip().removeprefix("@"))
            if domain is None:
                raise ValueError(f"{entry!r} is not a domain name")
            parsed.append(domain)
        return tuple(parsed)

    @field_validator("claims", mode="before")
    @classmethod
    def _claim_lists(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        lists = {}
        for name, given in value.items():
            if not isinstance(name, str) or not name.strip(". ") or ".." in name:
                raise ValueError(f"{name!r} is not a claim name or dotted path")
            values = given if isinstance(given, list) else [given]
            if not all(isinstance(v, str | int) for v in values):  # bool is an int
                raise ValueError(f"{name}: values are strings, integers or true/false")
            lists[name] = values
        return lists

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _methods(value)

    @model_validator(mode="after")
    def _not_empty(self) -> RuleConfig:
        if not (self.emails or self.email_domains or self.groups or self.claims
                or self.methods or self.scopes):
            raise ValueError("a rule needs at least one of emails, email_domains, groups, "
                             "claims, scopes, methods")
        if any(not values for values in self.claims.values()):
            raise ValueError("a claim rule needs at least one value")
        return self


class RateLimitConfig(FrozenModel):
    """routes[].rate_limit: `requests` per `per`, counted per signed-in user (anonymous
    requests per address), per client address, or for the whole route."""

    requests: int = Field(ge=1, le=1_000_000)
    per: Duration
    key: Literal["user", "ip", "route"] = "user"


class PolicyConfig(FrozenModel):
    """A named policy (`policies:`), for routes to share by name."""

    allow: tuple[RuleConfig, ...] | None = None
    deny: tuple[RuleConfig, ...] = ()

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _rule_lists(cls, value: Any) -> Any:
        return _listed(value)

    @model_validator(mode="after")
    def _says_something(self) -> PolicyConfig:
        if self.allow is None and not self.deny:
            raise ValueError("a policy needs allow or deny rules")
        return self


class UpstreamTLSConfig(FrozenModel):
    """TLS to an https:// upstream: a private CA, or (loudly) no verification at all."""

    ca_file: Path | None = None
    verify: bool = True


class RouteConfig(FrozenModel):
    name: str = Field(min_length=1)
    host: str | None = None
    path_prefix: str = "/"
    upstream: str
    auth: Literal["required", "public"] = "required"
    # Who may use it (auth: required only): allow and deny rules here, or a named policy.
    allow: tuple[RuleConfig, ...] | None = None
    deny: tuple[RuleConfig, ...] = ()
    policy: str | None = None
    methods: tuple[str, ...] | None = None  # others get 405
    # Step-up: a sign-in no older than this, and of one of these strengths (the ID token's
    # acr); otherwise the user signs in again, asked for with max_age and acr_values.
    max_auth_age: Duration | None = None
    acr_values: tuple[str, ...] = ()
    rate_limit: RateLimitConfig | None = None  # past it: 429 with Retry-After
    # API clients: Authorization: Bearer <token>, checked as api: says, instead of a session;
    # the token's aud must hold one of `audiences` (default: api.audiences).
    bearer: bool = False
    audiences: tuple[str, ...] = ()
    # CORS preflights (OPTIONS with Origin and Access-Control-Request-Method) pass without
    # credentials, which browsers never send on one; the upstream answers them.
    allow_preflight: bool = False
    strip_prefix: bool = False
    # The Host the upstream gets: public_url's (default: absolute URLs it builds point at the
    # gateway, and no client can choose it), the client's own, or the upstream URL's.
    host_header: Literal["public", "client", "upstream"] = "public"
    preserve_host: bool = False  # the older spelling of host_header: client
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 60.0
    total_timeout: Duration | None = None
    rewrite_redirects: bool = True  # Location/Content-Location on the upstream's origin
    rewrite_cookie_paths: bool = True  # Set-Cookie Path under strip_prefix, and its Domain
    max_body_size: Size | None = None
    retries: int = Field(default=1, ge=0, le=5)
    upstream_tls: UpstreamTLSConfig | None = None
    pass_access_token: bool = False
    pass_authorization_header: bool = False
    pass_id_token: bool = False  # X-Forwarded-Id-Token: the user's ID token
    # More identity headers: name -> a claim template ("{department}", "{a} {b}").
    headers: dict[str, str] = Field(default_factory=dict)
    # Authorization on a protected route: the client's is dropped (servers map Basic auth to
    # REMOTE_USER, which the client could then choose), unless pass_client_authorization;
    # pass_basic_auth sends Basic base64(<user>:) for the signed-in user instead.
    pass_client_authorization: bool = False
    pass_basic_auth: bool = False
    basic_auth_user: Literal["preferred_username", "email", "sub"] = "preferred_username"
    case_insensitive: bool = False
    early_hints: bool = False
    # WebSockets: close one that carried no frame either way for this long (None: never), and
    # ping the client this often so half-open connections are found (0: no pings).
    websocket_idle_timeout: Duration | None = None
    websocket_ping_interval: NonNegativeDuration = 30.0
    # A public route inside a route with allow rules is a hole in it; check-config and
    # `gateway run` warn about one unless it is marked as intended.
    allow_nested_public: bool = False

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _rule_lists(cls, value: Any) -> Any:
        return _listed(value)

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("lists no method: leave it out to allow every method")
        return _methods(value) if value is not None else None

    @field_validator("acr_values")
    @classmethod
    def _check_acr_values(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for acr in value:
            if not acr or not acr.isprintable() or " " in acr:
                raise ValueError(f"{acr!r} is not an acr value (no spaces: the request "
                                 "separates them with spaces)")
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        seen: set[str] = set()
        for name, template in value.items():
            lowered = name.lower().replace("_", "-")
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
            if lowered in _NOT_SETTABLE:
                raise ValueError(f"{name}: not a header routes can set (framing, the client's "
                                 "own, or one a pass_* option or the gateway sets)")
            if lowered in seen:
                raise ValueError(f"{name}: named twice (header names ignore case, and '_' is "
                                 "'-' to many servers)")
            seen.add(lowered)
            try:
                ClaimTemplate.parse(template)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @field_validator("policy")
    @classmethod
    def _check_policy_name(cls, value: str | None) -> str | None:
        if value is not None and not POLICY_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a policy name")
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.strip().lower().rstrip(".")
        labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
        if not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"{value!r} is not a host name or *.domain wildcard")
        return host

    @field_validator("path_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        # Requests are matched in canonical form (routing.py), so a prefix must be in it too.
        segments = value.rstrip("/").split("/")[1:]
        if not _PREFIX.fullmatch(value) or any(seg in ("", ".", "..") for seg in segments):
            raise ValueError(f"{value!r} must be a plain ASCII path like /app: no '//', dot "
                             "segments, ';', '%', '?', '#', '\\' or spaces")
        if value.startswith("/oauth2") and value[7:8] in ("", "/"):
            raise ValueError("/oauth2 is reserved for the gateway's own endpoints")
        return value.rstrip("/") or "/"

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str) -> str:
        if value.startswith("unix:"):
            if not value.removeprefix("unix:").startswith("/"):
                raise ValueError(f"{value!r}: a Unix socket upstream is unix:/absolute/path")
            return value
        return http_url(value, require_path_free=True).rstrip("/")

    @property
    def effective_host_header(self) -> Literal["public", "client", "upstream"]:
        return "client" if self.preserve_host else self.host_header

    @property
    def restricted(self) -> bool:
        """Has rules beyond "any signed-in user" (its own, or a named policy's)."""
        return self.allow is not None or bool(self.deny) or self.policy is not None

    @model_validator(mode="after")
    def _tls_needs_https(self) -> RouteConfig:
        if self.upstream_tls is not None and not self.upstream.startswith("https://"):
            raise ValueError("upstream_tls needs an https:// upstream")
        return self

    @model_validator(mode="after")
    def _allow_needs_auth(self) -> RouteConfig:
        if self.auth == "public" and (self.allow is not None or self.deny or self.policy):
            raise ValueError("allow, deny and policy need auth: required")
        if self.auth == "public" and (self.max_auth_age is not None or self.acr_values):
            raise ValueError("max_auth_age and acr_values need auth: required")
        if self.policy is not None and (self.allow is not None or self.deny):
            raise ValueError("policy names rules kept under policies: set either policy or "
                             "allow/deny")
        if self.auth == "public" and (self.pass_access_token or self.pass_authorization_header
                                      or self.pass_basic_auth or self.pass_id_token
                                      or self.headers):
            raise ValueError("passing tokens or the user (pass_*, headers) needs auth: "
                             "required")
        given = [name for name in ("pass_authorization_header", "pass_basic_auth",
                                   "pass_client_authorization") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} each set Authorization: choose one")
        if self.preserve_host and self.host_header != "public":
            raise ValueError("preserve_host is the older spelling of host_header: client; "
                             "set only host_header")
        if self.auth == "public" and (self.bearer or self.allow_preflight):
            raise ValueError("bearer and allow_preflight are for auth: required routes")
        if self.audiences and not self.bearer:
            raise ValueError("audiences are for routes with bearer: true")
        if self.auth != "public" and self.allow_nested_public:
            raise ValueError("allow_nested_public is for auth: public routes")
        return self


Rules = tuple[tuple[RuleConfig, ...] | None, tuple[RuleConfig, ...], str]


def rules_of(route: RouteConfig, policies: Mapping[str, PolicyConfig]) -> Rules:
    """The route's allow rules (None: any signed-in user), deny rules, and where they are
    written (for log lines and messages): its own, or its named policy's."""
    if route.policy is not None:
        policy = policies[route.policy]
        return policy.allow, policy.deny, f"policies.{route.policy}"
    return route.allow, route.deny, f"routes[{route.name}]"
