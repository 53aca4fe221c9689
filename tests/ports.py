"""Ports for the servers the tests start: free, outside the kernel's ephemeral range, and never
handed out twice in one run.

Binding port 0 and closing the socket hands back a port from the ephemeral range, which any
outgoing connection (the suite makes thousands) may take before the test's server binds it:
an occasional "address already in use". Ports from below that range can only be taken by
another listener, which the bind probe here sees.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 20000
_given: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(*, also: int = 0) -> int:
    """A port on 127.0.0.1 that nobody listens on now; with `also`, port + `also` is free too
    (Redis Cluster's bus port)."""
    highest = _ephemeral_start() - also
    for _ in range(500):
        port = random.randrange(_LOWEST, highest)  # noqa: S311  (a port number, not a secret)
        candidates = (port, port + also) if also else (port,)
        if any(candidate in _given for candidate in candidates):
            continue
        try:
            for candidate in candidates:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        _given.update(candidates)
        return port
    raise RuntimeError(f"no free port between {_LOWEST} and {highest}")
