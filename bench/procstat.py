"""What a server under test costs the machine: CPU time and resident memory of a process and
all its descendants (a supervisor and its workers, Apache and its children), read from /proc.

Linux only, no psutil. CPU is utime + stime of every live process of the tree plus cutime +
cstime (the time of children it has already reaped), so a worker or an Apache child that
exits during a measurement still counts: its time moves into its parent's cutime when it is
reaped. Memory is sampled (every `interval` seconds, in a thread) as the sum of the tree's
resident set (Rss) and of its proportional set (Pss: a page shared by k processes counts 1/k
in each), from /proc/PID/smaps_rollup; a peak between two samples is missed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

TICKS = os.sysconf("SC_CLK_TCK")
_KIB = 1024


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses):
    index 0 is field 3 (state) of proc(5), so field n is at n - 3."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:  # it exited meanwhile
        return None
    return text.rpartition(")")[2].split()


def tree(root: int) -> list[int]:
    """`root` and every descendant of it alive now (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def cpu_seconds(roots: Iterable[int]) -> float:
    """CPU time (user + system) the trees under `roots` have used so far, reaped children
    included."""
    ticks = 0
    for root in roots:
        for pid in tree(root):
            fields = _stat_fields(pid)
            if fields is not None:  # utime, stime, cutime, cstime: fields 14 to 17
                ticks += sum(int(value) for value in fields[11:15])
    return ticks / TICKS


@dataclass(frozen=True)
class Memory:
    rss: int  # bytes, summed over the processes
    pss: int


def memory(pids: Iterable[int]) -> Memory:
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * _KIB
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * _KIB
        except (OSError, ValueError):  # exited meanwhile
            continue
    return Memory(rss, pss)


def tree_memory(roots: Iterable[int]) -> Memory:
    pids = [pid for root in roots for pid in tree(root)]
    return memory(pids)


def rss_by_process(root: int) -> dict[int, int]:
    """Each process of the tree and its resident set, bytes."""
    return {pid: memory([pid]).rss for pid in tree(root)}


class Usage:
    """A measurement of the trees under `roots`, as a context manager: CPU seconds used
    inside it (`cpu`), and the peak of the summed Rss and Pss sampled inside it (`peak`)."""

    def __init__(self, roots: Iterable[int], interval: float = 0.25) -> None:
        self._roots = list(roots)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._cpu_start = 0.0
        self.cpu = 0.0
        self.peak = Memory(0, 0)

    def _sample(self) -> None:
        pids: list[int] = []
        rescan = 0.0
        while True:
            now = time.monotonic()
            if now >= rescan:  # new processes (Apache starts children under load)
                pids = [pid for root in self._roots for pid in tree(root)]
                rescan = now + 1.0
            sample = memory(pids)
            self.peak = Memory(max(self.peak.rss, sample.rss), max(self.peak.pss, sample.pss))
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> Usage:
        self._cpu_start = cpu_seconds(self._roots)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cpu = cpu_seconds(self._roots) - self._cpu_start
        self._stop.set()
        self._thread.join()
        last = tree_memory(self._roots)  # and once at the end, so no run has no sample
        self.peak = Memory(max(self.peak.rss, last.rss), max(self.peak.pss, last.pss))
