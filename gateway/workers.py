"""`server.workers`: N processes serving one port, under a supervisor.

One Python process does all its work on one core; `workers: N` (or `auto`: one per CPU the
process may use) runs N of them. The supervisor (`gateway run`) binds the listening sockets
itself, one per worker slot, all on the configured address with SO_REUSEPORT, so the kernel
spreads new connections over them evenly; each worker inherits its slot's socket and serves
on it with its own event loop, pools and caches (sessions live in the shared store, which is
why `memory://` is refused with more than one worker).

The supervisor keeps every socket open. When a worker dies, the connections the kernel has
queued on its socket wait there (they are not reset) until the replacement, started at once,
accepts them; one that keeps dying is restarted with a growing pause (up to 10 s), so a crash
loop does not spin. SIGTERM or SIGINT is passed on to every worker, which drains as a single
process does (shutdown_delay, then shutdown_timeout); the supervisor exits when they all have,
with status 0 only if they all ended cleanly. A second signal is passed on too (workers then
stop at once). SIGHUP (a config reload) is passed on to every worker, each of which reloads.

A supervisor that dies without a word (SIGKILL, the OOM killer) must not leave its workers
serving: they would keep the port with the configuration they started with, beside whatever
is started next, and answer part of its traffic by rules since changed. Each worker holds the
read end of a pipe whose only write end the supervisor keeps; the kernel closes that end when
the supervisor goes however it goes, the worker reads end-of-file, and it drains and exits as
on SIGTERM (server.serve).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

from gateway import metrics
from gateway.config import Config
from gateway.errors import ConfigError, bind_errors

log = logging.getLogger("gateway")

LISTEN_FD = "GATEWAY_LISTEN_FD"  # set for a worker: the inherited socket it serves on
LIFELINE_FD = "GATEWAY_LIFELINE_FD"  # and the read end of the pipe its supervisor holds open
_FAST_EXIT = 5.0  # a worker that dies sooner than this after starting counts as crash-looping
_MAX_PAUSE = 10.0


def count(config: Config) -> int:
    workers = config.server.workers
    if workers == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return workers


def listening_socket(config: Config) -> socket.socket:
    """A socket bound to server.listen with SO_REUSEPORT (one per worker slot)."""
    host, port = config.server.host, config.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        with bind_errors("server.listen", config.server.listen):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(1024)
    except ConfigError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def is_worker() -> bool:
    """Was this process started by a supervisor, to serve the socket it handed over?"""
    return LISTEN_FD in os.environ


def inherited_socket() -> socket.socket:
    """In a worker: the socket the supervisor handed it (to be made once: the object owns
    the descriptor)."""
    return socket.socket(fileno=int(os.environ[LISTEN_FD]))


class _Lifeline(asyncio.Protocol):
    """The worker's end of the lifeline: nothing is ever written to the pipe, so all it can
    see is its end (the supervisor's end closed)."""

    def __init__(self, gone: Callable[[], None]) -> None:
        self._gone: Callable[[], None] | None = gone

    def eof_received(self) -> bool | None:
        self._end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # a read error: no lifeline either
            self._end()
        self._gone = None  # closed by this worker itself as it exits: nothing to tell

    def _end(self) -> None:
        if self._gone is not None:
            log.warning("gateway_supervisor_gone pid=%d (draining and exiting, as on "
                        "SIGTERM)", os.getpid())
            self._gone()
            self._gone = None


async def watch_supervisor(gone: Callable[[], None]) -> asyncio.BaseTransport | None:
    """In a worker: call `gone` once, when the supervisor has died (its end of the lifeline
    closed); returns the pipe's transport (None: started by a supervisor of an earlier
    release, with no lifeline). A read-pipe transport, not a bare reader on the descriptor:
    uvloop's readers do not wake for a pipe's hang-up."""
    value = os.environ.get(LIFELINE_FD)
    if value is None:
        return None
    pipe = os.fdopen(int(value), "rb", buffering=0)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: _Lifeline(gone), pipe)
    return transport


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self._sockets = [listening_socket(config) for _ in range(count(config))]
        # The workers' lifeline (module docstring): they inherit the read end; the write
        # end is this process's alone (not inheritable), so it closes when this one ends.
        self._lifeline, self._lifeline_held = os.pipe()
        self._argv = list(argv)  # how this process was started: each worker runs the same
        self._stopping = False
        self._clean = True
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._metrics_listen = config.server.metrics_listen
        self._metrics: metrics.WorkerMetrics | None = None
        self._starting = asyncio.Lock()

    async def run(self) -> int:
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self._metrics_listen is not None:  # the workers' numbers, added up
                    self._metrics = metrics.WorkerMetrics()
                    stack.callback(self._metrics.close)
                    await stack.enter_async_context(
                        metrics.listener(self._metrics_listen, self._metrics.registry))
                return await self._supervise()
        finally:
            for sock in self._sockets:
                sock.close()
            os.close(self._lifeline)
            os.close(self._lifeline_held)

    async def _supervise(self) -> int:
        loop = asyncio.get_running_loop()
        slots = [asyncio.create_task(self._keep(index, sock))
                 for index, sock in enumerate(self._sockets)]
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._pass_on, signal.SIGHUP)  # reload
        log.info("gateway_supervising workers=%d pid=%d", len(slots), os.getpid())
        await asyncio.gather(*slots)
        return 0 if self._clean else 1

    def _stop(self, sig: signal.Signals) -> None:
        self._stopping = True
        self._pass_on(sig)

    def _pass_on(self, sig: signal.Signals) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    async def _keep(self, index: int, sock: socket.socket) -> None:
        """Run slot `index`'s worker until the supervisor stops; restart it when it dies."""
        pause = 0.0
        while not self._stopping:
            started = time.monotonic()
            env = {**os.environ, LISTEN_FD: str(sock.fileno()),
                   LIFELINE_FD: str(self._lifeline),
                   **(self._metrics.environment() if self._metrics else {})}
            # A worker starts with SIGHUP blocked, and unblocks it once it reloads on it
            # (server.serve): a reload signalled while it starts waits for it, instead of
            # killing it (SIGHUP's default action). The blocked mask passes through fork and
            # exec; a SIGHUP to the supervisor meanwhile waits too, for the line after. One
            # start at a time, so that no other restores the mask while this one forks.
            async with self._starting:
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *self._argv, pass_fds=(sock.fileno(), self._lifeline), env=env)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self._procs[index] = proc
            if self._stopping:  # a signal came while it started
                proc.terminate()
            status = await proc.wait()
            if self._metrics is not None:
                self._metrics.worker_gone(proc.pid)
            if self._stopping:
                if status != 0:
                    self._clean = False
                return
            log.error("gateway_worker_died slot=%d pid=%d status=%d (restarting)", index,
                      proc.pid, status)
            pause = min(_MAX_PAUSE, pause * 2 or 0.5) \
                if time.monotonic() - started < _FAST_EXIT else 0.0
            if pause:
                await asyncio.sleep(pause)


def worker_argv() -> list[str]:
    """The command that started this process, to start each worker the same way."""
    return [sys.executable, "-m", "gateway", *sys.argv[1:]]
