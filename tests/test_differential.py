"""Differential test of the path invariant against real upstream servers: what the gateway
checked is what the upstream serves.

A `gateway run` process fronts nginx, Apache httpd and Tomcat (tests/real_upstreams.py), one host
name each. Every route of a host points at its own port of that host's server, and each server
reports the port a request arrived on (so: the route the gateway authorized) and the path it
resolved itself. For every target, either the gateway or the upstream refuses it, or the route
the gateway authorized is the route the upstream's resolved path falls in, by the routes'
own rules (longest prefix on whole segments, `;params` ignored). Targets come from hypothesis
(dot segments, `;`, `#`, `?`, escapes, case, slashes, backslashes, unicode) and from a fixed list
of known tricks, kept as regression cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from real_upstreams import Server, resolved_path, send_raw, start_apache, start_nginx, start_tomcat

pytestmark = pytest.mark.e2e

# The route table every host gets; all routes are public, so the gateway forwards whatever it
# accepts and the test sees the route it chose.
PREFIXES = {"root": "/", "admin": "/admin", "assets": "/admin/assets", "public": "/public",
            "at": "/@admin"}
SERVERS = {"nginx": start_nginx, "apache": start_apache, "tomcat": start_tomcat}


def route_of(path: bytes) -> str:
    """The route an upstream-resolved path falls in, by the route table's own rules; written
    here independently of gateway/routing.py so the two cannot share a mistake."""
    segments = [segment.split(b";", 1)[0] for segment in path.split(b"/")[1:]]
    best = "root"
    for name, prefix in PREFIXES.items():
        wanted = prefix.encode().split(b"/")[1:] if prefix != "/" else []
        if segments[: len(wanted)] == wanted and len(prefix) > len(PREFIXES[best]):
            best = name
    return best


@dataclass
class Front:
    """The gateway process and, per host, the route behind each upstream port."""

    port: int
    routes_by_port: dict[str, dict[int, str]]
    log: Path


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    directory = tmp_path_factory.mktemp("differential")
    servers: list[Server] = []
    routes: list[dict[str, object]] = []
    routes_by_port: dict[str, dict[int, str]] = {}
    try:
        for host, start in SERVERS.items():
            ports = [free_port() for _ in PREFIXES]
            servers.append(start(directory, ports))
            routes_by_port[host] = dict(zip(ports, PREFIXES, strict=True))
            routes += [{"name": f"{host}-{name}", "host": f"{host}.test", "path_prefix": prefix,
                        "upstream": f"http://127.0.0.1:{port}", "auth": "public", "retries": 0}
                       for (name, prefix), port in zip(PREFIXES.items(), ports, strict=True)]
        port = free_port()
        config = {  # no IdP is needed: every route is public
            "server": {"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
            "oidc": {"issuer": f"http://127.0.0.1:{free_port()}", "client_id": "differential",
                     "client_secret": "${SECRET}"},
            "routes": routes,
        }
        config_file = directory / "gateway.yaml"
        config_file.write_text(yaml.safe_dump(config))
        log = directory / "gateway.log"
        with log.open("wb") as stderr:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(config_file)],
                env={"SECRET": "s" * 32, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            _wait_for(port, gateway, log)
            yield Front(port, routes_by_port, log)
        finally:
            gateway.terminate()
            gateway.wait(timeout=15)
    finally:
        for server in servers:
            server.stop()


def _wait_for(port: int, gateway: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise AssertionError(f"gateway exited: {log.read_text()}")
        try:
            if send_raw(port, "/oauth2/healthz", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway did not start: {log.read_text()}")


def check(front: Front, host: str, target: str) -> str:
    """Send `target` (each char one byte) to `host` through the gateway; fail if the route the
    gateway authorized is not the one the upstream's resolved path falls in. Returns what
    happened, for the regression cases' own assertions."""
    status, headers = send_raw(front.port, target, host=f"{host}.test")
    resolved = resolved_path(headers)
    if resolved is None:
        return f"refused {status}"
    authorized = front.routes_by_port[host][int(headers["x-seen-port"])]
    assert route_of(resolved) == authorized, (
        f"{host}: {target!r} was authorized for route {authorized} but the upstream resolved "
        f"{resolved!r}, which is in route {route_of(resolved)}")
    return f"{authorized} {resolved.decode('latin-1')}"


# Known tricks, each a bypass somewhere: kept as fixed regression cases.
KNOWN_TRICKS = [
    "/admin/assets/..#", "/admin/assets/..#x", "/public/..#", "/public/..#/x",
    "/admin/assets/../#", "/public/..%23", "/admin/assets/..?#",
    "/;/admin/users", "/;jsessionid=x/admin/users", "/;x=1/admin", "//;/admin", "/public/;/..",
    "/public/..;/admin", "/public/.;/admin", "/public/..;x=1/admin", "/admin/assets/..;/..;/",
    "/public;/../admin", "/admin/assets;x/../", "/public/..%3b/admin", "/admin%3bx/assets",
    "/public/%2e%2e/admin", "/public/.%2e/admin", "/admin/assets/%2e%2e", "/%2e/admin",
    "/public/..%2fadmin", "/public%2f..%2fadmin", "/admin/assets/..%2f", "/admin%2fassets/..",
    "/public/..%5cadmin", "/public\\..\\admin", "/admin/assets/..\\", "/public/..%255cadmin",
    "/public/%c0%ae%c0%ae/admin", "/public/%e0%80%ae%e0%80%ae/admin", "/public/..%00/admin",
    "/public/..%252fadmin", "/public/%252e%252e/admin", "//admin", "///admin/assets/..",
    "/admin/assets/./..", "/admin/assets/.", "/admin/assets/x/../..", "/public/../admin/assets",
    "/admin/assets/..%20", "/admin/assets/.. ", "/admin/assets/..\t", "/ADMIN/assets/..",
    "/admin/assets/caf\xc3\xa9/../..", "/admin/assets/\xff/../..", "http://x/admin/assets/..",
    "/%40admin/x", "/%40admin%2Fx", "/public/..%2f%40admin", "/public/%25%32%66..%25%32%66admin",
    "/%25%32%65%25%32%65/admin", "/admin/;jsessionid=1", "/public/;x", "/admin/assets[1]/..",
]


@pytest.mark.parametrize("host", SERVERS)
@pytest.mark.parametrize("target", KNOWN_TRICKS)
def test_known_tricks_never_reach_another_route_than_the_one_authorized(
        front: Front, host: str, target: str) -> None:
    check(front, host, target)


@pytest.mark.parametrize(("target", "outcome"), [
    # the reported bypasses: refused by the gateway itself now
    ("/admin/assets/..#", "refused 400"),
    ("/public/..#", "refused 400"),
    ("/;/admin/users", "refused 400"),
    ("/;jsessionid=x/admin/users", "refused 400"),
    # and the ordinary forms still pass
    ("/admin/assets/app.css", "assets /admin/assets/app.css"),
    ("/admin;jsessionid=1/users", "admin /admin/users"),
    ("/public/../admin/x?y=1", "admin /admin/x"),
])
def test_the_reported_bypasses_are_refused_and_plain_paths_pass(
        front: Front, target: str, outcome: str) -> None:
    assert check(front, "tomcat", target) == outcome


PIECES = ["admin", "assets", "public", "x", "Admin", "ASSETS", ".", "..", "%2e", "%2E%2e", ".%2e",
          "%2e.", ";", ";x=1", ";jsessionid=1", "%3b", "%3B", "%2f", "%2F", "%5c", "\\", "#", "?",
          "%23", "%3f", "%20", " ", "\t", "%09", "%00", "%25", "%252e", "%252f", "%c3%a9",
          "caf\xc3\xa9", "\xe9", "%c0%ae", "%ff", "~1", "::$DATA", "%41", "%61dmin", "//", "/",
          "=", "&", "@", ":", "%7e", "~", "|", "[", "]", "%40", "%2B", "%2b", "%3A", "%3D", "%28",
          "%29", "%21", "%24", "%26", "%27", "%2A", "%2C", "@admin", "%25%32%66"]
# The pieces most attacks are made of come up more often than the rest.
HOT = ["..", ".", ";", ";x=1", "%2e%2e", "%3b", "%2f", "\\", "admin", "assets", "public", ""]
PIECE = st.one_of(st.sampled_from(HOT), st.sampled_from(PIECES))
SEGMENT = st.lists(PIECE, max_size=3).map("".join)
# Targets start inside a route more often than not (climbing out of one is the attack) and may
# end in a fragment or a query.
TARGET = st.builds(
    lambda start, segments, tail: start + "/" + "/".join(segments) + tail,
    st.sampled_from(["", "/admin", "/admin/assets", "/public", "/ADMIN", "/@admin", "/%40admin"]),
    st.lists(SEGMENT, max_size=5),
    st.one_of(st.just(""), st.lists(PIECE, max_size=3).map(lambda parts: "?" + "".join(parts)),
              st.lists(PIECE, max_size=3).map(lambda parts: "#" + "".join(parts))))


@pytest.mark.parametrize("host", SERVERS)
@given(target=TARGET)
@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_generated_targets_never_reach_another_route_than_the_one_authorized(
        front: Front, host: str, target: str) -> None:
    check(front, host, target)


def test_a_refused_target_is_logged_without_reaching_an_upstream(front: Front) -> None:
    status, headers = send_raw(front.port, "/public/..#", host="nginx.test")
    assert status == 400 and "x-seen-port" not in headers
    assert "bad_request status=400" in front.log.read_text()
