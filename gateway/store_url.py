"""The session store URL forms, parsed once into a typed location.

    memory://                                              embedded, one instance
    redis://[[user]:password@]host[:port][/db]             one Redis server
    rediss://...                                           the same over TLS
    unix:///path/to/redis.sock[?db=N]                      a local socket
    redis+sentinel://[[user]:password@]h1[:p1],h2[:p2]/MASTER[/db]      Sentinel-managed
    rediss+sentinel://...                                  the same, TLS to the data nodes
    redis+cluster://[[user]:password@]h1[:p1],h2[:p2]      Redis Cluster (seed nodes)
    rediss+cluster://...                                   the same over TLS

Pure: no I/O. Used by config (validation, precise messages) and by sessions/redis.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from yarl import URL

Kind = Literal["memory", "redis", "unix", "sentinel", "cluster"]
_DEFAULT_PORTS = {"redis": 6379, "sentinel": 26379, "cluster": 6379}


@dataclass(frozen=True, slots=True)
class StoreLocation:
    kind: Kind
    url: str  # for kind redis/unix: the URL redis-py understands
    tls: bool = False
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    master: str | None = None
    db: int = 0


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, tail = item[1:].partition("]")
        port = tail.removeprefix(":") or str(default_port)
    elif item.count(":") == 1:
        host, port = item.split(":")
    else:
        host, port = item, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{item!r} is not HOST[:PORT]")
    return host, int(port)


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    return tuple(_host_port(item.strip(), default_port) for item in netloc.split(","))


def _multi_host(value: str, kind: Kind, tls: bool) -> StoreLocation:
    rest = value.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    if not at:
        hostlist, userinfo = netloc, ""
    username, _, password = userinfo.partition(":")
    hosts = _hosts(hostlist, _DEFAULT_PORTS[kind])
    parts = [p for p in path.split("/") if p]
    master, db = None, 0
    if kind == "sentinel":
        if not parts:
            raise ValueError("name the master: redis+sentinel://HOST:PORT,.../MASTER[/DB]")
        master = unquote(parts.pop(0))
    if parts:
        if not parts[0].isdigit() or len(parts) > 1:
            raise ValueError(f"{path!r}: expected a database number")
        db = int(parts[0])
    if kind == "cluster" and db:
        raise ValueError("Redis Cluster has only database 0")
    return StoreLocation(kind, value, tls, hosts, unquote(username) or None,
                         unquote(password) or None, master, db)


def parse_store_url(value: str) -> StoreLocation:
    """The store location, or ValueError with a message fit for `session.store: ...`."""
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if value == "memory://":
        return StoreLocation("memory", value)
    if scheme in ("redis", "rediss"):
        url = URL(value)
        if not url.host:
            raise ValueError(f"{scheme}:// needs a host")
        db = url.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"{url.path!r}: expected a database number")
        return StoreLocation("redis", value, tls=scheme == "rediss")
    if scheme == "unix":
        if not urlsplit(value).path:
            raise ValueError("unix:// needs a socket path")
        return StoreLocation("unix", value)
    for kind in ("sentinel", "cluster"):
        if scheme in (f"redis+{kind}", f"rediss+{kind}"):
            return _multi_host(value, kind, tls=scheme.startswith("rediss"))
    raise ValueError("use memory://, redis://, rediss://, unix://, redis+sentinel:// or "
                     "redis+cluster:// (see config.example.yaml)")
