"""A small development OpenID Provider for the demo and the tests: real flow, real signatures.

Implements discovery, JWKS, the authorization endpoint with a login page, the token endpoint
(authorization_code with PKCE S256; client_secret_basic and client_secret_post), userinfo and
RP-initiated logout. ID tokens are RS256, signed by joserfc with a key made at startup. It keeps
its state in memory on its own Application and is not meant for production use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

from aiohttp import web
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey
from yarl import URL

CODE_TTL = 60  # seconds; an authorization code is exchanged at once
SESSION_COOKIE = "demo_idp_session"
# Sign-in strengths (the ID token's acr): a password, or a password and the one-time code.
ACR_PASSWORD = "urn:gateway:demo:pwd"
ACR_MFA = "urn:gateway:demo:mfa"
DEMO_ONE_TIME_CODE = "123456"  # a demo's second factor: printed on its sign-in page


@dataclass(frozen=True, slots=True)
class DemoUser:
    sub: str
    password: str
    email: str
    name: str
    preferred_username: str
    groups: tuple[str, ...]
    email_verified: bool = True

    def claims(self) -> dict[str, object]:
        return {"email": self.email, "email_verified": self.email_verified, "name": self.name,
                "preferred_username": self.preferred_username, "groups": list(self.groups)}


@dataclass(frozen=True, slots=True)
class DemoClient:
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()


DEMO_USERS: Mapping[str, DemoUser] = types.MappingProxyType({
    "alice": DemoUser("alice", "alice", "alice@example.com", "Alice Admin", "alice",
                      ("admins", "staff")),
    "bob": DemoUser("bob", "bob", "bob@example.com", "Bob Staff", "bob", ("staff",)),
})


@dataclass(frozen=True, slots=True)
class _SignIn:
    """An IdP session: who signed in, when, and how (Core §2: auth_time, acr, amr)."""

    user: str
    auth_time: int
    acr: str
    amr: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Grant:
    client_id: str
    redirect_uri: str
    nonce: str | None
    code_challenge: str
    sid: str
    sign_in: _SignIn
    expires_at: float

    @property
    def user(self) -> str:
        return self.sign_in.user


@dataclass
class _State:
    issuer: str
    clients: dict[str, DemoClient]
    users: Mapping[str, DemoUser]
    clock: Callable[[], float]
    id_token_ttl: int
    userinfo_only_claims: bool
    access_token_ttl: int
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(
        2048, parameters={"kid": secrets.token_hex(8), "use": "sig", "alg": "RS256"}))
    codes: dict[str, _Grant] = field(default_factory=dict)
    access_tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    refresh_tokens: dict[str, _Grant] = field(default_factory=dict)  # rotated on every use
    sessions: dict[str, _SignIn] = field(default_factory=dict)  # IdP session id -> sign-in
    token_requests: int = 0


STATE = web.AppKey("demo_idp_state", _State)


class _AuthorizeError(Exception):
    """A request we must not redirect back for (unknown client or redirect_uri)."""


def create_idp_app(issuer: str, clients: Sequence[DemoClient],
                   users: Mapping[str, DemoUser] = DEMO_USERS, *,
                   clock: Callable[[], float] = time.time, id_token_ttl: int = 300,
                   userinfo_only_claims: bool = False,
                   access_token_ttl: int = 3600) -> web.Application:
    app = web.Application()
    app[STATE] = _State(issuer.rstrip("/"), {c.client_id: c for c in clients}, users, clock,
                        id_token_ttl, userinfo_only_claims, access_token_ttl)
    app.router.add_get("/.well-known/openid-configuration", _discovery)
    app.router.add_get("/jwks", _jwks)
    app.router.add_get("/authorize", _authorize)
    app.router.add_post("/authorize", _authorize)
    app.router.add_post("/token", _token)
    app.router.add_get("/userinfo", _userinfo)
    app.router.add_get("/logout", _logout)
    return app


async def _discovery(request: web.Request) -> web.Response:
    issuer = request.app[STATE].issuer
    return web.json_response({
        "issuer": issuer,
        "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token",
        "userinfo_endpoint": issuer + "/userinfo",
        "jwks_uri": issuer + "/jwks",
        "end_session_endpoint": issuer + "/logout",
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "scopes_supported": ["openid", "email", "profile", "groups"],
        "claims_supported": ["sub", "email", "email_verified", "name", "preferred_username",
                             "groups", "sid", "auth_time", "acr", "amr"],
        "acr_values_supported": [ACR_PASSWORD, ACR_MFA],
    })


async def _jwks(request: web.Request) -> web.Response:
    return web.json_response(KeySet([request.app[STATE].key]).as_dict(private=False))


# --- authorization endpoint -------------------------------------------------------------

_AUTH_PARAMS = ("client_id", "redirect_uri", "response_type", "scope", "state", "nonce",
                "code_challenge", "code_challenge_method", "max_age", "acr_values")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Gateway demo sign-in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:24rem;margin:4rem auto;padding:0 1rem}}
label{{display:block;margin:.8rem 0 .2rem}}input[type=text],input[type=password]{{width:100%;
padding:.4rem}}button{{margin:1rem .5rem 0 0;padding:.4rem 1rem}}.err{{color:#b00}}
.hint{{color:#555;font-size:.9rem}}</style></head>
<body><h1>Gateway demo sign-in</h1>{error}
<form method="post" action="/authorize">{hidden}
<label for="username">Username</label><input type="text" id="username" name="username" autofocus>
<label for="password">Password</label><input type="password" id="password" name="password">
<label for="otp">One-time code (when asked for a second factor)</label>
<input type="text" id="otp" name="otp" autocomplete="one-time-code">
<button type="submit" id="sign-in">Sign in</button>
<button type="submit" name="cancel" value="1" id="cancel">Cancel</button></form>
<p class="hint">Demo users: alice / alice — groups admins, staff; bob / bob — group staff.
The demo's one-time code is 123456.</p>
</body></html>
"""


def _error_page(message: str, status: int = 400) -> web.Response:
    body = (f"<!doctype html><title>Sign-in error</title><h1>Sign-in error</h1>"
            f"<p>{html.escape(message)}</p>")
    return web.Response(status=status, text=body, content_type="text/html")


def _check_client(state: _State, params: Mapping[str, str]) -> DemoClient:
    client = state.clients.get(params.get("client_id", ""))
    if client is None:
        raise _AuthorizeError("Unknown client_id.")
    if params.get("redirect_uri") not in client.redirect_uris:
        raise _AuthorizeError("The redirect_uri is not registered for this client.")
    return client


def _found(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


def _back(params: Mapping[str, str], **query: str) -> web.Response:
    """Send the browser back to the client with `query` (and the state, echoed exactly)."""
    if params.get("state"):
        query["state"] = params["state"]
    return _found(str(URL(params["redirect_uri"]).update_query(query)))


def _protocol_error(params: Mapping[str, str]) -> str | None:
    if params.get("response_type") != "code":
        return "unsupported_response_type"
    if "openid" not in params.get("scope", "").split():
        return "invalid_scope"
    if not params.get("code_challenge") or params.get("code_challenge_method") != "S256":
        return "invalid_request"
    return None


def _login_page(params: Mapping[str, str], error: str = "", status: int = 200) -> web.Response:
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(params[name])}">'
        for name in _AUTH_PARAMS if name in params)
    body = _PAGE.format(hidden=hidden,
                        error=f'<p class="err">{html.escape(error)}</p>' if error else "")
    return web.Response(status=status, text=body, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


def _issue_code(state: _State, params: Mapping[str, str], sign_in: _SignIn, sid: str) -> str:
    code = secrets.token_urlsafe(32)
    state.codes[code] = _Grant(params["client_id"], params["redirect_uri"], params.get("nonce"),
                               params["code_challenge"], sid, sign_in,
                               state.clock() + CODE_TTL)
    return code


def _still_good(state: _State, params: Mapping[str, str], sign_in: _SignIn) -> bool:
    """May the remembered sign-in answer this request without a new one? Not when it is
    older than max_age, nor weaker than the acr_values ask (Core §3.1.2.1)."""
    max_age = params.get("max_age", "")
    if max_age.isdigit() and state.clock() - sign_in.auth_time > int(max_age):
        return False
    return not (ACR_MFA in params.get("acr_values", "").split() and sign_in.acr != ACR_MFA)


async def _authorize(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    form = await request.post() if request.method == "POST" else {}
    source = form if request.method == "POST" else request.query
    params = {name: str(source[name]) for name in _AUTH_PARAMS if name in source}
    try:
        _check_client(state, params)
    except _AuthorizeError as exc:
        return _error_page(str(exc))
    error = _protocol_error(params)
    if error:
        return _back(params, error=error)
    if request.method == "GET":
        sid = request.cookies.get(SESSION_COOKIE, "")
        remembered = state.sessions.get(sid)
        if remembered is not None and request.query.get("prompt") != "login" \
                and _still_good(state, params, remembered):
            return _back(params, code=_issue_code(state, params, remembered, sid))
        return _login_page(params)
    if form.get("cancel"):
        return _back(params, error="access_denied")
    user = state.users.get(str(form.get("username", "")))
    password = str(form.get("password", ""))
    if user is None or not hmac.compare_digest(password.encode(), user.password.encode()):
        return _login_page(params, "Invalid username or password.", status=401)
    otp = str(form.get("otp", "")).strip()
    if otp and not hmac.compare_digest(otp.encode(), DEMO_ONE_TIME_CODE.encode()):
        return _login_page(params, "Invalid one-time code.", status=401)
    if not otp and ACR_MFA in params.get("acr_values", "").split():
        return _login_page(params, "This sign-in needs the one-time code.", status=401)
    sign_in = _SignIn(user.sub, int(state.clock()), ACR_MFA if otp else ACR_PASSWORD,
                      ("pwd", "otp") if otp else ("pwd",))
    sid = secrets.token_urlsafe(16)
    state.sessions[sid] = sign_in
    response = _back(params, code=_issue_code(state, params, sign_in, sid))
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="Lax", path="/")
    return response


# --- token and userinfo endpoints -------------------------------------------------------


def _token_error(error: str, status: int = 400) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if error == "invalid_client":
        headers["WWW-Authenticate"] = 'Basic realm="demo"'
    return web.json_response({"error": error}, status=status, headers=headers)


def _authenticate_client(state: _State, request: web.Request,
                         form: Mapping[str, str]) -> DemoClient | None:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Basic "):
        try:
            decoded = base64.b64decode(auth[6:], validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        raw_id, _, raw_secret = decoded.partition(":")
        client_id, secret = unquote(raw_id.replace("+", " ")), unquote(raw_secret.replace("+", " "))
    else:
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
    client = state.clients.get(client_id)
    if client is None or not hmac.compare_digest(secret.encode(), client.client_secret.encode()):
        return None
    return client


def _pkce_ok(verifier: str, challenge: str) -> bool:
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return hmac.compare_digest(computed, challenge)


def _at_hash(access_token: str) -> str:
    """Core §3.1.3.6: the left half of SHA-256 (RS256's hash) of the access token."""
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def _id_token(state: _State, grant: _Grant, client_id: str, access_token: str, *,
              refreshed: bool = False) -> str:
    now = int(state.clock())
    user = state.users[grant.user]
    claims: dict[str, object] = {"iss": state.issuer, "sub": user.sub, "aud": client_id,
                                 "exp": now + state.id_token_ttl, "iat": now,
                                 "auth_time": grant.sign_in.auth_time, "acr": grant.sign_in.acr,
                                 "amr": list(grant.sign_in.amr),
                                 "sid": grant.sid, "at_hash": _at_hash(access_token)}
    if grant.nonce and not refreshed:  # Core §12.2: a refreshed ID token carries no nonce
        claims["nonce"] = grant.nonce
    if not state.userinfo_only_claims:
        claims.update(user.claims())
    header = {"alg": "RS256", "kid": state.key.kid, "typ": "JWT"}
    return jwt.encode(header, claims, state.key)


async def _token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.token_requests += 1
    form = {k: str(v) for k, v in (await request.post()).items()}
    client = _authenticate_client(state, request, form)
    if client is None:
        return _token_error("invalid_client", 401)
    if form.get("grant_type") == "refresh_token":
        grant = state.refresh_tokens.pop(form.get("refresh_token", ""), None)
        if grant is None or grant.client_id != client.client_id:
            return _token_error("invalid_grant")
        return _tokens(state, grant, client.client_id, refreshed=True)
    if form.get("grant_type") != "authorization_code":
        return _token_error("unsupported_grant_type")
    grant = state.codes.pop(form.get("code", ""), None)  # single use, whatever follows
    if (grant is None or grant.expires_at < state.clock() or grant.client_id != client.client_id
            or grant.redirect_uri != form.get("redirect_uri")
            or not _pkce_ok(form.get("code_verifier", ""), grant.code_challenge)):
        return _token_error("invalid_grant")
    return _tokens(state, grant, client.client_id)


def _tokens(state: _State, grant: _Grant, client_id: str, *,
            refreshed: bool = False) -> web.Response:
    access_token = secrets.token_urlsafe(32)
    state.access_tokens[access_token] = (grant.user, state.clock() + state.access_token_ttl)
    refresh_token = secrets.token_urlsafe(32)
    state.refresh_tokens[refresh_token] = grant
    return web.json_response({
        "access_token": access_token, "token_type": "Bearer",
        "expires_in": state.access_token_ttl, "refresh_token": refresh_token,
        "id_token": _id_token(state, grant, client_id, access_token, refreshed=refreshed),
        "scope": "openid email profile",
    }, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def _userinfo(request: web.Request) -> web.Response:
    state = request.app[STATE]
    auth = request.headers.get("Authorization", "")
    entry = state.access_tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
    if entry is None or entry[1] < state.clock():
        return web.json_response({"error": "invalid_token"}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    user = state.users[entry[0]]
    return web.json_response({"sub": user.sub, **user.claims()})


# --- RP-initiated logout ----------------------------------------------------------------


def _hinted_client(state: _State, request: web.Request) -> DemoClient | None:
    client_id = request.query.get("client_id")
    hint = request.query.get("id_token_hint")
    if not client_id and hint:
        try:
            # Expired hints are fine per RP-Initiated Logout §2; the signature still counts.
            aud = jwt.decode(hint, state.key, algorithms=["RS256"]).claims.get("aud")
        except (JoseError, ValueError):
            return None
        client_id = aud if isinstance(aud, str) else None
    return state.clients.get(client_id or "")


async def _logout(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
    target = request.query.get("post_logout_redirect_uri")
    if target:
        client = _hinted_client(state, request)
        if client is None or target not in client.post_logout_redirect_uris:
            return _error_page("The post_logout_redirect_uri is not registered.")
        if request.query.get("state"):
            target = str(URL(target).update_query(state=request.query["state"]))
        response = _found(target)
    else:
        response = web.Response(text="<!doctype html><title>Signed out</title>"
                                     "<h1>You are signed out</h1>", content_type="text/html")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response
