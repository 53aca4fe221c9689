"""Return paths: only same-origin paths, whatever the encoding; plus the public corpora."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urljoin

import pytest
from yarl import URL

from gateway.redirects import safe_return_path

BASE = "https://app.example.com/start"
CORPORA = Path(__file__).resolve().parents[2] / "shared" / "testdata"


@pytest.mark.parametrize("value", [
    "/", "/a?b=c", "/a%20b", "/deep/path?x=1#frag", "/app?next=//evil.com", "/caf%C3%A9",
])
def test_same_origin_paths_are_accepted(value: str) -> None:
    assert safe_return_path(value) == value


@pytest.mark.parametrize("value", [
    "//evil.com", "/\\evil.com", "/\t/evil.com", "/\n/evil.com", "https://evil.com",
    "https:evil.com", "javascript:alert(1)", "JaVaScRiPt:alert(1)", "/%2F%2Fevil.com",
    "/%2f%2fevil.com", "/%5Cevil.com", "/%5cevil.com", "/%252F%252Fevil.com",
    "/%25252F%25252Fevil.com", "%2F%2Fevil.com", "/%0d%0aSet-Cookie:x=1",
    "/\r\nLocation: x", "/%09/evil.com", "/ /evil.com", "evil.com", "", None,
    "/" + "a" * 5000, "/oauth2/start", "/oauth2", "/oauth2/sign_out?rd=/",
    "/%E0%A4%A", "/%ff",
])
def test_hostile_targets_are_refused(value: str | None) -> None:
    """Open redirect: none of these may leave the origin (or loop into the login)."""
    assert safe_return_path(value) is None


@pytest.mark.parametrize("value", [
    "/\uff0fevil.com",  # fullwidth solidus
    "/\uff3cevil.com",  # fullwidth reverse solidus
    "\uff0f/evil.com",
    "/\u2215evil.com",  # division slash
    "/\u2044evil.com",  # fraction slash
    "/%EF%BC%8Fevil.com",  # fullwidth solidus, percent-encoded
    "/\u00a0/evil.com",
])
def test_unicode_look_alikes_of_slashes_are_refused(value: str) -> None:
    """Open redirect: browsers and IDNA may map these to '/' or '\\'."""
    assert safe_return_path(value) is None


def _stays_on_origin(value: str) -> bool:
    for resolved in (urljoin(BASE, value), str(URL(BASE).join(URL(value, encoded=True)))):
        parsed = URL(resolved, encoded=True)
        if (parsed.scheme, parsed.host, parsed.port) != ("https", "app.example.com", 443):
            return False
    return True


@pytest.mark.parametrize("corpus", ["openredirects-oauth2-proxy.txt",
                                    "openredirects-mod_auth_openidc.txt"])
def test_public_open_redirect_corpora_never_leave_the_origin(corpus: str) -> None:
    path = CORPORA / corpus
    if not path.exists():
        pytest.skip(f"{path} is not here (a checkout without ../shared)")
    failures = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        accepted = safe_return_path(line)
        if accepted is not None and not _stays_on_origin(accepted):
            failures.append(f"line {number}: {line!r}")
    assert not failures, "\n".join(failures)
    assert len(lines) > 100
