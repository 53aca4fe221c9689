"""The code flow's requests: authorization URL, token request, userinfo."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import free_port
from yarl import URL

from gateway.errors import IdPError, LoginError
from gateway.oidc import flow
from gateway.oidc.provider import ProviderMetadata

CLIENT = flow.Client("a b:c", "s%&/ secret", "https://gw/oauth2/callback", ("openid", "email"),
                     "client_secret_basic", 2.0)


class TokenEndpoint:
    def __init__(self) -> None:
        self.status = 200
        self.body: dict[str, Any] = {"access_token": "at", "id_token": "it",
                                     "token_type": "Bearer", "expires_in": 300}
        self.seen: list[tuple[dict[str, str], str | None]] = []

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.seen.append((form, request.headers.get("Authorization")))
        return web.json_response(self.body, status=self.status)


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[TokenEndpoint, ProviderMetadata]]:
    token = TokenEndpoint()

    async def userinfo(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer good":
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"sub": "alice", "email": "a@x"})

    app = web.Application()
    app.router.add_post("/token", token.handle)
    app.router.add_get("/userinfo", userinfo)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    metadata = ProviderMetadata(base, base + "/auth", base + "/token", base + "/jwks",
                                base + "/userinfo", None, ("RS256",))
    yield token, metadata
    await server.close()


def test_authorization_url_carries_state_nonce_and_s256_challenge() -> None:
    metadata = ProviderMetadata("https://idp", "https://idp/auth?tenant=1", "", "", None, None,
                                ("RS256",))
    request = flow.begin(metadata, CLIENT)
    query = URL(request.url).query
    assert query["tenant"] == "1"
    assert query["response_type"] == "code"
    assert query["client_id"] == "a b:c"
    assert query["redirect_uri"] == "https://gw/oauth2/callback"
    assert query["scope"] == "openid email"
    assert query["state"] == request.state and query["nonce"] == request.nonce
    assert query["code_challenge_method"] == "S256"
    digest = hashlib.sha256(request.code_verifier.encode()).digest()
    assert query["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert 43 <= len(request.code_verifier) <= 128
    other = flow.begin(metadata, CLIENT)
    assert len({request.state, other.state, request.nonce, other.nonce}) == 4
    assert min(len(request.state), len(request.nonce)) >= 43


async def test_client_secret_basic_form_encodes_id_and_secret(
        endpoint: tuple[TokenEndpoint, ProviderMetadata]) -> None:
    token, metadata = endpoint
    async with aiohttp.ClientSession() as http:
        tokens = await flow.exchange(http, metadata, CLIENT, "the-code", "the-verifier", now=100)
    form, authorization = token.seen[0]
    assert form == {"grant_type": "authorization_code", "code": "the-code",
                    "redirect_uri": CLIENT.redirect_uri, "code_verifier": "the-verifier"}
    assert authorization is not None
    user, _, secret = base64.b64decode(authorization.removeprefix("Basic ")).decode().partition(":")
    assert (unquote(user), unquote(secret)) == ("a b:c", "s%&/ secret")
    assert tokens.access_token == "at" and tokens.id_token == "it"
    assert tokens.expires_at == 400


async def test_client_secret_post_sends_credentials_in_the_form(
        endpoint: tuple[TokenEndpoint, ProviderMetadata]) -> None:
    token, metadata = endpoint
    client = dataclasses.replace(CLIENT, auth_method="client_secret_post")
    async with aiohttp.ClientSession() as http:
        await flow.exchange(http, metadata, client, "c", "v", now=0)
    form, authorization = token.seen[0]
    assert authorization is None
    assert form["client_id"] == "a b:c" and form["client_secret"] == "s%&/ secret"


@pytest.mark.parametrize(("status", "body", "error"), [
    (400, {"error": "invalid_grant"}, LoginError),
    (500, {"error": "server_error"}, IdPError),
    (200, {"access_token": "at", "token_type": "Bearer"}, IdPError),
    (200, {"access_token": "at", "id_token": "it", "token_type": "mac"}, IdPError),
    (200, ["not", "an", "object"], IdPError),
    (200, {"access_token": "at\r\nX-Evil: 1", "id_token": "it", "token_type": "Bearer"},
     IdPError),
    (200, {"access_token": "", "id_token": "it", "token_type": "Bearer"}, IdPError),
])
async def test_bad_token_responses_are_errors(
        endpoint: tuple[TokenEndpoint, ProviderMetadata], status: int, body: Any,
        error: type[Exception]) -> None:
    token, metadata = endpoint
    token.status, token.body = status, body
    async with aiohttp.ClientSession() as http:
        with pytest.raises(error):
            await flow.exchange(http, metadata, CLIENT, "c", "v", now=0)


async def test_userinfo_uses_the_bearer_token(
        endpoint: tuple[TokenEndpoint, ProviderMetadata]) -> None:
    _, metadata = endpoint
    async with aiohttp.ClientSession() as http:
        assert (await flow.userinfo(http, metadata, CLIENT, "good"))["email"] == "a@x"
        with pytest.raises(IdPError, match="401"):
            await flow.userinfo(http, metadata, CLIENT, "bad")
