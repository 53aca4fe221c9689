"""Sign-out: delete the server-side session and the cookie, then leave via the IdP if it can.

With an end_session_endpoint in discovery, the browser goes there (RP-Initiated Logout 1.0)
with id_token_hint, client_id and post_logout_redirect_uri = public_url + rd; the IdP must have
that URI registered. Otherwise it goes straight to rd. rd is checked like every return path.
"""

from __future__ import annotations

import logging

from aiohttp import web
from yarl import URL

from gateway.errors import IdPError, IdPUnavailableError
from gateway.pages import redirect
from gateway.redirects import safe_return_path
from gateway.runtime import USER_SUB, runtime_from

log = logging.getLogger("gateway.logout")


async def sign_out(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    return_to = safe_return_path(request.query.get("rd")) or "/"
    cookie_value = request.cookies.get(rt.session_cookie)
    session = await rt.sessions.load(cookie_value)
    await rt.sessions.delete(cookie_value)
    target = return_to
    if session is not None:
        request[USER_SUB] = session.identity.sub
        log.info("session_signed_out sub=%s", session.identity.sub)
        try:
            metadata = await rt.provider.metadata()
        except (IdPError, IdPUnavailableError):
            metadata = None  # the local session is gone; the IdP session will time out itself
        if metadata is not None and metadata.end_session_endpoint:
            target = str(URL(metadata.end_session_endpoint).update_query(
                id_token_hint=session.tokens.id_token,
                client_id=rt.client.client_id,
                post_logout_redirect_uri=rt.config.server.public_url + return_to,
            ))
    response = redirect(target)
    response.del_cookie(rt.session_cookie, path="/")
    return response
