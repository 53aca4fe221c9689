"""Property-based: arbitrary input never crashes the parsers that face the network, and never
yields a session or a redirect off the origin."""

from __future__ import annotations

from urllib.parse import urljoin

from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.errors import BadRequestError
from gateway.redirects import safe_return_path
from gateway.routing import canonical_path
from gateway.sessions.cookies import SessionCookie
from gateway.sessions.keys import Keys
from gateway.sessions.store import _attempt_key

URLISH = st.text(alphabet=st.sampled_from(list("/\\%.:@?#;=&2345acdefFC tx\t\r\n\x00\uff0f")),
                 max_size=40)


@given(st.one_of(st.text(max_size=200), URLISH))
@settings(max_examples=500)
def test_redirect_check_never_lets_a_browser_leave_the_origin(value: str) -> None:
    accepted = safe_return_path(value)
    if accepted is not None:
        resolved = URL(urljoin("https://app.example.com/x", accepted), encoded=True)
        assert (resolved.scheme, resolved.host) == ("https", "app.example.com")
        assert resolved.port == 443


@given(st.one_of(st.text(max_size=120), st.binary(max_size=120).map(
    lambda raw: raw.decode("latin-1"))))
@settings(max_examples=500)
def test_cookie_parser_accepts_only_what_it_could_have_written(value: str) -> None:
    cookie = SessionCookie.parse(value)
    if cookie is not None:
        assert cookie.value == value


@given(URLISH.map(lambda s: "/" + s))
@settings(max_examples=500)
def test_canonical_paths_are_stable_and_free_of_dot_segments(raw: str) -> None:
    try:
        path = canonical_path(raw)
    except BadRequestError:
        return
    assert path.startswith("/")
    assert "/../" not in path + "/" and "/./" not in path + "/" and "//" not in path
    assert canonical_path(path) == path  # matching and forwarding see the same form


@given(st.text(max_size=300))
def test_any_state_string_maps_to_a_fixed_name_and_key(state: str) -> None:
    keys = Keys.for_deployment("https://idp.example.com", "gw", None)
    name = keys.attempt(state)
    assert name.startswith(keys.prefix + ":attempt:{") and name.endswith("}")
    assert "{" not in name.partition("{")[2]  # one hash tag: the state cannot add another
    assert len(_attempt_key(state)) == 32
