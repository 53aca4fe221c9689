"""The gateway's one exception hierarchy.

Every failure a user or operator can cause is one of these; `pages.error_middleware` is the
only place that turns them into HTTP responses. Each class carries the status, a public
message that is safe to show (never a token, cookie or secret) and a log event name.

    GatewayError
     ├── ConfigError                 operator error in the YAML or the environment
     ├── BadRequestError        400  malformed path, parameters or cookies
     │    ├── BearerRequestError 400  a malformed Authorization on a bearer route (RFC 6750)
     │    └── WebSocketHandshakeError 400  a WebSocket opening handshake RFC 6455 refuses
     ├── LoginError             400  the login could not complete (state, IdP error, bad token)
     ├── NotAuthenticatedError  401  API client without a session or bearer token
     │    ├── StepUpRequiredError 401  its sign-in is too old or weak for the route (RFC 9470)
     │    ├── SignInRequiredError 401  a browser at forward-auth: where to sign in, for the front
     │    └── InvalidTokenError 401  its bearer token failed a check (RFC 6750 invalid_token)
     ├── ForbiddenError         403  authenticated but denied by the route's allow rules
     │    └── InsufficientScopeError 403  a bearer token without a scope the route needs
     ├── NotFoundError          404  no route matches
     ├── PayloadTooLargeError   413  the body is over the route's max_body_size
     ├── MethodNotAllowedError  405  a gateway endpoint called with a disabled method
     ├── RequestTimeoutError    408  the client went silent while sending its body
     ├── URITooLongError        414  the request line is over the parser's limit
     ├── TooManyRequestsError   429  too many sign-ins started from one client address
     │    └── RateLimitedError  429  over a route's rate_limit
     ├── HeadersTooLargeError   431  a header line over server.max_header_size, or too many
     ├── IdPError               502  the OpenID Provider answered badly
     │    ├── IdPTimeoutError   504
     │    └── IssuerMismatchError 502  discovery names another issuer than oidc.issuer
     ├── IdPUnavailableError    503  the OpenID Provider cannot be reached (discovery/JWKS)
     ├── StoreUnavailableError  503  the session store cannot be reached
     └── UpstreamError          502  the upstream refused or broke the connection
          └── UpstreamTimeoutError 504
"""

from __future__ import annotations

import contextlib
import html
import os
from collections.abc import Iterator


class GatewayError(Exception):
    status: int = 500
    title: str = "Internal error"
    public_message: str = "The gateway could not handle this request."
    event: str = "gateway_error"
    # Logged at DEBUG, not WARNING: routine answers the access log line already tells (a
    # request without a session), which a flood would otherwise double in the log; set on
    # an instance whose audit line has told it already (a refusal, a failed sign-in).
    routine: bool = False

    def __init__(self, detail: str | None = None) -> None:
        # `detail` is for the log line only; it may name internals but never secrets.
        super().__init__(detail or self.public_message)
        self.detail = detail or self.public_message

    def response_headers(self) -> dict[str, str]:
        """Extra headers the error's response carries (e.g. Retry-After)."""
        return {}

    def extra_html(self) -> str:
        """Markup the error's page adds after its message, built and escaped by the error
        (e.g. a link onwards)."""
        return ""


class ConfigError(GatewayError):
    """Raised with the dotted key and the problem, e.g. ("oidc.issuer", "is required")."""

    event = "config_invalid"

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class BadRequestError(GatewayError):
    status = 400
    title = "Bad request"
    public_message = "The request is malformed."
    event = "bad_request"


class WebSocketHandshakeError(BadRequestError):
    """Its page says what RFC 6455 §4.1 wants; its Sec-WebSocket-Version says which version
    the gateway speaks (§4.4)."""

    public_message = ("The WebSocket opening handshake is malformed: it needs one "
                      "Sec-WebSocket-Key (16 bytes in base64) and Sec-WebSocket-Version 13.")

    def response_headers(self) -> dict[str, str]:
        return {"Sec-WebSocket-Version": "13"}


class BearerRequestError(BadRequestError):
    """RFC 6750 §3.1 invalid_request: the Authorization header cannot be read as one bearer
    token."""

    public_message = "The Authorization header is malformed."
    event = "invalid_request"

    def response_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer error="invalid_request"'}


class LoginError(GatewayError):
    status = 400
    title = "Sign-in failed"
    public_message = "Sign-in could not be completed. Please start again."
    event = "login_failed"

    def __init__(self, detail: str, public_message: str | None = None, *,
                 reason: str = "invalid_callback") -> None:
        """`reason`: a short code for the metrics and the audit line (never the detail)."""
        super().__init__(detail)
        self.reason = reason
        if public_message:
            self.public_message = public_message


class NotAuthenticatedError(GatewayError):
    status = 401
    title = "Authentication required"
    public_message = "Sign in to access this resource."
    event = "not_authenticated"
    routine = True

    def __init__(self, detail: str | None = None, *, bearer: bool = False) -> None:
        """`bearer`: the route takes bearer tokens, so the answer says so (RFC 6750 §3: with
        no credential at all, no error code)."""
        super().__init__(detail)
        self.bearer = bearer

    def response_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"} if self.bearer else {}


class StepUpRequiredError(NotAuthenticatedError):
    """RFC 9470: signed in, but not recently or strongly enough for this resource."""

    public_message = "Sign in again to access this resource."
    event = "insufficient_user_authentication"
    routine = False

    def __init__(self, detail: str | None = None, *, max_age: int | None = None,
                 acr_values: tuple[str, ...] = ()) -> None:
        super().__init__(detail)
        self.max_age = max_age
        self.acr_values = acr_values

    def response_headers(self) -> dict[str, str]:
        params = ['error="insufficient_user_authentication"']
        if self.max_age is not None:
            params.append(f'max_age="{self.max_age}"')
        if self.acr_values:
            params.append(f'acr_values="{" ".join(self.acr_values)}"')
        return {"WWW-Authenticate": "Bearer " + ", ".join(params)}


class SignInRequiredError(NotAuthenticatedError):
    """A browser without a session, at forward-auth (/oauth2/auth): 401, naming where to
    sign in for the front (nginx's error_page redirects there), with a page that goes there
    by itself (Traefik and Envoy hand the page to the browser)."""

    def __init__(self, detail: str | None = None, *, url: str = "/oauth2/start") -> None:
        super().__init__(detail)
        self.url = url

    def response_headers(self) -> dict[str, str]:
        return {"X-Auth-Request-Sign-In": self.url}

    def extra_html(self) -> str:
        url = html.escape(self.url)
        return (f'<meta http-equiv="refresh" content="0; url={url}">'
                f'<p><a href="{url}">Sign in</a></p>')


class InvalidTokenError(NotAuthenticatedError):
    """RFC 6750 §3.1 invalid_token. `description` says which check failed, in words fit for
    the client (never the token); the log line's detail says more."""

    public_message = "The access token is not valid here."
    event = "invalid_token"
    routine = False  # a refused token is worth a line: expiry storms, forgeries

    def __init__(self, detail: str | None = None, *,
                 description: str = "the token is not valid") -> None:
        super().__init__(detail, bearer=True)
        self.description = description

    def response_headers(self) -> dict[str, str]:
        # A quoted-string: descriptions are the gateway's own words, never with '"' or '\'.
        return {"WWW-Authenticate": f'Bearer error="invalid_token", '
                                    f'error_description="{self.description}"'}


class ForbiddenError(GatewayError):
    status = 403
    title = "Access denied"
    public_message = "Your account is not allowed to access this resource."
    event = "access_denied"

    def __init__(self, detail: str | None = None, *, signed_in_as: str | None = None,
                 sign_out_by_post: bool = True) -> None:
        """`signed_in_as`: the user's name, so the page can say who was refused and offer a
        sign-out (to try another account)."""
        super().__init__(detail)
        self.signed_in_as = signed_in_as
        self.sign_out_by_post = sign_out_by_post


class InsufficientScopeError(ForbiddenError):
    """RFC 6750 §3.1 insufficient_scope: the token lacks every scope the route's rules
    accept; `scope` lists them."""

    public_message = "The access token does not carry a scope this resource needs."
    event = "insufficient_scope"

    def __init__(self, detail: str | None = None, *, scopes: tuple[str, ...] = ()) -> None:
        super().__init__(detail)
        self.scopes = scopes

    def response_headers(self) -> dict[str, str]:
        scope = f', scope="{" ".join(self.scopes)}"' if self.scopes else ""
        return {"WWW-Authenticate": f'Bearer error="insufficient_scope"{scope}'}


class NotFoundError(GatewayError):
    status = 404
    title = "Not found"
    public_message = "No application is served at this address."
    event = "route_not_found"


class PayloadTooLargeError(GatewayError):
    status = 413
    title = "Request too large"
    public_message = "The request body is larger than this application accepts."
    event = "payload_too_large"


class RequestTimeoutError(GatewayError):
    status = 408
    title = "Request timed out"
    public_message = "The request body stopped arriving before it was complete."
    event = "request_body_timeout"


class URITooLongError(GatewayError):
    status = 414
    title = "Address too long"
    public_message = "The requested address is longer than this server accepts."
    event = "uri_too_long"


class TooManyRequestsError(GatewayError):
    status = 429
    title = "Too many sign-in attempts"
    public_message = "Too many sign-ins were started from your network. Please wait a minute."
    event = "login_rate_limited"

    def __init__(self, detail: str | None = None, *, retry_after: int = 60) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def response_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimitedError(TooManyRequestsError):
    """A route's rate_limit, with the draft RateLimit fields (draft-ietf-httpapi-ratelimit-
    headers): the policy, and that nothing remains until t seconds from now."""

    title = "Too many requests"
    public_message = "Too many requests. Please wait a moment and try again."
    event = "rate_limited"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1,
                 fields: dict[str, str] | None = None) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.fields = fields or {}

    def response_headers(self) -> dict[str, str]:
        return {**super().response_headers(), **self.fields}


class HeadersTooLargeError(GatewayError):
    status = 431
    title = "Request headers too large"
    public_message = ("The request headers are larger than this server accepts. "
                      "Clearing this site's cookies usually helps.")
    event = "headers_too_large"


class MethodNotAllowedError(GatewayError):
    status = 405
    title = "Method not allowed"
    public_message = "This address does not accept that method."
    event = "method_not_allowed"

    def __init__(self, detail: str | None = None, *,
                 allowed: frozenset[str] | None = None) -> None:
        super().__init__(detail)
        self.allowed = allowed

    def response_headers(self) -> dict[str, str]:
        """RFC 9110 §15.5.6: a 405 lists the methods the target takes."""
        return {"Allow": ", ".join(sorted(self.allowed))} if self.allowed else {}


class IdPError(GatewayError):
    status = 502
    title = "Identity provider error"
    public_message = "The identity provider returned an invalid answer. Please try again later."
    event = "idp_error"


class IdPTimeoutError(IdPError):
    status = 504
    title = "Identity provider timeout"
    public_message = "The identity provider did not answer in time. Please try again later."
    event = "idp_timeout"


class IssuerMismatchError(IdPError):
    """A configuration error found only at run time: the page and readyz say what it is."""

    title = "Sign-in misconfigured"
    event = "idp_issuer_mismatch"

    public_message = "The identity provider's issuer is not the one configured (oidc.issuer)."
    found: object = None
    configured = ""

    @classmethod
    def between(cls, found: object, configured: str) -> IssuerMismatchError:
        error = cls(f"the discovery document's issuer {found!r} is not oidc.issuer "
                    f"{configured!r}; they must match exactly, trailing slash included")
        error.found, error.configured = found, configured
        error.public_message = (f"The identity provider calls itself {found!r}, but this "
                                f"gateway is configured for {configured!r} (oidc.issuer).")
        return error


class IdPUnavailableError(GatewayError):
    status = 503
    title = "Sign-in unavailable"
    public_message = "The identity provider cannot be reached. Please try again later."
    event = "idp_unavailable"


class StoreUnavailableError(GatewayError):
    status = 503
    title = "Service unavailable"
    public_message = "The session store is unavailable. Please try again shortly."
    event = "store_unavailable"


class UpstreamError(GatewayError):
    status = 502
    title = "Bad gateway"
    public_message = "The application behind the gateway could not be reached."
    event = "upstream_unreachable"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    title = "Gateway timeout"
    public_message = "The application behind the gateway did not answer in time."
    event = "upstream_timeout"


@contextlib.contextmanager
def bind_errors(key: str, address: str) -> Iterator[None]:
    """Binding a listener: an address that is taken or not ours is the config's fault (the
    OSError becomes a ConfigError naming `key` and why)."""
    try:
        yield
    except OSError as exc:
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        raise ConfigError(key, f"cannot listen on {address} ({reason})") from None
