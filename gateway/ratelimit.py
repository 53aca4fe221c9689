"""A limit on sign-ins started per client address, shared by every replica through the store.

Each sign-in start stores a login attempt for ten minutes, so without a limit anyone could fill
the store with anonymous requests. Windows are fixed minutes, counted with one store round trip
on the login path only (never on the per-request path of a signed-in user). Addresses are the
client's as the trusted proxies report it; IPv6 clients are counted per /64, since one host
commonly holds a whole /64.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math

from gateway.errors import TooManyRequestsError
from gateway.runtime import Runtime

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


async def check_login_start(rt: Runtime, address: str) -> None:
    """Count one sign-in start from `address`; TooManyRequestsError past the limit."""
    limit = rt.config.server.login_starts_per_minute
    if limit == 0:
        return
    now = rt.clock()
    window = math.floor(now / WINDOW)
    key = f"gateway:login-rate:{{{bucket(address)}}}:{window}"
    count = await rt.sessions.backend.count(key, WINDOW)
    if count > limit:
        retry_after = max(1, math.ceil((window + 1) * WINDOW - now))
        raise TooManyRequestsError(f"over {limit} sign-in starts per minute",
                                   retry_after=retry_after)
