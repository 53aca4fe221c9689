"""Error responses: the one place a GatewayError becomes HTTP, as a short page or JSON.

Browsers (Accept has text/html, no X-Requested-With) get a small HTML page; API clients get
`{"error": ..., "message": ...}`. Never a traceback; anything unexpected is logged and answered
with a generic 500.
"""

from __future__ import annotations

import functools
import html
import json
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import ForbiddenError, GatewayError

log = logging.getLogger("gateway")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;
color:#222}}h1{{font-size:1.4rem}}p{{line-height:1.5}}a{{color:#0b5cad}}</style></head>
<body><h1>{status} {title}</h1><p>{message}</p>{extra}</body></html>
"""


def redirect(location: str) -> web.Response:
    """A 302 that is never cached (it may carry a fresh cookie or a one-time URL)."""
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def wants_html(request: web.BaseRequest) -> bool:
    if request.headers.get("X-Requested-With"):
        return False
    return "text/html" in request.headers.get("Accept", "")


# The gateway's own pages are never framed by another site (a sign-out button, clickjacked)
# nor sniffed into another type. (The front-channel logout page, which the IdP frames, is
# not rendered here.)
_PAGE_HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                 "Content-Security-Policy": "frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff"}


def render(request: web.BaseRequest, status: int, title: str, message: str, *,
           code: str, link: tuple[str, str] | None = None, as_html: bool | None = None,
           extra_html: str = "", extra_json: dict[str, str] | None = None) -> web.Response:
    """A short page (or JSON). `extra_html` is markup the caller built and escaped."""
    headers = dict(_PAGE_HEADERS)
    if wants_html(request) if as_html is None else as_html:
        extra = extra_html
        if link:
            extra += f'<p><a href="{html.escape(link[0])}">{html.escape(link[1])}</a></p>'
        body = _PAGE.format(status=status, title=html.escape(title),
                            message=html.escape(message), extra=extra)
        return web.Response(status=status, text=body, content_type="text/html", headers=headers)
    return web.Response(status=status, headers=headers, content_type="application/json",
                        charset="utf-8",
                        body=_json_body(code, message, tuple((extra_json or {}).items())))


@functools.lru_cache(maxsize=256)
def _json_body(code: str, message: str, extra: tuple[tuple[str, str], ...]) -> bytes:
    """An API client's error body. Kept: a flood of refusals (401s) gets the same few bodies,
    and encoding them was 6% of a 401 (py-spy)."""
    return json.dumps({"error": code, "message": message, **dict(extra)}).encode()


def _signed_in_as(exc: ForbiddenError) -> str:
    """Who was refused, and a way to sign out and try another account."""
    name = html.escape(exc.signed_in_as or "")
    if exc.sign_out_by_post:  # a same-origin form: passes sign-out's CSRF check
        action = ('<form method="post" action="/oauth2/sign_out">'
                  '<button type="submit">Sign out</button></form>')
    else:
        action = '<p><a href="/oauth2/sign_out">Sign out</a></p>'
    return f"<p>You are signed in as <strong>{name}</strong>.</p>{action}"


def error_response(request: web.Request, exc: GatewayError) -> web.Response:
    link = ("/oauth2/start", "Sign in again") if exc.status == 400 and \
        exc.event == "login_failed" else None
    extra_html, extra_json = exc.extra_html(), {}
    if isinstance(exc, ForbiddenError) and exc.signed_in_as:
        extra_html, extra_json = _signed_in_as(exc), {"signed_in_as": exc.signed_in_as}
    response = render(request, exc.status, exc.title, exc.public_message, code=exc.event,
                      link=link, extra_html=extra_html, extra_json=extra_json)
    response.headers.update(exc.response_headers())
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        log.log(logging.DEBUG if exc.routine else logging.WARNING, "%s status=%d detail=%s",
                exc.event, exc.status, exc.detail)
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = render(request, exc.status, exc.reason, exc.reason,
                          code=exc.reason.lower().replace(" ", "_"))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled_error path=%s", request.path)
        return render(request, 500, "Internal error", GatewayError.public_message,
                      code="internal_error")
