"""Headers that cross the gateway, in both directions.

Pure: takes a mapping and plain values, returns a new CIMultiDict; never imports aiohttp.web.
SECURITY: the identity headers are the upstream's only source of truth about the user, so every
client-sent spelling of them is removed on every route (gunicorn drops names with "_", many PHP
and WSGI stacks fold "_" into "-": both spellings are stripped). So are the identity headers of
the login proxies an upstream may be migrating from (mod_auth_openidc, oauth2-proxy, Pomerium,
Authelia and the REMOTE_USER conventions), which it may still read, and any names the operator
lists in server.strip_request_headers.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from multidict import CIMultiDict, MultiMapping
from yarl import URL

from gateway.identity import Identity, ascii_lower, email_address
from gateway.routing import Route

# RFC 9110 §7.6.1: hop-by-hop fields, plus any field named in Connection.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
USER = "X-Forwarded-User"
EMAIL = "X-Forwarded-Email"
PREFERRED_USERNAME = "X-Forwarded-Preferred-Username"
GROUPS = "X-Forwarded-Groups"
ACCESS_TOKEN = "X-Forwarded-Access-Token"  # noqa: S105  (a header name)
ID_TOKEN = "X-Forwarded-Id-Token"  # noqa: S105  (a header name)
_IDENTITY = frozenset({
    # ours (and oauth2-proxy's)
    "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username",
    "x-forwarded-groups", "x-forwarded-access-token",
    # oauth2-proxy's legacy name; Authelia's; the REMOTE_USER conventions; Grafana's
    # auth-proxy default
    "gap-auth", "remote-user", "remote-groups", "remote-email", "remote-name",
    "x-remote-user", "x-remote-group", "x-email", "x-user", "x-authenticated-user",
    "x-webauth-user",
})
# mod_auth_openidc (OIDC_CLAIM_*, OIDC_access_token, OIDC_id_token, ...), oauth2-proxy
# (X-Auth-Request-*), Pomerium (X-Pomerium-Claim-*, X-Pomerium-Jwt-Assertion), AWS ALB
# (X-Amzn-Oidc-*), Google IAP (X-Goog-Authenticated-User-*, X-Goog-Iap-Jwt-Assertion),
# Cloudflare Access (Cf-Access-*), Azure App Service (X-MS-Client-Principal*).
_IDENTITY_PREFIXES = ("oidc-", "x-auth-request-", "x-pomerium-", "x-amzn-oidc-",
                      "x-goog-authenticated-user-", "x-goog-iap-", "cf-access-",
                      "x-ms-client-principal")
_FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                         "x-forwarded-prefix", "x-forwarded-port", "x-real-ip", "forwarded"})
# Identities whose headers a route's RequestRules keeps (then it starts again).
IDENTITIES_KEPT = 1024
# Never passed on from any client (RequestRules says why).
_DROPPED = HOP_BY_HOP | {"cookie", "expect", "host"}
_DROPPED_UNTRUSTED = _DROPPED | _FORWARDING


@dataclass(frozen=True, slots=True)
class Stripped:
    """Request header names no client may send upstream, compared normalised (lower case,
    '_' read as '-'): exact names, and prefixes."""

    names: frozenset[str] = _IDENTITY
    prefixes: tuple[str, ...] = _IDENTITY_PREFIXES

    @classmethod
    def with_extra(cls, extra: Iterable[str]) -> Stripped:
        """The built-in set plus the operator's names; a trailing '*' makes a prefix."""
        names, prefixes = set(_IDENTITY), list(_IDENTITY_PREFIXES)
        for name in extra:
            if name.endswith("*"):
                prefixes.append(_normalise(name[:-1]))
            else:
                names.add(_normalise(name))
        return cls(frozenset(names), tuple(prefixes))

    def __contains__(self, normalised: str) -> bool:
        return normalised in self.names or normalised.startswith(self.prefixes)


DEFAULT_STRIPPED = Stripped()


class ClientInfo(NamedTuple):
    """What the gateway knows about the connection, for the X-Forwarded-* headers (a named
    tuple: one is made per proxied request)."""

    ip: str
    scheme: str
    host: str
    trusted: bool  # the peer is a trusted proxy whose X-Forwarded-* may be kept


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    if not trusted:  # the default: nothing to parse the address for
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # a Unix socket peer, or garbage in X-Forwarded-For
        return False
    return any(ip in network for network in trusted)


def client_address(peer: str, forwarded_for: Iterable[str], trusted: Sequence[Network]) -> str:
    """Who the client is: the peer, or, behind trusted proxies, the right-most
    X-Forwarded-For hop that is not one of them (hops further left are client-supplied)."""
    return client_and_reporter(peer, forwarded_for, trusted)[0]


def client_and_reporter(peer: str, forwarded_for: Iterable[str],
                        trusted: Sequence[Network]) -> tuple[str, tuple[str, ...]]:
    """The client's address, and the trusted addresses that vouched for it: the peer and
    every trusted hop between it and the client (none when the peer is the client).

    Any of them may in fact be a client whose own address falls inside trusted_proxies, and
    then every address left of it is whatever it wrote. Nothing here can tell which; but
    whichever it is, its own address is among the vouchers, since the hop to its right (or
    the connection itself) recorded it. So a limit counted against every voucher always
    reaches the one address such a client cannot choose."""
    if not is_trusted(peer, trusted):
        return peer, ()
    hops = [_without_port(hop.strip())
            for value in forwarded_for for hop in value.split(",") if hop.strip()]
    vouchers = [peer]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop, tuple(vouchers)
        vouchers.append(hop)
    if not hops:
        return peer, ()
    return hops[0], tuple(vouchers[:-1])


def _without_port(hop: str) -> str:
    """Some proxies (Azure Application Gateway) write `1.2.3.4:5678` or `[2001:db8::1]:443`;
    the port changes per connection, the address is the client."""
    if hop.startswith("[") and "]" in hop:
        return hop[1:hop.index("]")]
    host, sep, port = hop.rpartition(":")
    return host if sep and "." in host and ":" not in host and port.isdigit() else hop


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def _and_listed(names: frozenset[str], headers: MultiMapping[str]) -> frozenset[str]:
    """`names` and the field names the Connection header lists (hop-by-hop, RFC 9110
    §7.6.1), normalised."""
    if "Connection" not in headers:
        return names
    values = headers.getall("Connection")
    if len(values) == 1:
        return _and_listed_in(names, values[0])
    return names.union(*(_and_listed_in(frozenset(), value) for value in values))


@functools.lru_cache(maxsize=256)
def _and_listed_in(names: frozenset[str], value: str) -> frozenset[str]:
    """Kept for the few pairs that recur: a route's names and an upstream's `keep-alive` on
    every response, or a browser's on every request."""
    return names | {_normalise(token.strip()) for token in value.split(",") if token.strip()}


def _without_cookies(values: Iterable[str], drop: frozenset[str]) -> str:
    kept = []
    for value in values:
        for pair in value.split(";"):
            name = pair.split("=", 1)[0].strip()
            if name and name not in drop:
                kept.append(pair.strip())
    return "; ".join(kept)


@dataclass(frozen=True, slots=True)
class RequestRules:
    """What one route does to the request headers it sends upstream, worked out once per
    config (Snapshot.build): per request, what is left is one set lookup per client header
    and one list made into the upstream's CIMultiDict.

    `skip` holds every name, normalised (lower case, '_' read as '-'), that no client header
    may pass under: hop-by-hop fields, the cookie header (rebuilt without the gateway's own
    cookies), Expect (answered by the gateway itself, after the session check), Host (set for
    the upstream), the identity headers in every spelling, the operator's stripped names, and
    every name the route sets itself (its credentials, routes[].headers, X-Request-ID,
    X-Forwarded-Prefix), whether or not it has a value to send this time. From a peer that is
    not a trusted proxy, the forwarding headers too (the gateway writes its own)."""

    route: Route
    skip: frozenset[str]  # from a trusted proxy
    skip_untrusted: frozenset[str]  # from anyone else
    prefixes: tuple[str, ...]  # stripped name prefixes, normalised
    gateway_cookies: frozenset[str]
    fixed: tuple[tuple[str, str], ...]  # sent on every request: X-Forwarded-Prefix
    identity_overridden: frozenset[str]  # default identity headers routes[].headers replace
    unverified_email: bool
    credentials: bool  # the route sends a credential or a header of its own
    # Identity headers by the Identity object they were made for (id -> (it, headers)).
    _sent: dict[int, tuple[Identity, tuple[tuple[str, str], ...]]] = dataclasses.field(
        default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, route: Route, *, gateway_cookies: frozenset[str],
              stripped: Stripped = DEFAULT_STRIPPED,
              unverified_email: bool = False) -> RequestRules:
        config = route.config
        sets: list[str] = ["X-Request-ID"]
        # SECURITY: on a protected route the client's own Authorization is dropped unless
        # the route asks to pass it: nginx and Apache set REMOTE_USER from any Basic header,
        # unchecked, so `curl -u admin:x` would name its own user to an app that trusts
        # REMOTE_USER. A route that passes a credential claims the header names even when
        # there is none to send.
        if config.pass_authorization_header or config.pass_basic_auth or (
                not route.access.public and not config.pass_client_authorization):
            sets.append("Authorization")
        if config.pass_access_token:
            sets.append(ACCESS_TOKEN)
        if config.pass_id_token:
            sets.append(ID_TOKEN)
        sets.extend(name for name, _ in route.claim_headers)
        fixed: tuple[tuple[str, str], ...] = ()
        if config.strip_prefix and route.prefix != "/":
            fixed = (("X-Forwarded-Prefix", route.prefix),)
            sets.append("X-Forwarded-Prefix")
        claimed = frozenset(_normalise(name) for name in sets)
        return cls(route, _DROPPED | stripped.names | claimed,
                   _DROPPED_UNTRUSTED | stripped.names | claimed, stripped.prefixes,
                   gateway_cookies, fixed,
                   claimed & {USER.lower(), EMAIL.lower(), PREFERRED_USERNAME.lower(),
                              GROUPS.lower()}, unverified_email,
                   bool(config.pass_authorization_header or config.pass_basic_auth
                        or config.pass_access_token or config.pass_id_token
                        or route.claim_headers))

    def for_upstream(self, headers: MultiMapping[str], identity: Identity | None,
                     client: ClientInfo, *, access_token: str | None = None,
                     id_token: str | None = None, host: str | None = None,
                     request_id: str | None = None) -> CIMultiDict[str]:
        """The request headers to send upstream for `identity` (None: nobody's), with its
        tokens where the route passes them. `host`: the Host to send (None: the upstream
        URL's), always first (RFC 9112 §3.2). `request_id` goes as X-Request-ID."""
        skip = _and_listed(self.skip if client.trusted else self.skip_untrusted, headers)
        prefixes = self.prefixes
        kept = [("Host", self.route.upstream.host if host is None else host)]
        forwarded_for = proto = forwarded_host = None  # a trusted proxy's, kept
        for field, content in headers.items():
            normalised = field.lower().replace("_", "-")  # _normalise, inline
            if normalised in skip or normalised.startswith(prefixes):
                continue
            if normalised in _FORWARDING:  # only a trusted proxy's get here
                if normalised == "x-forwarded-for":  # several lines are one list (RFC 9110)
                    forwarded_for = content if forwarded_for is None \
                        else f"{forwarded_for}, {content}"
                    continue  # sent below as one line, with the peer added
                proto = content if normalised == "x-forwarded-proto" else proto
                forwarded_host = content if normalised == "x-forwarded-host" else forwarded_host
            kept.append((field, content))
        if "Cookie" in headers:
            cookie = _without_cookies(headers.getall("Cookie"), self.gateway_cookies)
            if cookie:
                kept.append(("Cookie", cookie))
        kept.append(("X-Forwarded-For",
                     f"{forwarded_for}, {client.ip}" if forwarded_for else client.ip))
        if proto is None:
            kept.append(("X-Forwarded-Proto", client.scheme))
        if forwarded_host is None:
            kept.append(("X-Forwarded-Host", client.host))
        if request_id is not None:
            kept.append(("X-Request-ID", request_id))
        kept.extend(self.fixed)
        if identity is not None:
            kept.extend(self._identity_headers(identity))
        if self.credentials:
            kept.extend(self._credentials(identity, access_token, id_token))
        return CIMultiDict(kept)

    def _identity_headers(self, identity: Identity) -> tuple[tuple[str, str], ...]:
        """identity_headers, less those the route sends its own of. Kept by the Identity
        object itself: a signed-in user's requests share the session cache's, and hashing
        and comparing an Identity (functools' cache) costs more than the lookup here. The
        entry holds the object, so its id cannot be another's while kept."""
        kept = self._sent.get(id(identity))
        if kept is not None and kept[0] is identity:
            return kept[1]
        sent = identity_headers(identity, unverified_email=self.unverified_email)
        if self.identity_overridden:  # a route's own header wins over the default one
            sent = tuple(pair for pair in sent if pair[0].lower() not in self.identity_overridden)
        if len(self._sent) >= IDENTITIES_KEPT:
            self._sent.clear()
        self._sent[id(identity)] = (identity, sent)
        return sent

    def _credentials(self, identity: Identity | None, access_token: str | None,
                     id_token: str | None) -> list[tuple[str, str]]:
        """What the route sends as the user's credentials, and the headers it adds
        (routes[].headers): only those with a value (the names are in `skip` either way)."""
        config, unverified = self.route.config, self.unverified_email
        values: list[tuple[str, str | None]] = []
        if config.pass_authorization_header:
            values.append(("Authorization", f"Bearer {access_token}" if access_token else None))
        elif config.pass_basic_auth:
            values.append(("Authorization", _basic(identity, config.basic_auth_user,
                                                   unverified)))
        if config.pass_access_token:
            values.append((ACCESS_TOKEN, access_token))
        if config.pass_id_token:
            values.append((ID_TOKEN, id_token))
        if identity is not None:
            values.extend((name, template.render(identity, unverified_email=unverified))
                          for name, template in self.route.claim_headers)
        return [(name, value) for name, value in values if value is not None]


def _basic(identity: Identity | None, claim: str, unverified_email: bool) -> str | None:
    """Basic base64(<user>:) for servers that map Basic auth to REMOTE_USER (RFC 7617: the
    user-id has no ':'); none when the identity lacks the claim, or when it is an email the
    IdP does not say is verified (as for X-Forwarded-Email)."""
    if identity is None or (claim == "email" and not identity.email_verified
                            and not unverified_email):
        return None
    user = getattr(identity, claim, None)
    if not isinstance(user, str) or not user or ":" in user:
        return None
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


@functools.lru_cache(maxsize=256)
def identity_headers(identity: Identity, *, unverified_email: bool = False
                     ) -> tuple[tuple[str, str], ...]:
    """SECURITY: the email goes upstream only when the IdP says it is verified (unless the
    operator opted out): upstreams that key accounts by email (Grafana's auth proxy, Gitea)
    would otherwise hand an account to whoever the IdP let pick that address.

    Kept for the last identities seen, by equality: a session the cache reloads from the
    store brings a new but equal Identity, whose email need not be checked (IDNA) again.
    The proxy also keeps the result per Identity object (RequestRules._identity_headers),
    which spares it the hashing and comparing this cache costs on every request."""
    values = {
        USER: identity.sub,
        EMAIL: _checked_email(identity.email)
        if identity.email and (identity.email_verified or unverified_email) else None,
        PREFERRED_USERNAME: identity.preferred_username,
        GROUPS: ",".join(identity.groups) if identity.groups else None,
    }
    return tuple((name, value) for name, value in values.items() if value)


def _checked_email(email: str) -> str | None:
    """SECURITY: the address policy compared (identity.email_address) is the one sent, so an
    upstream cannot read another mailbox into it: IDNA forms ('bücher.de', a soft hyphen,
    fullwidth letters) go as the ASCII domain; only ASCII case is kept as the IdP wrote it.
    Not an address at all: no header."""
    checked = email_address(email)
    if checked is None or ascii_lower(email) == checked:
        return email if checked else None
    return checked


_REWRITTEN = frozenset({"location", "content-location", "set-cookie"})
_PROTOCOL_RELATIVE = re.compile(r"[\t\n\r]*/[\t\n\r]*[/\\]")


def _under(path: str, prefix: str) -> bool:
    """Is `path` (perhaps with a query) already at or under `prefix`?"""
    return prefix == "/" or path == prefix or path.startswith((prefix + "/", prefix + "?"))


def _rewrite_location(value: str, origins: tuple[str, ...], prefix: str) -> str:
    """An absolute URL on the app's own origin (its upstream address, or the public one it
    built from the Host it was sent) becomes a path on ours, as nginx's proxy_redirect does,
    with the stripped route prefix put back unless the app already put it there (an app told
    its base path)."""
    origin = next((o for o in origins if value.lower().startswith(o.lower())
                   and value[len(o):len(o) + 1] in ("", "/", "?")), None)
    if origin is None:
        return value
    rest = value[len(origin):]
    path = rest if rest.startswith("/") else "/" + rest
    rewritten = path if _under(path, prefix) else prefix.rstrip("/") + path
    # SECURITY: "http://internal//evil.example/x" is harmless as sent, but "//evil.example/x"
    # (or "/\evil.example", also with a tab or newline inside, which browsers drop) is another
    # origin: such a value is kept as the upstream sent it.
    if _PROTOCOL_RELATIVE.match(rewritten):
        return value
    return rewritten


_COOKIE_PATH = re.compile(r"(;\s*path\s*=\s*)([^;]*)", re.IGNORECASE)
_COOKIE_DOMAIN = re.compile(r";\s*domain\s*=\s*([^;]*)", re.IGNORECASE)


def _prefixed(prefix: str, path: str) -> str:
    path = path.strip()
    if _under(path.rstrip("/") or "/", prefix):  # the app knows its base path: as it is
        return path
    return (prefix + path).rstrip("/") or "/"


def _rewrite_set_cookie(value: str, upstream_host: str | None, prefix: str) -> str:
    """Scope an upstream's cookie to where the browser sees the app (nginx's proxy_cookie_path
    and proxy_cookie_domain): under the stripped prefix (unless it already is), and on the
    gateway's host."""
    if prefix != "/":
        if _COOKIE_PATH.search(value):
            value = _COOKIE_PATH.sub(lambda m: m.group(1) + _prefixed(prefix, m.group(2))
                                     if m.group(2).strip().startswith("/") else m.group(0),
                                     value)
        else:
            value += f"; Path={prefix}"
    domain = _COOKIE_DOMAIN.search(value)
    if upstream_host and domain and domain.group(1).strip().lstrip(".").lower() == upstream_host:
        value = _COOKIE_DOMAIN.sub("", value)  # the internal host means nothing to browsers
    return value


# Server: the gateway answers with its own, as nginx does (the upstream's names its software
# and version, which is nobody's business).
_NOT_RETURNED = HOP_BY_HOP | {"server"}


@functools.lru_cache(maxsize=64)
def _host_of(url: str) -> str | None:
    """A route's upstream host, parsed once (the routes' upstreams are few)."""
    return URL(url).host


def from_upstream(headers: MultiMapping[str], *, origins: tuple[str, ...] = (),
                  prefix: str = "/", cookies_from: str | None = None) -> CIMultiDict[str]:
    """Response headers to send back to the client (duplicates such as Set-Cookie kept).

    Location and Content-Location on one of `origins` (the app's upstream address, and the
    public one) are rewritten to paths on the gateway (legacy apps redirect to their internal
    address). With `cookies_from` (the upstream's origin), Set-Cookie is scoped to the
    stripped prefix and stripped of the upstream's own Domain.
    """
    dropped = _and_listed(_NOT_RETURNED, headers)
    upstream_host = _host_of(cookies_from) if cookies_from else None
    kept: list[tuple[str, str]] = []  # made a CIMultiDict once: each add searches it
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in dropped:
            continue
        if lowered in _REWRITTEN:
            if lowered != "set-cookie":
                if origins:
                    value = _rewrite_location(value, origins, prefix)
            elif cookies_from:
                value = _rewrite_set_cookie(value, upstream_host, prefix)
        kept.append((name, value))
    return CIMultiDict(kept)
