"""End to end: an IdP that hangs, errors or lies during the callback yields a clear page and
never a session."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from conftest import StackFactory, idp_sign_in

pytestmark = pytest.mark.e2e


def on_path(path: str, action: str) -> Middleware:
    @web.middleware
    async def misbehave(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != path:
            return await handler(request)
        if action == "hang":
            await asyncio.sleep(3)
        if action == "error":
            return web.json_response({"error": "server_error"}, status=500)
        response = await handler(request)
        if action == "other-sub" and isinstance(response, web.Response) and response.body:
            data = json.loads(response.body)  # type: ignore[arg-type]
            return web.json_response({**data, "sub": "mallory"})
        return response

    return misbehave


async def callback_result(make_stack: StackFactory, browser: aiohttp.ClientSession,
                          **kwargs: object) -> tuple[int, str, bool]:
    stack = await make_stack(oidc={"timeout": "500ms"}, **kwargs)
    async with browser.get(stack.gateway + "/echo", allow_redirects=False) as resp:
        authorize = resp.headers["Location"]
    callback = await idp_sign_in(browser, authorize, "alice")
    async with browser.get(callback, allow_redirects=False) as resp:
        text = await resp.text()
        return resp.status, text, "gateway_session" in resp.cookies


async def test_hanging_token_endpoint_gives_504_page_and_no_session(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    status, text, has_session = await callback_result(
        make_stack, browser, idp_middlewares=[on_path("/token", "hang")])
    assert status == 504
    assert "did not answer in time" in text
    assert not has_session


async def test_failing_token_endpoint_gives_502_page_and_no_session(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    status, text, has_session = await callback_result(
        make_stack, browser, idp_middlewares=[on_path("/token", "error")])
    assert status == 502
    assert "identity provider" in text.lower()
    assert not has_session


async def test_userinfo_for_another_subject_is_refused(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    """Token substitution: userinfo answering for another user must not complete the login."""
    status, _, has_session = await callback_result(
        make_stack, browser, userinfo_only_claims=True,
        idp_middlewares=[on_path("/userinfo", "other-sub")])
    assert status == 502
    assert not has_session
