"""Logging setup, the access log and the request metrics: one line per request, never a
token, code or cookie.

The access line carries the method, the path without its query (queries carry OAuth codes
and state), the route, the status, the whole and the upstream durations, what became of the
request (outcome), its request id, the user's sub and the rule that decided. The same
middleware counts the request in the metrics (metrics.py).

With `logging.format: json` every line is one JSON object with typed fields. The access line
gives its own; every other line of the gateway's is written as `event key=%s key=%d ...`
(a test holds every log call in gateway/ to that shape), and the formatter reads the fields
from that template and its arguments (not from the rendered text, so a value with spaces
stays one value): the event name, then each key with its argument as a JSON string, number,
boolean or null; any explanation after the fields is the `message`. A line logged while a
request is handled carries that request's id, audit lines included.

Audit lines (logger `gateway.audit`) record what changed who may do what: sign-ins and their
failures, each kind of sign-out and revocation, refusals, step-ups and config reloads.

The request id is the X-Request-ID a trusted proxy sent (server.trusted_proxies; a plain
token of at most 128 characters), else a new random one; the upstream gets it as
X-Request-ID, so its logs and the gateway's meet.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import TextIO

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from gateway.config import LoggingConfig
from gateway.headers import is_trusted
from gateway.runtime import TRAIL, Runtime, Trail, runtime_from

access_log = logging.getLogger("gateway.access")
audit_log = logging.getLogger("gateway.audit")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The id of the request being handled, for every line logged meanwhile (JSON lines).
_current_request = contextvars.ContextVar[str | None]("request_id", default=None)
# A printf placeholder; an event name; a `key=` just before a placeholder; a unit after one.
_PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdifgr%]")
_EVENT = re.compile(r"[a-z][a-z0-9_]*")
_KEY = re.compile(r"(?:^|\s)([a-z][a-z0-9_]*)=$")
_UNIT = re.compile(r"m?s\b")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_ACCESS = ("%s %s route=%s status=%d duration_ms=%.1f upstream_ms=%s outcome=%s id=%s "
           "user=%s rule=%s")
# The access line as _TEXT_FORMAT makes it (date and time, milliseconds, level, logger).
_ACCESS_LINE = "%s,%03d INFO gateway.access " + _ACCESS
# What became of a request that did not reach an upstream, by status.
_OUTCOMES = {302: "sign_in", 401: "unauthenticated", 403: "denied", 404: "no_route",
             429: "rate_limited"}


def _typed(value: object, conversion: str) -> object:
    if value is None or isinstance(value, bool):
        return value
    if conversion in "di" and isinstance(value, int | float):
        return int(value)
    if conversion in "fg" and isinstance(value, int | float):
        return float(value)
    return value if isinstance(value, int | float | str) else str(value)


def template_fields(template: str, args: tuple[object, ...]) -> dict[str, object] | None:
    """`event key=%s key=%d ... [explanation]` and its arguments as typed fields; None when
    the template is not of that shape."""
    fields: dict[str, object] = {}
    placeholders = list(_PLACEHOLDER.finditer(template))
    if len(placeholders) != len(args) or any(m.group() == "%%" for m in placeholders):
        return None
    event, _, _ = template.partition(" ")
    if event == "%s" and args and isinstance(args[0], str) and _EVENT.fullmatch(args[0]):
        fields["event"], placeholders, args = args[0], placeholders[1:], args[1:]
    elif _EVENT.fullmatch(event.rstrip(":")):
        fields["event"] = event.rstrip(":")
    else:
        return None
    end = template.find(" ") if " " in template else len(template)
    for match, value in zip(placeholders, args, strict=True):
        key = _KEY.search(template, 0, match.start())
        if key is None or key.end() != match.start():
            return None
        fields[key.group(1)] = _typed(value, match.group()[-1])
        end = match.end()
        unit = _UNIT.match(template, end)  # lifetime=%gs: the unit stays in the docs
        if unit is not None:
            end = unit.end()
    rest = template[end:].strip(" :(),;.") if placeholders else template[end:].strip(" :")
    if rest:
        fields["message"] = rest.replace("%%", "%")
    return fields


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {"time": self.formatTime(record),
                                    "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if not isinstance(fields, dict):  # the access line brings its own fields
            args = record.args if isinstance(record.args, tuple) else ()
            fields = template_fields(str(record.msg), args) if isinstance(record.msg, str) \
                else None
        entry.update(fields if fields is not None else {"message": record.getMessage()})
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry.setdefault("request_id", request_id)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The gateway's log handler, installed by setup(). It also writes the access line, one
    per request, itself (write_access) when nothing but this handler listens to it: the
    same bytes logging would write, without a LogRecord, the walk through the loggers and
    the formatter (about 8% of a proxied request's instructions, 16% of a 401's:
    callgrind). A handler, filter or level anyone adds puts the line back through logging."""

    def __init__(self, stream: TextIO, json_lines: bool) -> None:
        super().__init__(stream)
        self.addFilter(RequestIds())
        self.setFormatter(_JSONFormatter() if json_lines else logging.Formatter(_TEXT_FORMAT))
        self._json_lines = json_lines
        self._own = (self.formatter, *self.filters)
        self._second, self._date = -1, ""  # the timestamp's part to the second, kept

    def _date_to(self, second: int) -> str:
        """Formatter.formatTime's default to the second (local time): kept for the second."""
        if second != self._second:
            self._second = second
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._date

    def write_access(self, fields: dict[str, object], args: tuple[object, ...]) -> bool:
        """Write the access line directly; False when logging must write it: the handler's
        level, formatter or filters are no longer the ones setup() gave it."""
        if self.level > logging.INFO or (self.formatter, *self.filters) != self._own:
            return False
        now = time.time()
        second = int(now)
        millisecond = int((now - second) * 1000)
        if self._json_lines:
            line = json.dumps({"time": f"{self._date_to(second)},{millisecond:03d}",
                               "level": "info", "logger": access_log.name, **fields},
                              default=str)
        else:  # one formatting for the whole line
            line = _ACCESS_LINE % (self._date_to(second), millisecond, *args)
        try:
            with self.lock:  # type: ignore[union-attr]
                stream = self.stream
                stream.write(line + self.terminator)
                if not getattr(stream, "line_buffering", False):  # that one wrote it already
                    stream.flush()
        except Exception:  # reported as StreamHandler.emit reports it
            self.handleError(access_log.makeRecord(
                access_log.name, logging.INFO, "", 0, _ACCESS, args, None))
        return True


def _direct_handler() -> _Handler | None:
    """setup()'s handler, when it alone hears the access line."""
    if access_log.handlers or access_log.filters or not access_log.propagate \
            or not access_log.isEnabledFor(logging.INFO):
        return None
    parent = access_log.parent
    if parent is None or parent.propagate or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    return handler if isinstance(handler, _Handler) else None


class RequestIds(logging.Filter):
    """Stamps a record with the id of the request being handled when it was logged (the
    handler's filters run then, in the request's context), for the JSON line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _current_request.get()
        return True


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
    # What no line of ours shows, not gathered for every record (the logging HOWTO's
    # "Optimization"): the caller's file and line (a stack walk per line), and the thread's
    # and process's names. About 2.5% of a proxied request's instructions (callgrind).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _Handler(sys.stderr, json_lines=config.format == "json")
    root = logging.getLogger("gateway")
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    root.propagate = False
    logging.getLogger("aiohttp").handlers[:] = [handler]
    redact_framework_logs()


def logged_out(rt: Runtime, kind: str, sessions: int, *, sub: object = None,
               sid: object = None) -> None:
    """Sessions ended, of any kind (sign_out, backchannel, frontchannel, refresh_refused,
    user_revoked): counted in the metrics and told in one audit line."""
    rt.metrics.logout(kind, sessions)
    audit_log.info("logout kind=%s sessions=%d sub=%s sid=%s", kind, sessions, sub, sid)


def _request_id(request: web.Request, rt: Runtime) -> str:
    given = request.headers.get("X-Request-ID")
    if given is not None and _REQUEST_ID.fullmatch(given) and is_trusted(
            request.remote or "", rt.config.server.trusted_networks):
        return given
    return rt.request_ids.new()


def _outcome(trail: Trail, status: int) -> str:
    if trail.upstream_ms is not None:
        return "proxied"
    if status >= 500:
        return "error"
    if trail.route is not None:
        return _OUTCOMES.get(status, "refused" if status >= 400 else "gateway")
    return "refused" if status >= 400 else "gateway"  # the gateway's own endpoints


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    rt = runtime_from(request)
    request[TRAIL] = trail = Trail(_request_id(request, rt))
    current = _current_request.set(trail.request_id)
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        _current_request.reset(current)
        duration = (time.perf_counter() - started) * 1000
        upstream, route = trail.upstream_ms, trail.route
        outcome = _outcome(trail, status)
        rt.metrics.request(
            route, status, outcome, duration / 1000,
            upstream / 1000 if upstream is not None else None)
        fields: dict[str, object] = {
            "event": "access", "method": request.method,
            # SECURITY: the raw path (no decoded CR/LF) and never the query (OAuth code, state)
            "path": request.raw_path.split("?", 1)[0], "route": route,
            "status": status, "duration_ms": round(duration, 1),
            "upstream_ms": round(upstream, 1) if upstream is not None else None,
            "outcome": outcome, "request_id": trail.request_id,
            "user": trail.user, "rule": trail.rule}
        args = (fields["method"], fields["path"], route or "-", status, duration,
                "-" if upstream is None else f"{upstream:.1f}", outcome, trail.request_id,
                trail.user or "-", trail.rule or "-")
        direct = _direct_handler()
        if direct is None or not direct.write_access(fields, args):
            access_log.info(_ACCESS, *args, extra={"fields": fields})
