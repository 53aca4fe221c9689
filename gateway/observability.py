"""Logging setup and the access log: one line per request, never a token, code or cookie.

The access line carries the method, the path without its query (queries carry OAuth codes
and state), the route, the status, the whole and the upstream durations, what became of the
request (outcome), its request id, the user's sub and the rule that decided. With
`logging.format: json` it is one JSON object with those as typed fields; other lines are
objects with the message.

The request id is the X-Request-ID a trusted proxy sent (server.trusted_proxies; a plain
token of at most 128 characters), else a new random one; the upstream gets it as
X-Request-ID, so its logs and the gateway's meet.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from gateway.config import LoggingConfig
from gateway.headers import is_trusted
from gateway.runtime import (
    DECIDED_BY,
    REQUEST_ID,
    ROUTE_NAME,
    UPSTREAM_MS,
    USER_SUB,
    runtime_from,
)

access_log = logging.getLogger("gateway.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# What became of a request that did not reach an upstream, by status.
_OUTCOMES = {302: "sign_in", 401: "unauthenticated", 403: "denied", 404: "no_route",
             429: "rate_limited"}


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {"time": self.formatTime(record),
                                    "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # the access line: typed fields, no text to parse
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class RedactParserErrors(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending bytes (a Cookie header, say)
    and a traceback, as an ERROR. Keep the fact, drop the bytes: cookies and tokens never
    reach a log. It is the client's mistake (answered 400), not the gateway's: INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            error = record.exc_info[1]
            record.msg = "bad_http_request status=%d error=%s"
            record.args = (error.code, type(error).__name__)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def redact_framework_logs() -> None:
    """Idempotent: attach the redacting filter to aiohttp's server logger once."""
    server_logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RedactParserErrors) for f in server_logger.filters):
        server_logger.addFilter(RedactParserErrors())


def setup(config: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("gateway")
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    root.propagate = False
    logging.getLogger("aiohttp").handlers[:] = [handler]
    redact_framework_logs()


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID")
    if given is not None and _REQUEST_ID.fullmatch(given) and is_trusted(
            request.remote or "", runtime_from(request).config.server.trusted_networks):
        return given
    return secrets.token_hex(16)


def _outcome(request: web.Request, status: int) -> str:
    if UPSTREAM_MS in request:
        return "proxied"
    if status >= 500:
        return "error"
    if ROUTE_NAME in request:
        return _OUTCOMES.get(status, "refused" if status >= 400 else "gateway")
    return "refused" if status >= 400 else "gateway"  # the gateway's own endpoints


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    request[REQUEST_ID] = request_id = _request_id(request)
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        duration = (time.perf_counter() - started) * 1000
        upstream = request.get(UPSTREAM_MS)
        fields = {
            "event": "access", "method": request.method,
            # SECURITY: the raw path (no decoded CR/LF) and never the query (OAuth code, state)
            "path": request.raw_path.split("?", 1)[0], "route": request.get(ROUTE_NAME),
            "status": status, "duration_ms": round(duration, 1),
            "upstream_ms": round(upstream, 1) if upstream is not None else None,
            "outcome": _outcome(request, status), "request_id": request_id,
            "user": request.get(USER_SUB), "rule": request.get(DECIDED_BY)}
        access_log.info(
            "%s %s route=%s status=%d duration_ms=%.1f upstream_ms=%s outcome=%s id=%s "
            "user=%s rule=%s", fields["method"], fields["path"], fields["route"] or "-",
            status, duration, "-" if upstream is None else f"{upstream:.1f}",
            fields["outcome"], request_id, fields["user"] or "-", fields["rule"] or "-",
            extra={"fields": fields})
