"""Errors become short pages (browsers) or JSON (API clients), in one place, never a traceback."""

from __future__ import annotations

import re

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient

from gateway import errors
from gateway.pages import error_middleware


def all_subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *all_subclasses(direct))]


HTTP_ERRORS = [cls for cls in all_subclasses(errors.GatewayError) if cls is not errors.ConfigError]


@pytest.mark.parametrize("cls", HTTP_ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_has_a_status_title_message_and_event(cls: type) -> None:
    assert 400 <= cls.status <= 599
    assert cls.title and cls.public_message
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", cls.event)


def app_raising(exc: BaseException) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        raise exc

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/x", handler)
    return app


@pytest.mark.parametrize("cls", HTTP_ERRORS, ids=lambda cls: cls.__name__)
async def test_every_error_renders_html_for_browsers_and_json_for_api_clients(
        aiohttp_client: AiohttpClient, cls: type) -> None:
    client = await aiohttp_client(app_raising(cls("internal detail: token=abc")))
    resp = await client.get("/x", headers={"Accept": "text/html"})
    assert resp.status == cls.status
    text = await resp.text()
    assert resp.content_type == "text/html"
    assert cls.title in text
    assert "token=abc" not in text
    assert resp.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert resp.headers["X-Frame-Options"] == "DENY"
    resp = await client.get("/x", headers={"Accept": "application/json"})
    assert resp.status == cls.status
    assert (await resp.json())["error"] == cls.event
    assert resp.headers["Cache-Control"] == "no-store"


async def test_unexpected_exceptions_give_a_generic_500_without_traceback(
        aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture) -> None:
    client = await aiohttp_client(app_raising(RuntimeError("secret internals")))
    resp = await client.get("/x", headers={"Accept": "text/html"})
    assert resp.status == 500
    text = await resp.text()
    assert "secret internals" not in text and "Traceback" not in text
    assert "unhandled_error" in caplog.text


async def test_framework_errors_get_our_page(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(app_raising(RuntimeError()))
    resp = await client.post("/x", headers={"Accept": "application/json"})
    assert resp.status == 405
    assert (await resp.json())["error"] == "method_not_allowed"
    assert "GET" in resp.headers["Allow"]
