"""Logs machines can read: every log call in gateway/ is `event key=%s ...`, which the JSON
formatter turns into typed fields; audit lines for sign-ins, refusals, step-ups and sign-outs,
with the request's id, through a real gateway and the demo IdP."""

from __future__ import annotations

import ast
import json
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import StackFactory, login

from gateway import observability
from gateway.observability import template_fields
from gateway.runtime import RequestIds

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def _log_calls() -> list[tuple[str, str, int]]:
    """(where, template, number of arguments) of every call like log.info("...", ...)."""
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.endswith("log")):
                continue
            args = node.args[1:] if node.func.attr == "log" else node.args
            if node.func.attr not in _LEVELS | {"log"} or not args or any(
                    keyword.arg == "extra" for keyword in node.keywords):
                continue  # (the access line brings its fields itself)
            template = args[0]
            assert isinstance(template, ast.Constant) and isinstance(template.value, str), (
                f"{path.name}:{node.lineno}: a log template must be a literal, with the values "
                "as arguments")
            calls.append((f"{path.name}:{node.lineno}", template.value, len(args) - 1))
    return calls


def test_the_package_logs_in_many_places() -> None:
    assert len(_log_calls()) > 40  # the scan below sees them: it is not vacuous


@pytest.mark.parametrize(("where", "template", "count"), _log_calls())
def test_every_log_line_is_an_event_with_named_fields(where: str, template: str,
                                                      count: int) -> None:
    args: tuple[object, ...] = ("some_event", *["v"] * (count - 1)) \
        if template.startswith("%s ") else ("v",) * count
    fields = template_fields(template, args)
    assert fields is not None, f"{where}: {template!r} is not `event key=%s ...`"
    assert set(fields) - {"event", "message"} or count == 0 or template.startswith("%s ")


def test_fields_are_typed_and_values_with_spaces_stay_whole() -> None:
    assert template_fields("refresh_failed sub=%s detail=%s", ("bob", "no answer in 3s")) == {
        "event": "refresh_failed", "sub": "bob", "detail": "no answer in 3s"}
    assert template_fields(
        "access_token_lifetime_short lifetime=%gs refresh_margin=%gs: sessions refresh often",
        (30, 60.0)) == {"event": "access_token_lifetime_short", "lifetime": 30.0,
                        "refresh_margin": 60.0, "message": "sessions refresh often"}
    assert template_fields("%s status=%d detail=%s", ("login_failed", 400, "x")) == {
        "event": "login_failed", "status": 400, "detail": "x"}
    assert template_fields("logout kind=%s sessions=%d sub=%s", ("sign_out", 1, None)) == {
        "event": "logout", "kind": "sign_out", "sessions": 1, "sub": None}
    assert template_fields("websocket_closed_idle", ()) == {"event": "websocket_closed_idle"}
    # not of the shape: a placeholder without a key, a sentence, an argument count off
    assert template_fields("config_warning %s", ("x",)) is None
    assert template_fields("Error handling request", ()) is None
    assert template_fields("a b=%s", ()) is None


def _json(record: logging.LogRecord) -> dict[str, Any]:
    return dict(json.loads(observability._JSONFormatter().format(record)))


async def test_audit_lines_for_sign_in_refusal_step_up_and_sign_out_carry_the_request_id(
        make_stack: StackFactory, browser: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    stack = await make_stack(routes=[
        {"name": "admin", "path_prefix": "/admin", "allow": {"groups": ["admins"]}},
        {"name": "vault", "path_prefix": "/vault", "acr_values": ["urn:demo:mfa"]},
        {"name": "app", "path_prefix": "/"}])
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(observability.RequestIds())  # as setup() does to its handler
    await login(browser, stack.gateway, "/echo", user="bob")
    async with browser.get(stack.gateway + "/admin/", allow_redirects=False) as resp:
        assert resp.status == 403
    async with browser.get(stack.gateway + "/vault/", allow_redirects=False) as resp:
        assert resp.status == 302
    async with browser.post(stack.gateway + "/oauth2/sign_out", allow_redirects=False,
                            headers={"Origin": stack.gateway}) as resp:
        assert resp.status == 302
    async with browser.get(stack.gateway + "/oauth2/callback?state=forged&code=x") as resp:
        assert resp.status == 400
    lines = [_json(r) for r in caplog.records if r.name.startswith("gateway")]
    audit = [line for line in lines if line["logger"] == "gateway.audit"]
    assert [line["event"] for line in audit] == [
        "login_succeeded", "access_denied", "step_up_required", "logout", "login_failed"]
    signed_in, denied, step_up, signed_out, failed = audit
    assert (signed_in["sub"], signed_in["client"], signed_in["step_up"]) == (
        "bob", "127.0.0.1", False)
    assert isinstance(signed_in["sid"], str) and signed_in["sid"]
    assert (denied["route"], denied["sub"], denied["rule"]) == (
        "admin", "bob", "routes[admin].allow")
    assert (step_up["route"], step_up["acr_values"], step_up["max_age"]) == (
        "vault", "urn:demo:mfa", None)
    assert (signed_out["kind"], signed_out["sessions"], signed_out["sub"]) == (
        "sign_out", 1, "bob")
    assert (failed["reason"], failed["status"], failed["level"]) == (
        "unknown_state", 400, "warning")
    # each audit line has the id of its request, as that request's access line does
    access = [(line["path"], line["request_id"]) for line in lines if line["event"] == "access"]
    assert (signed_in["request_id"], failed["request_id"]) == tuple(
        request_id for path, request_id in access if path == "/oauth2/callback")
    access = dict(access)
    assert denied["request_id"] == access["/admin/"]
    assert signed_out["request_id"] == access["/oauth2/sign_out"]
    # a refusal the audit line told is not told again as a warning
    assert not [line for line in lines if line["event"] == "access_denied"
                and line["logger"] != "gateway.audit"]
    assert not [line for line in lines if line.get("message") and line["level"] != "debug"
                and "event" not in line]  # every line of the gateway's is an event


def test_new_request_ids_are_distinct_hex_across_refills_of_the_random_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawn 256 at a time from one os.urandom call: every id is 16 fresh bytes, none
    repeats across pools, and the pool is refilled only when spent."""
    calls: list[int] = []
    real = os.urandom

    def counted(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counted)
    ids = RequestIds()
    drawn = [ids.new() for _ in range(3 * 256 + 1)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in drawn)
    assert len(set(drawn)) == len(drawn)
    assert calls == [RequestIds.POOL] * 4
