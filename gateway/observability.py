"""Logging setup and the access log: one line per request, never a token, code or cookie.

The access line carries the path without its query (queries carry OAuth codes and state), the
route, the status, the duration and the user's sub.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from gateway.config import LoggingConfig
from gateway.runtime import DECIDED_BY, ROUTE_NAME, USER_SUB

access_log = logging.getLogger("gateway.access")


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
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


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        access_log.info(
            "%s %s route=%s status=%d duration_ms=%.1f user=%s rule=%s",
            request.method,
            # SECURITY: the raw path (no decoded CR/LF) and never the query (OAuth code, state)
            request.raw_path.split("?", 1)[0],
            request.get(ROUTE_NAME, "-"),
            status,
            (time.perf_counter() - started) * 1000,
            request.get(USER_SUB, "-"),
            request.get(DECIDED_BY, "-"),
        )
