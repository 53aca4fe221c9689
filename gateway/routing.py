"""Request targets in canonical form, and the route table.

One canonical form is decided here and used for both matching and forwarding, so the policy
that is checked is always the policy of the path the upstream will serve (proxy.py checks the
target it sends against it once more, just before sending). Pure: never imports aiohttp.web.

Accepted targets (anything else is refused with 400, or 414 when too long):
- the path has only RFC 3986 path characters (unreserved, sub-delims, `:`, `@`, `/` and
  `%XX` escapes): no raw `#` (the fragment an upstream URL builder would drop), no whitespace,
  no `\\`, no non-ASCII, none of `"<>[]^`{|}` (servlet containers refuse those too);
- the query has only visible ASCII and no `#`; it is passed on exactly as sent;
- no escape that changes structure on an upstream that decodes: `%2F`, `%5C`, `%00`, `%3B`,
  their double encodings (`%252F`, ...), and no byte sequence that is not UTF-8 once decoded
  (overlong forms such as `%C0%AE` are dots to some decoders);
- no segment that an upstream could read as another segment: a `;params` segment with an empty
  name (`/;/admin`: Tomcat strips the params and merges the slashes into `/admin`) or a dot
  name (`/..;/`: servlet containers read it as `/../`).
Canonical form: percent-encoded unreserved characters (letters, digits, `-._~`) are decoded,
so `%2e%2e` is `..`; dot segments are removed (RFC 3986 §5.2.4), so `/public/../admin` is
`/admin`; runs of `/` are merged, as nginx's merge_slashes does.

Matching compares path segments without `;params`, because servlet containers route
`/admin;x=1` to `/admin`. Routes marked case_insensitive compare them the way an IIS upstream
would: ignoring ASCII case, NTFS stream suffixes (`admin::$DATA`) and trailing dots and spaces
(`admin.`, `admin%20`); a path that only matches such a route through one of those forms, or
whose segment there cannot be compared at all (non-ASCII, which .NET folds in ways ASCII rules
cannot follow; 8.3 short names like `ADMINI~1`), is refused rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote, unquote_to_bytes

from gateway.config_routes import PolicyConfig, RouteConfig, RuleConfig, rules_of
from gateway.errors import BadRequestError, URITooLongError
from gateway.identity import ClaimTemplate, ascii_lower
from gateway.policy import Access, Rule
from gateway.upstreams import Upstream

MAX_PATH_LENGTH = 8192  # longer paths are refused, as most servers do
CACHED, CACHED_PATH_LENGTH = 4096, 256  # how many canonical paths and matches are kept
# RFC 3986 §3.3: path = *( "/" / pchar ); pchar = unreserved / pct-encoded / sub-delims / ":" / "@"
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_QUERY_CHARS = re.compile(r"[\x21-\x22\x24-\x7e]*")  # visible ASCII but '#'
_UNRESERVED = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_FORBIDDEN_ESCAPES = re.compile(r"%(2[fF]|5[cC]|00|3[bB]|25(2[eEfF]|5[cC]|3[bB]|00))")
_BAD_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")
_HIGH_ESCAPE = re.compile(r"%[89a-fA-F]")


class Target(NamedTuple):
    """A request target the gateway accepted: the canonical path it matches and forwards, and
    the query, passed on exactly as the client sent it (without the `?`; "" when none).
    (Made for every request: a named tuple, as pipeline.Principal is.)"""

    path: str
    query: str = ""

    def with_path(self, path: str) -> str:
        """The request target for `path` with this query: what an upstream is sent."""
        return path + ("?" + self.query if self.query else "")


def access_of(rc: RouteConfig, policies: Mapping[str, PolicyConfig] | None = None) -> Access:
    """The route's access rules (its own, or its named policy's) as the policy's types."""
    allow, deny, source = rules_of(rc, policies or {})
    return Access(
        public=rc.auth == "public",
        allow=tuple(_rule(r, f"{source}.allow[{i}]") for i, r in enumerate(allow))
        if allow is not None else None,
        deny=tuple(_rule(r, f"{source}.deny[{i}]") for i, r in enumerate(deny)),
        methods=frozenset(rc.methods) if rc.methods is not None else None,
        max_auth_age=rc.max_auth_age, acr_values=rc.acr_values,
        allow_preflight=rc.allow_preflight)


def _rule(rule: RuleConfig, label: str) -> Rule:
    return Rule(label, frozenset(rule.emails), frozenset(rule.email_domains),
                frozenset(rule.groups), tuple(rule.claims.items()), frozenset(rule.methods),
                rule.scopes)


@dataclass(frozen=True, slots=True)
class Route:
    """A route built once at startup: what it matches, who may use it (compiled for the
    policy) and the upstream it goes to (its pooled client session). Every other setting is
    read from its frozen config, never copied."""

    name: str
    host: str | None
    prefix: str
    prefix_segments: tuple[str, ...]  # computed once: matching runs on every request
    folded_segments: tuple[str, ...]  # the same, ASCII lower case
    case_insensitive: bool  # also true when nested under a case-insensitive route
    access: Access
    upstream: Upstream
    config: RouteConfig
    claim_headers: tuple[tuple[str, ClaimTemplate], ...]  # routes[].headers, parsed

    @classmethod
    def build(cls, rc: RouteConfig, upstream: Upstream,
              policies: Mapping[str, PolicyConfig] | None = None) -> Route:
        segments = tuple(rc.path_prefix.split("/")[1:]) if rc.path_prefix != "/" else ()
        return cls(rc.name, rc.host, rc.path_prefix, segments,
                   tuple(ascii_lower(s) for s in segments), rc.case_insensitive,
                   access_of(rc, policies), upstream, rc,
                   tuple((name, ClaimTemplate.parse(t)) for name, t in rc.headers.items()))

    def upstream_path(self, path: str) -> str:
        """The path sent upstream: with strip_prefix, minus the segments the prefix matched
        (their `;params` included, since matching ignored them)."""
        if not self.config.strip_prefix or self.prefix == "/":
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


def parse_target(raw_target: str) -> Target:
    """The target as the gateway matches and forwards it; BadRequestError if it has none."""
    path, _, query = raw_target.partition("?")
    # SECURITY: the query is not matched, but it is forwarded as sent: a '#' in it would be
    # dropped as a fragment by URL builders, so the upstream would get another target.
    if not _QUERY_CHARS.fullmatch(query):
        raise BadRequestError("request query has '#', whitespace or a non-ASCII byte")
    return Target(canonical_path(path), query)


def canonical_path(raw_path: str) -> str:
    """The one path the gateway matches and forwards; BadRequestError if there is none.

    A short path's answer is kept (the last CACHED of them): a site's paths repeat (its
    pages, assets and API calls), and the checks cost more than the lookup. A refused path
    is never kept, and a long one is never kept, so the cache's memory stays small."""
    path = raw_path.split("?", 1)[0]
    return _canonical_kept(path) if len(path) <= CACHED_PATH_LENGTH else _canonical(path)


def _canonical(path: str) -> str:
    if not path.startswith("/"):
        raise BadRequestError("request target is not an absolute path")
    if len(path) > MAX_PATH_LENGTH:
        raise URITooLongError(f"request path over {MAX_PATH_LENGTH} bytes")
    # Browsers send '[' and ']' raw in paths; they pass percent-encoded, as RFC 3986 wants.
    if "[" in path or "]" in path:
        path = path.replace("[", "%5B").replace("]", "%5D")
    # SECURITY: a raw '#' starts a fragment that URL builders drop (so /public/..# would
    # reach the upstream as /public/..), and whitespace, backslashes and non-ASCII are read
    # differently by every server: only plain RFC 3986 path characters pass.
    if not _PATH_CHARS.fullmatch(path):
        raise BadRequestError("request path has a character outside RFC 3986 path characters")
    if _BAD_ESCAPE.search(path):
        raise BadRequestError("request path has a broken escape")
    if _HIGH_ESCAPE.search(path) and not _is_utf8(unquote_to_bytes(path)):
        raise BadRequestError("request path decodes to bytes that are not UTF-8")
    decoded = _UNRESERVED.sub(_decode_unreserved, path)
    # SECURITY: encoded slashes, backslashes, NUL and ';', and double encoding, smuggle path
    # structure past the matcher to upstreams that decode (again). Checked once the
    # unreserved escapes are decoded, so '%25%32%66' cannot spell '%252f' past the check.
    if _FORBIDDEN_ESCAPES.search(decoded):
        raise BadRequestError("request path has an encoded '/', '\\', ';' or NUL, or a double "
                              "encoding")
    segments = decoded.split("/")
    for index, segment in enumerate(segments):
        name, params, _ = segment.partition(";")
        # SECURITY: servlet containers strip ';params' and then merge slashes or resolve dots:
        # "/;x/admin" becomes "/admin" and "/..;x/" becomes "/../" there. A last segment of
        # params only ("/app/;jsessionid=1", from Tomcat's encodeURL) is "/app/" everywhere.
        if params and (name in (".", "..") or (not name and index < len(segments) - 1)):
            raise BadRequestError("request path has a ;parameter segment with an empty or "
                                  "dot name")
    return _remove_dot_segments(decoded)


_canonical_kept = functools.lru_cache(maxsize=CACHED)(_canonical)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _match_segments(path: str) -> list[str]:
    """The segment names routes are matched on: without ;params (servlet containers route
    /admin;x=1 to /admin) and percent-decoded, as every upstream decodes before it maps a path
    (so /%40admin is /@admin); decoding cannot make a '/', '\\' or ';' here, since their
    escapes were refused."""
    names = [segment.split(";", 1)[0] for segment in path.split("/")[1:]]
    return [unquote(name) if "%" in name else name for name in names] if "%" in path else names


def host_covers(outer: str | None, inner: str | None) -> bool:
    """Does a route for host `outer` also take requests for `inner`'s hosts?"""
    if outer is None or outer == inner:
        return True
    return outer.startswith("*.") and inner is not None and inner.endswith(outer[1:])


def _nested_in_case_insensitive(route: Route, table: tuple[Route, ...]) -> bool:
    """SECURITY: under a case_insensitive prefix the upstream ignores case, so a route nested
    in it must too, or /api/ADMIN would match the outer route and skip /api/admin's policy."""
    return any(
        outer.case_insensitive and host_covers(outer.host, route.host)
        and route.folded_segments[: len(outer.folded_segments)] == outer.folded_segments
        for outer in table)


_NO_MATCH, _PLAIN, _IIS_FORM = 0, 1, 2
_SHORT_NAME = re.compile(r"[^~.]{1,6}~[0-9]+(\.[^.]{0,3})?")
_EIGHT_DOT_THREE = re.compile(r"[^.+,;=\[\] ]{1,8}(\.[^.+,;=\[\] ]{1,3})?")
_NOT_IN_SHORT_NAMES = re.compile(r"[.+,;=\[\] ]")
# ASP.NET's cookieless session and forms-auth segments, which it removes before it maps a
# path: /(S(x))/admin is /admin there (CVE-2023-36899).
_COOKIELESS = re.compile(r"\([A-Za-z]\(.*\)\)")


def _iis_equivalent(segment: str, folded: str) -> bool:
    """Could an IIS upstream (NTFS, .NET) serve `segment` as the prefix segment `folded`?"""
    # NTFS: "admin::$DATA" and "admin:x" are streams of "admin"; trailing dots and spaces are
    # dropped from file names ("admin." and "admin%20" are "admin").
    name = segment.partition(":")[0].rstrip(". ")
    if not name.isascii() or not name.isprintable():
        # .NET folds some non-ASCII letters to ASCII ones ('ı' to 'I', 'ſ' to 'S'): any
        # non-ASCII character may stand for the prefix's letter at its place; control
        # characters are read in ways nothing here can follow.
        return not name.isprintable() or (len(name) == len(folded) and all(
            not c.isascii() or ascii_lower(c) == f for c, f in zip(name, folded, strict=True)))
    if ascii_lower(name) == folded:
        return True
    return _SHORT_NAME.fullmatch(name) is not None and _may_be_short_for(name, folded)


def _may_be_short_for(short: str, folded: str) -> bool:
    """Could NTFS have made `short` (ADMINI~1, or the hashed AD3F2A~1) the 8.3 alias of
    `folded`? Only a name that is not 8.3 itself has an alias, and an alias always starts
    with the name's first character (invalid characters read as '_'). Nothing finer is
    checked: an alias's other characters depend on the directory's history."""
    if _EIGHT_DOT_THREE.fullmatch(folded):
        return False
    base = _NOT_IN_SHORT_NAMES.sub("_", folded.lstrip(". "))
    return bool(base) and ascii_lower(short[0]) == base[0]


def _prefix_match(route: Route, segments: list[str]) -> int:
    """_NO_MATCH, _PLAIN, or _IIS_FORM: a case_insensitive route matched only through a form
    the upstream may equate with its prefix (the caller refuses such a request)."""
    wanted = route.prefix_segments
    if len(segments) < len(wanted):
        return _NO_MATCH
    if not route.case_insensitive:
        return _PLAIN if all(s == w for s, w in zip(segments, wanted, strict=False)) \
            else _NO_MATCH
    # SECURITY: IIS-style upstreams serve /ADMIN, /admin. and /admin::$DATA as /admin, so the
    # route claims them all, or they would fall through to a more permissive route.
    kind = _PLAIN
    for segment, folded in zip(segments, route.folded_segments, strict=False):
        if ascii_lower(segment) == folded:
            continue
        if not _iis_equivalent(segment, folded):
            return _NO_MATCH
        kind = _IIS_FORM
    return kind


def _host_rank(route_host: str | None, host: str) -> int:
    """0 = exact host, 1 = wildcard (longer suffix first), 2 = any host, -1 = no match."""
    if route_host is None:
        return 2
    if route_host.startswith("*."):
        return 1 if host.endswith(route_host[1:]) and len(host) > len(route_host) - 1 else -1
    return 0 if host == route_host else -1


def host_name(host: str) -> str:
    """A Host header's name as routes match it: lower case, no port, no trailing dot."""
    host = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else host.lower()
    return host.rstrip(".")


class RouteTable:
    """Routes grouped by host specificity; within the best group, the longest prefix wins."""

    def __init__(self, routes: Iterable[Route]) -> None:
        table = tuple(routes)
        self._routes = tuple(
            dataclasses.replace(route, case_insensitive=True)
            if not route.case_insensitive and _nested_in_case_insensitive(route, table)
            else route
            for route in table)
        # Per table, so a reload's new table starts empty (see canonical_path).
        self._kept = functools.lru_cache(maxsize=CACHED)(self._match)

    @classmethod
    def build(cls, configs: Iterable[RouteConfig],
              upstream_for: Callable[[RouteConfig], Upstream],
              policies: Mapping[str, PolicyConfig] | None = None) -> RouteTable:
        return cls(Route.build(rc, upstream_for(rc), policies) for rc in configs)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def match(self, host: str, path: str) -> Route | None:
        """The route for `host` (a Host header) and a canonical `path`; None if none is.
        BadRequestError for a path only an IIS upstream's reading would match."""
        if len(path) + len(host) <= CACHED_PATH_LENGTH:
            return self._kept(host, path)
        return self._match(host, path)

    def _match(self, host: str, path: str) -> Route | None:
        host = host_name(host)
        segments = _match_segments(path)
        best: tuple[int, int, int] | None = None
        chosen: Route | None = None
        chosen_kind = _NO_MATCH
        for route in self._routes:
            rank = _host_rank(route.host, host)
            if rank < 0:
                continue
            if route.case_insensitive and any(_COOKIELESS.fullmatch(s) for s in segments):
                raise BadRequestError("path has an ASP.NET cookieless segment, which an IIS "
                                      f"upstream of route {route.name} would remove")
            kind = _prefix_match(route, segments)
            if kind == _NO_MATCH:
                continue
            host_len = len(route.host or "")
            key = (rank, -host_len, -len(route.prefix))
            if best is None or key < best:
                best, chosen, chosen_kind = key, route, kind
        if chosen_kind == _IIS_FORM:
            assert chosen is not None
            raise BadRequestError(f"path matches case_insensitive route {chosen.name} only in a "
                                  "form an IIS upstream may read as its prefix")
        return chosen
