"""The real upstreams of real_upstreams.py report what they really resolved.

These tests document the behaviour of Debian 12's nginx 1.22, Apache 2.4 and Tomcat 10.1 with
their default path handling, as found by running them: the expected values below were observed,
not wished for. They are the reference for gateway tests that compare the gateway's routing
decision with what the upstream behind it does with the same bytes. ``None`` means the server
refused the request itself (a 4xx of its own, without the two headers).
"""

from __future__ import annotations

import socket
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from real_upstreams import (
    Server,
    escape_like_apache,
    free_ports,
    resolved_path,
    send_raw,
    start_apache,
    start_nginx,
    start_tomcat,
)

pytestmark = pytest.mark.e2e

STARTERS: dict[str, Callable[[Path, list[int]], Server]] = {
    "nginx": start_nginx,
    "apache": start_apache,
    "tomcat": start_tomcat,
}


@pytest.fixture(scope="module", params=list(STARTERS))
def upstream(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Each server once per module, on two ports (as if behind two gateway routes)."""
    name: str = request.param
    server = STARTERS[name](tmp_path_factory.mktemp(name), free_ports(2))
    yield server
    server.stop()
    assert not server.alive(), f"{name} left processes behind after stop()"


def resolve(server: Server, target: bytes, port: int | None = None) -> bytes | None:
    """What `server` resolved `target` to, or None if it refused it; checks the port header."""
    port = server.ports[0] if port is None else port
    status, headers = send_raw(port, target)
    path = resolved_path(headers)
    if path is None:
        assert status >= 400, (status, headers)
        assert "x-seen-port" not in headers
        return None
    assert status == 200, (status, headers)
    assert headers["x-seen-port"] == str(port)
    return path


REFUSED = None

# (raw target, nginx, Apache, Tomcat): what each server resolved, observed.
CASES: list[tuple[bytes, bytes | None, bytes | None, bytes | None]] = [
    (b"/", b"/", b"/", b"/"),
    # dot segments
    (b"/a/b/../c", b"/a/c", b"/a/c", b"/a/c"),
    (b"/a/./b", b"/a/b", b"/a/b", b"/a/b"),
    (b"/a/b/..", b"/a/", b"/a/", b"/a"),
    (b"/a/b/...", b"/a/b/...", b"/a/b/...", b"/a/b/..."),
    (b"/..", REFUSED, REFUSED, REFUSED),
    (b"/../a", REFUSED, REFUSED, REFUSED),
    # encoded dots are decoded before dot-segment removal everywhere
    (b"/x/%2e%2e/y", b"/y", b"/y", b"/y"),
    (b"/x/%2E%2E/y", b"/y", b"/y", b"/y"),
    (b"/x/.%2e/y", b"/y", b"/y", b"/y"),
    (b"/a/b/%2e", b"/a/b/", b"/a/b/", b"/a/b"),
    (b"/%2e%2e/a", REFUSED, REFUSED, REFUSED),
    (b"/admin%2e", b"/admin.", b"/admin.", b"/admin."),
    (b"/admin.", b"/admin.", b"/admin.", b"/admin."),
    (b"/admin./users", b"/admin./users", b"/admin./users", b"/admin./users"),
    # double-encoding is decoded once
    (b"/%2541", b"/%41", b"/%41", b"/%41"),
    (b"/A%41", b"/AA", b"/AA", b"/AA"),
    # slashes: merged everywhere (Tomcat too); an encoded slash only nginx accepts
    (b"/a//b", b"/a/b", b"/a/b", b"/a/b"),
    (b"//a/b", b"/a/b", b"/a/b", b"/a/b"),
    (b"/a%2fb", b"/a/b", REFUSED, REFUSED),
    (b"/public/..%2fadmin", b"/admin", REFUSED, REFUSED),
    (b"/a/b/..%2f..%2fc", b"/c", REFUSED, REFUSED),
    # backslash: a plain character for nginx and Apache, refused by Tomcat
    (b"/a\\b", b"/a\\b", b"/a\\b", REFUSED),
    (b"/public/..%5cadmin", b"/public/..\\admin", b"/public/..\\admin", REFUSED),
    # path parameters: only Tomcat strips ;... (before decoding, so %3b is a character)
    (
        b"/admin;jsessionid=1/users",
        b"/admin;jsessionid=1/users",
        b"/admin;jsessionid=1/users",
        b"/admin/users",
    ),
    (b"/;/admin/users", b"/;/admin/users", b"/;/admin/users", b"/admin/users"),
    (b"/public/..;/admin", b"/public/..;/admin", b"/public/..;/admin", b"/admin"),
    (b"/admin/users;.css", b"/admin/users;.css", b"/admin/users;.css", b"/admin/users"),
    (b"/a;b/c;d/e", b"/a;b/c;d/e", b"/a;b/c;d/e", b"/a/c/e"),
    (b"/admin;x/../public", b"/public", b"/public", b"/public"),
    (b"/a/b/..;/..;/c", b"/a/b/..;/..;/c", b"/a/b/..;/..;/c", b"/c"),
    (b"/%2e;/a", b"/.;/a", b"/.;/a", b"/a"),
    (b"/admin%3b/users", b"/admin;/users", b"/admin;/users", b"/admin;/users"),
    (b"/public/..%3b/admin", b"/public/..;/admin", b"/public/..;/admin", b"/public/..;/admin"),
    (b"/a;%2f..%2f/b", b"/b", REFUSED, b"/a/b"),
    # '#': nginx cuts the path there (a fragment), Apache and Tomcat refuse it
    (b"/a/b/..#x", b"/a/", REFUSED, REFUSED),
    (b"/public#/../admin", b"/public", REFUSED, REFUSED),
    (b"/a%23b", b"/a#b", b"/a#b", b"/a#b"),
    # Tomcat's own 404 for its protected directories, in any case or spelling
    (b"/WEB-INF/web.xml", b"/WEB-INF/web.xml", b"/WEB-INF/web.xml", REFUSED),
    (b"/web-inf/web.xml", b"/web-inf/web.xml", b"/web-inf/web.xml", REFUSED),
    (b"/%57EB-INF;x/web.xml", b"/WEB-INF;x/web.xml", b"/WEB-INF;x/web.xml", REFUSED),
    # the query is not part of the path
    (b"/a?x=/../b", b"/a", b"/a", b"/a"),
    (b"/a%3fb", b"/a?b", b"/a?b", b"/a?b"),
    # spaces and control bytes
    (b"/admin%20", b"/admin ", b"/admin ", b"/admin "),
    (b"/a%20b", b"/a b", b"/a b", b"/a b"),
    (b"/a%0ab", b"/a\nb", b"/a\nb", b"/a\nb"),
    (b"/a%0db", b"/a\rb", b"/a\rb", b"/a\rb"),
    (b"/a%09b", b"/a\tb", b"/a\tb", b"/a\tb"),
    (b"/a\tb", REFUSED, REFUSED, REFUSED),
    (b"/a%00b", REFUSED, REFUSED, REFUSED),
    # non-ASCII: Tomcat wants valid UTF-8, percent-encoded
    (b"/caf%c3%a9", b"/caf\xc3\xa9", b"/caf\xc3\xa9", b"/caf\xc3\xa9"),
    (b"/caf\xc3\xa9", b"/caf\xc3\xa9", b"/caf\xc3\xa9", REFUSED),
    (b"/%ff", b"/\xff", b"/\xff", REFUSED),
    (b"/%c0%ae%c0%ae/a", b"/\xc0\xae\xc0\xae/a", b"/\xc0\xae\xc0\xae/a", REFUSED),
    # absolute-form: the path is taken from it; Tomcat wants its host to match Host
    (b"http://127.0.0.1/a/../b", b"/b", b"/b", b"/b"),
    (b"http://other.example/admin", b"/admin", b"/admin", REFUSED),
]


@pytest.mark.parametrize(("target", "nginx", "apache", "tomcat"), CASES)
def test_each_server_reports_what_it_resolved(
    upstream: Server,
    target: bytes,
    nginx: bytes | None,
    apache: bytes | None,
    tomcat: bytes | None,
) -> None:
    expected = {"nginx": nginx, "apache": apache, "tomcat": tomcat}[upstream.name]
    assert resolve(upstream, target) == expected


def test_the_port_header_is_the_port_the_request_arrived_on(upstream: Server) -> None:
    """Never the Host header's port: the gateway may forward any Host."""
    for port in upstream.ports:
        for host in ("127.0.0.1", "127.0.0.1:1", "other.example:8080"):
            status, headers = send_raw(port, "/route/check", host=host)
            assert (status, headers.get("x-seen-port")) == (200, str(port)), host


def test_every_byte_is_escaped_the_same_way_and_round_trips(upstream: Server) -> None:
    """Each byte, sent percent-encoded, comes back escaped exactly like Apache's ap_escape_uri,
    as a header of printable ASCII, and decodes to the byte. The bytes a server refuses are
    part of what is documented."""
    allowed = set(string.ascii_letters + string.digits + "%$-_.+!*'(),:;@&=/~")
    refused = []
    for byte in range(1, 256):
        target = b"/e%" + f"{byte:02x}".encode() + b"z"
        status, headers = send_raw(upstream.ports[1], target)
        value = headers.get("x-resolved-path")
        if value is None:
            assert status >= 400, (byte, status)
            refused.append(byte)
            continue
        assert status == 200, (byte, status)
        path = b"/e" + bytes([byte]) + b"z"
        assert value == escape_like_apache(path), (byte, value)
        assert set(value) <= allowed, value
        assert resolved_path(headers) == path
    expected_refused = {
        "nginx": [],
        "apache": [0x2F],  # AllowEncodedSlashes Off: 404
        "tomcat": [0x2F, 0x5C, *range(0x80, 0x100)],  # %2F, %5C, invalid UTF-8: 400
    }[upstream.name]
    assert refused == expected_refused


def test_multibyte_utf8_round_trips(upstream: Server) -> None:
    for text in ("é", "€", "😀", "ａｄｍｉｎ"):
        raw = text.encode()
        target = b"/" + "".join(f"%{b:02x}" for b in raw).encode()
        assert resolve(upstream, target) == b"/" + raw


@pytest.mark.parametrize("name", ["apache", "tomcat"])  # nginx retries bind() for 2.5 s
def test_a_server_that_cannot_listen_fails_fast_with_its_log(name: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = int(taken.getsockname()[1])
        with pytest.raises(RuntimeError, match=r"(?s)exited with status.*Address already in use"):
            STARTERS[name](tmp_path, [*free_ports(1), busy])
