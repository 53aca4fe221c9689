"""Legacy apps behind the gateway, as ops teams run them: PHP under Debian's nginx and php-fpm
(stock fastcgi.conf), and an unmodified DokuWiki from Debian's package driven by Chromium at /
and under /wiki/ (README "Fronting a legacy app")."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import StackFactory, chromium_sign_in, login
from php_sites import dokuwiki_root, php_site, whoami_root
from ports import free_port

pytestmark = pytest.mark.e2e

MALLORY = {"Authorization": "Basic " + base64.b64encode(b"mallory:anything").decode()}


async def _whoami(http: aiohttp.ClientSession, url: str,
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with http.get(url, headers=headers, allow_redirects=False) as resp:
        assert resp.status == 200, (url, resp.status, await resp.text())
        body: dict[str, Any] = await resp.json(content_type=None)
        return body


async def test_a_clients_basic_user_never_becomes_remote_user(
        make_stack: StackFactory, browser: aiohttp.ClientSession, tmp_path: Path) -> None:
    stock_port, recipe_port = free_port(), free_port()
    root = whoami_root(tmp_path / "www")
    with php_site(tmp_path / "stock", stock_port, root) as stock, \
            php_site(tmp_path / "recipe", recipe_port, root,
                     remote_user_from_gateway=True) as recipe:
        async with aiohttp.ClientSession() as direct:
            # The hazard is real on this server: stock nginx believes any Basic header.
            assert (await _whoami(direct, stock.url + "/whoami.php", MALLORY))[
                "remote_user"] == "mallory"
        stack = await make_stack(routes=[
            {"name": "stock", "path_prefix": "/stock", "strip_prefix": True,
             "upstream": stock.url},
            {"name": "basic", "path_prefix": "/basic", "strip_prefix": True,
             "upstream": stock.url, "pass_basic_auth": True},
            {"name": "own", "path_prefix": "/own", "strip_prefix": True,
             "upstream": stock.url, "pass_client_authorization": True},
            {"name": "recipe", "path_prefix": "/recipe", "strip_prefix": True,
             "upstream": recipe.url},
        ])
        # Without a session, credentials of its own get a client nowhere.
        async with browser.get(stack.gateway + "/stock/whoami.php", headers=MALLORY,
                               allow_redirects=False) as resp:
            assert resp.status == 302
        await login(browser, stack.gateway, "/stock/whoami.php")
        seen = await _whoami(browser, stack.gateway + "/stock/whoami.php", MALLORY)
        assert not seen["remote_user"] and seen["php_auth_user"] is None
        assert seen["x_forwarded_user"] == "alice"
        # pass_basic_auth: servers that map Basic auth to REMOTE_USER get the signed-in user.
        seen = await _whoami(browser, stack.gateway + "/basic/whoami.php", MALLORY)
        assert seen["remote_user"] == seen["php_auth_user"] == "alice"
        # The README's fastcgi_param recipe, even with both spoofs tried at once.
        seen = await _whoami(browser, stack.gateway + "/recipe/whoami.php",
                             {**MALLORY, "X-Forwarded-User": "mallory"})
        assert seen["remote_user"] == "alice"
        # The documented opt-in for apps with Basic auth of their own behind the gateway.
        seen = await _whoami(browser, stack.gateway + "/own/whoami.php", MALLORY)
        assert seen["remote_user"] == "mallory" and seen["x_forwarded_user"] == "alice"


# A 2 MiB upload DokuWiki accepts as a PDF (its content check looks for HTML in the head).
PAYLOAD = b"%PDF-1.4\n" + b"0123456789abcdef" * (2 * 1024 * 1024 // 16)


@pytest.mark.browser
@pytest.mark.parametrize("prefix", ["/", "/wiki"])
async def test_dokuwiki_works_in_chromium_behind_the_gateway(
        prefix: str, page: Any, make_stack: StackFactory, tmp_path: Path) -> None:
    """Served at / (it works out its own base) and under /wiki/ with strip_prefix and the
    wiki told its base path, all gateway defaults: sign in, a page saved through its
    CSRF-protected form and the redirect after it, revisions by the gateway's user, uploads
    by XHR and by plain multipart, gateway sign-out; no request fails."""
    from playwright.async_api import expect

    port = free_port()
    root = dokuwiki_root(tmp_path, basedir="" if prefix == "/" else prefix + "/")
    with php_site(tmp_path, port, root, remote_user_from_gateway=True) as site:
        route: dict[str, Any] = {"name": "wiki", "path_prefix": prefix, "upstream": site.url}
        if prefix != "/":
            route["strip_prefix"] = True
        stack = await make_stack(routes=[route])
        wiki = stack.gateway + prefix.rstrip("/") + "/"
        failed: list[str] = []
        seen: list[str] = []
        page.context.on("request", lambda r: seen.append(r.url))
        page.context.on("requestfailed",
                        lambda r: failed.append(f"{r.method} {r.url}: {r.failure}"))
        page.context.on("response", lambda r: r.status >= 400 and failed.append(
            f"{r.status} {r.request.method} {r.url}"))

        await chromium_sign_in(page, wiki)
        await expect(page).to_have_title(re.compile(r"\[Gateway test wiki\]"))
        assert page.url.startswith(wiki)

        # Its session cookie must come back for the CSRF token to match.
        article = wiki + "doku.php?id=playground:gateway"
        await page.wait_for_load_state("networkidle")
        await page.goto(article + "&do=edit")
        await page.fill("#wiki__text", "Saved through the gateway by Chromium.")
        await page.click("#edbtn__save")
        await expect(page.locator(".page")).to_contain_text("Saved through the gateway")
        assert page.url == article  # the redirect after saving, followed on our origin
        await page.wait_for_load_state("networkidle")
        await page.goto(article + "&do=revisions")
        await expect(page.locator(".changes")).to_contain_text("alice")

        # Upload by XHR (its uploader widget), then by plain multipart in a page without JS.
        await page.wait_for_load_state("networkidle")
        await page.goto(wiki + "doku.php?id=playground:gateway&do=media&ns=playground"
                        "&tab_files=upload")
        await page.set_input_files("#mediamanager__uploader input[type=file]", files=[
            {"name": "xhr.pdf", "mimeType": "application/pdf", "buffer": PAYLOAD}])
        await page.click("#mediamanager__upload_button")
        await expect(page.locator(".qq-upload-success")).to_have_count(1)
        plain = await page.context.browser.new_context(java_script_enabled=False)
        try:
            await plain.add_cookies(await page.context.cookies())
            form_page = await plain.new_page()
            form_page.on("response", lambda r: r.status >= 400 and failed.append(
                f"{r.status} {r.request.method} {r.url} (no JS)"))
            await form_page.goto(wiki + "doku.php?id=playground:gateway&do=media"
                                 "&ns=playground&tab_files=upload")
            await form_page.set_input_files("#upload__file", files=[
                {"name": "plain.pdf", "mimeType": "application/pdf", "buffer": PAYLOAD}])
            await form_page.click("#dw__upload button[type=submit]")
            await expect(form_page.locator(".success")).to_contain_text("Upload successful")
        finally:
            await plain.close()
        for name in ("xhr.pdf", "plain.pdf"):
            fetched = await page.request.get(wiki + f"lib/exe/fetch.php?media=playground:{name}")
            assert fetched.status == 200 and await fetched.body() == PAYLOAD

        # Absolute URLs it builds name the gateway, never the upstream's address.
        feed = await page.request.get(wiki + "feed.php")
        text = await feed.text()
        assert f":{port}" not in text and wiki + "doku.php?id=playground:gateway" in text

        # Gateway sign-out ends access through the gateway (the wiki has no session of its
        # own here: it takes REMOTE_USER from the gateway).
        await page.wait_for_load_state("networkidle")
        await page.goto(stack.gateway + "/oauth2/sign_out?rd=" + prefix)
        await expect(page.locator("#username")).to_be_visible()

    assert not failed, failed
    assert len(seen) > 30, seen  # the pages' styles, scripts and images all came through
