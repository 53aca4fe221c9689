"""A real headless Chromium signs in through `gateway demo`, exactly as a newcomer would."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator

import pytest
from conftest import chromium_sign_in, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


@contextlib.asynccontextmanager
async def running_demo(port: int) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
        assert b"open http://127.0.0.1:" in line, line
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            code = await proc.wait()
        await proc.communicate()
        assert code == 0, f"demo exited with {code} on SIGTERM"


async def test_demo_login_in_chromium_lands_on_the_upstream_with_identity(page: object) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    async with running_demo(free_port()) as url:
        await chromium_sign_in(page, url + "/hello?from=browser")
        await expect(page.locator("#user")).to_have_text("alice")
        assert page.url == url + "/hello?from=browser"
        assert "admins,staff" in await page.content()
        cookies = await page.context.cookies(url)
        session = next(c for c in cookies if c["name"] == "gateway_session")
        assert session["httpOnly"] is True
        assert session["sameSite"] == "Lax"
        # bob is staff only: the admin area refuses him after his own login.
        await page.context.clear_cookies()
        await chromium_sign_in(page, url + "/admin/", "bob")
        await expect(page.locator("h1")).to_contain_text("403")
