"""Canonical request paths and the route table.

One canonical form is decided here and used for both matching and forwarding, so the policy
that is checked is always the policy of the path the upstream will serve. Pure: never imports
aiohttp.web.

Canonical form (raw request path, before any decoding by the framework):
- percent-encoded unreserved characters (letters, digits, `-._~`) are decoded, so `%2e%2e` is `..`;
- dot segments are removed (RFC 3986 §5.2.4), so `/public/../admin` is `/admin`;
- runs of `/` are merged, as nginx's merge_slashes does;
- encoded `/`, `\\` and NUL, double-encoded dots/slashes, raw backslashes and control characters
  are refused: upstreams disagree on what they mean, so no meaning is safe.
Matching compares path segments without `;params`, because servlet containers route
`/admin;x=1` to `/admin`; routes marked case_insensitive compare them ignoring case, because
IIS-style upstreams serve `/ADMIN` as `/admin`.
"""

from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass
from typing import Literal

from gateway.config import AllowRules, RouteConfig
from gateway.errors import BadRequestError, URITooLongError

MAX_PATH_LENGTH = 8192  # longer paths are refused, as most servers do
_UNRESERVED = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_FORBIDDEN_ESCAPES = re.compile(r"%(2[fF]|5[cC]|00|25(2[eEfF]|5[cC]))")
_BAD_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")
_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    host: str | None
    prefix: str
    upstream: str
    auth: Literal["required", "public"]
    allow: AllowRules | None
    strip_prefix: bool
    preserve_host: bool
    connect_timeout: float
    read_timeout: float
    total_timeout: float | None
    rewrite_redirects: bool
    max_body_size: int | None
    retries: int
    pass_access_token: bool
    pass_authorization_header: bool
    case_insensitive: bool
    early_hints: bool

    @classmethod
    def from_config(cls, rc: RouteConfig) -> Route:
        return cls(rc.name, rc.host, rc.path_prefix, rc.upstream, rc.auth, rc.allow,
                   rc.strip_prefix, rc.preserve_host, rc.connect_timeout, rc.read_timeout,
                   rc.total_timeout, rc.rewrite_redirects, rc.max_body_size, rc.retries,
                   rc.pass_access_token, rc.pass_authorization_header, rc.case_insensitive,
                   rc.early_hints)

    @property
    def prefix_segments(self) -> list[str]:
        return self.prefix.split("/")[1:] if self.prefix != "/" else []

    def upstream_path(self, path: str) -> str:
        """The path sent upstream: with strip_prefix, minus the segments the prefix matched
        (their `;params` included, since matching ignored them)."""
        if not self.strip_prefix or self.prefix == "/":
            return path
        rest = path.split("/")[1 + len(self.prefix_segments):]
        return "/" + "/".join(rest)


def _decode_unreserved(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))


def _remove_dot_segments(path: str) -> str:
    output: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment not in (".", ""):
            output.append(segment)
    trailing = path.endswith(("/", "/.", "/..")) and bool(output)
    return "/" + "/".join(output) + ("/" if trailing else "")


def canonical_path(raw_path: str) -> str:
    """The one path the gateway matches and forwards; BadRequestError if there is none."""
    path = raw_path.split("?", 1)[0]
    if not path.startswith("/"):
        raise BadRequestError("request target is not an absolute path")
    if len(path) > MAX_PATH_LENGTH:
        raise URITooLongError(f"request path over {MAX_PATH_LENGTH} bytes")
    # SECURITY: encoded slashes/backslashes/NUL and double encoding smuggle path structure
    # past the matcher to upstreams that decode again.
    if _FORBIDDEN_ESCAPES.search(path) or _BAD_ESCAPE.search(path) or _CONTROL.search(path):
        raise BadRequestError("request path contains an encoded slash, backslash or control byte")
    decoded = _UNRESERVED.sub(_decode_unreserved, path)
    # SECURITY: servlet containers read "/..;x/" as "/../": a dot segment hidden behind
    # path parameters would climb out of a public prefix on the upstream.
    if any(segment.split(";", 1)[0] in (".", "..") for segment in decoded.split("/")
           if ";" in segment):
        raise BadRequestError("request path has a dot segment with ;parameters")
    return _remove_dot_segments(decoded)


def _match_segments(path: str) -> list[str]:
    return [segment.split(";", 1)[0] for segment in path.split("/")[1:]]


def _nested_in_case_insensitive(route: Route, table: tuple[Route, ...]) -> bool:
    """SECURITY: under a case_insensitive prefix the upstream ignores case, so a route nested
    in it must too, or /api/ADMIN would match the outer route and skip /api/admin's policy."""
    wanted = [_ascii_lower(s) for s in route.prefix_segments]
    return any(
        outer.case_insensitive and outer.host in (None, route.host)
        and wanted[: len(outer.prefix_segments)]
        == [_ascii_lower(s) for s in outer.prefix_segments]
        for outer in table)


def _ascii_lower(segment: str) -> str:
    # SECURITY: only A-Z fold: str.lower() maps the Kelvin sign to "k", so a non-ASCII path
    # could match an ASCII prefix the upstream never equates with it.
    return segment.translate(_ASCII_LOWER)


def _prefix_matches(route: Route, segments: list[str]) -> bool:
    wanted = route.prefix_segments
    got = segments[: len(wanted)]
    if route.case_insensitive:
        # SECURITY: IIS-style upstreams serve /ADMIN as /admin, so the route must claim it too,
        # or /ADMIN would fall through to a more permissive route.
        return [_ascii_lower(s) for s in got] == [_ascii_lower(w) for w in wanted]
    return got == wanted


def _host_rank(route_host: str | None, host: str) -> int:
    """0 = exact host, 1 = wildcard (longer suffix first), 2 = any host, -1 = no match."""
    if route_host is None:
        return 2
    if route_host.startswith("*."):
        return 1 if host.endswith(route_host[1:]) and len(host) > len(route_host) - 1 else -1
    return 0 if host == route_host else -1


class RouteTable:
    """Routes grouped by host specificity; within the best group, the longest prefix wins."""

    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        table = tuple(Route.from_config(rc) for rc in routes)
        self._routes = tuple(
            dataclasses.replace(route, case_insensitive=True)
            if not route.case_insensitive and _nested_in_case_insensitive(route, table)
            else route
            for route in table)

    def match(self, host: str, path: str) -> Route | None:
        host = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else host.lower()
        host = host.rstrip(".")
        segments = _match_segments(path)
        best: tuple[int, int, int] | None = None
        chosen: Route | None = None
        for route in self._routes:
            rank = _host_rank(route.host, host)
            if rank < 0 or not _prefix_matches(route, segments):
                continue
            host_len = len(route.host or "")
            key = (rank, -host_len, -len(route.prefix))
            if best is None or key < best:
                best, chosen = key, route
        return chosen
