"""What a valid configuration probably gets wrong: findings, not errors.

`gateway check-config` prints them and `gateway run` logs them at start. Each names the key
and what will happen at run time, so an operator finds out before the first user does.
"""

from __future__ import annotations

from gateway.config import Config
from gateway.config_routes import RouteConfig
from gateway.routing import host_covers

_SHORT_SECRET = 16


def advisories(config: Config) -> list[str]:
    """What a valid config probably gets wrong: check-config prints these, `gateway run`
    logs them. Each names the key and the consequence."""
    notes: list[str] = []
    oidc = config.oidc
    if not any("group" in scope.lower() for scope in oidc.scopes):
        for key in _group_rules(config):
            notes.append(
                f"{key}: oidc.scopes {list(oidc.scopes)} ask for no groups scope; unless "
                f"the IdP adds the '{oidc.groups_claim}' claim by itself, no user is in any "
                f"group: allow rules on groups let nobody in, deny rules keep nobody out "
                f"(add e.g. 'groups' to oidc.scopes)")
    for route in config.routes:
        outer = _restricted_around(route, config.routes)
        if outer is not None:
            notes.append(
                f"routes[{route.name}]: public, but inside routes[{outer.name}] "
                f"({outer.path_prefix}), which has allow rules: {route.path_prefix} is open "
                f"to everyone (set allow_nested_public: true on routes[{route.name}] if that "
                f"is intended)")
    notes.extend(_bearer_audiences(config))
    if oidc.client_secret is not None and \
            len(oidc.client_secret.get_secret_value()) < _SHORT_SECRET:
        notes.append(f"oidc.client_secret: shorter than {_SHORT_SECRET} characters; a "
                     "confidential client's secret should be long and random")
    return notes


def _bearer_audiences(config: Config) -> list[str]:
    """An audience that is the gateway's own client_id: ID tokens name it too. With typ
    checked (at+jwt) they are refused anyway; with `token_typ: any` only their ID-token
    claims tell them apart."""
    notes = []
    for route in config.routes:
        audiences = route.audiences or config.api.audiences
        if route.bearer and config.oidc.client_id in audiences and \
                config.api.token_typ == "any":  # noqa: S105  (a JOSE typ, no secret)
            key = f"routes[{route.name}].audiences" if route.audiences else "api.audiences"
            notes.append(f"{key}: holds oidc.client_id, the audience of the gateway's own ID "
                         "tokens, and api.token_typ is any: bearer tokens are told apart from "
                         "ID tokens by their claims alone (give the API an audience of its "
                         "own)")
    return notes


def _group_rules(config: Config) -> list[str]:
    """The keys of the groups rules that routes use, each once (a policy may serve many)."""
    keys: list[str] = []
    for route in config.routes:
        allow, deny, source = config.rules_of(route)
        for kind, rules in (("allow", allow or ()), ("deny", deny)):
            for index, rule in enumerate(rules):
                key = f"{source}.{kind}[{index}].groups"
                if rule.groups and key not in keys:
                    keys.append(key)
    return keys


def _restricted_around(route: RouteConfig, routes: tuple[RouteConfig, ...]) -> RouteConfig | None:
    if route.auth != "public" or route.allow_nested_public:
        return None
    for outer in routes:
        if not outer.restricted or not host_covers(outer.host, route.host):
            continue
        prefix = outer.path_prefix.rstrip("/")
        inner = route.path_prefix
        if outer.case_insensitive:
            prefix, inner = prefix.lower(), inner.lower()
        if inner.startswith(prefix + "/"):
            return outer
    return None
