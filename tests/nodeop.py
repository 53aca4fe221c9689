"""Run the independent `oidc-provider` (npm, OpenID-certified) for tests, and sign in through it.

`start_node_op` starts tests/e2e/op.mjs under node on a free loopback port and yields its
issuer. `follow_op` walks the OP's own pages (its devInteractions login form and logout
confirmation) the way a browser would, until the OP sends the browser elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import html.parser
import os
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import aiohttp
from ports import free_port
from yarl import URL

E2E_DIR = Path(__file__).parent / "e2e"


def node_op_available() -> str | None:
    """None when the OP can run here, else the reason to skip."""
    if shutil.which("node") is None:
        return "node is not installed (CI installs it)"
    if not (E2E_DIR / "node_modules" / "oidc-provider").is_dir():
        return "tests/e2e/node_modules is missing: run `npm ci` in tests/e2e (CI does)"
    return None


@contextlib.asynccontextmanager
async def start_node_op(*, client_id: str, client_secret: str, redirect_uris: Sequence[str],
                        post_logout_redirect_uris: Sequence[str] = (),
                        backchannel_logout_uri: str = "",
                        backchannel_session_required: bool = True,
                        access_token_ttl: int = 3600, issuer: str | None = None,
                        jwk: str | None = None, robot_secret: str | None = None,
                        client_credentials_ttl: int = 600, port: int | None = None
                        ) -> AsyncIterator[str]:
    """`issuer`: another issuer name than the OP's own URL (at `port`); `jwk`: a private JWK
    to sign with (two OPs can share one); `robot_secret`: enable API clients (op.mjs,
    OP_API)."""
    port = port or free_port()
    env = {**os.environ, "OP_PORT": str(port), "OP_CLIENT_ID": client_id,
           "OP_CLIENT_SECRET": client_secret, "OP_REDIRECT_URIS": ",".join(redirect_uris),
           "OP_POST_LOGOUT_REDIRECT_URIS": ",".join(post_logout_redirect_uris),
           "OP_BACKCHANNEL_LOGOUT_URI": backchannel_logout_uri,
           "OP_BACKCHANNEL_SESSION_REQUIRED": str(backchannel_session_required).lower(),
           "OP_ACCESS_TOKEN_TTL": str(access_token_ttl),
           "OP_CLIENT_CREDENTIALS_TTL": str(client_credentials_ttl)}
    if issuer is not None:
        env["OP_ISSUER"] = issuer
    if jwk is not None:
        env["OP_JWK"] = jwk
    if robot_secret is not None:
        env.update(OP_API="1", OP_ROBOT_SECRET=robot_secret)
    proc = await asyncio.create_subprocess_exec(
        "node", str(E2E_DIR / "op.mjs"), cwd=E2E_DIR, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
        if not line.startswith(b"READY "):
            _, err = await proc.communicate()
            raise RuntimeError(f"oidc-provider did not start: {err.decode(errors='replace')}")
        yield line.decode().split()[1]
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=5)
            except TimeoutError:
                proc.kill()
        await proc.communicate()


class _Form(html.parser.HTMLParser):
    """The first form on a page: its action and its input names/values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form" and self.action is None:
            self.action, self._in_form = values.get("action") or "", True
        elif tag in ("input", "button") and self._in_form and values.get("name"):
            self.fields.setdefault(values["name"] or "", values.get("value") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


async def follow_op(http: aiohttp.ClientSession, url: str, issuer: str,
                    answers: Mapping[str, str] | None = None, *, max_steps: int = 12) -> str:
    """Follow the OP's redirects and fill its forms until it sends the browser off the OP.

    `answers` fills form fields by name (e.g. login and password); other fields keep their
    values. The caller's session must use `aiohttp.CookieJar(unsafe=True)`: the OP's cookies
    are set for the IP host 127.0.0.1. Returns the URL the OP redirects to.
    """
    origin = URL(issuer).origin()
    method, data = "GET", None
    for _ in range(max_steps):
        async with http.request(method, url, data=data, allow_redirects=False) as resp:
            if resp.status in (302, 303):
                target = URL(url).join(URL(resp.headers["Location"]))
                if target.origin() != origin:
                    return str(target)
                method, data, url = "GET", None, str(target)
                continue
            body = await resp.text()
            assert resp.status == 200, f"{resp.status} from the OP at {url}: {body[:300]}"
        form = _Form()
        form.feed(body)
        assert form.action is not None, f"no form on the OP page at {url}: {body[:300]}"
        fields = {**form.fields, **(answers or {})}
        method, data, url = "POST", fields, str(URL(url).join(URL(form.action)))
    raise AssertionError("the OP did not send the browser back in time")
