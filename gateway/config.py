"""Load and validate the YAML configuration into frozen, typed objects.

This is the only module that reads YAML or the environment for configuration; everything else
receives a `Config`. `${VAR}` is expanded in parsed scalar strings (not in the raw text), so a
secret containing `: ` or `#` cannot change the YAML structure. Every problem is reported as a
`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL

from gateway.config_routes import (
    POLICY_NAME,
    FrozenModel,
    PolicyConfig,
    RouteConfig,
    Rules,
    http_url,
    rules_of,
)
from gateway.errors import ConfigError
from gateway.sessions.keys import PREFIX_SHAPE, Keys
from gateway.store_url import StoreLocation, parse_store_url
from gateway.units import Duration, NonNegativeDuration, Size

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DOMAIN_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HEADER_NAME = re.compile(r"[!#$%&'+\-.^_`|~0-9A-Za-z]+\*?")  # RFC 9110 §5.6.2 token
PROXY_LOGIN_START_FACTOR = 20


def host_and_port(listen: str) -> tuple[str, int]:
    """A checked HOST:PORT (brackets around an IPv6 host removed)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class ServerConfig(FrozenModel):
    listen: str = "127.0.0.1:4180"
    public_url: str
    trusted_proxies: tuple[str, ...] = ()
    shutdown_timeout: Duration = 10.0
    # After SIGTERM, keep serving this long (readyz says "draining") before the listener
    # closes: Kubernetes removes a pod from its endpoints only after it signals it.
    shutdown_delay: NonNegativeDuration = 0.0
    max_header_size: Size = 16 * 1024
    login_starts_per_minute: int = Field(default=120, ge=0)
    # Sign-ins started per minute through one trusted proxy address, all its clients together:
    # the bound when a client inside trusted_proxies writes its own X-Forwarded-For.
    login_starts_per_minute_per_proxy: int | None = Field(default=None, ge=0)
    # Request headers removed before the upstream, beyond the built-in identity headers;
    # "X-Corp-*" names a prefix.
    strip_request_headers: tuple[str, ...] = ()
    # Where `gateway run` writes its pid (for `gateway reload`); removed when it exits.
    pid_file: Path | None = None
    # Processes serving the port (SO_REUSEPORT), under a supervisor that restarts one that
    # dies; "auto": one per CPU. More than one needs a shared session store.
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    # The serving processes' event loop: uvloop (libuv, in C) does the same work in about 12%
    # fewer instructions a request (bench/README.md); "asyncio" is the standard library's.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # Hosts a sign-in may return to besides public_url's own (sites behind a forward-auth
    # front on other hosts): "app.example.com" exactly, ".example.com" for any under it.
    redirect_domains: tuple[str, ...] = ()
    # HOST:PORT of the Prometheus listener (GET /metrics); off unless set. Never the public
    # port: keep it on an address only the monitoring can reach.
    metrics_listen: str | None = None

    @field_validator("redirect_domains")
    @classmethod
    def _check_redirect_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        domains = []
        for entry in value:
            domain = entry.strip().lower()
            labels = domain.removeprefix(".").split(".")
            if not all(_DOMAIN_LABEL.fullmatch(label) for label in labels):
                raise ValueError(f"{entry!r} is not a host name (app.example.com) or a "
                                 ".domain (.example.com: any host under it)")
            if domain.startswith(".") and len(labels) < 2:
                raise ValueError(f"{entry!r} would allow every host under a top-level domain")
            domains.append(domain)
        return tuple(domains)

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} must be HOST:PORT, like 127.0.0.1:4180")
        return value

    @model_validator(mode="after")
    def _metrics_apart(self) -> ServerConfig:
        if self.metrics_listen is not None and self.metrics_listen == self.listen:
            raise ValueError("metrics_listen: must not be the public listen address (anyone "
                             "who reaches the gateway could read its metrics)")
        return self

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        http_url(value, require_path_free=True)
        if URL(value).path not in ("", "/"):
            raise ValueError(f"{value!r} must be an origin without a path (serve the gateway at /)")
        # The form browsers send in Origin (lower case, no default port): sign-out's CSRF
        # check compares with it, and redirect_uri must match the IdP's registration.
        return str(URL(value).origin())

    @field_validator("trusted_proxies")
    @classmethod
    def _check_cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network (CIDR)") from None
        return value

    @field_validator("strip_request_headers")
    @classmethod
    def _check_header_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name (or a prefix ending in '*')")
        return value

    @property
    def proxy_login_starts_per_minute(self) -> int:
        if self.login_starts_per_minute_per_proxy is not None:
            return self.login_starts_per_minute_per_proxy
        return PROXY_LOGIN_START_FACTOR * self.login_starts_per_minute

    @property
    def host(self) -> str:
        return host_and_port(self.listen)[0]

    @property
    def port(self) -> int:
        return host_and_port(self.listen)[1]

    @cached_property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in self.trusted_proxies)


class OIDCConfig(FrozenModel):
    issuer: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    groups_claim: str = "groups"
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post"] = (
        "client_secret_basic"  # noqa: S105  (a method name, not a password)
    )
    timeout: Duration = 10.0
    clock_skew: Duration = 60.0
    # Send X-Forwarded-Email even when the IdP does not say the address is verified. Risky:
    # upstreams that key accounts by email can then be taken over by whoever the IdP lets
    # pick that address.
    allow_unverified_email: bool = False
    # Re-read the identity claims from userinfo at every refresh (for IdPs that put groups
    # only in userinfo, or return no ID token on refresh).
    refresh_userinfo: bool = False

    @field_validator("issuer")
    @classmethod
    def _check_issuer(cls, value: str) -> str:
        # OIDC Discovery §4.3: the issuer is compared exactly, so keep it as written.
        http_url(value, require_path_free=True)
        return value

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in value:
            raise ValueError("must include 'openid'")
        return value

    @model_validator(mode="after")
    def _one_secret_source(self) -> OIDCConfig:
        if (self.client_secret is None) == (self.client_secret_file is None):
            raise ValueError("set exactly one of client_secret (from ${VAR}) or client_secret_file")
        return self

    @field_validator("client_secret")
    @classmethod
    def _secret_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty ${VAR} would pass here and fail the first login at the IdP with a 502.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty (is its environment variable set to nothing?)")
        return value

    def secret(self) -> str:
        """The client secret, read from the file on demand so rotation needs no config change.
        ConfigError when the file is empty; OSError when it cannot be read."""
        if self.client_secret is not None:
            return self.client_secret.get_secret_value()
        assert self.client_secret_file is not None
        secret = self.client_secret_file.read_text().strip()
        if not secret:
            raise ConfigError("oidc.client_secret_file", f"{self.client_secret_file} is empty")
        return secret


class RedisTLSConfig(FrozenModel):
    """TLS to Redis (rediss://, rediss+sentinel://, rediss+cluster://)."""

    ca_file: Path | None = None  # CA bundle to verify the server; default: the system's
    cert_file: Path | None = None  # client certificate, for servers that require one
    key_file: Path | None = None
    verify: bool = True  # false: no certificate check at all (a loud warning at startup)

    @model_validator(mode="after")
    def _pair(self) -> RedisTLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class SessionConfig(FrozenModel):
    store: str = "memory://"
    cookie_name: str = Field(default="gateway_session", pattern=r"^[A-Za-z0-9_\-]+$")
    cookie_secure: bool | None = None
    idle_timeout: Duration = 1800.0
    max_lifetime: Duration = 43200.0
    store_timeout: Duration = 2.0
    redis_tls: RedisTLSConfig = RedisTLSConfig()
    refresh_margin: NonNegativeDuration = 60.0
    refresh_grace: NonNegativeDuration = 0.0
    # No session refreshes (or tries to) more often than this, whatever the IdP's tokens live.
    refresh_min_interval: NonNegativeDuration = 10.0
    sign_out_methods: tuple[Literal["GET", "POST"], ...] = Field(
        default=("GET", "POST"), min_length=1)
    frontchannel_logout: bool = False
    # The namespace of every key in the store; default: derived from issuer and client_id, so
    # gateways of different apps sharing one Redis never see each other's sessions.
    key_prefix: str | None = None
    # Serve a session loaded in the last cache_ttl from this process's memory (no store round
    # trip), while the store's invalidation channel is up: any process's revocation drops it
    # everywhere at once (sessions/cache.py). 0: off. At most 10s.
    cache_ttl: NonNegativeDuration = 2.0
    # Also keep the registry's indexes as the release before the bucketed indexes did, for
    # its replicas during a rolling upgrade (sessions/keys.py); off once they are all gone.
    write_legacy_indexes: bool = False

    @field_validator("cache_ttl")
    @classmethod
    def _check_cache_ttl(cls, value: float) -> float:
        if value > 10.0:
            raise ValueError("at most 10s: it bounds how late a revocation lands should the "
                             "invalidation channel die without a word")
        return value
    # The cookies' Domain (default: none, so only public_url's host gets them): a parent
    # domain, for sites on sibling hosts behind a forward-auth front.
    cookie_domain: str | None = None

    @field_validator("cookie_domain")
    @classmethod
    def _check_cookie_domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        domain = value.strip().lower().removeprefix(".")
        labels = domain.split(".")
        if not all(_DOMAIN_LABEL.fullmatch(label) for label in labels) or len(labels) < 2:
            raise ValueError(f"{value!r} is not a domain under which cookies can be shared "
                             "(example.com)")
        return domain

    @field_validator("key_prefix")
    @classmethod
    def _check_key_prefix(cls, value: str | None) -> str | None:
        if value is not None and not PREFIX_SHAPE.fullmatch(value):
            raise ValueError(f"{value!r} must be 1-64 of A-Z a-z 0-9 . _ : - (no braces: they "
                             "are Redis Cluster hash tags)")
        return value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        parse_store_url(value)
        return value

    @property
    def store_location(self) -> StoreLocation:
        return parse_store_url(self.store)

    @property
    def binding_cookie_name(self) -> str:
        """Binds a login to the browser that started it; stripped before the upstream."""
        return self.cookie_name + "_login"

    @property
    def gateway_cookies(self) -> frozenset[str]:
        """The gateway's own cookies: never sent to an upstream."""
        return frozenset({self.cookie_name, self.binding_cookie_name})

    @model_validator(mode="after")
    def _lifetimes(self) -> SessionConfig:
        if self.idle_timeout > self.max_lifetime:
            raise ValueError("idle_timeout must not be longer than max_lifetime")
        return self


class APIConfig(FrozenModel):
    """api: how bearer tokens are checked on routes with `bearer: true` (RFC 6750, 9068,
    7662)."""

    audiences: tuple[str, ...] = ()  # a token's aud must hold one of these
    # RFC 9068 types JWT access tokens at+jwt; `any` also takes "JWT" or no typ (Keycloak,
    # Entra ID), refusing tokens with ID-token-only claims.
    token_typ: Literal["at+jwt", "any"] = "at+jwt"  # noqa: S105  (a JOSE typ, no secret)
    # RFC 7662: ask the IdP about tokens that are not JWTs (opaque tokens).
    introspection: bool = False
    introspection_endpoint: str | None = None  # default: the discovery document's
    introspection_cache: NonNegativeDuration = 60.0  # and never past the token's exp

    @field_validator("audiences")
    @classmethod
    def _check_audiences(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not audience.strip() for audience in value):
            raise ValueError("an audience is empty")
        return value

    @field_validator("introspection_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        return http_url(value, require_path_free=True) if value is not None else None


class LoggingConfig(FrozenModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Config(FrozenModel):
    server: ServerConfig
    oidc: OIDCConfig
    session: SessionConfig = SessionConfig()
    policies: dict[str, PolicyConfig] = Field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = Field(min_length=1)
    api: APIConfig = APIConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("policies")
    @classmethod
    def _policy_names(cls, value: dict[str, PolicyConfig]) -> dict[str, PolicyConfig]:
        for name in value:
            if not POLICY_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a policy name (letters, digits, '_', '.', "
                                 "'-'; at most 64)")
        return value

    @model_validator(mode="after")
    def _policies_exist(self) -> Config:
        for route in self.routes:
            if route.policy is not None and route.policy not in self.policies:
                known = ", ".join(sorted(self.policies)) or "none are defined"
                raise ValueError(f"routes[{route.name}].policy: no policy named "
                                 f"{route.policy!r} under policies ({known})")
        return self

    @model_validator(mode="after")
    def _workers_share_the_store(self) -> Config:
        if self.server.workers != 1 and self.session.store_location.kind == "memory":
            raise ValueError("server.workers: more than one worker needs a shared session "
                             "store (session.store: redis://...): memory:// is per process, "
                             "so each worker would know only its own sessions")
        return self

    @model_validator(mode="after")
    def _cookie_domain_covers_public_url(self) -> Config:
        domain = self.session.cookie_domain
        host = URL(self.server.public_url).host or ""
        if domain is not None and host != domain and not host.endswith("." + domain):
            raise ValueError(f"session.cookie_domain: {domain!r} does not cover "
                             f"server.public_url's host {host!r}; browsers would drop the "
                             "session cookie")
        return self

    @model_validator(mode="after")
    def _bearer_audiences(self) -> Config:
        for route in self.routes:
            if route.bearer and not (route.audiences or self.api.audiences):
                raise ValueError(f"routes[{route.name}].bearer: needs api.audiences (or the "
                                 "route's audiences): the tokens' aud must name this API, or "
                                 "any token from the IdP would do")
        return self

    def rules_of(self, route: RouteConfig) -> Rules:
        """The route's allow rules, deny rules and where they are written."""
        return rules_of(route, self.policies)

    @field_validator("routes")
    @classmethod
    def _unique_names(cls, value: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
        seen: set[str] = set()
        for route in value:
            if route.name in seen:
                raise ValueError(f"duplicate route name {route.name!r}")
            seen.add(route.name)
        return value

    @field_validator("routes")
    @classmethod
    def _no_shadowed_routes(cls, value: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
        """Two routes that claim the same requests: only the first would ever match, and
        with case_insensitive the one that wins could be the wrong policy for an IIS app."""
        for index, route in enumerate(value):
            for earlier in value[:index]:
                if earlier.host != route.host:
                    continue
                same = earlier.path_prefix == route.path_prefix or (
                    (earlier.case_insensitive or route.case_insensitive)
                    and earlier.path_prefix.lower() == route.path_prefix.lower())
                if same:
                    raise ValueError(f"routes {earlier.name!r} and {route.name!r} have the same "
                                     f"host and path_prefix (ignoring case on a "
                                     f"case_insensitive route): only one could ever match")
        return value

    @property
    def store_keys(self) -> Keys:
        """Where this deployment's records live in the store (sessions/keys.py)."""
        return Keys.for_deployment(self.oidc.issuer, self.oidc.client_id, self.session.key_prefix)

    @cached_property
    def public_host(self) -> str:
        """public_url's host[:port], the Host upstreams get by default (kept: a proxied
        request may ask for it)."""
        return str(URL(self.server.public_url).host_port_subcomponent)

    @property
    def redirect_uri(self) -> str:
        return self.server.public_url + "/oauth2/callback"

    @property
    def cookie_secure(self) -> bool:
        if self.session.cookie_secure is not None:
            return self.session.cookie_secure
        return self.server.public_url.startswith("https://")


def _expand(node: object, environ: Mapping[str, str], path: str) -> object:
    if isinstance(node, dict):
        return {k: _expand(v, environ, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, environ, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(path, f"environment variable {name} is not set")
            return environ[name]

        return _ENV_REF.sub(substitute, node)
    return node


def _check_secret_source(raw: Mapping[str, object]) -> None:
    # Secrets only from the environment or files: a literal in YAML ends up in git and backups.
    oidc = raw.get("oidc")
    if isinstance(oidc, dict):
        secret = oidc.get("client_secret")
        if isinstance(secret, str) and not _ENV_REF.fullmatch(secret.strip()):
            raise ConfigError(
                "oidc.client_secret",
                "must come from the environment, like \"${GW_CLIENT_SECRET}\", "
                "or use oidc.client_secret_file",
            )


def _key_of(loc: tuple[int | str, ...], raw: Mapping[str, object]) -> str:
    parts: list[str] = []
    node: object = raw
    for item in loc:
        if isinstance(item, int):
            name = node[item].get("name") if isinstance(node, list) and item < len(node) and \
                isinstance(node[item], dict) else None
            parts[-1] += f"[{item}]" if not name else f"[{name}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(item)
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


_SECRET_NOT_NEEDED = "not-needed-by-this-command"  # noqa: S105  (a stand-in, not a secret)


def _without_secret(raw: Mapping[str, object], environ: Mapping[str, str]) -> Mapping[str, str]:
    """The environment with a stand-in for the client secret's variable, for commands that
    never talk to the IdP (the sessions admin commands): ops can run them without it."""
    oidc = raw.get("oidc")
    secret = oidc.get("client_secret") if isinstance(oidc, dict) else None
    match = _ENV_REF.fullmatch(secret.strip()) if isinstance(secret, str) else None
    if match and not environ.get(match.group(1)):
        return {**environ, match.group(1): _SECRET_NOT_NEEDED}
    return environ


def parse(raw: object, environ: Mapping[str, str], *, secret_needed: bool = True) -> Config:
    """Validate an already-parsed YAML document."""
    if not isinstance(raw, dict):
        raise ConfigError("", "the configuration must be a YAML mapping")
    _check_secret_source(raw)
    if not secret_needed:
        environ = _without_secret(raw, environ)
    expanded = _expand(raw, environ, "")
    assert isinstance(expanded, dict)
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = _key_of(tuple(error["loc"]), expanded)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "is required"
        raise ConfigError(key or "(top level)", message) from None


def load(path: str | Path, environ: Mapping[str, str], *, secret_needed: bool = True) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("", f"{path} is not valid YAML{where}") from None
    return parse(raw, environ, secret_needed=secret_needed)
