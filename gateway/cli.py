"""Command line: `gateway run | check-config | reload | demo | sessions`. The only reader of
GATEWAY_CONFIG.

main(argv) returns the exit code, so tests call it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence

from gateway import __version__, admin, observability, online, server, workers
from gateway import config as config_module
from gateway.advisories import advisories
from gateway.app import build_app
from gateway.errors import ConfigError, StoreUnavailableError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Identity-aware reverse proxy with OpenID Connect login.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "serve until SIGTERM/SIGINT (SIGHUP: reload the config)"),
                       ("check-config", "validate a config file and exit"),
                       ("reload", "check the config, then make the running gateway (by "
                                  "server.pid_file) reload it")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG)")
        if name == "check-config":
            sub.add_argument("--online", action="store_true",
                             help="also ask the IdP, ping the store and each upstream, and "
                                  "print the routes")
    demo = commands.add_parser("demo", help="run a self-contained demo (dev IdP, sample app)")
    demo.add_argument("--port", type=int, default=4180,
                      help="the gateway's port on 127.0.0.1 (default 4180); the demo IdP and "
                           "sample app take two free 127.0.0.1 ports, printed at start")
    sessions = commands.add_parser("sessions", help="list or revoke sessions in the store")
    actions = sessions.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list sessions (never a token)")
    revoking = actions.add_parser("revoke", help="end sessions at once, on every replica")
    for sub in (listing, revoking):
        sub.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG)")
    only = listing.add_mutually_exclusive_group()
    only.add_argument("--user", help="only this user's (sub or email)")
    only.add_argument("--session", help="only this session (its id, or a prefix of it)")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    which = revoking.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", help="every session of this user (sub or email)")
    which.add_argument("--session", help="one session (its id, or a prefix of it)")
    which.add_argument("--all", action="store_true", help="every session")
    return parser


def _load(path: str | None, *, secret_needed: bool = True) -> config_module.Config:
    path = path or os.environ.get("GATEWAY_CONFIG")
    if not path:
        raise ConfigError("--config", "no config file given (or set GATEWAY_CONFIG)")
    return config_module.load(path, os.environ, secret_needed=secret_needed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, and usage errors (2)
        return int(exc.code or 0)
    if args.command == "demo":
        from gateway.demo import run_demo

        return run_demo(port=args.port)
    try:
        if args.command == "sessions":  # ops run these without the client secret
            config = _load(args.config, secret_needed=False)
            observability.setup(config.logging)  # a revocation's audit line, on stderr
            text, matched = asyncio.run(admin.run(
                config, args.action, user=args.user, session=args.session,
                every=getattr(args, "all", False), as_json=getattr(args, "json", False)))
            print(text)
            # revoking nothing that was named is worth a non-zero exit to a script
            return 1 if args.action == "revoke" and not matched and not args.all else 0
        config = _load(args.config)
        config.oidc.secret()  # a missing secret file is a config error, found before serving
        if args.command == "check-config":
            for note in advisories(config):
                print(f"warning: {note}", file=sys.stderr)
            print(f"config OK: {len(config.routes)} route(s)\n"
                  f"store namespace: {config.store_keys.prefix}:")
            if not args.online:
                return 0
            report, healthy = asyncio.run(online.check(config))
            print(report)
            return 0 if healthy else 1
        if args.command == "reload":
            return _signal_reload(config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    except admin.UsageError as exc:
        print(f"usage: gateway sessions {args.action} ...  (see --help)\n"
              f"gateway sessions {args.action}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"config error: oidc.client_secret_file: {exc.strerror}", file=sys.stderr)
        return 1
    except StoreUnavailableError as exc:
        print(f"store error: {exc.detail}", file=sys.stderr)
        return 1
    observability.setup(config.logging)
    log = logging.getLogger("gateway")
    if workers.is_worker():  # the supervisor said all this once
        log.info("gateway_worker_starting pid=%d", os.getpid())
    else:
        log.info("gateway_starting listen=%s public_url=%s routes=%d workers=%d",
                 config.server.listen, config.server.public_url, len(config.routes),
                 workers.count(config))
        for note in advisories(config):
            log.warning("config_warning advice=%s", note)
    if config.session.store_location.kind == "memory":
        # Nothing can tell from here whether other replicas run; say what this choice means.
        log.warning("session_store_in_memory: sessions live in this process only; they end "
                    "on restart and other replicas cannot see them (use redis:// for more "
                    "than one replica)")
    path = args.config or os.environ["GATEWAY_CONFIG"]  # _load found one of them
    try:
        with _pid_file(config):
            if workers.count(config) > 1 and not workers.is_worker():
                return asyncio.run(workers.Supervisor(config, workers.worker_argv()).run())
            server.run(server.serve(build_app(config), config, path), config)
    except ConfigError as exc:  # found only once serving starts: the address is taken
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _pid_file(config: config_module.Config) -> Iterator[None]:
    """server.pid_file holds this process's pid while it serves (not a worker's: the
    supervisor passes signals on)."""
    path = config.server.pid_file
    if path is None or workers.is_worker():
        yield
        return
    try:
        path.write_text(f"{os.getpid()}\n")
    except OSError as exc:
        raise ConfigError("server.pid_file", f"cannot write {path}: {exc.strerror}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _signal_reload(config: config_module.Config) -> int:
    """`gateway reload`: the config was valid (or main said why not); SIGHUP the process in
    server.pid_file, which re-reads it."""
    path = config.server.pid_file
    if path is None:
        print("config error: server.pid_file: not set, so the running gateway cannot be "
              "found (or send it SIGHUP yourself)", file=sys.stderr)
        return 1
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a pid"
        print(f"reload failed: server.pid_file {path}: {reason} (is the gateway running?)",
              file=sys.stderr)
        return 1
    print(f"config OK; reload signalled to pid {pid}")
    return 0
