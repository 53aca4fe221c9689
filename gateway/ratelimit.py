"""Rate limits shared by every replica through the store: sign-ins started per client address,
and each route's own `rate_limit`.

Each sign-in start stores a login attempt for ten minutes, so without a limit anyone could fill
the store with anonymous requests. Windows are fixed minutes, counted with one store round trip
on the login path only (never on the per-request path of a signed-in user). Addresses are the
client's as the trusted proxies report it; IPv6 clients are counted per /64, since one host
commonly holds a whole /64.

A client whose own address falls inside trusted_proxies is indistinguishable from a proxy, and
could write any X-Forwarded-For it likes, minting a fresh bucket per request. So a start whose
address came from X-Forwarded-For is also counted against every trusted address that vouched
for it (headers.client_and_reporter: the peer, and the trusted hops between it and the
client), each with a limit for all the clients behind it together
(server.login_starts_per_minute_per_proxy, by default 20 times the per-address limit). Among
them is always the one address such a client cannot choose, its own. The price: behind an
ordinary load balancer the balancer is a voucher, so 20 addresses starting sign-ins at the
full rate (or one forging client inside trusted_proxies) can hold up sign-ins through it for
the rest of the minute. Raise the limit (or set it to 0) for a front with many sign-ins a
minute, and list only real proxies in trusted_proxies.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re

from aiohttp import web

from gateway.errors import RateLimitedError, TooManyRequestsError
from gateway.headers import client_address
from gateway.routing import Route
from gateway.runtime import Runtime, Snapshot
from gateway.sessions.backends import Rate

WINDOW = 60.0  # seconds


def bucket(address: str) -> str:
    """The unit that is counted: an IPv4 address, an IPv6 /64, or (no address: a Unix socket
    peer, or a proxy's odd X-Forwarded-For entry) a digest of what there is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "other-" + hashlib.sha256(address.encode(errors="replace")).hexdigest()[:32]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


async def check_login_start(rt: Runtime, address: str, *, vouchers: tuple[str, ...]) -> None:
    """Count one sign-in start from `address`, and against each trusted address that vouched
    for it; TooManyRequestsError past any limit."""
    server = rt.config.server
    await _count(rt, bucket(address), server.login_starts_per_minute, "address")
    for voucher in dict.fromkeys(v for v in vouchers if v != address):
        await _count(rt, "proxy-" + bucket(voucher), server.proxy_login_starts_per_minute,
                     "proxy")


async def _count(rt: Runtime, name: str, limit: int, what: str) -> None:
    if limit == 0:
        return
    now = rt.clock()
    window = math.floor(now / WINDOW)
    count = await rt.sessions.count_login_start(name, window, WINDOW)
    if count > limit:
        retry_after = max(1, math.ceil((window + 1) * WINDOW - now))
        raise TooManyRequestsError(f"over {limit} sign-in starts per minute per {what}",
                                   retry_after=retry_after)


_POLICY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


async def check_route(request: web.Request, rt: Runtime, snapshot: Snapshot, route: Route,
                      user: str | None) -> dict[str, str]:
    """Count one allowed request against the route's rate_limit: per signed-in `user` (an
    anonymous request per address), per client address (as the trusted proxies report it,
    IPv6 per /64), or for the whole route. Past it: RateLimitedError (429). Returns the
    RateLimit fields for the response ({} on a route without a limit)."""
    limit = route.config.rate_limit
    if limit is None:
        return {}
    kind, who = limit.key, ""
    if kind == "user" and user is not None:
        who = user
    elif kind != "route":
        kind = "ip"
        who = bucket(client_address(request.remote or "",
                                    request.headers.getall("X-Forwarded-For", ()),
                                    snapshot.config.server.trusted_networks))
    rate = await rt.sessions.rate(route.name, kind, who, limit.requests, limit.per)
    fields = _fields(route, rate)
    if not rate.allowed:
        raise RateLimitedError(f"route {route.name}: over {limit.requests} per {limit.per:g}s "
                               f"per {kind}", retry_after=max(1, math.ceil(rate.retry_after)),
                               fields=fields)
    return fields


def _fields(route: Route, rate: Rate) -> dict[str, str]:
    """draft-ietf-httpapi-ratelimit-headers: the policy (quota q per window w seconds) and
    where this client stands (r remaining, t seconds until the quota is back; refused: until
    the next request would be let through)."""
    limit = route.config.rate_limit
    assert limit is not None
    name = route.name if _POLICY_NAME.fullmatch(route.name) else "route"
    until = rate.reset if rate.allowed else rate.retry_after
    return {"RateLimit-Policy": f'"{name}";q={limit.requests};w={math.ceil(limit.per)}',
            "RateLimit": f'"{name}";r={rate.remaining};t={math.ceil(until)}'}
