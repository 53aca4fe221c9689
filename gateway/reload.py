"""Live reload: SIGHUP (or `gateway reload`) re-reads the config file and swaps it in whole.

A valid config replaces routes, policies, upstreams and the other per-request settings in
one assignment (Runtime.snapshot): a request reads the snapshot once (pipeline.resolve), so
one in flight finishes on the config it started with, and nothing is dropped (connections,
WebSockets and sessions live outside the snapshot). An invalid config is refused: the error
is logged and the running config stays.

Some settings are built into what lives as long as the process: the listening socket and the
workers, the IdP client and its keys, the session store and its keys, the introspection cache,
logging. A change to one of those is not half-applied: the log names each such key, the old
value stays in force, and everything else in the new config is applied.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.config import Config
from gateway.config import load as load_config
from gateway.errors import ConfigError
from gateway.observability import audit_log as log  # every line here is an audit line
from gateway.runtime import Runtime, Snapshot

# server.* keys that belong to the listener or the process, not to a request.
_SERVER_AT_START = ("listen", "workers", "public_url", "max_header_size", "shutdown_timeout",
                    "shutdown_delay", "pid_file", "metrics_listen")
_API_AT_START = ("introspection_endpoint", "introspection_cache")
_SECTIONS_AT_START = ("oidc", "session", "logging")


def needs_restart(old: Config, new: Config) -> list[str]:
    """The keys whose new value only a restart would bring in."""
    changed = [f"server.{key}" for key in _SERVER_AT_START
               if getattr(old.server, key) != getattr(new.server, key)]
    changed += [f"api.{key}" for key in _API_AT_START
                if getattr(old.api, key) != getattr(new.api, key)]
    for section in _SECTIONS_AT_START:
        before, after = getattr(old, section), getattr(new, section)
        changed += [f"{section}.{key}" for key in type(before).model_fields
                    if getattr(before, key) != getattr(after, key)]
    return changed


def applicable(old: Config, new: Config) -> Config:
    """`new`, with the running values of what needs a restart."""
    # model_copy: the values are validated already (the keys kept do not feed any value
    # derived from the others, such as trusted_networks).
    server = new.server.model_copy(
        update={key: getattr(old.server, key) for key in _SERVER_AT_START})
    api = new.api.model_copy(update={key: getattr(old.api, key) for key in _API_AT_START})
    return new.model_copy(update={"server": server, "api": api, "oidc": old.oidc,
                                  "session": old.session, "logging": old.logging})


def reload(rt: Runtime, path: str | Path) -> bool:
    """Re-read `path` and swap the runtime's snapshot; False (and the old config kept) when
    the file is not a valid config."""
    applied = _reload(rt, path)
    rt.metrics.reload(applied)
    return applied


def _reload(rt: Runtime, path: str | Path) -> bool:
    try:
        new = load_config(path, os.environ)
        new.oidc.secret()  # as at start: a secret file that cannot be read is a config error
    except ConfigError as exc:
        log.error("config_reload_refused error=%s (the running config stays)", exc)
        return False
    except OSError as exc:
        log.error("config_reload_refused error=%s (the running config stays)",
                  f"oidc.client_secret_file: {exc.strerror}")
        return False
    old = rt.config
    restart = needs_restart(old, new)
    if restart:
        log.warning("config_reload_needs_restart keys=%s: they keep their running values "
                    "until the gateway restarts; the rest is applied", ",".join(restart))
    try:
        snapshot = Snapshot.build(applicable(old, new), rt.upstreams)
    except Exception:  # an upstream_tls.ca_file that cannot be loaded, or a bug: never half
        log.exception("config_reload_refused (the running config stays)")
        return False
    rt.snapshot = snapshot  # one assignment: atomic for requests
    log.info("config_reloaded routes=%d policies=%d", len(snapshot.config.routes),
             len(snapshot.config.policies))
    return True
