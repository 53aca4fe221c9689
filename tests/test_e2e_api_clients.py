"""API clients with bearer tokens (issue: API clients), end to end against oidc-provider.

The OP issues real tokens by the client credentials grant (RFC 6749 §4.4) to a `robot`
client: JWT access tokens (RFC 9068) for https://api.test and https://other.test, opaque ones
for https://opaque.test, which the gateway introspects (RFC 7662). Forged tokens are made from
real ones: unsigned, HMAC-signed with the OP's public key or the client secret, from a second
OP that claims the first one's issuer with its own key, and from a third that shares the
first one's key under its own issuer name. Time is the gateway's clock, moved forward by the
test, so expiry and the introspection cache are tested without waiting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from conftest import BROWSER_HEADERS, CLIENT_ID, CLIENT_SECRET, free_port, raw_config, serve
from joserfc.jwk import RSAKey
from nodeop import follow_op, node_op_available, start_node_op

from gateway import config as config_module
from gateway.app import build_app
from gateway.demo.upstream import create_upstream_app
from gateway.websocket import WS_RECHECK_INTERVAL

pytestmark = pytest.mark.e2e

ROBOT_SECRET = "robot-secret-" + "r" * 32
API, OPAQUE, OTHER = "https://api.test", "https://opaque.test", "https://other.test"
ROBOT_AUTH = {"Authorization": "Basic "
              + base64.b64encode(f"robot:{ROBOT_SECRET}".encode()).decode()}


class MovableClock:
    """The real time, plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class ApiStack:
    gateway: str
    issuer: str
    token_endpoint: str
    revocation_endpoint: str
    clock: MovableClock
    jwk: dict[str, Any]

    async def token(self, resource: str, scope: str = "read", *, op: str | None = None
                    ) -> str:
        """A client credentials token for `resource` from this OP (or the one at `op`)."""
        endpoint = self.token_endpoint if op is None else op + "/token"
        async with aiohttp.ClientSession() as http, http.post(
                endpoint, data={"grant_type": "client_credentials", "resource": resource,
                                "scope": scope},
                headers=ROBOT_AUTH) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            token = body["access_token"]
            assert isinstance(token, str)
            return token

    async def revoke(self, token: str) -> None:
        async with aiohttp.ClientSession() as http, http.post(
                self.revocation_endpoint, data={"token": token},
                headers=ROBOT_AUTH) as resp:
            assert resp.status == 200, await resp.text()

    async def call(self, path: str, token: str | None = None, *, method: str = "GET",
                   headers: dict[str, str] | None = None,
                   http: aiohttp.ClientSession | None = None) -> tuple[int, Any, Any]:
        """(status, response headers, JSON body) of an API call through the gateway."""
        sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        async with contextlib.AsyncExitStack() as stack:
            if http is None:
                http = await stack.enter_async_context(aiohttp.ClientSession())
            async with http.request(method, self.gateway + path, headers=sent,
                                    allow_redirects=False) as resp:
                body = await resp.json() if resp.content_type == "application/json" \
                    else await resp.text()
                return resp.status, resp.headers, body


async def _endpoint(issuer: str, name: str) -> str:
    async with aiohttp.ClientSession() as http, \
            http.get(issuer + "/.well-known/openid-configuration") as resp:
        endpoint = (await resp.json())[f"{name}_endpoint"]
        assert isinstance(endpoint, str)
        return endpoint


ROUTES: list[dict[str, Any]] = [
    {"name": "api", "path_prefix": "/echo/api", "bearer": True},
    {"name": "writers", "path_prefix": "/echo/write", "bearer": True,
     "allow": [{"scopes": ["write"]}]},
    {"name": "robots", "path_prefix": "/echo/robots", "bearer": True,
     "allow": [{"groups": ["robots"]}]},
    {"name": "humans", "path_prefix": "/echo/humans", "bearer": True,
     "deny": [{"groups": ["robots"]}]},
    {"name": "opaque", "path_prefix": "/echo/opaque", "bearer": True,
     "audiences": [OPAQUE]},
    {"name": "cors", "path_prefix": "/echo/cors", "bearer": True, "allow_preflight": True},
    {"name": "passing", "path_prefix": "/echo/passing", "bearer": True,
     "pass_authorization_header": True, "pass_access_token": True, "pass_id_token": True},
    {"name": "sockets", "path_prefix": "/ws", "bearer": True},
    {"name": "app", "path_prefix": "/"},
]


@contextlib.asynccontextmanager
async def api_stack(**api: Any) -> AsyncIterator[ApiStack]:
    reason = node_op_available()
    if reason:
        pytest.skip(reason)
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    jwk = RSAKey.generate_key(2048, parameters={"kid": "shared"}).as_dict(private=True)
    async with start_node_op(client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                             redirect_uris=[gateway + "/oauth2/callback"],
                             robot_secret=ROBOT_SECRET, jwk=json.dumps(jwk)) as issuer:
        upstream_runner, upstream = await serve(create_upstream_app())
        raw = raw_config(gateway, issuer, upstream, routes=[dict(r) for r in ROUTES],
                         api={"audiences": [API], **api})
        raw["oidc"]["scopes"] = ["openid", "email", "profile", "groups"]
        clock = MovableClock()
        config = config_module.parse(raw, {"SECRET": CLIENT_SECRET})
        runner, _ = await serve(build_app(config, clock=clock), port)
        try:
            yield ApiStack(gateway, issuer, await _endpoint(issuer, "token"),
                           await _endpoint(issuer, "revocation"), clock, jwk)
        finally:
            await runner.cleanup()
            await upstream_runner.cleanup()


def upstream_headers(body: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in body["headers"]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def part(token: str, index: int) -> dict[str, Any]:
    segment = token.split(".")[index]
    decoded = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(decoded, dict)
    return decoded


def hmac_signed(token: str, secret: bytes) -> str:
    """The token's claims, re-signed HS256 with `secret` (the algorithm-confusion forgery)."""
    header = b64(json.dumps({**part(token, 0), "alg": "HS256"}).encode())
    body = token.split(".")[1]
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(mac)}"


def refused_because(headers: Any, description: str) -> None:
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="invalid_token"'), challenge
    assert description in challenge, challenge


async def test_jwt_bearer_token_reaches_upstream_as_its_client_with_no_session() -> None:
    async with api_stack() as stack:
        token = await stack.token(API)
        async with aiohttp.ClientSession() as http, http.get(
                stack.gateway + "/echo/api/x?q=1",
                headers={"Authorization": f"Bearer {token}", "X-Forwarded-User": "mallory",
                         "Accept": "application/json"}) as resp:
            assert resp.status == 200, await resp.text()
            assert "Set-Cookie" not in resp.headers  # no session is made for a token
            body = await resp.json()
        sent = upstream_headers(body)
        assert sent["x-forwarded-user"] == "robot"
        assert sent["x-forwarded-email"] == "robot@example.org"
        assert sent["x-forwarded-groups"] == "robots"
        assert "authorization" not in sent  # the token stays at the gateway unless passed
        assert body["path"] == "/echo/api/x" and body["query"] == "q=1"
        # Passed on when the route says so; a token has no ID token to pass.
        status, _, body = await stack.call("/echo/passing", token)
        sent = upstream_headers(body)
        assert status == 200
        assert sent["authorization"] == f"Bearer {token}"
        assert sent["x-forwarded-access-token"] == token
        assert "x-forwarded-id-token" not in sent


async def test_bearer_refusals_follow_rfc_6750() -> None:
    async with api_stack() as stack:
        status, headers, body = await stack.call("/echo/api")
        assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")  # no error code
        assert body["error"] == "not_authenticated"

        wrong_audience = await stack.token(OTHER)
        status, headers, body = await stack.call("/echo/api", wrong_audience)
        assert (status, body["error"]) == (401, "invalid_token")
        refused_because(headers, "not meant for this API")

        status, headers, _ = await stack.call("/echo/api", "not a token")
        assert status == 401
        refused_because(headers, "malformed")
        status, headers, _ = await stack.call("/echo/api", "opaque-but-well-formed")
        refused_because(headers, "opaque tokens are not accepted")

        async with aiohttp.ClientSession() as http, http.get(
                stack.gateway + "/echo/api",
                headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")]) as resp:
            assert resp.status == 400
            assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_request"'

        token = await stack.token(API)
        stack.clock.offset = 600 + 61  # past exp (10 min) and the 60 s clock skew allowed
        status, headers, _ = await stack.call("/echo/api", token)
        assert status == 401
        refused_because(headers, "expired")


async def test_forged_tokens_are_refused() -> None:
    async with api_stack() as stack:
        real = await stack.token(API)
        none = f"{b64(json.dumps({**part(real, 0), 'alg': 'none'}).encode())}." \
               f"{real.split('.')[1]}."
        public_pem = RSAKey.import_key(stack.jwk).as_pem(private=False)
        forgeries = {
            "alg none": (none, "signing algorithm"),
            "HMAC with the public key": (hmac_signed(real, public_pem), "signing algorithm"),
            "HMAC with the client secret": (hmac_signed(real, CLIENT_SECRET.encode()),
                                            "signing algorithm"),
            "tampered claims": (f"{real.split('.')[0]}."
                                f"{b64(json.dumps({**part(real, 1), 'sub': 'admin'}).encode())}"
                                f".{real.split('.')[2]}", "signature"),
        }
        port = free_port()
        async with start_node_op(client_id="x", client_secret="x", redirect_uris=[],
                                 robot_secret=ROBOT_SECRET, issuer=stack.issuer, port=port):
            # Claims the real issuer, signs with a key the real OP never published.
            forgeries["unknown key"] = (await stack.token(API, op=f"http://127.0.0.1:{port}"),
                                        "signature")
        async with start_node_op(client_id="x", client_secret="x", redirect_uris=[],
                                 robot_secret=ROBOT_SECRET,
                                 jwk=json.dumps(stack.jwk)) as other_issuer:
            # The same key, but tokens say who issued them.
            forgeries["wrong issuer"] = (await stack.token(API, op=other_issuer),
                                         "another issuer")
        assert part(forgeries["wrong issuer"][0], 1)["iss"] == other_issuer
        assert part(forgeries["unknown key"][0], 1)["iss"] == stack.issuer
        for name, (token, description) in forgeries.items():
            status, headers, _ = await stack.call("/echo/api", token)
            assert status == 401, name
            refused_because(headers, description)
        assert (await stack.call("/echo/api", real))[0] == 200


async def test_policy_on_tokens_scopes_and_groups() -> None:
    async with api_stack() as stack:
        reader, writer = await stack.token(API, "read"), await stack.token(API, "read write")
        status, headers, body = await stack.call("/echo/write", reader)
        assert (status, body["error"]) == (403, "insufficient_scope")
        assert headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope", scope="write"'
        assert "signed_in_as" not in body  # nothing to sign out of
        assert (await stack.call("/echo/write", writer))[0] == 200
        assert (await stack.call("/echo/robots", reader))[0] == 200
        status, headers, body = await stack.call("/echo/humans", reader)
        assert (status, body["error"]) == (403, "access_denied")
        assert "WWW-Authenticate" not in headers  # not a scope it could ask for


async def test_opaque_tokens_are_introspected_and_cached_no_longer_than_configured() -> None:
    async with api_stack(introspection=True, introspection_cache="5s") as stack:
        token = await stack.token(OPAQUE)
        assert token.count(".") == 0
        status, _, body = await stack.call("/echo/opaque", token)
        assert status == 200
        assert upstream_headers(body)["x-forwarded-user"] == "robot"
        # Introspected, but meant for another API than this route's.
        status, headers, _ = await stack.call("/echo/api", token)
        refused_because(headers, "not meant for this API")

        await stack.revoke(token)
        assert (await stack.call("/echo/opaque", token))[0] == 200  # still cached
        stack.clock.offset = 6
        status, headers, _ = await stack.call("/echo/opaque", token)
        assert status == 401
        refused_because(headers, "not active")
        # JWTs are still verified locally.
        assert (await stack.call("/echo/api", await stack.token(API)))[0] == 200


async def test_cors_preflight_passes_without_credentials_and_without_identity() -> None:
    async with api_stack() as stack:
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "PUT",
                     "X-Forwarded-User": "mallory"}
        status, _, body = await stack.call("/echo/cors", method="OPTIONS", headers=preflight)
        assert status == 200
        sent = upstream_headers(body)
        assert body["method"] == "OPTIONS"
        assert "x-forwarded-user" not in sent
        # Not a preflight (no Access-Control-Request-Method), or not a route that allows them.
        assert (await stack.call("/echo/cors", method="OPTIONS",
                                 headers={"Origin": "https://app.example"}))[0] == 401
        assert (await stack.call("/echo/api", method="OPTIONS", headers=preflight))[0] == 401
        assert (await stack.call("/echo/cors", method="PUT", headers=preflight))[0] == 401


async def test_browser_session_still_works_on_a_bearer_route_but_a_bad_token_wins() -> None:
    async with api_stack() as stack, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=BROWSER_HEADERS) as browser:
        async with browser.get(stack.gateway + "/echo/api", allow_redirects=False) as resp:
            assert resp.status == 302
            authorize = resp.headers["Location"]
        callback = await follow_op(browser, authorize, stack.issuer,
                                   {"login": "alice", "password": "any"})
        async with browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 302
        status, _, body = await stack.call("/echo/api", http=browser)
        assert status == 200
        assert upstream_headers(body)["x-forwarded-user"] == "alice"
        status, headers, _ = await stack.call("/echo/api", "forged", http=browser)
        assert status == 401
        refused_because(headers, "opaque tokens are not accepted")


async def test_a_websocket_opened_with_a_bearer_token_ends_when_the_token_does() -> None:
    """A token is checked when it is presented; the socket it opened is closed (1008) once
    the gateway would no longer take the token, within the watch's interval, instead of
    staying open for as long as the client keeps it."""
    async with api_stack() as stack:
        token = await stack.token(API)
        lifetime = part(token, 1)["exp"] - time.time()
        async with aiohttp.ClientSession() as http, http.ws_connect(
                stack.gateway + "/ws", headers={"Authorization": f"Bearer {token}"},
                protocols=("chat",)) as ws:
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "echo:hi"
            stack.clock.offset = lifetime + 30  # expired, but within the 60 s clock skew
            await asyncio.sleep(WS_RECHECK_INTERVAL + 1)  # the watch has looked meanwhile
            await ws.send_str("still")
            assert (await ws.receive(timeout=5)).data == "echo:still"
            stack.clock.offset = lifetime + 61
            message = await ws.receive(timeout=WS_RECHECK_INTERVAL + 3)
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1008)
