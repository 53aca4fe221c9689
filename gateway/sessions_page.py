"""/oauth2/sessions: a signed-in user's own sessions, on every replica, and a way to end them.

GET lists the sessions of the user the cookie belongs to (the store's by-sub index, shared by
the fleet): the device (read from the User-Agent), the client address, when it signed in and
when it was last used (to within the store's touch interval, at most a minute), with the
current one marked. Browsers get a page, API clients JSON.

POST ends one of them (`end=<id>`) or all the others (`end=others`). Only sessions found
under the signed-in user's own sub can be named: the ids shown are opaque hashes looked up
in that list, so another user's session is neither listed nor reachable, whatever is sent.
The form is CSRF-checked twice: the request must come from our own origin (as sign-out's
POST), and carry a token only the cookie's holder can make (an HMAC under the session's own
key, which never leaves the cookie). An ended session's record is deleted from the store and
named on the invalidation channel, so every replica refuses it at its next request, session
caches included. The current session is ended by signing out, which also ends it at the IdP.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
from datetime import UTC, datetime

from aiohttp import web

from gateway.errors import BadRequestError, ForbiddenError, NotAuthenticatedError, NotFoundError
from gateway.login import redirect_to_idp
from gateway.logout import same_origin
from gateway.observability import logged_out
from gateway.pages import redirect, render, wants_html
from gateway.runtime import TRAIL, Runtime, runtime_from
from gateway.sessions.registry import SessionInfo
from gateway.sessions.store import Loaded

PATH = "/oauth2/sessions"
_CSRF_LABEL = b"gateway /oauth2/sessions form"
_HANDLE = re.compile(r"[0-9a-f]{32}")
# Browser and system names, most specific first (Edge and Opera say Chrome too, Chrome says
# Safari): enough to tell one's own devices apart, not a fingerprint.
_BROWSERS = (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"),
             ("Chromium/", "Chromium"), ("Chrome/", "Chrome"), ("Safari/", "Safari"),
             ("curl/", "curl"))
_SYSTEMS = (("iPhone", "iOS"), ("iPad", "iPadOS"), ("Android", "Android"),
            ("CrOS", "ChromeOS"), ("Windows", "Windows"), ("Mac OS X", "macOS"),
            ("Linux", "Linux"))


def handle_of(info: SessionInfo) -> str:
    """The id a session is shown and named by: not its storage id (half of a cookie's
    derivation), a hash of it."""
    return hashlib.sha256(b"session handle\n" + info.storage_id.encode()).hexdigest()[:32]


def csrf_token(loaded: Loaded) -> str:
    return hmac.new(loaded.cookie.key, _CSRF_LABEL, hashlib.sha256).hexdigest()


def device_of(user_agent: str) -> str:
    """"Firefox on Linux", from a User-Agent; the agent itself (shortened) when unknown."""
    browser = next((name for token, name in _BROWSERS if token in user_agent), None)
    system = next((name for token, name in _SYSTEMS if token in user_agent), None)
    if browser and system:
        return f"{browser} on {system}"
    return browser or system or (user_agent[:60] if user_agent not in ("", "-") else "unknown")


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


async def _signed_in(request: web.Request, rt: Runtime) -> Loaded | web.StreamResponse:
    """The request's live session; else, for a browser, the sign-in that comes back here."""
    loaded = await rt.sessions.load(rt.session_cookie_in(request))
    if loaded is not None:
        request[TRAIL].user = loaded.session.identity.sub
        return loaded
    if wants_html(request):
        return await redirect_to_idp(request, rt, PATH)
    raise NotAuthenticatedError("the sessions page without a session")


async def show(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    loaded = await _signed_in(request, rt)
    if not isinstance(loaded, Loaded):
        return loaded
    infos = await rt.sessions.registry.by_sub(loaded.session.identity.sub)
    if not any(info.storage_id == loaded.storage_id for info in infos):
        infos.append(rt.sessions.info_of(loaded))  # its index entry was lost: still shown
    rows = [(info, info.storage_id == loaded.storage_id) for info in infos]
    rows.sort(key=lambda row: (not row[1], -row[0].last_seen))
    token = csrf_token(loaded)
    if not wants_html(request):
        return web.json_response({"csrf_token": token, "sessions": [
            {"id": handle_of(info), "current": current, "device": device_of(info.user_agent),
             "user_agent": info.user_agent, "client_ip": info.client_ip,
             "signed_in": _when(info.created_at), "last_used": _when(info.last_seen)}
            for info, current in rows]}, headers={"Cache-Control": "no-store"})
    identity = loaded.session.identity
    name = identity.preferred_username or identity.email or identity.sub
    return render(request, 200, "Your sessions",
                  f"Signed in as {name}, on {len(rows)} device(s).", code="sessions",
                  as_html=True, extra_html=_table(
                      rows, token, "POST" in rt.config.session.sign_out_methods))


def _end_form(token: str, end: str, label: str) -> str:
    return (f'<form method="post" action="{PATH}"><input type="hidden" name="csrf" '
            f'value="{token}"><input type="hidden" name="end" value="{end}">'
            f'<button type="submit">{html.escape(label)}</button></form>')


def _table(rows: list[tuple[SessionInfo, bool]], token: str, sign_out_by_post: bool) -> str:
    sign_out = ('<form method="post" action="/oauth2/sign_out"><button type="submit">Sign out'
                '</button></form>') if sign_out_by_post \
        else '<a href="/oauth2/sign_out">Sign out</a>'
    cells = []
    for info, current in rows:
        action = f"<strong>this session</strong>{sign_out}" if current \
            else _end_form(token, handle_of(info), "End this session")
        cells.append(
            f'<tr data-session="{handle_of(info)}"><td>{html.escape(device_of(info.user_agent))}'
            f'<br><small>{html.escape(info.user_agent[:120])}</small></td>'
            f"<td>{html.escape(info.client_ip)}</td><td>{_when(info.created_at)}</td>"
            f"<td>{_when(info.last_seen)}</td><td>{action}</td></tr>")
    others = _end_form(token, "others", "End all other sessions") if len(rows) > 1 else ""
    return ('<table><thead><tr><th>Device</th><th>Address</th><th>Signed in</th>'
            '<th>Last used</th><th></th></tr></thead><tbody>' + "".join(cells) +
            f"</tbody></table>{others}")


async def end(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    # SECURITY: CSRF. Our own origin only (a cross-site form is refused before anything is
    # read), and a token under the session's own key.
    if not same_origin(request, rt.config.server.public_url):
        raise ForbiddenError("sessions page POST from another origin")
    loaded = await _signed_in(request, rt)
    if not isinstance(loaded, Loaded):
        return loaded
    form = await request.post()
    given, which = form.get("csrf"), form.get("end")
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(),
                                                            csrf_token(loaded).encode()):
        raise ForbiddenError("sessions page POST without this session's CSRF token")
    if not isinstance(which, str) or not (which == "others" or _HANDLE.fullmatch(which)):
        raise BadRequestError("sessions page POST names no session (end=<id> or others)")
    sub = loaded.session.identity.sub
    # SECURITY: only this user's own sessions are candidates, and never the current one.
    mine = [info for info in await rt.sessions.registry.by_sub(sub)
            if info.storage_id != loaded.storage_id]
    chosen = mine if which == "others" else [i for i in mine if handle_of(i) == which]
    if which != "others" and not chosen:
        raise NotFoundError("sessions page: no such session of this user (ended already?)")
    ended = await rt.sessions.registry.revoke(chosen)
    logged_out(rt, "user_revoked", ended, sub=sub)
    if wants_html(request):
        return redirect(PATH)
    return web.json_response({"ended": ended}, headers={"Cache-Control": "no-store"})
