"""The demo IdP is a real (small) OpenID Provider: its protocol checks hold."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from conftest import free_port, serve
from joserfc import jwt
from joserfc.jwk import KeySet
from yarl import URL

from gateway.demo.idp import DemoClient, create_idp_app

REDIRECT = "https://rp.example.com/cb"
CLIENT = DemoClient("rp", "rp-secret-" + "x" * 30, (REDIRECT,), ("https://rp.example.com/",))


@dataclass
class Idp:
    url: str
    http: aiohttp.ClientSession
    userinfo_only: bool


@pytest.fixture(params=[False, True], ids=["claims-in-token", "userinfo-only"])
async def idp(request: pytest.FixtureRequest) -> AsyncIterator[Idp]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    runner, _ = await serve(create_idp_app(url, [CLIENT], userinfo_only_claims=request.param),
                            port)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield Idp(url, http, request.param)
    await runner.cleanup()


def auth_params(verifier: str, **changes: str) -> dict[str, str]:
    digest = hashlib.sha256(verifier.encode()).digest()
    params = {"client_id": "rp", "redirect_uri": REDIRECT, "response_type": "code",
              "scope": "openid email", "state": "st-1", "nonce": "no-1",
              "code_challenge": base64.urlsafe_b64encode(digest).rstrip(b"=").decode(),
              "code_challenge_method": "S256"}
    params.update(changes)
    return params


async def sign_in(idp: Idp, params: dict[str, str], user: str = "alice",
                  password: str | None = None) -> aiohttp.ClientResponse:
    async with idp.http.get(idp.url + "/authorize", params=params) as resp:
        assert resp.status == 200
        assert 'id="username"' in await resp.text()
    form = {**params, "username": user, "password": password or user}
    return await idp.http.post(idp.url + "/authorize", data=form, allow_redirects=False)


async def code_for(idp: Idp, verifier: str) -> str:
    resp = await sign_in(idp, auth_params(verifier))
    assert resp.status == 302
    location = URL(resp.headers["Location"])
    assert str(location.with_query(None)) == REDIRECT
    assert location.query["state"] == "st-1"
    return location.query["code"]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def exchange(idp: Idp, code: str, verifier: str,
                   secret: str = CLIENT.client_secret) -> aiohttp.ClientResponse:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
            "code_verifier": verifier}
    return await idp.http.post(idp.url + "/token", data=form, headers=basic("rp", secret))


async def test_code_flow_issues_a_verifiable_id_token(idp: Idp) -> None:
    async with idp.http.get(idp.url + "/.well-known/openid-configuration") as resp:
        discovery = await resp.json()
    assert discovery["issuer"] == idp.url
    assert discovery["code_challenge_methods_supported"] == ["S256"]
    async with idp.http.get(discovery["jwks_uri"]) as resp:
        keys = KeySet.import_key_set(await resp.json())
    verifier = secrets.token_urlsafe(48)
    resp = await exchange(idp, await code_for(idp, verifier), verifier)
    assert resp.status == 200
    body = await resp.json()
    claims = jwt.decode(body["id_token"], keys, algorithms=["RS256"]).claims
    assert (claims["iss"], claims["aud"], claims["sub"], claims["nonce"]) == (
        idp.url, "rp", "alice", "no-1")
    async with idp.http.get(idp.url + "/userinfo",
                            headers={"Authorization": f"Bearer {body['access_token']}"}) as resp:
        info = await resp.json()
    assert info["email"] == "alice@example.com"
    assert info["groups"] == ["admins", "staff"]
    assert ("email" in claims) is not idp.userinfo_only


async def test_token_endpoint_refuses_wrong_verifier_reuse_and_bad_client(idp: Idp) -> None:
    verifier = secrets.token_urlsafe(48)
    code = await code_for(idp, verifier)
    resp = await exchange(idp, code, verifier, secret="wrong")
    assert resp.status == 401
    resp = await exchange(idp, code, "another-verifier-" + "x" * 30)
    assert (await resp.json())["error"] == "invalid_grant"
    resp = await exchange(idp, code, verifier)  # the failed attempt consumed the code
    assert (await resp.json())["error"] == "invalid_grant"


async def test_wrong_password_and_cancel(idp: Idp) -> None:
    resp = await sign_in(idp, auth_params("v" * 43), password="nope")
    assert resp.status == 401
    form = {**auth_params("v" * 43), "cancel": "1"}
    async with idp.http.post(idp.url + "/authorize", data=form, allow_redirects=False) as resp:
        assert URL(resp.headers["Location"]).query["error"] == "access_denied"


async def test_unregistered_redirect_uri_is_never_redirected_to(idp: Idp) -> None:
    params = auth_params("v" * 43, redirect_uri="https://evil.example.com/cb")
    async with idp.http.get(idp.url + "/authorize", params=params,
                            allow_redirects=False) as resp:
        assert resp.status == 400
        assert "Location" not in resp.headers


async def test_missing_pkce_is_an_error_sent_back(idp: Idp) -> None:
    params = auth_params("v" * 43)
    del params["code_challenge"]
    async with idp.http.get(idp.url + "/authorize", params=params,
                            allow_redirects=False) as resp:
        assert URL(resp.headers["Location"]).query["error"] == "invalid_request"


async def test_logout_redirects_only_to_registered_uris(idp: Idp) -> None:
    ok = {"client_id": "rp", "post_logout_redirect_uri": "https://rp.example.com/"}
    async with idp.http.get(idp.url + "/logout", params=ok, allow_redirects=False) as resp:
        assert resp.headers["Location"] == "https://rp.example.com/"
    bad = {"client_id": "rp", "post_logout_redirect_uri": "https://evil.example.com/"}
    async with idp.http.get(idp.url + "/logout", params=bad, allow_redirects=False) as resp:
        assert resp.status == 400
