"""The demo's sample upstream: an app with no login of its own that shows who the gateway says
the user is. Also the tests' upstream: echo, redirects, cookies, streams, downloads, websockets.

It trusts the identity headers blindly, as legacy apps behind the gateway do; that is the point.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import time

from aiohttp import WSMsgType, web

_IDENTITY = ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Preferred-Username",
             "X-Forwarded-Groups")
_CHUNK = 64 * 1024


async def _home(request: web.Request) -> web.Response:
    rows = "".join(
        f"<tr><th>{name}</th><td>{html.escape(request.headers.get(name, '(none)'))}</td></tr>"
        for name in _IDENTITY)
    user = html.escape(request.headers.get("X-Forwarded-User", "(none)"))
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Demo upstream</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem}}
th{{text-align:left;padding-right:1rem}}</style></head>
<body><h1>Hello from the demo upstream</h1>
<p>Signed in as <strong id="user">{user}</strong>.</p>
<table>{rows}</table>
<p>Request: <code>{html.escape(request.method)} {html.escape(request.raw_path)}</code></p>
<p><a href="/admin/">Admin area</a> (group admins) · <a href="/public/">Public page</a> ·
<a href="/oauth2/userinfo">/oauth2/userinfo</a></p>
<form method="post" action="/oauth2/sign_out"><button id="sign-out">Sign out</button></form>
</body></html>
"""
    return web.Response(text=body, content_type="text/html")


async def _echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        digest.update(chunk)
        length += len(chunk)
    path, _, query = request.raw_path.partition("?")
    return web.json_response({
        "method": request.method, "path": path, "query": query,
        "headers": [[name, value] for name, value in request.headers.items()],
        "body_length": length, "body_sha256": digest.hexdigest(),
    })


async def _redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": request.query.get("to", "/")})


async def _set_cookies(request: web.Request) -> web.Response:
    response = web.Response(text="two cookies")
    response.set_cookie("a", "1")
    response.set_cookie("b", "2")
    return response


async def _early_hints(request: web.Request) -> web.Response:
    """103 Early Hints (RFC 8297), then the page a moment later, as CDNs and frameworks do."""
    await request.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload"
                               b"\r\nConnection: x-hop\r\nX-Hop: dropped"
                               b"\r\nContent-Length: 5\r\n\r\n")
    request.writer.output_size = 0
    await asyncio.sleep(0.2)
    return web.Response(text="page after hints", headers={"Link": "</style.css>; rel=preload"})


async def _stream(request: web.Request) -> web.StreamResponse:
    chunks = int(request.query.get("chunks", "3"))
    delay = float(request.query.get("delay", "0.1"))
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(chunks):
        if i or "first_after" in request.query:  # the headers alone, for that long
            await asyncio.sleep(delay if i else float(request.query["first_after"]))
        await response.write(f"chunk {i}\n".encode())
    await response.write_eof()
    return response


async def _events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events; each carries the monotonic time it was written (for latency tests)."""
    count = int(request.query.get("count", "3"))
    interval = float(request.query.get("interval", "0.2"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i in range(count):
        if i:
            await asyncio.sleep(interval)
        await response.write(f"id: {i}\ndata: {time.monotonic()}\n\n".encode())
    await response.write_eof()
    return response


async def _download(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("bytes", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    block = b"x" * _CHUNK
    remaining = size if request.method != "HEAD" else 0
    try:
        while remaining > 0:
            await response.write(block[: min(_CHUNK, remaining)])
            remaining -= _CHUNK
        await response.write_eof()
    except ConnectionError:  # the reader left (the gateway, when its client did): no error
        pass
    return response


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("chat",), max_msg_size=0)  # any size: tests send big ones
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT and message.data.startswith("close:"):
            await ws.close(code=int(message.data[6:]))  # lets tests check close codes pass
        elif message.type == WSMsgType.TEXT:
            await ws.send_str("echo:" + message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if code in (204, 304) or code < 200:
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code}\n")


def create_upstream_app(name: str = "demo upstream") -> web.Application:
    app = web.Application(handler_args={"max_field_size": 64 * 1024})  # fat legacy cookies
    app.router.add_route("*", "/echo", _echo)
    app.router.add_route("*", "/echo/{tail:.*}", _echo)
    app.router.add_route("*", "/public/echo", _echo)
    app.router.add_get("/redirect", _redirect)
    app.router.add_get("/public/redirect", _redirect)
    app.router.add_get("/set-cookies", _set_cookies)
    app.router.add_get("/public/set-cookies", _set_cookies)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/public/early-hints", _early_hints)
    app.router.add_get("/public/stream", _stream)
    app.router.add_get("/events", _events)
    app.router.add_get("/public/events", _events)
    app.router.add_get("/download", _download)
    app.router.add_get("/public/download", _download)
    app.router.add_get("/ws", _websocket)
    app.router.add_route("*", "/status/{code:[0-9]{3}}", _status)
    app.router.add_route("*", "/public/status/{code:[0-9]{3}}", _status)
    app.router.add_route("*", "/{tail:.*}", _home)
    return app
