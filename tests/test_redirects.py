"""Return paths: only same-origin paths, whatever the encoding; plus the public corpora."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urljoin

import pytest
from yarl import URL

from gateway.redirects import domain_allowed, safe_return_path, safe_return_url

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


# --- Absolute return URLs on server.redirect_domains (sites behind forward-auth fronts) ---

PUBLIC = "https://auth.example.com"
DOMAINS = (".example.com", "wiki.example.org")


def url_target(value: str | None) -> str | None:
    return safe_return_url(value, public_origin=PUBLIC, domains=DOMAINS)


@pytest.mark.parametrize(("value", "expected"), [
    ("/a?b=c", "/a?b=c"),  # a path, as before
    ("https://auth.example.com/x?y=1", "/x?y=1"),  # the gateway's own origin: a path
    ("https://auth.example.com:443/x", "/x"),
    ("https://app.example.com/x?y=1", "https://app.example.com/x?y=1"),
    ("HTTPS://App.Example.COM/x", "https://app.example.com/x"),
    ("https://deep.app.example.com", "https://deep.app.example.com/"),
    ("https://app.example.com:8443/x", "https://app.example.com:8443/x"),
    ("https://wiki.example.org/page", "https://wiki.example.org/page"),
])
def test_urls_on_allowed_domains_are_accepted(value: str, expected: str) -> None:
    assert url_target(value) == expected


@pytest.mark.parametrize("value", [
    "https://example.com/x",  # ".example.com" is what is under it, not itself
    "https://evilexample.com/x", "https://example.com.evil.com/x",
    "https://other.example.org/x",  # wiki.example.org is listed exactly
    "http://app.example.com/x",  # https gateway: never down to http
    "https://app.example.com@evil.com/x", "https://evil.com#@app.example.com/x",
    "https://evil.com\\@app.example.com/x", "https://evil.com?.example.com/",
    "https://app.example.com\\.evil.com/", "https:/app.example.com/x",
    "https:///app.example.com/x", "//app.example.com/x", "https://app..example.com/x",
    "https://-app.example.com/x", "https://app.example.com:99999/x",
    "https://app.example.com//evil.com", "https://app.example.com/\\evil.com",
    "https://app.example.com/%2F%2Fevil.com", "https://app.example.com/oauth2/start",
    "https://app.example.com\t/x", "https://app%2eexample.com/x",
    "https://app.ex\uff41mple.com/x", "javascript://app.example.com/%0aalert(1)",
    "ftp://app.example.com/x", "https://127.0.0.1/x", "https://app.example.com /x",
])
def test_urls_elsewhere_or_ambiguous_are_refused(value: str) -> None:
    assert url_target(value) is None


def test_without_redirect_domains_only_the_own_origin_is_accepted() -> None:
    assert safe_return_url("https://app.example.com/x", public_origin=PUBLIC) is None
    assert safe_return_url("https://auth.example.com/x", public_origin=PUBLIC) == "/x"


@pytest.mark.parametrize("corpus", ["openredirects-oauth2-proxy.txt",
                                    "openredirects-mod_auth_openidc.txt"])
def test_public_corpora_with_an_allow_list_never_leave_the_allowed_hosts(corpus: str) -> None:
    """The corpora name allowed-looking domains (www.whitelisteddomain.tld, example.com):
    with those allowed, every payload either lands on them or is refused."""
    path = CORPORA / corpus
    if not path.exists():
        pytest.skip(f"{path} is not here (a checkout without ../shared)")
    failures = []
    for number, line in enumerate(path.read_text(encoding="utf-8",
                                                 errors="replace").splitlines(), 1):
        for domains in (DOMAINS, (".whitelisteddomain.tld", "www.whitelisteddomain.tld")):
            accepted = safe_return_url(line, public_origin=PUBLIC, domains=domains)
            if accepted is not None and not _lands_on(accepted, domains):
                failures.append(f"line {number}: {line!r} -> {accepted!r}")
    assert not failures, "\n".join(failures)


def _lands_on(value: str, domains: tuple[str, ...]) -> bool:
    base = PUBLIC + "/oauth2/start"
    for resolved in (urljoin(base, value), str(URL(base).join(URL(value, encoded=True)))):
        parsed = URL(resolved, encoded=True)
        host = parsed.host or ""
        if parsed.scheme != "https" or not (f"https://{host}" == PUBLIC
                                            or domain_allowed(host, domains)):
            return False
    return True
